"""scripts/rpc.sh (openssl + curl) and the `sign` command produce requests the authenticator accepts.

A tiny loopback HTTP server stands in for the runtime: it runs RpcAuthenticator.precheck, reads
exactly Content-Length bytes, runs finish, and echoes what it authenticated.
"""

import argparse
import contextlib
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
from pathlib import Path

from enclave import cli
from enclave.host import sign as cmd_sign
from enclave.host.args import resolve_secret
from enclave.rpcauth import LOCAL_DEFAULT_RPC_SECRET
from enclave.rpcauth import AuthError, RpcAuthenticator
from tests.support import remember_secret, scan_later

ROOT = Path(__file__).resolve().parent.parent
RPC_SH = ROOT / "scripts" / "rpc.sh"
SECRET = "rpc-sh-test-secret-0123456789abcdef-XYZ"
WRONG_SECRET = "not-the-secret-" + "z" * 30
remember_secret(SECRET, WRONG_SECRET, "from-flag", "from-env", kind="rpc shared secret")
SKEW = 30


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _answer(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        auth: RpcAuthenticator = self.server.auth
        self.server.nonces.append(self.headers.get("X-Enclave-Nonce"))
        try:
            pending = auth.precheck(self.command, self.path, self.headers, time.time())
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            auth.finish(pending, body, time.time())
        except AuthError as exc:
            self.server.reasons.append(exc.reason)
            self._answer(exc.status, exc.body())
            return
        self._answer(200, {"ok": True, "method": self.command, "target": self.path,
                           "body_sha256": hashlib.sha256(body).hexdigest(),
                           "content_type": self.headers.get("Content-Type")})

    do_GET = do_POST = do_PUT = _handle


@unittest.skipUnless(shutil.which("openssl") and shutil.which("curl") and shutil.which("bash"),
                     "needs bash, openssl and curl")
class RpcShTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        cls.server.daemon_threads = True
        cls.server.reasons = []
        cls.server.nonces = []
        cls.server.auth = RpcAuthenticator(lambda now: [SECRET, LOCAL_DEFAULT_RPC_SECRET], SKEW,
                                           allow_local_default_secret=True)
        cls.thread = threading.Thread(target=cls.server.serve_forever,
                                      kwargs={"poll_interval": 0.05}, daemon=True)
        cls.thread.start()
        cls.base_url = f"http://127.0.0.1:{cls.server.server_address[1]}"

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()
        cls.thread.join(timeout=5)

    def rpc(self, *args, secret=SECRET):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
        env["ENCLAVE_RUNTIME_BASE_URL"] = self.base_url
        if secret is not None:
            env["ENCLAVE_RPC_SHARED_SECRET"] = secret
        result = subprocess.run(["bash", str(RPC_SH), *args], env=env, capture_output=True,
                                timeout=30, text=True)
        scan_later(result.stderr, "rpc.sh stderr")
        return result

    def ok(self, *args, **kwargs) -> dict:
        result = self.rpc(*args, **kwargs)
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        return json.loads(result.stdout)

    def test_signed_json_post_is_accepted(self):
        body = '{"code": "4/0Aabc", "redirect_uri": "https://app.example/cb"}'
        answer = self.ok("POST", "/v1/rpc/google/token/exchange", body)
        self.assertEqual(answer["body_sha256"], hashlib.sha256(body.encode()).hexdigest())
        self.assertEqual(answer["content_type"], "application/json")

    def test_query_string_and_glob_characters_are_signed_as_sent(self):
        target = "/v1/rpc/echo?a=1&b=[x]&c={y}&d=%2F"
        answer = self.ok("POST", target, "{}")
        self.assertEqual(answer["target"], target)

    def test_get_and_empty_post(self):
        self.assertEqual(self.ok("GET", "/v1/rpc/echo")["method"], "GET")
        answer = self.ok("POST", "/v1/rpc/echo")
        self.assertEqual(answer["body_sha256"], hashlib.sha256(b"").hexdigest())

    def test_body_from_file_is_sent_byte_for_byte(self):
        data = '{"name": "Zoë", "list": [1, 2]}\n\n'.encode()
        with tempfile.NamedTemporaryFile(suffix=".json") as handle:
            handle.write(data)
            handle.flush()
            answer = self.ok("POST", "/v1/rpc/echo", "@" + handle.name)
        self.assertEqual(answer["body_sha256"], hashlib.sha256(data).hexdigest())

    def test_each_call_has_a_fresh_nonce(self):
        for _ in range(3):
            self.ok("POST", "/v1/rpc/echo", "{}")

    def test_local_default_secret_when_unset(self):
        self.ok("POST", "/v1/rpc/echo", "{}", secret=None)

    def test_nonce_starting_with_a_dash_is_sent_safely(self):
        # openssl rand is replaced by a stub whose base64 starts with "+" ("-" in base64url),
        # as it does about 1 time in 64; every other openssl call goes to the real one.
        real = shutil.which("openssl")
        with tempfile.TemporaryDirectory() as stub_dir:
            stub = Path(stub_dir, "openssl")
            stub.write_text('#!/usr/bin/env bash\n'
                            'if [ "$1" = rand ]; then echo "+-leadingdashAAAAAAAAAAAAAAAAAAAAAAAAAAAA"; '
                            f'else exec "{real}" "$@"; fi\n')
            stub.chmod(0o755)
            env_path = f"{stub_dir}{os.pathsep}{os.environ.get('PATH', '')}"
            with unittest.mock.patch.dict(os.environ, {"PATH": env_path}):
                answer = self.ok("POST", "/v1/rpc/echo", "{}")
        self.assertTrue(answer["ok"])
        self.assertTrue(self.server.nonces[-1].startswith("--leadingdash"), self.server.nonces)

    def test_wrong_secret_is_refused_and_exits_non_zero(self):
        with self.assertLogs("enclave.rpcauth", "WARNING"):
            result = self.rpc("POST", "/v1/rpc/echo", "{}", secret=WRONG_SECRET)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn('"unauthorized"', result.stdout)
        self.assertEqual(self.server.reasons[-1], "bad_signature")

    def test_usage(self):
        for args in ((), ("POST",), ("POST", "/a", "{}", "extra"), ("post", "/a"),
                     ("POST", "no-slash"), ("GET", "/a", "{}")):
            with self.subTest(args=args):
                result = self.rpc(*args)
                self.assertEqual(result.returncode, 2)
                self.assertTrue(result.stderr)
        self.assertIn("usage:", self.rpc().stderr)


class SignCommandTest(unittest.TestCase):
    """`sign METHOD TARGET [BODY_FILE] [--secret S]` prints headers the authenticator accepts."""

    def sign(self, argv, environ):
        parser = argparse.ArgumentParser()
        cmd_sign.add_arguments(parser)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cmd_sign.run(parser.parse_args(argv), environ)
        scan_later(err.getvalue(), "sign stderr")
        return code, out.getvalue(), err.getvalue()

    def headers(self, text):
        return dict(line.split(": ", 1) for line in text.splitlines())

    def test_headers_verify(self):
        with tempfile.NamedTemporaryFile() as body:
            body.write(b'{"token": "x"}')
            body.flush()
            code, out, _ = self.sign(["POST", "/v1/rpc/google/token/revoke?q=1", body.name],
                                     {"ENCLAVE_RPC_SHARED_SECRET": SECRET})
        self.assertEqual(code, 0)
        headers = self.headers(out)
        self.assertEqual(sorted(headers), ["X-Enclave-Nonce", "X-Enclave-Signature",
                                           "X-Enclave-Timestamp"])
        auth = RpcAuthenticator(lambda now: [SECRET], SKEW)
        auth.verify("POST", "/v1/rpc/google/token/revoke?q=1", headers, b'{"token": "x"}',
                    time.time())

    def test_secret_sources(self):
        cases = [
            ("--secret wins", ["--secret", "from-flag"], {"ENCLAVE_RPC_SHARED_SECRET": "env"},
             "from-flag"),
            ("environment", [], {"ENCLAVE_RPC_SHARED_SECRET": "from-env"}, "from-env"),
            ("local default, ALFRED_ENV=local", [], {"ALFRED_ENV": "local"},
             LOCAL_DEFAULT_RPC_SECRET),
        ]
        for name, extra, environ, secret in cases:
            with self.subTest(name):
                code, out, _ = self.sign(["GET", "/healthz", *extra], environ)
                self.assertEqual(code, 0)
                auth = RpcAuthenticator(lambda now, s=secret: [s], SKEW,
                                        allow_local_default_secret=True)
                auth.verify("GET", "/healthz", self.headers(out), b"", time.time())

    def test_no_default_secret_unless_alfred_env_is_local(self):
        for name, environ in (("ALFRED_ENV unset", {}), ("ALFRED_ENV empty", {"ALFRED_ENV": ""}),
                              ("test", {"ALFRED_ENV": "test"}),
                              ("staging", {"ALFRED_ENV": "staging"}),
                              ("production", {"ALFRED_ENV": "production"})):
            with self.subTest(name):
                code, out, err = self.sign(["GET", "/x"], environ)
                self.assertEqual((code, out), (2, ""))
                self.assertIn("ENCLAVE_RPC_SHARED_SECRET", err)
                self.assertIn("ALFRED_ENV", err)

    def test_resolve_secret_for_sign_and_probe(self):
        cases = [
            ("flag", "from-flag", {}, "from-flag"),
            ("environment", None, {"ENCLAVE_RPC_SHARED_SECRET": "from-env"}, "from-env"),
            ("explicit local", None, {"ALFRED_ENV": "local"}, LOCAL_DEFAULT_RPC_SECRET),
            ("ALFRED_ENV unset", None, {}, None),
            ("ALFRED_ENV empty", None, {"ALFRED_ENV": ""}, None),
            ("ALFRED_ENV=test", None, {"ALFRED_ENV": "test"}, None),
        ]
        for name, flag, environ, expected in cases:
            with self.subTest(name):
                got = resolve_secret(argparse.Namespace(secret=flag), environ)
                self.assertEqual(got, expected)

    def test_nonce_starting_with_a_dash(self):
        nonce = "-" + "a" * 21 + "-_B9"
        for name, argv in (("--nonce=VALUE", ["--nonce=" + nonce]),
                           ("--nonce VALUE", ["--nonce", nonce]),
                           ("--nonce VALUE before the operands", None)):
            with self.subTest(name):
                base = ["sign", "POST", "/x", "--secret", SECRET, "--timestamp", "1700000000"]
                args = base + argv if argv else ["sign", "--nonce", nonce] + base[1:]
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = cli.main(args)
                self.assertEqual(code, 0, err.getvalue())
                headers = self.headers(out.getvalue())
                self.assertEqual(headers["X-Enclave-Nonce"], nonce)
                auth = RpcAuthenticator(lambda now: [SECRET], SKEW)
                auth.verify("POST", "/x", headers, b"", 1700000000)

    def test_undecodable_secret_exits_2_without_a_traceback(self):
        env = {k: v for k, v in os.environb.items()
               if not k.startswith((b"ALFRED_", b"ENCLAVE_"))}
        bad = b"caf\xe9-undecodable-\xff-secret"
        cases = [("environment", [], {b"ENCLAVE_RPC_SHARED_SECRET": bad}),
                 ("--secret", [b"--secret", bad], {})]
        for name, extra, more_env in cases:
            with self.subTest(name):
                result = subprocess.run(
                    [sys.executable.encode(), str(ROOT / "enclave.py").encode(), b"sign",
                     b"GET", b"/x", *extra],
                    env={**env, **more_env}, capture_output=True, timeout=30)
                stderr = result.stderr.decode("utf-8", "replace")
                self.assertEqual((result.returncode, result.stdout), (2, b""), stderr)
                self.assertIn("UTF-8", stderr)
                self.assertNotIn("Traceback", stderr)
                self.assertNotIn(b"undecodable", result.stderr)

    def test_fixed_timestamp_and_nonce_are_deterministic(self):
        argv = ["POST", "/x", "--secret", SECRET, "--timestamp", "1700000000",
                "--nonce", "A" * 22]
        self.assertEqual(self.sign(argv, {})[1], self.sign(argv, {})[1])

    def test_usage_errors(self):
        for argv in (["post", "/x"], ["POST", "x"], ["POST", "/a b"], ["POST", "/x", "/nonexistent"],
                     ["POST", "/x", "--nonce", "short"]):
            with self.subTest(argv=argv):
                code, out, err = self.sign(argv, {"ENCLAVE_RPC_SHARED_SECRET": SECRET})
                self.assertEqual((code, out), (2, ""))
                self.assertTrue(err)


if __name__ == "__main__":
    unittest.main()
