"""Configuration: local defaults start; every fail-closed rule is reported, naming the variable."""

import argparse
import base64
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclave.config import ConfigError, load_settings, read_dotenv
from enclave.rpcauth import LOCAL_DEFAULT_RPC_SECRET
from tests.support import keep_off_console, remember_key_files, remember_private_key

ROOT = Path(__file__).resolve().parent.parent
STRONG_SECRET = "s" * 40
KEY_PEM = ec.generate_private_key(ec.SECP384R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption()).decode()


def strict_env(env: str, **overrides) -> dict:
    """A valid staging/production environment, with overrides (None removes a variable).
    Like the Containerfile's: a per-boot key bound by the NSM, and no secret value at all."""
    base = {
        "ALFRED_ENV": env,
        "ENCLAVE_RUNTIME_MODE": "remote",
        "TEE_ATTESTATION_DOCUMENT_PATH": "/dev/nsm",
        "TEE_ATTESTATION_REQUIRED": "true",
        "TEE_ALLOW_INSECURE_DEV_ATTESTATION": "false",
        "TEE_ATTESTATION_SIGNING_PRIVATE_KEY": "ephemeral",
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
    def test_explicit_local_is_a_working_local_setup(self):
        s = load_settings({"ALFRED_ENV": "local"})
        self.assertEqual((s.env, s.mode), ("local", "dev-shim"))
        self.assertEqual(str(s.http_listen), "tcp:127.0.0.1:8181")
        self.assertEqual(str(s.secrets_listen), "tcp:127.0.0.1:7777")
        self.assertEqual(s.rpc_shared_secret, LOCAL_DEFAULT_RPC_SECRET)
        self.assertTrue(s.allow_local_default_secret)
        self.assertTrue(s.allow_insecure_dev_attestation)
        self.assertFalse(s.attestation_required)
        self.assertEqual(s.secrets_initial_timeout_s, 5.0)
        self.assertEqual(s.rpc_max_skew_s, 30)

    def test_http_listen_follows_the_base_url(self):
        s = load_settings({"ALFRED_ENV": "local",
                           "ENCLAVE_RUNTIME_BASE_URL": "http://127.0.0.1:9191"})
        self.assertEqual(str(s.http_listen), "tcp:127.0.0.1:9191")

    def test_valid_strict_environments_load(self):
        for env in ("staging", "production"):
            with self.subTest(env=env):
                s = load_settings(strict_env(env))
                self.assertIsNone(s.signing_private_key_pem)  # per boot, bound by the NSM
                self.assertIsNone(s.rpc_shared_secret)  # only ever delivered
                self.assertIsNone(s.token_sealing_key)
                self.assertEqual(s.ready_requires, ("rpc_secret", "sealing_key",
                                                    "google_credentials", "mtls"))
                self.assertEqual(s.mode, "remote")
                self.assertEqual(str(s.secrets_listen), "vsock:ANY:7777")
                self.assertEqual(s.certs_dir, Path("/opt/enclave/certs"))

    def test_signing_key_from_file(self):
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
            f.write(KEY_PEM)
            f.flush()
            s = load_settings({"ALFRED_ENV": "local",
                               "TEE_ATTESTATION_SIGNING_PRIVATE_KEY": "@" + f.name})
            self.assertEqual(s.signing_private_key_pem, KEY_PEM.encode())

    def test_dotenv_is_read_and_the_environment_wins(self):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d, ".env")
            path.write_text("# comment\nexport ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS=45\n"
                            "ENCLAVE_RUNTIME_BASE_URL='http://127.0.0.1:9999'\n")
            self.assertEqual(read_dotenv(path)["ENCLAVE_RUNTIME_BASE_URL"], "http://127.0.0.1:9999")
            s = load_settings({"ALFRED_ENV": "local", "ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS": "20"},
                              dotenv=str(path))
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
        ("a signing key in the image with the NSM",
         {"TEE_ATTESTATION_SIGNING_PRIVATE_KEY": KEY_PEM}, "TEE_ATTESTATION_SIGNING_PRIVATE_KEY"),
        ("a per-boot key with a static document",
         {"TEE_ATTESTATION_DOCUMENT_PATH": None, "TEE_ATTESTATION_DOCUMENT": "AAAA"},
         "TEE_ATTESTATION_SIGNING_PRIVATE_KEY"),
        ("shared secret in the environment", {"ENCLAVE_RPC_SHARED_SECRET": STRONG_SECRET},
         "ENCLAVE_RPC_SHARED_SECRET"),
        ("local default secret", {"ENCLAVE_RPC_SHARED_SECRET": LOCAL_DEFAULT_RPC_SECRET},
         "ENCLAVE_RPC_SHARED_SECRET"),
        ("sealing key in the environment",
         {"ENCLAVE_TOKEN_SEALING_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="},
         "ENCLAVE_TOKEN_SEALING_KEY"),
        ("Google client secret in the environment",
         {"GOOGLE_OAUTH_CLIENT_SECRET": "google-secret-in-the-image"},
         "GOOGLE_OAUTH_CLIENT_SECRET"),
        ("unknown readiness part", {"ENCLAVE_READY_REQUIRES": "rpc_secret,coffee"},
         "ENCLAVE_READY_REQUIRES"),
        ("log sink over TCP", {"ENCLAVE_LOG_SINK": "tcp:127.0.0.1:9000"}, "ENCLAVE_LOG_SINK"),
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
        found = problems({"ALFRED_ENV": "production", "ENCLAVE_RPC_SHARED_SECRET": STRONG_SECRET,
                          "MTLS_CLIENT_CERT_JSON": "{}"})
        for variable in ("ENCLAVE_RUNTIME_MODE", "TEE_ATTESTATION_DOCUMENT",
                         "TEE_ATTESTATION_REQUIRED", "TEE_ATTESTATION_SIGNING_PRIVATE_KEY",
                         "ENCLAVE_RPC_SHARED_SECRET", "MTLS_CLIENT_CERT_JSON"):
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
                                    GOOGLE_OAUTH_CLIENT_SECRET=secret,
                                    TEE_ATTESTATION_REQUIRED="maybe-" + secret))
        self.assertTrue(found)
        for p in found:
            self.assertNotIn(secret[:20], p)

    def test_redacted_view_and_repr_hide_secrets(self):
        s = load_settings({"ALFRED_ENV": "local", "ENCLAVE_RPC_SHARED_SECRET": STRONG_SECRET,
                           "TEE_ATTESTATION_SIGNING_PRIVATE_KEY": KEY_PEM})
        for shown in (str(s.redacted()), repr(s)):
            self.assertNotIn(STRONG_SECRET, shown)
            self.assertNotIn("PRIVATE KEY", shown)

    def test_loopback_peers_and_fractional_timeouts_are_accepted(self):
        s = load_settings({"ALFRED_ENV": "local",
                           "ENCLAVE_SECRETS_ALLOWED_PEERS": "vsock:3, 127.0.0.2, ::1",
                           "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "0.5"})
        self.assertEqual(s.secrets_allowed_peers, ("vsock:3", "127.0.0.2", "::1"))
        self.assertEqual(s.secrets_initial_timeout_s, 0.5)


class LocalDefaultSecret(unittest.TestCase):
    """The published local RPC secret (and the dev-shim defaults) only with ALFRED_ENV=local set
    explicitly AND both listeners on loopback; anything else without a secret is refused."""

    LOCAL = {"ALFRED_ENV": "local"}
    # (name, environment, the variables every refusal must name together)
    REFUSED = [
        ("ALFRED_ENV unset, no secret", {}, ("ALFRED_ENV", "ENCLAVE_RPC_SHARED_SECRET")),
        ("ALFRED_ENV unset, the local default given explicitly",
         {"ENCLAVE_RPC_SHARED_SECRET": LOCAL_DEFAULT_RPC_SECRET},
         ("ALFRED_ENV", "ENCLAVE_RPC_SHARED_SECRET")),
        ("HTTP on every interface", {**LOCAL, "ENCLAVE_HTTP_LISTEN": "tcp:0.0.0.0:8181"},
         ("ENCLAVE_HTTP_LISTEN", "ENCLAVE_RPC_SHARED_SECRET")),
        ("HTTP on vsock", {**LOCAL, "ENCLAVE_HTTP_LISTEN": "vsock:ANY:8181"},
         ("ENCLAVE_HTTP_LISTEN", "ENCLAVE_RPC_SHARED_SECRET")),
        ("HTTP from a public base URL",
         {**LOCAL, "ENCLAVE_RUNTIME_BASE_URL": "http://0.0.0.0:8181"},
         ("ENCLAVE_HTTP_LISTEN", "ENCLAVE_RPC_SHARED_SECRET")),
        ("HTTP on a host name", {**LOCAL, "ENCLAVE_HTTP_LISTEN": "tcp:example.com:8181"},
         ("ENCLAVE_HTTP_LISTEN", "ENCLAVE_RPC_SHARED_SECRET")),
        ("secrets on vsock", {**LOCAL, "ENCLAVE_SECRETS_LISTEN": "vsock:ANY:7777"},
         ("ENCLAVE_SECRETS_LISTEN", "ENCLAVE_RPC_SHARED_SECRET")),
        ("the local default given explicitly, HTTP on every interface",
         {**LOCAL, "ENCLAVE_HTTP_LISTEN": "tcp:0.0.0.0:8181",
          "ENCLAVE_RPC_SHARED_SECRET": LOCAL_DEFAULT_RPC_SECRET},
         ("ENCLAVE_HTTP_LISTEN", "ENCLAVE_RPC_SHARED_SECRET")),
        ("dev-shim by default, ALFRED_ENV unset", {"ENCLAVE_RPC_SHARED_SECRET": STRONG_SECRET},
         ("ALFRED_ENV", "TEE_ALLOW_INSECURE_DEV_ATTESTATION")),
        ("dev-shim by default, HTTP on every interface",
         {**LOCAL, "ENCLAVE_HTTP_LISTEN": "tcp:0.0.0.0:8181",
          "ENCLAVE_RPC_SHARED_SECRET": STRONG_SECRET},
         ("ENCLAVE_HTTP_LISTEN", "TEE_ALLOW_INSECURE_DEV_ATTESTATION")),
    ]
    # (name, environment, allow_local_default_secret)
    ACCEPTED = [
        ("explicit local, loopback", LOCAL, True),
        ("explicit local, IPv6 loopback and localhost",
         {**LOCAL, "ENCLAVE_HTTP_LISTEN": "tcp:[::1]:8181",
          "ENCLAVE_SECRETS_LISTEN": "tcp:localhost:7777"}, True),
        ("ALFRED_ENV unset with a secret and the dev-shim opt-in",
         {"ENCLAVE_RPC_SHARED_SECRET": STRONG_SECRET, "TEE_ALLOW_INSECURE_DEV_ATTESTATION": "true"},
         False),
        ("explicit local on every interface with a secret and the dev-shim opt-in",
         {**LOCAL, "ENCLAVE_HTTP_LISTEN": "tcp:0.0.0.0:8181",
          "ENCLAVE_RPC_SHARED_SECRET": STRONG_SECRET,
          "TEE_ALLOW_INSECURE_DEV_ATTESTATION": "true"}, False),
    ]

    def test_refused_without_a_secret_naming_the_variables(self):
        for name, environ, variables in self.REFUSED:
            with self.subTest(name):
                found = problems(environ)
                self.assertTrue(found, "the published secret must not be accepted here")
                for variable in variables:
                    self.assertTrue(any(variable in p for p in found), (variable, found))

    def test_accepted(self):
        for name, environ, allowed in self.ACCEPTED:
            with self.subTest(name):
                s = load_settings(environ)
                self.assertEqual(s.allow_local_default_secret, allowed)
                if not allowed:
                    self.assertNotEqual(s.rpc_shared_secret, LOCAL_DEFAULT_RPC_SECRET)

    def test_settings_built_directly_never_allow_it(self):
        from enclave.config import Settings
        self.assertFalse(Settings().allow_local_default_secret)


class NonUtf8Environment(unittest.TestCase):
    """os.environ holds undecodable bytes as lone surrogates: refused, naming the variable."""

    def test_undecodable_values_are_refused(self):
        for name in ("ENCLAVE_RPC_SHARED_SECRET", "ENCLAVE_RUNTIME_BASE_URL",
                     "GOOGLE_OAUTH_CLIENT_SECRET", "ALFRED_ENV"):
            with self.subTest(name):
                environ = {"ALFRED_ENV": "local", name: "abc\udcff\udcfedef-long-enough-value"}
                found = problems(environ)
                self.assertTrue(any(p.startswith(name) and "UTF-8" in p for p in found), found)
                self.assertEqual(sum(name in p for p in found), 1, found)


class Messages(unittest.TestCase):
    def test_numbers_out_of_range_say_their_range(self):
        cases = [
            ("negative skew", "ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS", "-5", ("1", "300")),
            ("skew too large", "ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS", "301", ("1", "300")),
            ("fractional skew", "ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS", "2.5", ("1", "300")),
            ("negative timeout", "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS", "-1", ("0", "600")),
            ("timeout not a number", "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS", "5s",
             ("0", "600")),
        ]
        for name, variable, value, bounds in cases:
            with self.subTest(name):
                found = [p for p in problems({"ALFRED_ENV": "local", variable: value})
                         if variable in p]
                self.assertEqual(len(found), 1, found)
                for bound in bounds:
                    self.assertRegex(found[0], rf"\b{re.escape(bound)}\b")

    def test_no_problem_names_a_variable_twice(self):
        names = re.compile(r"\b(?:ALFRED|ENCLAVE|TEE|GOOGLE|ECS|MTLS)_[A-Z_]+\b")
        cases = [
            {"ENCLAVE_EGRESS_ROUTES": "bad"},
            {"ENCLAVE_EGRESS_ROUTES": "x:1=vsock:3:1,x:1=vsock:3:2"},
            {"ENCLAVE_HTTP_LISTEN": "udp:1.2.3.4:1"},
            {"ENCLAVE_SECRETS_LISTEN": "vsock:x:7777"},
            {"TEE_ATTESTATION_SIGNING_PRIVATE_KEY": "@/nonexistent/key.pem"},
            {"ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS": "-1"},
        ]
        for environ in cases:
            with self.subTest(environ):
                found = problems({"ALFRED_ENV": "local", **environ})
                self.assertTrue(found)
                for p in found:
                    counts = {n: names.findall(p).count(n) for n in names.findall(p)}
                    self.assertTrue(all(c == 1 for c in counts.values()), p)

    def test_env_file_errors_name_the_file(self):
        with tempfile.TemporaryDirectory() as d:
            not_utf8 = Path(d, "latin1.env")
            not_utf8.write_bytes(b"ENCLAVE_RPC_SHARED_SECRET=caf\xe9\n")
            cases = [("missing", str(Path(d, "missing.env"))), ("a directory", d),
                     ("not UTF-8", str(not_utf8))]
            for name, path in cases:
                with self.subTest(name), self.assertRaises(ConfigError) as ctx:
                    load_settings({"ALFRED_ENV": "local"}, dotenv=path)
                message = "; ".join(ctx.exception.problems)
                self.assertIn("--env-file", message)
                self.assertIn(path, message)
                self.assertNotIn("ENCLAVE_DOTENV", message)
                self.assertEqual(message.count(path), 1, message)


class CheckConfigRunsServesChecks(unittest.TestCase):
    """check-config refuses (exit 2, every problem at once) what serve refuses before binding."""

    @classmethod
    def setUpClass(cls):
        from enclave import attestation, devpki, identity
        cls._tmp = tempfile.TemporaryDirectory()
        cls.dir = Path(cls._tmp.name)
        key = ec.generate_private_key(ec.SECP384R1())
        cls.key_pem = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
        remember_private_key(cls.key_pem)
        root = devpki.load_or_create_root(cls.dir / "minter")
        remember_key_files(cls.dir / "minter")

        def mint(pem: str) -> bytes:
            ident = identity.SigningIdentity.from_pem(pem.encode())
            return attestation.DevShimSource(ident, root).document()

        cls.document_b64 = base64.b64encode(mint(cls.key_pem)).decode()
        cls.doc_file = cls.write("doc.b64", cls.document_b64)
        cls.other_doc_file = cls.write("other.b64", base64.b64encode(mint(KEY_PEM)).decode())
        cls.garbage_file = cls.write("garbage.b64", "bm90IGEgZG9jdW1lbnQ=")
        cls.garbage_key_file = cls.write("garbage.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n")
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cls.rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode()
        remember_private_key(cls.rsa_pem)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    @classmethod
    def write(cls, name: str, text: str) -> str:
        path = cls.dir / name
        path.write_text(text)
        return str(path)

    def static(self, **overrides) -> dict:
        """A valid local configuration with a static document minted for the signing key."""
        base = {"ALFRED_ENV": "local", "ENCLAVE_RUNTIME_MODE": "remote",
                "ENCLAVE_STATE_DIR": str(self.dir / "state"),
                "TEE_ATTESTATION_SIGNING_PRIVATE_KEY": self.key_pem,
                "TEE_ATTESTATION_DOCUMENT_PATH": self.doc_file}
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    def check_config(self, environ: dict) -> tuple[int, str, str]:
        from enclave.host import check_config
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, environ, clear=True), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = check_config.run(argparse.Namespace(env_file=None))
        return code, out.getvalue(), err.getvalue()

    def test_a_good_static_configuration_passes_and_writes_nothing(self):
        for name, environ in (("static document", self.static()),
                              ("inline document", self.static(
                                  TEE_ATTESTATION_DOCUMENT_PATH=None,
                                  TEE_ATTESTATION_DOCUMENT=self.document_b64)),
                              ("dev-shim", {"ALFRED_ENV": "local",
                                            "ENCLAVE_STATE_DIR": str(self.dir / "state")})):
            with self.subTest(name):
                code, out, err = self.check_config(environ)
                self.assertEqual(code, 0, err)
                self.assertFalse((self.dir / "state").exists(), "check-config wrote files")

    def test_each_problem_serve_refuses(self):
        cases = [
            ("key is not a PEM", {"TEE_ATTESTATION_SIGNING_PRIVATE_KEY": "not a key"},
             "TEE_ATTESTATION_SIGNING_PRIVATE_KEY"),
            ("key file holds no PEM key",
             {"TEE_ATTESTATION_SIGNING_PRIVATE_KEY": "@" + self.garbage_key_file},
             "TEE_ATTESTATION_SIGNING_PRIVATE_KEY"),
            ("unsupported key type (RSA)", {"TEE_ATTESTATION_SIGNING_PRIVATE_KEY": self.rsa_pem},
             "TEE_ATTESTATION_SIGNING_PRIVATE_KEY"),
            ("missing document file",
             {"TEE_ATTESTATION_DOCUMENT_PATH": str(self.dir / "missing.b64")},
             "TEE_ATTESTATION_DOCUMENT_PATH"),
            ("document file is not a document",
             {"TEE_ATTESTATION_DOCUMENT_PATH": self.garbage_file}, "TEE_ATTESTATION_DOCUMENT_PATH"),
            ("document minted for another key",
             {"TEE_ATTESTATION_DOCUMENT_PATH": self.other_doc_file},
             "TEE_ATTESTATION_DOCUMENT_PATH"),
            ("inline document not base64",
             {"TEE_ATTESTATION_DOCUMENT_PATH": None, "TEE_ATTESTATION_DOCUMENT": "%%%"},
             "TEE_ATTESTATION_DOCUMENT"),
            ("malformed MTLS_CLIENT_CERT_JSON", {"MTLS_CLIENT_CERT_JSON": "{"},
             "MTLS_CLIENT_CERT_JSON"),
            ("MTLS_CLIENT_CERT_JSON without its fields", {"MTLS_CLIENT_CERT_JSON": "{}"},
             "MTLS_CLIENT_CERT_JSON"),
            ("MTLS_CLIENT_CERT_JSON with a non-PEM certificate",
             {"MTLS_CLIENT_CERT_JSON": json.dumps({"client_cert": "x", "client_key": "y",
                                                   "ca_cert": "z"})},
             "MTLS_CLIENT_CERT_JSON"),
        ]
        for name, overrides, variable in cases:
            with self.subTest(name):
                code, out, err = self.check_config(self.static(**overrides))
                self.assertEqual((code, out), (2, ""), err)
                self.assertIn(variable, err)
                self.assertNotIn("Traceback", err)
                self.assertTrue(any(l.startswith(f"  - {variable}") for l in err.splitlines()),
                                err)

    def test_every_problem_at_once(self):
        code, out, err = self.check_config(self.static(
            TEE_ATTESTATION_SIGNING_PRIVATE_KEY="not a key",
            TEE_ATTESTATION_DOCUMENT_PATH=str(self.dir / "missing.b64"),
            MTLS_CLIENT_CERT_JSON="{"))
        self.assertEqual(code, 2, err)
        lines = [l for l in err.splitlines() if l.startswith("  - ")]
        for variable in ("TEE_ATTESTATION_SIGNING_PRIVATE_KEY", "TEE_ATTESTATION_DOCUMENT_PATH",
                         "MTLS_CLIENT_CERT_JSON"):
            self.assertTrue(any(variable in l for l in lines), (variable, err))
        self.assertNotIn("PRIVATE KEY", err)


class CheckConfigCommand(unittest.TestCase):
    def run_cli(self, environ, command="check-config", timeout=60):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ALFRED_", "ENCLAVE_", "TEE_", "GOOGLE_", "ECS_", "MTLS_"))}
        env.update(environ)
        return subprocess.run([sys.executable, str(ROOT / "enclave.py"), command],
                              env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def test_exit_codes_and_redaction(self):
        ok = self.run_cli(strict_env("production"))
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertNotIn(STRONG_SECRET, ok.stdout)
        bad = self.run_cli({"ALFRED_ENV": "production", "ENCLAVE_RPC_SHARED_SECRET": "short-secret"})
        self.assertEqual(bad.returncode, 2)
        self.assertIn("ENCLAVE_RPC_SHARED_SECRET", bad.stderr)
        self.assertNotIn("short-secret", bad.stderr)

    def test_unset_alfred_env_without_a_secret_exits_2(self):
        with tempfile.TemporaryDirectory() as state:
            # Ports 0 and a scratch state directory: should serve start anyway, it harms nothing.
            environ = {"ENCLAVE_HTTP_LISTEN": "tcp:127.0.0.1:0",
                       "ENCLAVE_SECRETS_LISTEN": "tcp:127.0.0.1:0",
                       "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "0",
                       "ENCLAVE_STATE_DIR": state, "ENCLAVE_CERTS_DIR": state}
            for command in ("check-config", "serve"):
                with self.subTest(command):
                    result = self.run_cli(environ, command, timeout=20)
                    self.assertEqual(result.returncode, 2, result.stderr)
                    self.assertIn("ALFRED_ENV", result.stderr)
                    self.assertIn("ENCLAVE_RPC_SHARED_SECRET", result.stderr)

    def test_undecodable_secret_in_the_environment_is_refused(self):
        env = {k: v for k, v in os.environb.items()
               if not k.startswith((b"ALFRED_", b"ENCLAVE_", b"TEE_", b"GOOGLE_", b"ECS_",
                                    b"MTLS_"))}
        env[b"ALFRED_ENV"] = b"local"
        env[b"ENCLAVE_RPC_SHARED_SECRET"] = b"caf\xe9-not-utf8-\xff\xfe-rpc-secret"
        result = subprocess.run([sys.executable, str(ROOT / "enclave.py"), "check-config"],
                                env=env, capture_output=True, timeout=60, cwd=ROOT)
        stderr = result.stderr.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 2, stderr)
        self.assertIn("ENCLAVE_RPC_SHARED_SECRET", stderr)
        self.assertIn("UTF-8", stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertNotIn(b"not-utf8", result.stdout + result.stderr)

    def test_disabled_mode_refuses_to_serve(self):
        result = subprocess.run([sys.executable, str(ROOT / "enclave.py"), "serve"],
                                env={**os.environ, "ALFRED_ENV": "local",
                                     "ENCLAVE_RUNTIME_MODE": "disabled"},
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        self.assertEqual(result.returncode, 2)
        self.assertIn("disabled", result.stderr)


if __name__ == "__main__":
    unittest.main()
