"""Senders: the `send-secrets` command, scripts/send-secrets.sh, raw socat, scripts/gen-dev-certs.sh."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import unittest
from pathlib import Path

from enclave import cli
from enclave.host import send_secrets as cmd_send_secrets
from enclave.addresses import parse_address
from enclave.config import Settings
from enclave.metrics import Metrics
from enclave.secrets_listener import SecretsListener
from enclave.secretstore import SecretStore
from tests.support import remember_key_files, remember_secret, scan_later
from tests.test_secrets import mtls_object, quiet_enclave_logs

ROOT = Path(__file__).resolve().parent.parent
SEND_SCRIPT = ROOT / "scripts" / "send-secrets.sh"
GEN_SCRIPT = ROOT / "scripts" / "gen-dev-certs.sh"
LOOPBACK_ANY = parse_address("tcp:127.0.0.1:0")
SCRIPT_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SenderTestCase(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name)
        quiet_enclave_logs(self)
        self.store = SecretStore(Settings(certs_dir=self.tmp / "certs"), Metrics())
        # Generated per boot: never logged either.
        remember_secret(self.store.sealing_keyring().current, kind="token sealing key")

    def start_listener(self, address=LOOPBACK_ANY) -> SecretsListener:
        listener = SecretsListener(address, self.store, ("127.0.0.1",), idle_timeout_s=2,
                                   connection_timeout_s=5, linger_s=0.5)
        listener.bind()
        listener.start()
        self.addCleanup(listener.shutdown)
        return listener

    def write(self, name: str, payload) -> Path:
        path = self.tmp / name
        path.write_bytes(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        return path

    def good_file(self) -> Path:
        return self.write("good.json", {"MTLS_CLIENT_CERT_JSON": mtls_object(),
                                        "ECS_WATERMARK_ENDPOINT": "https://wm.internal:8443"})

    def bad_file(self) -> Path:
        return self.write("bad.json", {"ECS_WATERMARK_ENDPOINT": "http://wm.internal"})


class SendSecretsCommandTest(SenderTestCase):
    def run_command(self, *argv) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser()
        cmd_send_secrets.add_arguments(parser)
        args = parser.parse_args([str(a) for a in argv])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cmd_send_secrets.run(args)
        scan_later(err.getvalue(), "send-secrets stderr")
        return code, out.getvalue(), err.getvalue()

    def test_accepted_delivery_prints_the_ack_and_exits_0(self):
        listener = self.start_listener()
        code, out, _ = self.run_command(listener.address, self.good_file())
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), {"ok": True, "version": 1, "changed": [
            "MTLS_CLIENT_CERT_JSON", "ECS_WATERMARK_ENDPOINT"]})
        self.assertEqual(out.count("\n"), 1)
        self.assertTrue(self.store.mtls().configured)

    def test_refused_delivery_prints_the_ack_and_exits_1(self):
        listener = self.start_listener()
        code, out, _ = self.run_command(listener.address, self.bad_file())
        self.assertEqual(code, 1)
        self.assertEqual(json.loads(out)["error"]["code"], "invalid_endpoint")

    def test_usage_errors_exit_2(self):
        cases = [
            ("not an address", ["somewhere:7777", self.good_file()]),
            ("vsock ANY", ["vsock:ANY:7777", self.good_file()]),
            ("missing file", ["tcp:127.0.0.1:1", self.tmp / "missing.json"]),
            ("file too large", ["tcp:127.0.0.1:1", self.write("big.json", b"{" + b" " * 300_000 + b"}")]),
            ("zero tries", ["tcp:127.0.0.1:1", self.good_file(), "--tries", "0"]),
        ]
        for name, argv in cases:
            with self.subTest(name):
                code, out, err = self.run_command(*argv)
                self.assertEqual(code, 2)
                self.assertEqual(out, "")
                self.assertIn("send-secrets:", err)

    def test_unreachable_after_all_tries_exits_1(self):
        sleeps = []
        self.addCleanup(setattr, cmd_send_secrets, "_sleep", cmd_send_secrets._sleep)
        cmd_send_secrets._sleep = sleeps.append
        code, out, err = self.run_command(f"tcp:127.0.0.1:{free_port()}", self.good_file(),
                                          "--tries", "3", "--interval", "2")
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertEqual(sleeps, [2.0, 2.0])
        self.assertIn("giving up after 3 tries", err)

    def test_retries_until_the_listener_is_up(self):
        port = free_port()
        address = parse_address(f"tcp:127.0.0.1:{port}")
        self.addCleanup(setattr, cmd_send_secrets, "_sleep", cmd_send_secrets._sleep)
        cmd_send_secrets._sleep = lambda seconds: self.start_listener(address)
        code, out, err = self.run_command(address, self.good_file(), "--tries", "5")
        self.assertEqual(code, 0, err)
        self.assertIn("try 1/5", err)
        self.assertTrue(json.loads(out)["ok"])

    def test_through_the_cli(self):
        listener = self.start_listener()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["send-secrets", str(listener.address), str(self.good_file())])
        self.assertEqual(code, 0)
        self.assertTrue(json.loads(out.getvalue())["ok"])


@unittest.skipUnless(shutil.which("socat"), "socat is not installed (make tools installs it)")
class SocatTest(SenderTestCase):
    def run_script(self, *argv, env=None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "SEND_SECRETS_SLEEP": "0", **(env or {})}
        result = subprocess.run([str(SEND_SCRIPT), *map(str, argv)], capture_output=True,
                                text=True, env=full_env, timeout=SCRIPT_TIMEOUT_S)
        scan_later(result.stderr, "send-secrets.sh stderr")
        return result

    def test_raw_socat_prints_the_ack(self):
        """The compatibility promise: `cat secrets.json | socat - ...` shows the outcome."""
        listener = self.start_listener()
        with open(self.good_file(), "rb") as stdin:
            result = subprocess.run(["socat", "-", f"TCP:127.0.0.1:{listener.address.port}"],
                                    stdin=stdin, capture_output=True, timeout=SCRIPT_TIMEOUT_S)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), {"ok": True, "version": 1, "changed": [
            "MTLS_CLIENT_CERT_JSON", "ECS_WATERMARK_ENDPOINT"]})

    def test_script_accepted_and_refused(self):
        listener = self.start_listener()
        target = f"127.0.0.1:{listener.address.port}"
        result = self.run_script("--tcp", target, self.good_file())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["version"], 1)
        result = self.run_script("--tcp", target, self.bad_file())
        self.assertEqual(result.returncode, 1)
        ack = json.loads(result.stdout)
        self.assertEqual((ack["ok"], ack["version"], ack["error"]["code"]),
                         (False, 1, "invalid_endpoint"))

    def test_script_unreachable_and_usage(self):
        result = self.run_script("--tcp", f"127.0.0.1:{free_port()}", self.good_file(),
                                 env={"SEND_SECRETS_TRIES": "2"})
        self.assertEqual(result.returncode, 1)
        self.assertIn("try 2/2", result.stderr)
        self.assertIn("giving up after 2 tries", result.stderr)
        self.assertEqual(result.stdout, "")
        for argv in ([], ["--tcp", "127.0.0.1:1"], ["--cid", "x", "f.json"],
                     ["--cid", "16", "--tcp", "127.0.0.1:1", str(self.good_file())],
                     ["--tcp", "127.0.0.1:1", str(self.tmp / "missing.json")]):
            with self.subTest(argv=argv):
                result = self.run_script(*argv)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertIn("send-secrets.sh", result.stderr)


@unittest.skipUnless(shutil.which("openssl") and shutil.which("socat"),
                     "openssl or socat is not installed (make tools installs them)")
class DevCertsTest(SenderTestCase):
    def test_dev_pki_is_idempotent_and_its_secrets_json_is_accepted(self):
        pki = self.tmp / "pki"

        def run(*argv):
            result = subprocess.run([str(GEN_SCRIPT), *argv], capture_output=True, text=True,
                                    timeout=SCRIPT_TIMEOUT_S)
            remember_key_files(pki, kind="gen-dev-certs.sh")  # secrets.json carries client.key
            scan_later(result.stderr, "gen-dev-certs.sh stderr")
            return result

        result = run("--endpoint", "https://127.0.0.1:9443", str(pki))
        self.assertEqual(result.returncode, 0, result.stderr)
        for name in ("ca.key", "client.key", "server.key", "secrets.json"):
            self.assertEqual(os.stat(pki / name).st_mode & 0o777, 0o600, name)
        first = (pki / "client.crt").read_bytes()
        result = run("--endpoint", "https://127.0.0.1:9443", str(pki))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("present and valid", result.stderr)
        self.assertEqual((pki / "client.crt").read_bytes(), first)

        listener = self.start_listener()
        result = subprocess.run(
            [str(SEND_SCRIPT), "--tcp", f"127.0.0.1:{listener.address.port}", str(pki / "secrets.json")],
            capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
        scan_later(result.stderr, "send-secrets.sh stderr")
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertTrue(self.store.mtls().configured)
        self.assertEqual(self.store.mtls().endpoint, "https://127.0.0.1:9443")

        result = run("--force", str(pki))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotEqual((pki / "client.crt").read_bytes(), first)


if __name__ == "__main__":
    unittest.main()
