"""Configuration: local defaults start; every fail-closed rule is reported, naming the variable."""

import base64
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclave.config import ConfigError, LOCAL_DEFAULT_RPC_SECRET, load_settings, read_dotenv

ROOT = Path(__file__).resolve().parent.parent
STRONG_SECRET = "s" * 40
KEY_PEM = ec.generate_private_key(ec.SECP384R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption()).decode()


def strict_env(env: str, **overrides) -> dict:
    """A valid staging/production environment, with overrides (None removes a variable)."""
    base = {
        "ALFRED_ENV": env,
        "ENCLAVE_RUNTIME_MODE": "remote",
        "TEE_ATTESTATION_DOCUMENT_PATH": "/dev/nsm",
        "TEE_ATTESTATION_REQUIRED": "true",
        "TEE_ALLOW_INSECURE_DEV_ATTESTATION": "false",
        "TEE_ATTESTATION_SIGNING_PRIVATE_KEY": KEY_PEM,
        "ENCLAVE_RPC_SHARED_SECRET": STRONG_SECRET,
    }
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def problems(environ: dict) -> list[str]:
    try:
        load_settings(environ)
    except ConfigError as exc:
        return exc.problems
    return []


class LocalDefaults(unittest.TestCase):
    def test_empty_environment_is_a_working_local_setup(self):
        s = load_settings({})
        self.assertEqual((s.env, s.mode), ("local", "dev-shim"))
        self.assertEqual(str(s.http_listen), "tcp:127.0.0.1:8181")
        self.assertEqual(str(s.secrets_listen), "tcp:127.0.0.1:7777")
        self.assertEqual(s.rpc_shared_secret, LOCAL_DEFAULT_RPC_SECRET)
        self.assertTrue(s.allow_insecure_dev_attestation)
        self.assertFalse(s.attestation_required)
        self.assertEqual(s.secrets_initial_timeout_s, 5.0)
        self.assertEqual(s.rpc_max_skew_s, 30)

    def test_http_listen_follows_the_base_url(self):
        s = load_settings({"ENCLAVE_RUNTIME_BASE_URL": "http://127.0.0.1:9191"})
        self.assertEqual(str(s.http_listen), "tcp:127.0.0.1:9191")

    def test_valid_strict_environments_load(self):
        for env in ("staging", "production"):
            with self.subTest(env=env):
                s = load_settings(strict_env(env))
                self.assertEqual(s.mode, "remote")
                self.assertEqual(str(s.secrets_listen), "vsock:ANY:7777")
                self.assertEqual(s.certs_dir, Path("/opt/enclave/certs"))

    def test_signing_key_from_file(self):
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
            f.write(KEY_PEM)
            f.flush()
            s = load_settings({"TEE_ATTESTATION_SIGNING_PRIVATE_KEY": "@" + f.name})
            self.assertEqual(s.signing_private_key_pem, KEY_PEM.encode())

    def test_dotenv_is_read_and_the_environment_wins(self):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d, ".env")
            path.write_text("# comment\nexport ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS=45\n"
                            "ENCLAVE_RUNTIME_BASE_URL='http://127.0.0.1:9999'\n")
            self.assertEqual(read_dotenv(path)["ENCLAVE_RUNTIME_BASE_URL"], "http://127.0.0.1:9999")
            s = load_settings({"ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS": "20"}, dotenv=str(path))
            self.assertEqual(s.rpc_max_skew_s, 20)
            self.assertEqual(str(s.http_listen), "tcp:127.0.0.1:9999")


class FailClosed(unittest.TestCase):
    # (name, environment overrides, the variable the problem must name)
    STRICT_RULES = [
        ("dev-shim mode", {"ENCLAVE_RUNTIME_MODE": "dev-shim"}, "ENCLAVE_RUNTIME_MODE"),
        ("disabled mode", {"ENCLAVE_RUNTIME_MODE": "disabled"}, "ENCLAVE_RUNTIME_MODE"),
        ("mode left at its default", {"ENCLAVE_RUNTIME_MODE": None}, "ENCLAVE_RUNTIME_MODE"),
        ("no document source", {"TEE_ATTESTATION_DOCUMENT_PATH": None}, "TEE_ATTESTATION_DOCUMENT"),
        ("attestation not required", {"TEE_ATTESTATION_REQUIRED": "false"},
         "TEE_ATTESTATION_REQUIRED"),
        ("attestation required unset", {"TEE_ATTESTATION_REQUIRED": None},
         "TEE_ATTESTATION_REQUIRED"),
        ("insecure dev attestation allowed", {"TEE_ALLOW_INSECURE_DEV_ATTESTATION": "true"},
         "TEE_ALLOW_INSECURE_DEV_ATTESTATION"),
        ("no signing key", {"TEE_ATTESTATION_SIGNING_PRIVATE_KEY": None},
         "TEE_ATTESTATION_SIGNING_PRIVATE_KEY"),
        ("no shared secret", {"ENCLAVE_RPC_SHARED_SECRET": None}, "ENCLAVE_RPC_SHARED_SECRET"),
        ("local default secret", {"ENCLAVE_RPC_SHARED_SECRET": LOCAL_DEFAULT_RPC_SECRET},
         "ENCLAVE_RPC_SHARED_SECRET"),
        ("short secret", {"ENCLAVE_RPC_SHARED_SECRET": "x" * 31}, "ENCLAVE_RPC_SHARED_SECRET"),
        ("token URL override", {"GOOGLE_OAUTH_TOKEN_URL": "https://127.0.0.1:1/token"},
         "GOOGLE_OAUTH_TOKEN_URL"),
        ("revoke URL override", {"GOOGLE_OAUTH_REVOKE_URL": "https://127.0.0.1:1/revoke"},
         "GOOGLE_OAUTH_REVOKE_URL"),
        ("outbound CA override", {"ENCLAVE_OUTBOUND_CA_FILE": "/tmp/ca.pem"},
         "ENCLAVE_OUTBOUND_CA_FILE"),
        ("mTLS material from the environment", {"MTLS_CLIENT_CERT_JSON": "{}"},
         "MTLS_CLIENT_CERT_JSON"),
        ("watermark endpoint from the environment",
         {"ECS_WATERMARK_ENDPOINT": "https://wm.example:8443"}, "ECS_WATERMARK_ENDPOINT"),
        ("empty attestation-required switch", {"TEE_ATTESTATION_REQUIRED": ""},
         "TEE_ATTESTATION_REQUIRED"),
    ]

    def test_every_strict_rule_in_staging_and_production(self):
        for env in ("staging", "production"):
            for name, overrides, variable in self.STRICT_RULES:
                with self.subTest(env=env, rule=name):
                    found = problems(strict_env(env, **overrides))
                    self.assertTrue(found, "a violation must be refused, not fixed up")
                    self.assertTrue(any(variable in p for p in found), found)

    def test_all_violations_are_reported_at_once(self):
        found = problems({"ALFRED_ENV": "production"})
        for variable in ("ENCLAVE_RUNTIME_MODE", "TEE_ATTESTATION_DOCUMENT",
                         "TEE_ATTESTATION_REQUIRED", "TEE_ATTESTATION_SIGNING_PRIVATE_KEY",
                         "ENCLAVE_RPC_SHARED_SECRET"):
            self.assertTrue(any(variable in p for p in found), (variable, found))

    def test_dev_shim_rules_and_strict_values(self):
        cases = [
            ("dev-shim without insecure flag", {"TEE_ALLOW_INSECURE_DEV_ATTESTATION": "false"},
             "TEE_ALLOW_INSECURE_DEV_ATTESTATION"),
            ("dev-shim with attestation required", {"TEE_ATTESTATION_REQUIRED": "true"},
             "TEE_ATTESTATION_REQUIRED"),
            ("unknown env", {"ALFRED_ENV": "prod"}, "ALFRED_ENV"),
            ("unknown mode", {"ENCLAVE_RUNTIME_MODE": "fast"}, "ENCLAVE_RUNTIME_MODE"),
            ("loose boolean", {"TEE_ATTESTATION_REQUIRED": "yes"}, "TEE_ATTESTATION_REQUIRED"),
            ("skew not a number", {"ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS": "30s"},
             "ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS"),
            ("skew too large", {"ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS": "301"},
             "ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS"),
            ("skew zero", {"ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS": "0"},
             "ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS"),
            ("bad listen address", {"ENCLAVE_HTTP_LISTEN": "udp:1.2.3.4:1"}, "ENCLAVE_HTTP_LISTEN"),
            ("bad vsock cid", {"ENCLAVE_SECRETS_LISTEN": "vsock:x:7777"}, "ENCLAVE_SECRETS_LISTEN"),
            ("bad peer", {"ENCLAVE_SECRETS_ALLOWED_PEERS": "vsock:3,evil"},
             "ENCLAVE_SECRETS_ALLOWED_PEERS"),
            ("http watermark endpoint", {"ECS_WATERMARK_ENDPOINT": "http://x:1"},
             "ECS_WATERMARK_ENDPOINT"),
            ("sealing key wrong size",
             {"ENCLAVE_TOKEN_SEALING_KEY": base64.b64encode(b"k" * 16).decode()},
             "ENCLAVE_TOKEN_SEALING_KEY"),
            ("test env with the local secret",
             {"ALFRED_ENV": "test", "ENCLAVE_RPC_SHARED_SECRET": LOCAL_DEFAULT_RPC_SECRET},
             "ENCLAVE_RPC_SHARED_SECRET"),
            ("test env without a secret", {"ALFRED_ENV": "test"}, "ENCLAVE_RPC_SHARED_SECRET"),
            ("unreadable outbound CA", {"ENCLAVE_OUTBOUND_CA_FILE": "/nonexistent/ca.pem"},
             "ENCLAVE_OUTBOUND_CA_FILE"),
            ("bad egress route", {"ENCLAVE_EGRESS_ROUTES": "oauth2.googleapis.com=vsock:3:8443"},
             "ENCLAVE_EGRESS_ROUTES"),
            ("ALFRED_ENV set but empty", {"ALFRED_ENV": ""}, "ALFRED_ENV"),
            ("mode set but empty", {"ENCLAVE_RUNTIME_MODE": ""}, "ENCLAVE_RUNTIME_MODE"),
            ("insecure switch set but empty", {"TEE_ALLOW_INSECURE_DEV_ATTESTATION": ""},
             "TEE_ALLOW_INSECURE_DEV_ATTESTATION"),
            ("a network peer may not deliver secrets",
             {"ENCLAVE_SECRETS_ALLOWED_PEERS": "vsock:3,10.1.2.3"}, "ENCLAVE_SECRETS_ALLOWED_PEERS"),
            ("the any-address is not a peer", {"ENCLAVE_SECRETS_ALLOWED_PEERS": "0.0.0.0"},
             "ENCLAVE_SECRETS_ALLOWED_PEERS"),
            ("skew with an underscore", {"ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS": "3_0"},
             "ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS"),
            ("timeout in Arabic-Indic digits",
             {"ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "\u0665"},
             "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS"),
            ("remote without a document", {"ENCLAVE_RUNTIME_MODE": "remote"},
             "TEE_ATTESTATION_DOCUMENT"),
        ]
        for name, environ, variable in cases:
            with self.subTest(rule=name):
                found = problems(environ)
                self.assertTrue(any(variable in p for p in found), found)

    def test_problems_never_contain_values(self):
        secret = "do-not-print-this-secret-value!!"
        found = problems(strict_env("production", ENCLAVE_RPC_SHARED_SECRET=secret[:20],
                                    TEE_ATTESTATION_REQUIRED="maybe-" + secret))
        self.assertTrue(found)
        for p in found:
            self.assertNotIn(secret[:20], p)

    def test_redacted_view_and_repr_hide_secrets(self):
        s = load_settings(strict_env("production"))
        for shown in (str(s.redacted()), repr(s)):
            self.assertNotIn(STRONG_SECRET, shown)
            self.assertNotIn("PRIVATE KEY", shown)

    def test_loopback_peers_and_fractional_timeouts_are_accepted(self):
        s = load_settings({"ENCLAVE_SECRETS_ALLOWED_PEERS": "vsock:3, 127.0.0.2, ::1",
                           "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "0.5"})
        self.assertEqual(s.secrets_allowed_peers, ("vsock:3", "127.0.0.2", "::1"))
        self.assertEqual(s.secrets_initial_timeout_s, 0.5)


class CheckConfigCommand(unittest.TestCase):
    def run_cli(self, environ):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ALFRED_", "ENCLAVE_", "TEE_", "GOOGLE_", "ECS_", "MTLS_"))}
        env.update(environ)
        return subprocess.run([sys.executable, str(ROOT / "enclave.py"), "check-config"],
                              env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)

    def test_exit_codes_and_redaction(self):
        ok = self.run_cli(strict_env("production"))
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertNotIn(STRONG_SECRET, ok.stdout)
        bad = self.run_cli({"ALFRED_ENV": "production", "ENCLAVE_RPC_SHARED_SECRET": "short-secret"})
        self.assertEqual(bad.returncode, 2)
        self.assertIn("ENCLAVE_RPC_SHARED_SECRET", bad.stderr)
        self.assertNotIn("short-secret", bad.stderr)

    def test_disabled_mode_refuses_to_serve(self):
        result = subprocess.run([sys.executable, str(ROOT / "enclave.py"), "serve"],
                                env={**os.environ, "ENCLAVE_RUNTIME_MODE": "disabled"},
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        self.assertEqual(result.returncode, 2)
        self.assertIn("disabled", result.stderr)


if __name__ == "__main__":
    unittest.main()
