"""Attestation end to end: a running `enclave.py serve` answered over HTTP, its answers checked by
the `verify` command in a subprocess (and by the zipapp), static-document start-up, and the
HTTP error table of the document/challenge endpoints.

Every server runs as `enclave.py serve` on 127.0.0.1:0 (the port is read from its `ready` log
line) with a temporary state directory; waits are bounded and processes are killed in cleanup.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from enclave import attestation, devpki, identity
from enclave.nitro import claims as nitro_claims
from enclave.nitro import verifier as verify
from tests.support import (keep_off_console, remember_key_files, remember_private_key,
                           remember_secret, scan_later)

ROOT = Path(__file__).resolve().parent.parent
ENCLAVE_PY = ROOT / "enclave.py"
PRODUCTION = Path(__file__).parent / "data" / "nitro" / "blocky_nitrite_nitro_attestation.b64"
PRODUCTION_MODULE_ID = "i-0a22e5c5f24d22174-enc0191cceb4289903f"
PRODUCTION_PCR0 = ("e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9f3857758992766f2"
                   "d65710a27aa94ae3949dd54e7c9fe86a")
READY_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 20.0
QUICK_EXIT_S = 15.0  # a refused configuration exits well before this, even on a busy machine
COMMAND_TIMEOUT_S = 60.0
READY_LINE = re.compile(r"serving: http=tcp:127\.0\.0\.1:(\d+) ")
ENV_PREFIXES = ("ALFRED_", "ENCLAVE_", "TEE_", "GOOGLE_", "ECS_", "MTLS_")
JSON = {"Content-Type": "application/json"}


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
    env.update(extra)
    return env


def pem(key) -> str:
    text = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode("ascii")
    remember_private_key(text, kind="signing key PEM")
    return text


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Server:
    """`enclave.py serve` in a subprocess; stderr goes to a file that is polled for `ready`."""

    def __init__(self, state_dir: Path, **env):
        self.state_dir = Path(state_dir)
        self.log_path = self.state_dir / f"serve-{secrets.token_hex(4)}.log"
        self.port: int | None = None
        environ = clean_env(**{
            "ALFRED_ENV": "local",
            "ENCLAVE_HTTP_LISTEN": "tcp:127.0.0.1:0",
            "ENCLAVE_SECRETS_LISTEN": "tcp:127.0.0.1:0",
            "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "0",
            "ENCLAVE_STATE_DIR": str(self.state_dir),
            "ENCLAVE_CERTS_DIR": str(self.state_dir / "certs"),
            "ENCLAVE_LOG_LEVEL": "DEBUG",  # every line goes to the end-of-run secret scan
            "ENCLAVE_LOG_FORMAT": "text",
        })
        environ.update(env)
        self._log = open(self.log_path, "wb")
        self._scanned = False
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(ENCLAVE_PY), "serve"], cwd=ROOT,
                                     env=environ, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY_LINE.search(self.log())
            if match:
                self.port = int(match.group(1))
                return self.port
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"serve not ready within {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve still running after {timeout}s:\n{self.log()}") from None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        if not self._scanned:  # the child's whole log goes to the end-of-run secret scan
            self._scanned = True
            remember_key_files(self.state_dir, kind="serve state")  # the dev-shim root key
            scan_later(self.log(), "enclave.py serve stderr")
        return self.proc.returncode

    def call(self, method: str, path: str, body=None, headers: dict | None = None):
        """(status, headers, parsed JSON or raw bytes) on a new connection."""
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            try:
                return resp.status, resp.headers, json.loads(data)
            except ValueError:
                return resp.status, resp.headers, data
        finally:
            conn.close()


def run_command(argv: list, *, stdin: bytes | None = None, cwd=ROOT, env: dict | None = None):
    """(exit code, parsed JSON stdout or None, stderr) of one command in a subprocess."""
    proc = subprocess.run([sys.executable, *map(str, argv)], input=stdin, capture_output=True,
                          cwd=cwd, env=env or clean_env(), timeout=COMMAND_TIMEOUT_S)
    scan_later(proc.stderr, f"{Path(str(argv[0])).name} stderr")
    out = proc.stdout.decode()
    try:
        parsed = json.loads(out) if out.strip() else None
    except ValueError:
        parsed = None
    return proc.returncode, parsed, proc.stderr.decode(errors="replace")


def verify_cmd(*argv, **kw):
    return run_command([ENCLAVE_PY, "verify", *argv], **kw)


class TempDirCase(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="enclave-e2e-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name: str, data) -> Path:
        path = self.dir / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path


# -- a dev-shim server answered over HTTP, checked by `enclave.py verify` ---------------------
class TestDevShimRoundTrip(TempDirCase):
    @classmethod
    def setUpClass(cls):
        cls.state_dir = Path(tempfile.mkdtemp(prefix="enclave-e2e-state-"))
        cls.server = Server(cls.state_dir)
        try:
            cls.server.wait_ready()
        except BaseException:
            cls.server.stop()
            shutil.rmtree(cls.state_dir, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        shutil.rmtree(cls.state_dir, ignore_errors=True)
        assert code == 0, f"serve did not stop cleanly on SIGTERM (exit {code})"

    def dev(self, *argv, **kw):
        return verify_cmd(*argv, "--allow-insecure-dev", "--state-dir", self.state_dir, **kw)

    def test_health_says_dev_shim_and_insecure(self):
        status, _, health = self.server.call("GET", "/healthz")
        self.assertEqual(status, 200)
        self.assertEqual((health["mode"], health["attestation"]),
                         ("dev-shim", {"source": "dev-shim", "insecure": True}))

    def test_challenge_answer_verifies_with_the_verify_command(self):
        nonce, user_data = os.urandom(32), os.urandom(40)
        status, _, answer = self.server.call("POST", "/v1/attestation/challenge",
                                             {"nonce": b64(nonce), "user_data": b64(user_data)},
                                             JSON)
        self.assertEqual(status, 200, answer)
        self.assertEqual(set(answer), {"nonce", "document", "nonce_bound_document", "evidence",
                                       "public_key"})
        self.assertEqual((answer["nonce"], answer["nonce_bound_document"]), (b64(nonce), True))
        answer_file = self.write("challenge.json", json.dumps(answer))
        evidence = ["--nonce", nonce.hex(), "--evidence", answer["evidence"]]

        code, summary, err = self.dev(answer_file, *evidence, "--max-age", "300")
        self.assertEqual(code, 0, (summary, err))
        self.assertTrue(summary["verified"])
        self.assertTrue(summary["insecure"])
        self.assertTrue(summary["module_id"].startswith("dev-shim"))
        self.assertEqual(summary["nonce"], nonce.hex())
        self.assertEqual(summary["user_data"], b64(user_data))
        self.assertEqual(summary["public_key"], answer["public_key"])
        self.assertEqual(summary["nonce_bound_by"], "document")
        self.assertEqual(summary["evidence"]["intent"], nitro_claims.INTENT_CHALLENGE)
        dev_root = verify.pem_to_der_certs(devpki.read_root_pem(self.state_dir))[0]
        self.assertEqual(summary["root_sha256"], hashlib.sha256(dev_root).hexdigest())

        # The bare document (base64 on stdin) with the evidence on the command line.
        code, summary, err = self.dev("-", *evidence, stdin=answer["document"].encode())
        self.assertEqual((code, summary and summary["nonce"]), (0, nonce.hex()), err)

        # Without --allow-insecure-dev only the AWS root is trusted: rejected at step 3.
        code, summary, err = verify_cmd(answer_file, *evidence)
        self.assertEqual(code, 1, err)
        self.assertEqual((summary["verified"], summary["step"]), (False, 3))
        self.assertIn("cabundle[0]", summary["error"])

        # Another nonce: the document does not carry it and the evidence does not bind it.
        code, summary, _ = self.dev(answer_file, "--nonce", os.urandom(32).hex(),
                                    "--evidence", answer["evidence"])
        self.assertEqual((code, summary["step"]), (1, 8))

    def test_document_endpoint_answer_verifies_with_the_verify_command(self):
        status, _, answer = self.server.call("GET", "/v1/attestation/document")
        self.assertEqual(status, 200, answer)
        self.assertEqual((answer["format"], answer["insecure"]), ("dev-shim", True))
        self.assertEqual(sorted(answer["pcrs"], key=int), [str(i) for i in range(16)])
        # PCR0 of a server run from the source tree: the measurement of enclave/**/*.py.
        self.assertEqual(answer["pcrs"]["0"], attestation.measure_tree(ROOT / "enclave").hex())
        answer_file = self.write("document.json", json.dumps(answer))

        code, summary, err = self.dev(answer_file, "--pcr", f"0={answer['pcrs']['0']}",
                                      "--max-age", "300")
        self.assertEqual(code, 0, (summary, err))
        self.assertEqual((summary["module_id"], summary["timestamp_ms"], summary["public_key"]),
                         (answer["module_id"], answer["timestamp_ms"], answer["public_key"]))
        self.assertEqual(summary["pcrs"], answer["pcrs"])
        self.assertIsNone(summary["nonce"])

        code, summary, _ = verify_cmd(answer_file)
        self.assertEqual((code, summary["verified"], summary["step"]), (1, False, 3))
        code, summary, _ = self.dev(answer_file, "--pcr", "0=" + "00" * 48)
        self.assertEqual((code, summary["step"]), (1, 6))

    def test_challenge_error_table(self):
        cases = [
            ("nonce not base64", {"nonce": "not base64 at all!"}, "invalid_nonce"),
            ("nonce 15 bytes", {"nonce": b64(os.urandom(15))}, "invalid_nonce"),
            ("nonce 65 bytes", {"nonce": b64(os.urandom(65))}, "invalid_nonce"),
            ("nonce not a string", {"nonce": 12345}, "invalid_nonce"),
            ("missing nonce", {"user_data": b64(b"x")}, "invalid_nonce"),
            ("user_data 513 bytes", {"nonce": b64(os.urandom(16)),
                                     "user_data": b64(os.urandom(513))}, "invalid_user_data"),
            ("user_data not base64", {"nonce": b64(os.urandom(16)), "user_data": "%%%"},
             "invalid_user_data"),
            ("body not JSON", b"nonce=abc", "malformed_json"),
            ("body a JSON array", b"[1, 2]", "invalid_request"),
        ]
        for name, body, code in cases:
            with self.subTest(name):
                status, headers, answer = self.server.call(
                    "POST", "/v1/attestation/challenge", body, JSON)
                self.assertEqual(status, 400, answer)
                self.assertEqual(answer["error"]["code"], code)
                self.assertTrue(answer["error"]["message"])
                self.assertEqual(headers["Content-Type"], "application/json")
        for name, body in (("nonce 16 bytes", {"nonce": b64(os.urandom(16))}),
                           ("nonce 64 bytes, user_data 512", {"nonce": b64(os.urandom(64)),
                                                              "user_data": b64(os.urandom(512))})):
            with self.subTest(name):
                status, _, answer = self.server.call("POST", "/v1/attestation/challenge", body,
                                                     JSON)
                self.assertEqual(status, 200, answer)
        for method, path, allowed in (("GET", "/v1/attestation/challenge", "POST"),
                                      ("POST", "/v1/attestation/document", "GET")):
            with self.subTest(f"{method} {path}"):
                status, headers, answer = self.server.call(method, path)
                self.assertEqual(status, 405)
                self.assertEqual(answer["error"]["code"], "method_not_allowed")
                self.assertEqual(headers["Allow"], allowed)
        status, _, answer = self.server.call("POST", "/v1/attestation/challenge",
                                             {"nonce": b64(os.urandom(16))}, {})
        self.assertEqual((status, answer["error"]["code"]), (415, "unsupported_media_type"))


# -- the zipapp verifies the real production document with its bundled root ------------------
class TestZipappVerify(TempDirCase):
    def test_zipapp_verifies_the_production_document_at_its_time(self):
        archive = self.dir / "enclave-host.pyz"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_zipapp.py"), "--host",
                        str(archive)],
                       check=True, stdout=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT_S)
        document = self.write("production.b64", PRODUCTION.read_bytes())
        # cwd is the temporary directory: the only `enclave` package in reach is the zip's.
        code, summary, err = run_command([archive, "verify", document, "--at-document-time",
                                          "--pcr", f"0={PRODUCTION_PCR0}"], cwd=self.dir)
        self.assertEqual(code, 0, err)
        self.assertEqual((summary["verified"], summary["insecure"], summary["module_id"]),
                         (True, False, PRODUCTION_MODULE_ID))
        self.assertEqual(summary["root_sha256"], "641a0321a3e244efe456463195d606317ed7cdcc3c1756e0"
                                                 "9893f3c68f79bb5b")
        self.assertEqual(summary["pcrs"]["0"], PRODUCTION_PCR0)
        # At the wall clock the leaf (a ~3 h certificate) has long expired: step 4.
        code, summary, _ = run_command([archive, "verify", document], cwd=self.dir)
        self.assertEqual((code, summary["step"]), (1, 4))


# -- start-up with a static document ----------------------------------------------------------
class TestStaticDocumentStartup(TempDirCase):
    def setUp(self):
        super().setUp()
        self.addCleanup(keep_off_console("enclave"))  # the dev PKI warns loudly when it mints
        self.root = devpki.load_or_create_root(self.dir / "minter")
        remember_key_files(self.dir / "minter", kind="dev root")

    def mint(self, private_key, name: str) -> Path:
        """A dev-shim document whose public_key is `private_key`'s, written as base64."""
        ident = identity.SigningIdentity.from_pem(pem(private_key).encode())
        source = attestation.DevShimSource(ident, self.root, module_id=f"dev-shim-static-{name}")
        return self.write(f"{name}.b64", b64(source.document()) + "\n")

    def serve(self, document: Path, key_setting: str) -> Server:
        state = self.dir / f"state-{secrets.token_hex(4)}"
        state.mkdir()
        rpc_secret = secrets.token_hex(32)
        remember_secret(rpc_secret, kind="rpc shared secret")
        server = Server(state, **{
            "ALFRED_ENV": "test",
            "ENCLAVE_RUNTIME_MODE": "remote",
            "ENCLAVE_RPC_SHARED_SECRET": rpc_secret,
            "TEE_ATTESTATION_DOCUMENT_PATH": str(document),
            "TEE_ATTESTATION_SIGNING_PRIVATE_KEY": key_setting,
        })
        self.addCleanup(server.stop)
        return server

    def test_matching_key_becomes_ready_and_serves_the_document(self):
        p384, ed = ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()
        key_file = self.write("ed25519.pem", pem(ed))
        cases = (("p384 inline PEM", p384, pem(p384)), ("ed25519 @file", ed, f"@{key_file}"))
        servers = []
        for name, key, setting in cases:  # start both, then check: the starts overlap
            document = self.mint(key, name.split()[0])
            servers.append((name, key, document, self.serve(document, setting)))
        for name, key, document_file, server in servers:
            with self.subTest(name):
                server.wait_ready()
                document = base64.b64decode(document_file.read_text())
                status, _, health = server.call("GET", "/healthz")
                self.assertEqual(status, 200)
                self.assertEqual((health["mode"], health["env"]), ("remote", "test"))
                self.assertEqual(health["attestation"], {"source": "static", "insecure": True})

                status, _, answer = server.call("GET", "/v1/attestation/document")
                self.assertEqual(status, 200)
                self.assertEqual(base64.b64decode(answer["document"]), document)  # as-is

                nonce = os.urandom(24)
                status, _, answer = server.call("POST", "/v1/attestation/challenge",
                                                {"nonce": b64(nonce)}, JSON)
                self.assertEqual(status, 200, answer)
                self.assertFalse(answer["nonce_bound_document"])
                self.assertEqual(base64.b64decode(answer["document"]), document)
                verified = verify.verify_document(
                    document, roots=[self.root.cert_der], at_ms=int(time.time() * 1000),
                    expected_nonce=nonce, evidence=base64.b64decode(answer["evidence"]))
                self.assertEqual(verified.nonce_bound_by, "evidence")
                self.assertEqual(verified.public_key, identity.SigningIdentity.from_pem(
                    pem(key).encode()).public_key_der)
                self.assertEqual(server.stop(), 0)  # SIGTERM: graceful stop, exit 0

    def test_mismatching_key_exits_2_naming_the_mismatch(self):
        other = ec.generate_private_key(ec.SECP384R1())
        expected = identity.SigningIdentity.from_pem(pem(other).encode()).fingerprint
        cases = (("document minted for another key",
                  self.mint(ed25519.Ed25519PrivateKey.generate(), "other")),
                 ("the real Nitro document", self.write("nitro.b64", PRODUCTION.read_bytes())))
        servers = [(name, self.serve(document, pem(other))) for name, document in cases]
        for name, server in servers:
            with self.subTest(name):
                code = server.wait_exit()
                elapsed = time.monotonic() - server.started
                log = server.log()
                self.assertEqual(code, 2, log)
                self.assertLess(elapsed, QUICK_EXIT_S)
                self.assertIn("TEE_ATTESTATION_DOCUMENT_PATH", log)
                self.assertIn("public_key does not match the signing identity", log)
                self.assertIn(expected, log)
                self.assertNotIn("serving:", log)
                self.assertNotIn("Traceback", log)


if __name__ == "__main__":
    unittest.main()
