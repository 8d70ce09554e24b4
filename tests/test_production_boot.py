"""The Containerfile's environment IS the production configuration, and it boots.

The ENV lines are read from the Containerfile itself, so the image and this test cannot drift.
With exactly them, `check-config` passes; the runtime started in-process with them (listeners
switched to loopback TCP, the start-up window shortened, /dev/nsm replaced by the fake NSM that
speaks the real ioctl CBOR, documents signed by a test root) comes up NOT ready, answers RPCs
with 503 not_ready naming what is missing, becomes ready on one secrets delivery, passes
`probe --require-attestation --root <test root> --pcr 0=...`, binds its per-boot key in every
document, and gets a different key after a restart.

The image takes only SEALED deliveries (ENCLAVE_SECRETS_SOURCE=kms). Its KMS is the fake KMS,
reached the production way: the image's own egress route for kms.us-east-1.amazonaws.com:443,
whose final AF_VSOCK connect alone is swapped for loopback TCP, with TLS checked for that host
name against a test CA standing in for the bundled Amazon roots.
"""

import base64
import contextlib
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
from pathlib import Path
from unittest import mock

from enclave import cli, egress, envelope, kms, nsm, tls
from enclave.config import load_settings
from enclave.outbound import OutboundClient
from enclave.nitro import AT_DOCUMENT_TIME, Verifier
from enclave.rpcauth import new_nonce, sign_request
from enclave.service import start
from tests.fakes.fake_kms import FakeKms
from tests.fakes.fake_nsm import FakeNsm, make_test_root
from tests.fakes.pki import TestCA
from tests.stack import send_secrets
from tests.support import keep_off_console, remember_secret, scan_later

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"
SUBPROCESS_TIMEOUT_S = 60
STOP_WITHIN_S = 6.0  # docs/DESIGN.md §2: SIGTERM at any phase exits 0 within 6 s
RPC_SECRET = "production-boot-rpc-secret-" + "r" * 24
SEALING_KEY_B64 = base64.b64encode(bytes(range(100, 132))).decode()
GOOGLE_CLIENT_SECRET = "production-boot-google-client-secret"
remember_secret(RPC_SECRET, kind="rpc shared secret")
remember_secret(GOOGLE_CLIENT_SECRET, kind="google client secret")
remember_secret(bytes(range(100, 132)), kind="token sealing key")
# The loopback stand-ins for the enclave's VSOCK listeners and paths: nothing else changes.
TEST_OVERRIDES = {
    "ENCLAVE_HTTP_LISTEN": "tcp:127.0.0.1:0",
    "ENCLAVE_SECRETS_LISTEN": "tcp:127.0.0.1:0",
    "ENCLAVE_SECRETS_ALLOWED_PEERS": "127.0.0.1",
    "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "0",  # the window itself: SigtermTest
}
_quiet = []


def setUpModule():
    _quiet.append(keep_off_console("enclave"))


def tearDownModule():
    while _quiet:
        _quiet.pop()()


def image_environment(path: Path = CONTAINERFILE) -> dict[str, str]:
    """Every variable the Containerfile's ENV instructions set (KEY=VALUE form, continuations
    joined), as the image's processes see them."""
    text = path.read_text()
    logical = re.sub(r"\\\n", " ", text)
    env: dict[str, str] = {}
    for line in logical.splitlines():
        if line.strip().upper().startswith("ENV "):
            for word in shlex.split(line.strip()[4:], comments=True):
                key, sep, value = word.partition("=")
                if not sep:
                    raise ValueError(f"Containerfile: ENV {word!r} is not KEY=VALUE")
                env[key] = value
    return env


class TheImageEnvironment(unittest.TestCase):
    def test_it_is_the_production_configuration_and_holds_no_secret(self):
        env = image_environment()
        self.assertEqual(env["ALFRED_ENV"], "production")
        self.assertEqual(env["TEE_ATTESTATION_SIGNING_PRIVATE_KEY"], "ephemeral")
        self.assertEqual(env["TEE_ATTESTATION_DOCUMENT_PATH"], "/dev/nsm")
        for name in ("ENCLAVE_RPC_SHARED_SECRET", "ENCLAVE_TOKEN_SEALING_KEY",
                     "GOOGLE_OAUTH_CLIENT_SECRET", "MTLS_CLIENT_CERT_JSON"):
            self.assertNotIn(name, env)

    def test_the_parser_reads_continuations_and_refuses_other_forms(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "Containerfile"
            path.write_text('FROM x\nENV A=1 \\\n    B="two words" \\\n    C=3\nRUN echo\n')
            self.assertEqual(image_environment(path), {"A": "1", "B": "two words", "C": "3"})
            path.write_text("ENV A 1\n")
            with self.assertRaises(ValueError):
                image_environment(path)

    def test_check_config_exits_0_with_exactly_the_image_environment(self):
        env = dict(image_environment())
        proc = subprocess.run([sys.executable, str(ROOT / "enclave.py"), "check-config"],
                              cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)
        scan_later(proc.stdout + proc.stderr, "check-config with the image environment")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        shown = json.loads(proc.stdout)
        self.assertEqual((shown["env"], shown["mode"]), ("production", "remote"))
        self.assertIsNone(shown["rpc_shared_secret"])

    def test_a_secret_added_to_the_image_is_refused_by_name(self):
        for name, value in (("ENCLAVE_RPC_SHARED_SECRET", RPC_SECRET),
                            ("ENCLAVE_TOKEN_SEALING_KEY", SEALING_KEY_B64),
                            ("GOOGLE_OAUTH_CLIENT_SECRET", GOOGLE_CLIENT_SECRET),
                            ("MTLS_CLIENT_CERT_JSON", "{}")):
            with self.subTest(name):
                env = {**image_environment(), name: value}
                proc = subprocess.run([sys.executable, str(ROOT / "enclave.py"), "check-config"],
                                      cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=SUBPROCESS_TIMEOUT_S)
                self.assertEqual(proc.returncode, 2)
                self.assertIn(name, proc.stderr)
                self.assertNotIn(value, proc.stderr + proc.stdout)


FAKE_NSM_PCR0 = bytes([1]) * 48  # tests/fakes/fake_nsm.py: PCRn is bytes([n + 1]) * 48
KMS_ROUTE_VSOCK = (3, 8002)  # the image's route for kms.us-east-1.amazonaws.com:443


class BootCase(unittest.TestCase):
    """Boots the runtime from the image's configuration on a fake NSM; helpers to talk to it."""

    @classmethod
    def setUpClass(cls):
        cls.root = make_test_root()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.root_pem = Path(cls._tmp.name) / "test-root.pem"
        cls.root_pem.write_bytes(cls.root.cert_pem)
        cls.ca = TestCA("Production Boot Test CA")
        cls.ca_file = cls.ca.write(cls._tmp.name, "ca")
        cls.client = cls.ca.issue("enclave-client-1")
        image = image_environment()
        cls.key_arn, cls.region = envelope.parse_key_arn(image["ENCLAVE_KMS_KEY_ARN"])
        kms_host = f"kms.{cls.region}.amazonaws.com"
        server = cls.ca.issue(kms_host, server=True, hosts=(kms_host, "127.0.0.1"))
        cert, key = server.write(cls._tmp.name, "kms")
        account, key_id = cls.key_arn.split(":")[4], cls.key_arn.rsplit("/", 1)[1]
        # Its key policy: documents from the test root, the fake NSM's PCR0 only.
        cls.fake_kms = FakeKms(attestation_roots=[cls.root.cert_der],
                               allowed_pcr0=[FAKE_NSM_PCR0], region=cls.region, account=account,
                               key_id=key_id, cert_file=cert, key_file=key).start()
        assert cls.fake_kms.key_arn == cls.key_arn
        cls.sealer = OutboundClient(context=tls.pinned_roots_context(ca_file=cls.ca_file))
        cls.bundle_version = 0

    @classmethod
    def tearDownClass(cls):
        cls.sealer.close()
        cls.fake_kms.stop()
        cls._tmp.cleanup()

    def _kms_over_the_route(self, sock, address):
        """The final connect of the image's KMS route, to the fake on loopback (nothing else)."""
        self.assertEqual(address, KMS_ROUTE_VSOCK, "only the KMS route is used in these tests")
        sock.close()
        return socket.create_connection(("127.0.0.1", self.fake_kms.port), timeout=10)

    def boot(self, **extra_env):
        """A runtime started in-process from the image environment; (running, fake NSM)."""
        fake = FakeNsm(self.root)
        self.addCleanup(fake.cleanup)
        state = tempfile.TemporaryDirectory()
        self.addCleanup(state.cleanup)
        env = {**image_environment(), **TEST_OVERRIDES,
               "ENCLAVE_CERTS_DIR": os.path.join(state.name, "certs"),
               "ENCLAVE_STATE_DIR": os.path.join(state.name, "state"), **extra_env}
        env.pop("ENCLAVE_LOG_SINK", None)  # the parent's log receiver: not on this machine
        settings = load_settings(env)
        # The image's egress routes point at the parent (CID 3), which is not here: the KMS route
        # reaches the fake KMS on loopback, any other route fails the test.
        route = mock.patch.object(egress, "_vsock_connect", self._kms_over_the_route)
        route.start()
        self.addCleanup(route.stop)
        real_device = nsm.NsmDevice
        with mock.patch.object(nsm, "NsmDevice",
                               lambda path: real_device(fake.device_path, ioctl=fake.ioctl)), \
                mock.patch.object(kms, "amazon_roots_pem", lambda: self.ca.cert_pem.decode()):
            running = start(settings)
        self.addCleanup(running.stop)
        return running, fake

    def call(self, running, method, target, body=None, secret=None):
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if secret:
            headers.update(sign_request(secret, method, target, body or b"", int(time.time()),
                                        new_nonce()))
        request = urllib.request.Request(f"http://127.0.0.1:{running.http.port}{target}",
                                         data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def delivery(self, **extra) -> dict:
        payload = {
            "ENCLAVE_RPC_SHARED_SECRET": RPC_SECRET,
            "ENCLAVE_TOKEN_SEALING_KEY": SEALING_KEY_B64,
            "GOOGLE_OAUTH_CLIENT_ID": "boot-client.apps.googleusercontent.com",
            "GOOGLE_OAUTH_CLIENT_SECRET": GOOGLE_CLIENT_SECRET,
            "MTLS_CLIENT_CERT_JSON": {"client_cert": self.client.cert_pem.decode(),
                                      "client_key": self.client.key_pem.decode(),
                                      "ca_cert": self.ca.cert_pem.decode()},
            "ECS_WATERMARK_ENDPOINT": "https://watermark.internal.example",  # the image's route
        }
        payload.update(extra)
        return payload

    def seal(self, payload: dict) -> dict:
        """What the operator's seal-secrets makes: the payload sealed under the image's key."""
        type(self).bundle_version += 1
        version = type(self).bundle_version
        context = {"purpose": envelope.PURPOSE, "bundle_version": str(version)}
        now = time.time()
        credentials = kms.AwsCredentials.from_delivery(self.fake_kms.credentials(), now=now)
        data_key = kms.generate_data_key(self.key_arn, context, credentials=credentials,
                                         region=self.region, transport=self.sealer,
                                         endpoint=self.fake_kms.url, now=now)
        remember_secret(data_key.plaintext, kind="data key")
        return envelope.seal(payload, kms_key_arn=self.key_arn, bundle_version=version,
                             data_key=data_key.plaintext,
                             encrypted_data_key=data_key.ciphertext_blob, nonce=os.urandom(12))

    def deliver(self, running, payload) -> dict:
        """A sealed delivery, as send-secrets.sh --kms makes it on the parent."""
        delivery = {"SEALED_SECRETS": self.seal(payload),
                    "AWS_CREDENTIALS": self.fake_kms.credentials(), "AWS_REGION": self.region}
        return send_secrets(running.listener.address.port, json.dumps(delivery).encode())


class ProductionBoot(BootCase):
    """The runtime with the image's configuration, on a fake NSM, end to end."""

    def test_not_ready_until_delivered_then_ready_and_probed_strictly(self):
        running, fake = self.boot()
        # Up and attested, but not ready: nothing secret is in the image.
        status, health = self.call(running, "GET", "/healthz?ready=1")
        self.assertEqual((status, health["ready"], health["status"]), (503, False, "degraded"))
        self.assertEqual(health["missing"], ["rpc_secret", "sealing_key", "google_credentials",
                                             "mtls"])
        self.assertEqual(self.call(running, "GET", "/healthz")[0], 200)
        self.assertEqual(self.call(running, "GET", "/v1/attestation/document")[0], 200)
        for target in ("/v1/rpc/google/token/exchange", "/v1/rpc/google/token/refresh",
                       "/v1/rpc/google/token/revoke", "/v1/rpc/watermark"):
            with self.subTest(target):
                status, answer = self.call(running, "POST", target, b"{}", secret=RPC_SECRET)
                self.assertEqual((status, answer["error"]["code"]), (503, "not_ready"))
                self.assertEqual(answer["error"]["missing"], ["rpc_secret"])

        # A partial delivery: ready waits for the rest, and RPCs name what their route lacks.
        ack = self.deliver(running, {"ENCLAVE_RPC_SHARED_SECRET": RPC_SECRET})
        self.assertTrue(ack["ok"], ack)
        status, health = self.call(running, "GET", "/healthz?ready=1")
        self.assertEqual((status, health["missing"]),
                         (503, ["sealing_key", "google_credentials", "mtls"]))
        status, answer = self.call(running, "POST", "/v1/rpc/watermark", b"{}", RPC_SECRET)
        self.assertEqual((status, answer["error"]["missing"]), (503, ["mtls"]))

        # The parent holds plaintext? The image refuses it: only sealed envelopes open here.
        plain = send_secrets(running.listener.address.port,
                             json.dumps({"ENCLAVE_RPC_SHARED_SECRET": RPC_SECRET}).encode())
        self.assertEqual((plain["ok"], plain["error"]["code"]), (False, "plaintext_refused"))

        decrypts = sum(1 for operation, _ in self.fake_kms.calls if operation == "Decrypt")
        ack = self.deliver(running, self.delivery())
        self.assertTrue(ack["ok"], ack)
        self.assertEqual(sum(1 for op, _ in self.fake_kms.calls if op == "Decrypt"), decrypts + 1)
        status, health = self.call(running, "GET", "/healthz?ready=1")
        self.assertEqual((status, health["ready"], health["missing"]), (200, True, []))
        self.assertEqual((health["secrets"]["source"], health["secrets"]["bundle_version"]),
                         ("kms", type(self).bundle_version))
        # Past readiness, an RPC reaches its handler (this body is refused as invalid).
        status, answer = self.call(running, "POST", "/v1/rpc/google/token/refresh", b"{}",
                                   RPC_SECRET)
        self.assertEqual((status, answer["error"]["code"]), (400, "invalid_request"))

        # The host services' start-up probe, strictly, against the test root and PCR0.
        pcr0 = fake.mint({})  # the fake's PCRs are fixed: read PCR0 from one of its documents
        pcr0_hex = Verifier([self.root.cert_der]).verify(pcr0, at_ms=AT_DOCUMENT_TIME).pcrs[0].hex()
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli.main(["probe", f"http://127.0.0.1:{running.http.port}",
                             "--require-attestation", "--root", str(self.root_pem),
                             "--pcr", f"0={pcr0_hex}", "--secret", RPC_SECRET])
        self.assertEqual(code, 0, out.getvalue())
        self.assertIn("all checks hold", out.getvalue())
        scan_later(out.getvalue(), "probe of the production boot")

        # Nothing secret in what anyone can read.
        text = json.dumps(health) + json.dumps(ack)
        text += urllib.request.urlopen(
            f"http://127.0.0.1:{running.http.port}/metrics", timeout=10).read().decode()
        for secret in (RPC_SECRET, GOOGLE_CLIENT_SECRET, SEALING_KEY_B64):
            self.assertNotIn(secret, text)

    def test_every_document_binds_the_per_boot_key_and_a_restart_makes_another(self):
        keys = []
        for boot in range(2):
            running, fake = self.boot()
            status, answer = self.call(running, "GET", "/v1/attestation/document")
            self.assertEqual(status, 200)
            doc = Verifier([self.root.cert_der]).verify(base64.b64decode(answer["document"]),
                                                        at_ms=int(time.time() * 1000))
            self.assertEqual(base64.b64encode(doc.public_key).decode(), answer["public_key"])
            nonce = os.urandom(32)
            body = json.dumps({"nonce": base64.b64encode(nonce).decode()}).encode()
            status, challenge = self.call(running, "POST", "/v1/attestation/challenge", body)
            self.assertEqual(status, 200, challenge)
            bound = Verifier([self.root.cert_der]).verify(
                base64.b64decode(challenge["document"]), at_ms=int(time.time() * 1000),
                expected_nonce=nonce, evidence=base64.b64decode(challenge["evidence"]))
            self.assertEqual(bound.public_key, doc.public_key)
            # Every request the runtime made to the NSM carried that same key.
            self.assertTrue(fake.requests)
            for request in fake.requests:
                self.assertEqual(request["Attestation"]["public_key"], doc.public_key)
            keys.append(doc.public_key)
            running.stop()
        self.assertNotEqual(keys[0], keys[1], "a restart must make a new per-boot key")

    def test_an_endpoint_without_an_egress_route_is_refused(self):
        running, _ = self.boot()
        for endpoint in ("https://watermark.internal.example:8443", "https://elsewhere.example"):
            with self.subTest(endpoint):
                ack = self.deliver(running, self.delivery(ECS_WATERMARK_ENDPOINT=endpoint))
                self.assertEqual((ack["ok"], ack["error"]["code"]),
                                 (False, "endpoint_not_routable"))
                self.assertEqual(ack["version"], 0)

    def test_egress_fails_closed_for_a_host_without_a_route(self):
        running, _ = self.boot()
        connector = running.runtime.watermark.connector  # the one every upstream call uses
        self.assertTrue(connector.fail_closed)
        with self.assertRaises(egress.EgressNotRouted) as ctx:  # before any socket exists
            connector.connect("accounts.example.com", 443, timeout=1)
        self.assertEqual(ctx.exception.code, "egress_not_routed")

    def test_clearing_what_production_needs_is_refused_and_readiness_stays(self):
        running, _ = self.boot()
        self.assertTrue(self.deliver(running, self.delivery())["ok"])
        for key in ("ENCLAVE_RPC_SHARED_SECRET", "ENCLAVE_TOKEN_SEALING_KEY",
                    "GOOGLE_OAUTH_CLIENT_SECRET", "MTLS_CLIENT_CERT_JSON"):
            with self.subTest(key):
                ack = self.deliver(running, {key: None})
                self.assertEqual((ack["ok"], ack["error"]["code"]), (False, "required_secret"))
                self.assertIn(key, ack["error"]["message"])
                self.assertEqual(self.call(running, "GET", "/healthz?ready=1")[0], 200)


class ReadinessFollowsWhatIsUsable(BootCase):
    """A part the configuration does not need may be cleared, and both readiness and the RPCs
    reflect it at once."""

    def test_clearing_an_unneeded_part_shows_at_once(self):
        running, _ = self.boot(ENCLAVE_READY_REQUIRES="rpc_secret,mtls")
        self.assertTrue(self.deliver(running, self.delivery())["ok"])
        self.assertEqual(self.call(running, "GET", "/healthz?ready=1")[0], 200)
        ack = self.deliver(running, {"GOOGLE_OAUTH_CLIENT_SECRET": None})
        self.assertTrue(ack["ok"], ack)
        status, answer = self.call(running, "POST", "/v1/rpc/google/token/revoke",
                                   b'{"token": "ya29.x"}', RPC_SECRET)
        self.assertEqual((status, answer["error"]["missing"]), (503, ["google_credentials"]))
        self.assertEqual(self.call(running, "GET", "/healthz?ready=1")[0], 200)  # not required
        ack = self.deliver(running, {"MTLS_CLIENT_CERT_JSON": None})
        self.assertEqual(ack["error"]["code"], "required_secret")


class SigtermDuringTheStartupWindow(unittest.TestCase):
    """HTTP answers during the window (RPCs 503 not_ready), and SIGTERM ends it at once."""

    def test_serve_stops_within_6_s_of_sigterm_in_the_window(self):
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("ALFRED_", "ENCLAVE_", "TEE_", "GOOGLE_", "ECS_"))}
            env.update({"ALFRED_ENV": "local", "ENCLAVE_HTTP_LISTEN": "tcp:127.0.0.1:0",
                        "ENCLAVE_SECRETS_LISTEN": "tcp:127.0.0.1:0",
                        "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "60",
                        "ENCLAVE_READY_REQUIRES": "rpc_secret,mtls",
                        "ENCLAVE_STATE_DIR": tmp, "ENCLAVE_CERTS_DIR": f"{tmp}/certs"})
            proc = subprocess.Popen([sys.executable, str(ROOT / "enclave.py"), "serve"],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            output = []
            try:
                port = None
                for line in proc.stdout:  # bounded by the subprocess's own life
                    output.append(line)
                    match = re.search(r"serving: http=tcp:127\.0\.0\.1:(\d+)", line)
                    port = int(match[1]) if match else port
                    if "Waiting for initial secrets" in line:
                        break
                self.assertIsNotNone(port, "".join(output))
                base = f"http://127.0.0.1:{port}"
                with urllib.request.urlopen(f"{base}/healthz", timeout=10) as resp:
                    self.assertEqual(resp.status, 200)
                with self.assertRaises(urllib.error.HTTPError) as ctx:
                    urllib.request.urlopen(f"{base}/healthz?ready=1", timeout=10)
                self.assertEqual(ctx.exception.code, 503)
                signalled = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
                elapsed = time.monotonic() - signalled
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                output.append(proc.stdout.read())
                proc.stdout.close()
            scan_later("".join(output), "serve stopped in the start-up window")
            self.assertEqual(code, 0, "".join(output))
            self.assertLess(elapsed, STOP_WITHIN_S, "".join(output))
            self.assertIn("Stop requested during the start-up window", "".join(output))


if __name__ == "__main__":
    unittest.main()
