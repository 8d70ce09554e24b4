"""`enclave.py probe`: passes against a correct runtime, fails closed and names the failed check.

The runtimes here are real parts (dev-shim attestation, the HTTP server, the RPC authenticator,
the /healthz code) on 127.0.0.1:0, with the Google and watermark handlers replaced by stubs
that answer 400 (the probe never needs an upstream). Broken variants change one thing each.
The probe runs as the real command in a subprocess, so exit codes are checked as shipped.
The runtimes are dev-shim, so the probe gets --allow-insecure-dev unless a test says otherwise.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from enclave import cli
from enclave.app import Runtime
from enclave.attestation import AttestationService, build_attestation
from enclave.config import Settings
from enclave.errors import ApiError
from enclave.metrics import Metrics
from enclave.rpcauth import RpcAuthenticator
from tests.support import captured_logs, running_server

REPO = Path(__file__).resolve().parent.parent
SECRET = "probe-test-shared-secret-0123456789abcdef"
PROBE_TIMEOUT_S = 60  # the whole probe run; each request has its own 5 s bound
RPC_PATHS = ("/v1/rpc/google/token/exchange", "/v1/rpc/google/token/refresh",
             "/v1/rpc/google/token/revoke", "/v1/rpc/watermark")


def run_probe(args: list[str], env_extra: dict | None = None) -> tuple[int, str]:
    """`enclave.py probe ARGS` in this process (the same entry point, without paying a Python
    start-up per run): its exit code and everything it printed. The environment is the test
    process's without runtime variables, plus `env_extra`, as a child would see it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENCLAVE_", "TEE_", "ALFRED_"))}
    env.update(env_extra or {})
    out = io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        try:
            code = cli.main(["probe", *args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return code, out.getvalue()


class _Store:
    """Secrets received and usable, as /healthz reports them."""

    bundle_version = None  # plaintext deliveries (ENCLAVE_SECRETS_SOURCE=channel)

    def current(self):
        return None  # the state snapshot /healthz caches against: never changes here

    def health(self) -> dict:
        return {"secrets": {"received": True, "version": 1, "updated_at": "2026-01-01T00:00:00Z"},
                "mtls": {"configured": True, "not_after": "2027-01-01T00:00:00Z"}}

    def ready(self) -> bool:
        return True

    def missing(self, parts) -> list[str]:
        return []


class _Rpc:
    """Google and watermark handlers that refuse every body as invalid (no upstream)."""

    def _refuse(self, req):
        raise ApiError(400, "invalid_request", "stub: no upstream in this test")

    exchange = refresh = revoke = handle = _refuse


def _ok_unauthenticated(req):
    return 200, {"ok": True}


class ProbeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.state_dir = cls._tmp.name
        settings = Settings(state_dir=Path(cls.state_dir))  # local dev-shim
        cls.attestation = build_attestation(settings)
        cls.settings = settings

    @classmethod
    def tearDownClass(cls):
        cls.attestation.close()
        cls._tmp.cleanup()

    def setUp(self):
        self.logs = self.enterContext(captured_logs())  # the servers' auth warnings

    def runtime(self):
        """(router, authenticator) of a correct runtime."""
        metrics = Metrics()
        service = AttestationService(self.attestation, metrics)
        auth = RpcAuthenticator(lambda now: [SECRET], 30, metrics)
        runtime = Runtime(self.settings, metrics=metrics, attestation=service, store=_Store(),
                          google=_Rpc(), watermark=_Rpc(), authenticator=auth)
        return runtime.router(), auth, service

    def probe(self, port: int, *extra: str, dev: bool = True,
              env_extra: dict | None = None) -> tuple[int, str]:
        """Run the probe; `dev` adds --allow-insecure-dev (the runtimes here are dev-shim)."""
        flags = ["--allow-insecure-dev"] if dev else []
        return run_probe([f"http://127.0.0.1:{port}", "--state-dir", self.state_dir,
                          "--secret", SECRET, *flags, *extra], env_extra)

    def probe_bare(self, *args: str, env_extra: dict | None = None) -> tuple[int, str]:
        """Run the probe with exactly these arguments (no --state-dir, no --secret)."""
        return run_probe(list(args), env_extra)

    def assertFailed(self, code: int, output: str, check: str, reason: str = ""):
        self.assertEqual(code, 1, output)
        lines = [line for line in output.splitlines() if line.startswith(f"FAIL {check}:")]
        self.assertTrue(lines, f"no 'FAIL {check}:' line in:\n{output}")
        if reason:
            self.assertIn(reason, lines[0])

    # -- the control: every check holds against a correct runtime ---------------------------
    def test_correct_runtime_passes(self):
        router, auth, _ = self.runtime()
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port)
        self.assertEqual(code, 0, output)
        self.assertNotIn("FAIL", output)
        for path in RPC_PATHS:
            self.assertIn(f"ok   rpc {path} refuses unsigned", output)
            self.assertIn(f"ok   rpc {path} refuses tampered", output)
        self.assertIn("ok   challenge verifies", output)
        self.assertIn("ok   rpc signed request accepted", output)

    # -- failures ----------------------------------------------------------------------------
    def test_runtime_down(self):
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        code, output = self.probe(port, "--timeout", "2")
        self.assertFailed(code, output, "healthz")
        self.assertFailed(code, output, "rpc signed request accepted", "unreachable")
        self.assertNotIn("ok   ", output)

    def test_rpc_accepting_unsigned_requests(self):
        router, auth, _ = self.runtime()
        for path in RPC_PATHS:  # a broken server: RPC routes answer 200 to anything
            router.add("POST", path, _ok_unauthenticated)
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port)
        for path in RPC_PATHS:
            with self.subTest(path=path):
                self.assertFailed(code, output, f"rpc {path} refuses unsigned",
                                  "expected HTTP 401, got 200")
                self.assertFailed(code, output, f"rpc {path} refuses tampered")
        self.assertIn("ok   document verifies", output)  # only the broken part fails

    def test_one_rpc_path_accepting_unsigned_requests(self):
        router, auth, _ = self.runtime()
        router.add("POST", "/v1/rpc/watermark", _ok_unauthenticated)
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port)
        self.assertFailed(code, output, "rpc /v1/rpc/watermark refuses unsigned")
        self.assertIn("ok   rpc /v1/rpc/google/token/revoke refuses unsigned", output)

    def test_tampered_document(self):
        router, auth, service = self.runtime()

        def tampered_document(req):
            status, body = service.document(req)
            raw = bytearray(base64.b64decode(body["document"]))
            raw[-1] ^= 0x01  # the last byte of the ES384 signature
            return status, {**body, "document": base64.b64encode(bytes(raw)).decode()}

        router.add("GET", "/v1/attestation/document", tampered_document)
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port)
        self.assertFailed(code, output, "document verifies", "step 5")
        self.assertIn("ok   challenge verifies", output)

    def test_document_summary_that_lies(self):
        router, auth, service = self.runtime()

        def lying_document(req):
            status, body = service.document(req)
            return status, {**body, "format": "aws-nitro", "insecure": False}

        router.add("GET", "/v1/attestation/document", lying_document)
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port)
        self.assertFailed(code, output, "document verifies", "does not match")

    def test_require_attestation_refuses_dev_shim(self):
        router, auth, _ = self.runtime()
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port, "--require-attestation", dev=False)
        self.assertFailed(code, output, "healthz", "expected mode remote")
        self.assertFailed(code, output, "document verifies", "step 3")
        self.assertFailed(code, output, "challenge verifies", "step 3")

    def test_require_attestation_refuses_an_insecure_root(self):
        root = Path(self.state_dir) / "dev-attestation" / "root.crt"
        code, output = self.probe(1, "--require-attestation", "--root", str(root), dev=False)
        self.assertEqual(code, 2, output)
        self.assertIn("INSECURE", output)

    # -- the INSECURE dev root is trusted only with --allow-insecure-dev ----------------------
    def test_dev_shim_refused_without_allow_insecure_dev(self):
        # The dev root is on disk (--state-dir) but not asked for: the default must not trust it.
        router, auth, _ = self.runtime()
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port, dev=False)
        self.assertFailed(code, output, "document verifies", "step 3")
        self.assertFailed(code, output, "document verifies", "add --allow-insecure-dev")
        self.assertFailed(code, output, "challenge verifies", "step 3")
        self.assertIn("ok   healthz", output)  # not strict: only the trust anchor differs
        self.assertIn("NOT SAFE TO USE", output)

    def test_dev_shim_refused_with_dev_root_in_environment(self):
        # ENCLAVE_STATE_DIR pointing at a dev root is no opt-in either.
        router, auth, _ = self.runtime()
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe_bare(f"http://127.0.0.1:{server.port}", "--secret", SECRET,
                                           env_extra={"ENCLAVE_STATE_DIR": self.state_dir})
        self.assertFailed(code, output, "document verifies", "step 3")

    def test_dev_shim_accepted_with_allow_insecure_dev(self):
        router, auth, _ = self.runtime()
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port)  # --allow-insecure-dev
        self.assertEqual(code, 0, output)
        self.assertIn("ok   document verifies", output)
        self.assertIn("INSECURE dev root", output)

    def test_dev_root_from_environment_with_allow_insecure_dev(self):
        router, auth, _ = self.runtime()
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe_bare(f"http://127.0.0.1:{server.port}", "--secret", SECRET,
                                           "--allow-insecure-dev",
                                           env_extra={"ENCLAVE_STATE_DIR": self.state_dir})
        self.assertEqual(code, 0, output)

    def test_insecure_root_needs_allow_insecure_dev(self):
        root = str(Path(self.state_dir) / "dev-attestation" / "root.crt")
        code, output = self.probe_bare("http://127.0.0.1:1", "--root", root)
        self.assertEqual(code, 2, output)
        self.assertIn("INSECURE", output)
        self.assertIn("--allow-insecure-dev", output)

    def test_insecure_root_accepted_with_allow_insecure_dev(self):
        root = str(Path(self.state_dir) / "dev-attestation" / "root.crt")
        router, auth, _ = self.runtime()
        with running_server(router, authenticator=auth) as server:
            # No --state-dir: the default location may lack a dev root; --root is the trust.
            code, output = self.probe_bare(f"http://127.0.0.1:{server.port}", "--secret", SECRET,
                                           "--allow-insecure-dev", "--root", root)
        self.assertEqual(code, 0, output)

    def test_allow_insecure_dev_without_a_dev_root(self):
        with tempfile.TemporaryDirectory() as empty:
            code, output = self.probe_bare("http://127.0.0.1:1", "--allow-insecure-dev",
                                           "--state-dir", empty)
        self.assertEqual(code, 2, output)
        self.assertNotIn("ok   ", output)

    def test_require_attestation_contradicts_allow_insecure_dev(self):
        code, output = self.probe(1, "--require-attestation")  # plus --allow-insecure-dev
        self.assertEqual(code, 2, output)
        self.assertIn("--require-attestation and --allow-insecure-dev", output)
        self.assertNotIn("ok   ", output)

    def test_unexpected_pcr(self):
        router, auth, _ = self.runtime()
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port, "--pcr", "0=" + "ab" * 48)
        self.assertFailed(code, output, "document verifies", "step 6")

    # -- PCR allow-lists: old or new image during a rollout ----------------------------------
    def pcrs_file(self, content) -> str:
        handle = tempfile.NamedTemporaryFile("w", suffix=".json", dir=self.state_dir,
                                             delete=False)
        self.addCleanup(os.unlink, handle.name)
        with handle:
            handle.write(content if isinstance(content, str) else json.dumps(content))
        return handle.name

    def test_pcr_allow_lists(self):
        router, auth, service = self.runtime()
        real = service.document(mock.Mock())[1]["pcrs"]["0"]
        old, older = "ab" * 48, "cd" * 48

        def build(pcr0):  # the shape `nitro-cli build-enclave` prints
            return {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": pcr0}}

        old_build = self.pcrs_file(build(old))
        cases = [
            ("repeated --pcr: old, then the running image", ["--pcr", f"0={old}", "--pcr",
                                                             f"0={real}"], 0),
            ("repeated --pcr: the running image, then old", ["--pcr", f"0={real}", "--pcr",
                                                             f"0={old}"], 0),
            ("--pcrs list of old and new builds",
             ["--pcrs", self.pcrs_file([build(old), build(real)])], 0),
            ("--pcrs bare map", ["--pcrs", self.pcrs_file({"PCR0": real})], 0),
            ("--pcrs old build plus --pcr new", ["--pcrs", old_build, "--pcr", f"0={real}"], 0),
            ("neither of two --pcr", ["--pcr", f"0={old}", "--pcr", f"0={older}"],
             "step 6 (PCRs): PCR0: expected one of 2 values"),
            ("--pcrs of another image only", ["--pcrs", old_build],
             f"step 6 (PCRs): PCR0: expected {old}, got {real}"),
        ]
        with running_server(router, authenticator=auth) as server:
            for name, argv, expected in cases:
                with self.subTest(name):
                    code, output = self.probe(server.port, *argv)
                    if expected == 0:
                        self.assertEqual(code, 0, output)
                    else:
                        self.assertFailed(code, output, "document verifies", expected)
                        self.assertFailed(code, output, "challenge verifies", expected)
                        self.assertIn("ok   healthz", output)  # only the pin fails

    def test_malformed_pcr_values_exit_2(self):
        good = "ab" * 48
        cases = {
            "bad hex": ["--pcrs", self.pcrs_file({"PCR0": "zz" * 48})],
            "wrong length": ["--pcrs", self.pcrs_file({"Measurements": {"PCR0": good[:-1]}})],
            "unknown key": ["--pcrs", self.pcrs_file({"PCR0": good, "PCR_0": good})],
            "non-JSON": ["--pcrs", self.pcrs_file("PCR0=" + good)],
            "empty list": ["--pcrs", self.pcrs_file([])],
            "--pcr bad hex": ["--pcr", f"0={'zz' * 48}"],
            "--pcr wrong length": ["--pcr", f"0={good}0"],
            "one bad --pcr among good ones": ["--pcr", f"0={good}", "--pcr", "1=00"],
        }
        for name, argv in cases.items():
            with self.subTest(name):
                code, output = self.probe_bare("http://127.0.0.1:1", *argv)
                self.assertEqual(code, 2, output)
                self.assertTrue(output.startswith("probe: --pcr"), output)
                self.assertEqual(len(output.strip().splitlines()), 1, output)

    def test_wrong_secret(self):
        router, auth, _ = self.runtime()
        with running_server(router, authenticator=auth) as server:
            code, output = self.probe(server.port, "--secret", "not-the-secret-" + "x" * 20)
        self.assertFailed(code, output, "rpc signed request accepted", "401")
        self.assertIn("ok   rpc /v1/rpc/watermark refuses tampered", output)

    def test_usage_errors(self):
        for args in (["ftp://127.0.0.1:1"], ["http://127.0.0.1:1", "--pcr", "x"],
                     ["http://127.0.0.1:1", "--timeout", "0"],
                     ["http://127.0.0.1:1", "--root", "/nonexistent/root.pem"]):
            with self.subTest(args=args):
                proc = subprocess.run([sys.executable, "enclave.py", "probe", *args], cwd=REPO,
                                      capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
                self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)


if __name__ == "__main__":
    unittest.main()
