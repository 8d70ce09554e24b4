"""The server, `enclave.py sign` and scripts/rpc.sh agree on which request targets exist.

Targets are ASCII (RFC 9112): a raw non-ASCII byte, a control character, a space, a fragment or
a leading `//` is refused by all three (400 invalid_target; exit 2; exit 2), so nothing is ever
signed that the server would not authenticate exactly as sent.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import unittest
from pathlib import Path

from enclave.host import sign as cmd_sign
from enclave.rpcauth import RpcAuthenticator, new_nonce, sign_request
from enclave.server import Router
from tests.support import (parse_raw_response, raw_exchange, remember_secret, running_server,
                           scan_later)

ROOT = Path(__file__).resolve().parent.parent
RPC_SH = ROOT / "scripts" / "rpc.sh"
SECRET = "targets-test-secret-0123456789abcdef-XYZ"
remember_secret(SECRET, kind="rpc shared secret")
SKEW_SECONDS = 30
COMMAND_TIMEOUT_SECONDS = 30

# (name, target, accepted); the target is sent, signed and passed on as UTF-8
CASES = [
    ("plain", "/v1/rpc/echo", True),
    ("query", "/v1/rpc/echo?q=1&r=x", True),
    ("percent-encoded UTF-8", "/v1/rpc/echo?q=%C3%A9t%C3%A9", True),
    ("raw UTF-8", "/v1/rpc/echo?q=\u00e9t\u00e9", False),
    ("fragment", "/v1/rpc/echo#x", False),
    ("leading //", "//v1/rpc/echo", False),
    ("ESC", "/v1/rpc/echo?\x1b[31m", False),
    ("DEL", "/v1/rpc/echo?\x7f", False),
    ("TAB", "/v1/rpc/echo?a\tb", False),
]


def echo_router() -> Router:
    router = Router()
    router.add("POST", "/v1/rpc/echo", lambda req: (200, {"target": req.target}), auth=True)
    return router


class TargetsAgree(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._ctx = running_server(echo_router(), authenticator=RpcAuthenticator(
            lambda now: [SECRET], SKEW_SECONDS))
        cls.server = cls._ctx.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls._ctx.__exit__(None, None, None)

    def test_the_server(self):
        for name, target, accepted in CASES:
            with self.subTest(name):
                headers = sign_request(SECRET, "POST", target, b"{}", int(time.time()), new_nonce())
                head = [f"POST {target} HTTP/1.1", "Host: x", "Connection: close",
                        "Content-Type: application/json", "Content-Length: 2"]
                head += [f"{k}: {v}" for k, v in headers.items()]
                data = raw_exchange(self.server.port,
                                    ("\r\n".join(head) + "\r\n\r\n{}").encode("utf-8"))
                status, _, body = parse_raw_response(data)
                if accepted:
                    self.assertEqual((status, json.loads(body)), (200, {"target": target}))
                else:
                    self.assertEqual((status, json.loads(body)["error"]["code"]),
                                     (400, "invalid_target"))

    def sign(self, target: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cmd_sign.run(argparse.Namespace(
                method="POST", target=target, body_file=None, secret=None, timestamp=None,
                nonce=None), {"ENCLAVE_RPC_SHARED_SECRET": SECRET})
        scan_later(err.getvalue(), "sign stderr")
        return code, out.getvalue(), err.getvalue()

    def test_the_sign_command(self):
        cases = list(CASES)
        # bytes that are not UTF-8 reach argv as surrogates (surrogateescape)
        cases.append(("invalid UTF-8 in argv", "/v1/rpc/echo?q=\udce9", False))
        for name, target, accepted in cases:
            with self.subTest(name):
                code, out, err = self.sign(target)
                if accepted:
                    self.assertEqual(code, 0, err)
                    self.assertIn("X-Enclave-Signature: v1=", out)
                else:
                    self.assertEqual((code, out), (2, ""))
                    self.assertEqual(len(err.splitlines()), 1, err)
                    self.assertIn("TARGET", err)

    def test_the_sign_command_line(self):
        """The real entry point: exit 2, one line, no traceback, for raw and invalid UTF-8."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
        env["ENCLAVE_RPC_SHARED_SECRET"] = SECRET
        for target in ("/v1/rpc/echo?q=\u00e9t\u00e9".encode(), b"/v1/rpc/echo?q=\xe9"):
            with self.subTest(target=target):
                result = subprocess.run([sys.executable, str(ROOT / "enclave.py"), "sign", "POST",
                                         target], env=env, capture_output=True, cwd=ROOT,
                                        timeout=COMMAND_TIMEOUT_SECONDS)
                scan_later(result.stderr, "sign stderr")
                self.assertEqual((result.returncode, result.stdout), (2, b""))
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertNotIn(b"Traceback", result.stderr)

    @unittest.skipUnless(shutil.which("openssl") and shutil.which("curl") and shutil.which("bash"),
                         "needs bash, openssl and curl")
    def test_rpc_sh(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
        env["ENCLAVE_RUNTIME_BASE_URL"] = f"http://127.0.0.1:{self.server.port}"
        env["ENCLAVE_RPC_SHARED_SECRET"] = SECRET
        for name, target, accepted in CASES:
            with self.subTest(name):
                result = subprocess.run(["bash", str(RPC_SH), "POST", target, "{}"], env=env,
                                        capture_output=True, timeout=COMMAND_TIMEOUT_SECONDS)
                scan_later(result.stderr, "rpc.sh stderr")
                if accepted:
                    self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
                    self.assertEqual(json.loads(result.stdout), {"target": target})
                else:
                    self.assertEqual((result.returncode, result.stdout), (2, b""))
                    self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)


if __name__ == "__main__":
    unittest.main()
