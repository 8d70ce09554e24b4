"""Senders: the `send-secrets` command, scripts/send-secrets.sh (plaintext and --kms sealed
deliveries, credentials from the environment or a fake IMDSv2), raw socat,
scripts/gen-dev-certs.sh."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import json
import os
import secrets
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

from enclave import cli, envelope, kms
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
KMS_KEY_ARN = "arn:aws:kms:eu-west-1:111122223333:key/0b7c4c2e-6f7d-4a8e-9f3a-1c2d3e4f5a6b"
CAPTURE_READ_TIMEOUT_S = 10  # the capture listener's bound on a silent sender


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


# -- --kms: the sealed delivery ----------------------------------------------------------------

class _CaptureHandler(socketserver.BaseRequestHandler):
    def handle(self):
        server = self.server
        self.request.settimeout(CAPTURE_READ_TIMEOUT_S)
        chunks = []
        try:
            while chunk := self.request.recv(65536):
                chunks.append(chunk)
        except OSError:
            return
        with server.lock:
            server.deliveries.append(b"".join(chunks))
            ack = server.acks.pop(0) if len(server.acks) > 1 else server.acks[0]
        self.request.sendall(json.dumps(ack).encode() + b"\n")


class CaptureListener(socketserver.ThreadingTCPServer):
    """A stand-in secrets listener on 127.0.0.1:0: keeps every delivery, answers `acks` in
    order (the last one repeats)."""

    daemon_threads = True
    block_on_close = True

    def __init__(self, *acks):
        super().__init__(("127.0.0.1", 0), _CaptureHandler)
        self.lock = threading.Lock()
        self.deliveries: list[bytes] = []
        self.acks = list(acks) or [{"ok": True, "version": 1, "changed": ["SEALED_SECRETS"]}]
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def close(self):
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class FakeImds(http.server.ThreadingHTTPServer):
    """IMDSv2 on 127.0.0.1:0: PUT /latest/api/token, then token-authenticated GETs of the role
    list and the role's credentials document (the real field names, Token not SessionToken).
    A GET without the session token is refused (401), as IMDSv2 does.

    Faults: `roles` (the listing; empty answers 404, as on an instance without a profile),
    `token_status` (the PUT's status: 403 is IMDSv2 turned off), `answered_token` (the PUT
    answers this instead of the token the GETs need)."""

    ROLE = "enclave-parent-role"
    daemon_threads = True

    def __init__(self, document: dict):
        self.token = "AQAEA" + secrets.token_urlsafe(40)
        self.document = document
        self.roles = [FakeImds.ROLE]
        self.token_status = 200
        self.answered_token: str | None = None
        self.seen: list[tuple[str, str, bool]] = []  # (method, path, carried the token)
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # no request lines on stderr
                pass

            def answer(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                fake.seen.append(("PUT", self.path, False))
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if self.path != "/latest/api/token" or not ttl.isdigit():
                    return self.answer(400, b"")
                if fake.token_status != 200:
                    return self.answer(fake.token_status, b"")
                self.answer(200, (fake.answered_token or fake.token).encode())

            def do_GET(self):
                authorized = self.headers.get("X-aws-ec2-metadata-token") == fake.token
                fake.seen.append(("GET", self.path, authorized))
                if not authorized:
                    return self.answer(401, b"")
                base = "/latest/meta-data/iam/security-credentials/"
                if self.path == base:
                    if not fake.roles:
                        return self.answer(404, b"")
                    return self.answer(200, "\n".join(fake.roles).encode())
                if self.path[len(base):] in fake.roles:
                    return self.answer(200, json.dumps(fake.document).encode())
                self.answer(404, b"")

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self):
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


def _random_credentials() -> dict:
    """Values shaped like AWS's, random per test, registered for the leak scan."""
    creds = {"AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
             "SecretAccessKey": secrets.token_urlsafe(30)[:40],
             "Token": "IQoJb3JpZ2luX2VjE" + secrets.token_urlsafe(120)}
    remember_secret(creds["SecretAccessKey"], creds["Token"], kind="AWS test credentials")
    return creds


class KmsDeliveryFixture(unittest.TestCase):
    """A sealed envelope in a file, random AWS-shaped credentials, capture listeners, and the
    script with every tool it runs (socat, curl, python) wrapped to record its command line,
    the part of a process that `ps` shows to every user."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name)
        self.envelope = envelope.seal(
            {"ENCLAVE_RPC_SHARED_SECRET": "never-sent-in-the-clear"}, kms_key_arn=KMS_KEY_ARN,
            bundle_version=9, data_key=os.urandom(32), encrypted_data_key=os.urandom(180),
            nonce=os.urandom(12))
        self.envelope_file = self.tmp / "sealed.json"
        self.envelope_file.write_text(json.dumps(self.envelope, indent=2))
        self.argv_log = self.tmp / "argv.log"
        self.bin = self.tmp / "bin"
        self.bin.mkdir()
        for tool, real in (("socat", shutil.which("socat")), ("curl", shutil.which("curl")),
                           ("python3", sys.executable)):
            if real is None:
                continue
            wrapper = self.bin / tool
            wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> "{self.argv_log}"\n'
                               f'exec "{real}" "$@"\n')
            wrapper.chmod(0o755)
        self.creds = _random_credentials()

    def listener(self, *acks) -> CaptureListener:
        listener = CaptureListener(*acks)
        self.addCleanup(listener.close)
        return listener

    def run_script(self, *argv, env=None) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SEND_SECRETS_"))}
        full_env = {**base, "PATH": f"{self.bin}{os.pathsep}{base.get('PATH', '')}",
                    "SEND_SECRETS_SLEEP": "0", "SEND_SECRETS_PYTHON": str(self.bin / "python3"),
                    **(env or {})}
        result = subprocess.run(["bash", str(SEND_SCRIPT), *map(str, argv)], capture_output=True,
                                text=True, env=full_env, timeout=SCRIPT_TIMEOUT_S)
        scan_later(result.stdout + result.stderr, "send-secrets.sh --kms output")
        return result

    def env_credentials(self, **extra) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.creds["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": self.creds["SecretAccessKey"],
                "AWS_SESSION_TOKEN": self.creds["Token"], **extra}

    def delivery(self, listener, index=-1) -> dict:
        return json.loads(listener.deliveries[index])

    def imds(self, **document_fields) -> FakeImds:
        document = {"Code": "Success", "LastUpdated": "2026-05-09T11:00:00Z",
                    "Type": "AWS-HMAC", **self.creds, "Expiration": "2099-05-09T17:00:00Z",
                    **document_fields}
        imds = FakeImds(document)
        self.addCleanup(imds.close)
        remember_secret(imds.token, kind="IMDSv2 session token")
        return imds


@unittest.skipUnless(shutil.which("socat"), "socat is not installed (make tools installs it)")
class KmsDeliveryScriptTest(KmsDeliveryFixture):
    """send-secrets.sh --kms ENVELOPE_FILE against a capture listener."""

    def assert_nothing_shows(self, result, *values):
        """No credential in the script's output, nor on any command line it ran."""
        command_lines = self.argv_log.read_text() if self.argv_log.exists() else ""
        self.assertIn("socat ", command_lines)
        for value in values:
            self.assertNotIn(value, result.stdout + result.stderr)
            self.assertNotIn(value, command_lines)

    def test_env_credentials_build_the_section_15_delivery(self):
        listener = self.listener()
        result = self.run_script("--tcp", listener.target, "--kms", self.envelope_file,
                                 env=self.env_credentials(AWS_REGION="eu-west-1"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), listener.acks[0])
        self.assertEqual(result.stdout.count("\n"), 1)
        delivery = self.delivery(listener)
        self.assertEqual(delivery, {
            "SEALED_SECRETS": self.envelope,
            "AWS_CREDENTIALS": {"AccessKeyId": self.creds["AccessKeyId"],
                                "SecretAccessKey": self.creds["SecretAccessKey"],
                                "SessionToken": self.creds["Token"]},
            "AWS_REGION": "eu-west-1"})
        # what the enclave will parse: the envelope and the credentials, as the runtime does
        self.assertEqual(envelope.parse(delivery["SEALED_SECRETS"]).kms_key_arn, KMS_KEY_ARN)
        now = time.time()
        kms.AwsCredentials.from_delivery(delivery["AWS_CREDENTIALS"], now=now)
        self.assert_nothing_shows(result, self.creds["SecretAccessKey"], self.creds["Token"],
                                  self.creds["AccessKeyId"])

    def test_region_comes_from_the_key_and_a_token_is_optional(self):
        listener = self.listener()
        env = self.env_credentials()
        del env["AWS_SESSION_TOKEN"]
        result = self.run_script("--tcp", listener.target, "--kms", self.envelope_file, env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        delivery = self.delivery(listener)
        self.assertEqual(delivery["AWS_REGION"], "eu-west-1")
        self.assertEqual(set(delivery["AWS_CREDENTIALS"]), {"AccessKeyId", "SecretAccessKey"})

    @unittest.skipUnless(shutil.which("curl"), "curl is not installed")
    def test_imds_credentials(self):
        document = {"Code": "Success", "LastUpdated": "2026-05-09T11:00:00Z",
                    "Type": "AWS-HMAC", **self.creds, "Expiration": "2099-05-09T17:00:00Z"}
        imds = FakeImds(document)
        self.addCleanup(imds.close)
        remember_secret(imds.token, kind="IMDSv2 session token")
        listener = self.listener()
        # IMDS is the default without AWS_ACCESS_KEY_ID
        result = self.run_script("--tcp", listener.target, "--kms", self.envelope_file,
                                 env={"SEND_SECRETS_IMDS_URL": imds.url})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(imds.seen, [
            ("PUT", "/latest/api/token", False),
            ("GET", "/latest/meta-data/iam/security-credentials/", True),
            ("GET", f"/latest/meta-data/iam/security-credentials/{FakeImds.ROLE}", True)])
        credentials = self.delivery(listener)["AWS_CREDENTIALS"]
        self.assertEqual(credentials, {"AccessKeyId": self.creds["AccessKeyId"],
                                       "SecretAccessKey": self.creds["SecretAccessKey"],
                                       "SessionToken": self.creds["Token"],
                                       "Expiration": "2099-05-09T17:00:00Z"})
        parsed = kms.AwsCredentials.from_delivery(credentials,
                                                  now=time.time())
        self.assertEqual(parsed.expiration.year, 2099)
        self.assert_nothing_shows(result, self.creds["SecretAccessKey"], self.creds["Token"],
                                  imds.token)

        # a named role skips the listing; a failed IMDS document exits 1
        imds.seen.clear()
        result = self.run_script("--tcp", listener.target, "--kms", self.envelope_file,
                                 env={"SEND_SECRETS_IMDS_URL": imds.url,
                                      "SEND_SECRETS_CREDENTIALS": "imds",
                                      "SEND_SECRETS_IMDS_ROLE": FakeImds.ROLE,
                                      "AWS_ACCESS_KEY_ID": "AKIAIGNOREDBYIMDS000"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual([path for _, path, _ in imds.seen][1:],
                         [f"/latest/meta-data/iam/security-credentials/{FakeImds.ROLE}"])
        imds.document = {"Code": "AssumeRoleUnauthorizedAccess"}
        sent = len(listener.deliveries)
        result = self.run_script("--tcp", listener.target, "--kms", self.envelope_file,
                                 env={"SEND_SECRETS_IMDS_URL": imds.url})
        self.assertEqual(result.returncode, 1)
        self.assertIn("AssumeRoleUnauthorizedAccess", result.stderr)
        self.assertEqual(len(listener.deliveries), sent)  # nothing sent

    @unittest.skipUnless(shutil.which("curl"), "curl is not installed")
    def test_no_imds_exits_1_with_a_hint(self):
        listener = self.listener()
        result = self.run_script("--tcp", listener.target, "--kms", self.envelope_file,
                                 env={"SEND_SECRETS_IMDS_URL": f"http://127.0.0.1:{free_port()}"})
        self.assertEqual(result.returncode, 1)
        self.assertIn("SEND_SECRETS_CREDENTIALS=env", result.stderr)
        self.assertEqual(listener.deliveries, [])

    def test_refused_and_busy_acks(self):
        refusal = {"ok": False, "version": 0,
                   "error": {"code": "kms_access_denied", "message": "not in the key policy"}}
        listener = self.listener(refusal)
        result = self.run_script("--tcp", listener.target, "--kms", self.envelope_file,
                                 env=self.env_credentials())
        self.assertEqual(result.returncode, 1)
        self.assertEqual(json.loads(result.stdout), refusal)

        busy = {"ok": False, "version": 0, "error": {"code": "busy", "message": "busy"}}
        listener = self.listener(busy, {"ok": True, "version": 1, "changed": []})
        result = self.run_script("--tcp", listener.target, "--kms", self.envelope_file,
                                 env=self.env_credentials())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("try 1/5: listener busy", result.stderr)
        first, second = listener.deliveries
        self.assertEqual(first, second)  # the same delivery, sent again

    def test_unreachable_listener(self):
        result = self.run_script("--tcp", f"127.0.0.1:{free_port()}", "--kms", self.envelope_file,
                                 env={**self.env_credentials(), "SEND_SECRETS_TRIES": "2"})
        self.assertEqual(result.returncode, 1)
        self.assertIn("giving up after 2 tries", result.stderr)
        self.assertEqual(result.stdout, "")

    def test_usage_errors_exit_2_and_send_nothing(self):
        listener = self.listener()
        not_sealed = self.tmp / "plain.json"
        not_sealed.write_text(json.dumps({"ENCLAVE_RPC_SHARED_SECRET": "x" * 40}))
        creds = self.env_credentials()
        no_secret = {k: v for k, v in creds.items() if k != "AWS_SECRET_ACCESS_KEY"}
        cases = {
            "FILE and --kms": (["--tcp", listener.target, not_sealed, "--kms",
                                self.envelope_file], creds, "not both"),
            "--kms without a file": (["--tcp", listener.target, "--kms"], creds, "usage:"),
            "unreadable envelope": (["--tcp", listener.target, "--kms", self.tmp / "missing"],
                                    creds, "cannot read"),
            "not an envelope": (["--tcp", listener.target, "--kms", not_sealed], creds,
                                "not a sealed envelope"),
            "unknown credentials source": (["--tcp", listener.target, "--kms",
                                            self.envelope_file],
                                           {**creds, "SEND_SECRETS_CREDENTIALS": "file"},
                                           "must be env or imds"),
            "env without the secret key": (["--tcp", listener.target, "--kms",
                                            self.envelope_file], no_secret,
                                           "AWS_SECRET_ACCESS_KEY"),
            "another region": (["--tcp", listener.target, "--kms", self.envelope_file],
                               {**creds, "AWS_REGION": "us-east-1"}, "not the region"),
        }
        for name, (argv, env, message) in cases.items():
            with self.subTest(name):
                result = self.run_script(*argv, env=env)
                self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
                self.assertIn(message, result.stderr)
                self.assertEqual(result.stdout, "")
        self.assertEqual(listener.deliveries, [])


class KmsDeliveryCommandTest(KmsDeliveryFixture):
    """`enclave.py send-secrets ADDRESS --kms ENVELOPE_FILE`, the Python twin of the script's
    --kms mode, against a fake IMDSv2 and a capture listener, both on loopback."""

    def setUp(self):
        super().setUp()
        self.addCleanup(setattr, cmd_send_secrets, "_sleep", cmd_send_secrets._sleep)
        self.sleeps: list[float] = []
        cmd_send_secrets._sleep = self.sleeps.append

    def run_twin(self, *argv, env=None) -> tuple[int, str, str]:
        """The command in this process with exactly `env` as its environment."""
        parser = argparse.ArgumentParser()
        cmd_send_secrets.add_arguments(parser)
        args = parser.parse_args([str(a) for a in argv])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cmd_send_secrets.run(args, environ=dict(env or {}))
        scan_later(out.getvalue() + err.getvalue(), "send-secrets --kms output")
        return code, out.getvalue(), err.getvalue()

    def kms_argv(self, listener_or_target, *extra):
        target = getattr(listener_or_target, "target", listener_or_target)
        return (f"tcp:{target}", "--kms", self.envelope_file, *extra)

    def assert_no_credentials(self, *texts, extra=()):
        for text in texts:
            for value in (self.creds["SecretAccessKey"], self.creds["Token"], *extra):
                self.assertNotIn(value, text)

    def test_imds_credentials_build_the_section_15_delivery(self):
        imds = self.imds()
        listener = self.listener()
        code, out, err = self.run_twin(*self.kms_argv(listener),
                                       env={"SEND_SECRETS_IMDS_URL": imds.url})
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), listener.acks[0])
        self.assertEqual(out.count("\n"), 1)
        self.assertEqual(imds.seen, [
            ("PUT", "/latest/api/token", False),
            ("GET", "/latest/meta-data/iam/security-credentials/", True),
            ("GET", f"/latest/meta-data/iam/security-credentials/{FakeImds.ROLE}", True)])
        self.assertEqual(len(listener.deliveries), 1)
        delivery = self.delivery(listener)
        self.assertEqual(delivery, {
            "SEALED_SECRETS": self.envelope,
            "AWS_CREDENTIALS": {"AccessKeyId": self.creds["AccessKeyId"],
                                "SecretAccessKey": self.creds["SecretAccessKey"],
                                "SessionToken": self.creds["Token"],
                                "Expiration": "2099-05-09T17:00:00Z"},
            "AWS_REGION": "eu-west-1"})
        self.assertEqual(list(delivery), ["SEALED_SECRETS", "AWS_CREDENTIALS", "AWS_REGION"])
        self.assertEqual(envelope.parse(delivery["SEALED_SECRETS"]).kms_key_arn, KMS_KEY_ARN)
        parsed = kms.AwsCredentials.from_delivery(delivery["AWS_CREDENTIALS"],
                                                  now=time.time())
        self.assertEqual(parsed.expiration.year, 2099)
        self.assert_no_credentials(out, err, extra=(imds.token,))

    def test_imds_is_the_default_only_without_aws_access_key_id(self):
        imds = self.imds()
        listener = self.listener()
        # AWS_ACCESS_KEY_ID set: env is the default (IMDS is not asked)
        code, _, err = self.run_twin(*self.kms_argv(listener), env={
            "SEND_SECRETS_IMDS_URL": imds.url, "AWS_ACCESS_KEY_ID": self.creds["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": self.creds["SecretAccessKey"]})
        self.assertEqual(code, 0, err)
        self.assertEqual(imds.seen, [])
        self.assertNotIn("SessionToken", self.delivery(listener)["AWS_CREDENTIALS"])
        # SEND_SECRETS_CREDENTIALS=imds wins; a named role skips the listing
        code, _, err = self.run_twin(*self.kms_argv(listener), env={
            "SEND_SECRETS_CREDENTIALS": "imds", "SEND_SECRETS_IMDS_URL": imds.url,
            "SEND_SECRETS_IMDS_ROLE": FakeImds.ROLE,
            "AWS_ACCESS_KEY_ID": "AKIAIGNOREDBYIMDS000"})
        self.assertEqual(code, 0, err)
        self.assertEqual([path for _, path, _ in imds.seen][1:],
                         [f"/latest/meta-data/iam/security-credentials/{FakeImds.ROLE}"])
        self.assertEqual(self.delivery(listener)["AWS_CREDENTIALS"]["AccessKeyId"],
                         self.creds["AccessKeyId"])

    def test_the_fake_imds_refuses_a_request_without_the_session_token(self):
        """What makes the delivery test meaningful: like IMDSv2, no token, no answer."""
        imds = self.imds()
        url = f"{imds.url}/latest/meta-data/iam/security-credentials/"
        with self.assertRaises(urllib.error.HTTPError) as ctx:
            urllib.request.urlopen(url, timeout=CAPTURE_READ_TIMEOUT_S)
        ctx.exception.close()
        self.assertEqual(ctx.exception.code, 401)
        self.assertEqual(imds.seen, [("GET", "/latest/meta-data/iam/security-credentials/",
                                      False)])

    def test_env_credentials(self):
        listener = self.listener()
        code, out, err = self.run_twin(*self.kms_argv(listener),
                                       env=self.env_credentials(AWS_DEFAULT_REGION="eu-west-1"))
        self.assertEqual(code, 0, err)
        self.assertEqual(self.delivery(listener)["AWS_CREDENTIALS"], {
            "AccessKeyId": self.creds["AccessKeyId"],
            "SecretAccessKey": self.creds["SecretAccessKey"],
            "SessionToken": self.creds["Token"]})
        self.assert_no_credentials(out, err)

    def test_imds_failures_exit_1_with_one_line_and_send_nothing(self):
        listener = self.listener()
        down = f"http://127.0.0.1:{free_port()}"

        def no_token(imds):
            imds.token_status = 403

        def wrong_token(imds):
            imds.answered_token = "AQAEA" + secrets.token_urlsafe(40)
            remember_secret(imds.answered_token, kind="IMDSv2 session token")

        def no_role(imds):
            imds.roles = []

        def two_roles(imds):
            imds.roles = [FakeImds.ROLE, "another-role"]

        def failed_document(imds):
            imds.document = {"Code": "AssumeRoleUnauthorizedAccess",
                             "LastUpdated": "2026-05-09T11:00:00Z"}

        def not_json(imds):
            imds.document = None  # json.dumps(None): "null", not an object

        def no_secret(imds):
            del imds.document["SecretAccessKey"]

        def expired(imds):
            imds.document["Expiration"] = "2020-01-01T00:00:00Z"

        cases = {
            "IMDS down": (None, "gave no session token"),
            "IMDSv2 off": (no_token, "gave no session token (not on EC2, or IMDSv2 disabled?"),
            "token refused": (wrong_token, "lists no instance role (attach an instance profile) "
                                           "(HTTP 401)"),
            "no role": (no_role, "lists no instance role"),
            "two roles": (two_roles, "lists 2 roles: name one in SEND_SECRETS_IMDS_ROLE"),
            "failed document": (failed_document,
                                "not usable (Code AssumeRoleUnauthorizedAccess)"),
            "not an object": (not_json, "not usable"),
            "no secret key": (no_secret, "lack AccessKeyId or SecretAccessKey"),
            "expired": (expired, "kms_credentials_expired"),
        }
        for name, (fault, message) in cases.items():
            with self.subTest(name):
                imds = self.imds()
                if fault is not None:
                    fault(imds)
                url = down if fault is None else imds.url
                code, out, err = self.run_twin(*self.kms_argv(listener),
                                               env={"SEND_SECRETS_IMDS_URL": url})
                self.assertEqual((code, out), (1, ""), err)
                self.assertIn(message, err)
                self.assertTrue(err.startswith("send-secrets: "), err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assert_no_credentials(err, extra=(imds.token,))
        self.assertEqual(listener.deliveries, [])

    def test_usage_errors_exit_2_and_send_nothing(self):
        listener = self.listener()
        not_sealed = self.tmp / "plain.json"
        not_sealed.write_text(json.dumps({"ENCLAVE_RPC_SHARED_SECRET": "x" * 40}))
        duplicate = self.tmp / "duplicate.json"
        duplicate.write_text('{"v": 1, "v": 1}')
        creds = self.env_credentials()
        cases = {
            "FILE and --kms": ((f"tcp:{listener.target}", not_sealed, "--kms",
                                self.envelope_file), creds, "not both"),
            "neither": ((f"tcp:{listener.target}",), creds, "FILE or --kms"),
            "unreadable envelope": ((f"tcp:{listener.target}", "--kms", self.tmp / "missing"),
                                    creds, "cannot read"),
            "not an envelope": ((f"tcp:{listener.target}", "--kms", not_sealed), creds,
                                "not a sealed envelope"),
            "duplicate keys": ((f"tcp:{listener.target}", "--kms", duplicate), creds,
                               "not strict UTF-8 JSON"),
            "env without anything": (self.kms_argv(listener),
                                     {"SEND_SECRETS_CREDENTIALS": "env"},
                                     "needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
            "env without the secret key": (
                self.kms_argv(listener),
                {k: v for k, v in creds.items() if k != "AWS_SECRET_ACCESS_KEY"},
                "AWS_SECRET_ACCESS_KEY"),
            "malformed env key id": (self.kms_argv(listener),
                                     {**creds, "AWS_ACCESS_KEY_ID": "not-a-key-id"},
                                     "kms_credentials_invalid"),
            "unknown credentials source": (self.kms_argv(listener),
                                           {**creds, "SEND_SECRETS_CREDENTIALS": "file"},
                                           "must be env or imds"),
            "another region": (self.kms_argv(listener), {**creds, "AWS_REGION": "us-east-1"},
                               "not the region"),
            "another default region": (self.kms_argv(listener),
                                       {**creds, "AWS_DEFAULT_REGION": "us-east-1"},
                                       "not the region"),
            "bad IMDS URL": (self.kms_argv(listener),
                             {"SEND_SECRETS_IMDS_URL": "ftp://169.254.169.254"},
                             "SEND_SECRETS_IMDS_URL must be"),
            "bad role name": (self.kms_argv(listener),
                              {"SEND_SECRETS_IMDS_URL": f"http://127.0.0.1:{free_port()}",
                               "SEND_SECRETS_IMDS_ROLE": "no/slashes"},
                              "SEND_SECRETS_IMDS_ROLE must be"),
        }
        for name, (argv, env, message) in cases.items():
            with self.subTest(name):
                code, out, err = self.run_twin(*argv, env=env)
                self.assertEqual((code, out), (2, ""), err)
                self.assertIn(message, err)
                self.assertTrue(err.startswith("send-secrets: "), err)
                self.assert_no_credentials(err)
        self.assertEqual(listener.deliveries, [])

    def test_refused_busy_and_unreachable_like_the_plaintext_mode(self):
        refusal = {"ok": False, "version": 0,
                   "error": {"code": "kms_access_denied", "message": "not in the key policy"}}
        listener = self.listener(refusal)
        code, out, _ = self.run_twin(*self.kms_argv(listener), env=self.env_credentials())
        self.assertEqual(code, 1)
        self.assertEqual(json.loads(out), refusal)

        busy = {"ok": False, "version": 0, "error": {"code": "busy", "message": "busy"}}
        listener = self.listener(busy, {"ok": True, "version": 1, "changed": []})
        code, out, err = self.run_twin(*self.kms_argv(listener), env=self.env_credentials())
        self.assertEqual(code, 0, err)
        first, second = listener.deliveries
        self.assertEqual(first, second)  # the same delivery, sent again
        self.assertEqual(self.sleeps, [cmd_send_secrets.DEFAULT_INTERVAL_S])

        self.sleeps.clear()
        code, out, err = self.run_twin(*self.kms_argv(f"127.0.0.1:{free_port()}", "--tries", "2"),
                                       env=self.env_credentials())
        self.assertEqual((code, out), (1, ""))
        self.assertIn("giving up after 2 tries", err)
        self.assertEqual(self.sleeps, [cmd_send_secrets.DEFAULT_INTERVAL_S])
        self.assert_no_credentials(err)

    def test_through_the_cli(self):
        listener = self.listener()
        out, err = io.StringIO(), io.StringIO()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SEND_SECRETS_"))}
        env.update(self.env_credentials())
        with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = cli.main(["send-secrets", f"tcp:{listener.target}", "--kms",
                             str(self.envelope_file)])
        scan_later(out.getvalue() + err.getvalue(), "send-secrets --kms output")
        self.assertEqual(code, 0, err.getvalue())
        self.assertEqual(self.delivery(listener)["AWS_REGION"], "eu-west-1")


@unittest.skipUnless(shutil.which("socat"), "socat is not installed (make tools installs it)")
class ScriptAndTwinAgreeTest(KmsDeliveryFixture):
    """send-secrets.sh --kms and `enclave.py send-secrets --kms`: for the same envelope and
    credentials, the same delivery (compared parsed)."""

    def twin(self, listener, env):
        parser = argparse.ArgumentParser()
        cmd_send_secrets.add_arguments(parser)
        args = parser.parse_args([f"tcp:{listener.target}", "--kms", str(self.envelope_file)])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cmd_send_secrets.run(args, environ=env)
        scan_later(out.getvalue() + err.getvalue(), "send-secrets --kms output")
        return code, out.getvalue(), err.getvalue()

    def assert_same_delivery(self, env):
        script_listener, twin_listener = self.listener(), self.listener()
        result = self.run_script("--tcp", script_listener.target, "--kms", self.envelope_file,
                                 env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        code, out, err = self.twin(twin_listener, env)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, result.stdout)  # the same ack line
        from_script, = script_listener.deliveries
        from_twin, = twin_listener.deliveries
        self.assertEqual(json.loads(from_twin), json.loads(from_script))
        return json.loads(from_twin)

    def test_env_credentials(self):
        delivery = self.assert_same_delivery(self.env_credentials(AWS_REGION="eu-west-1"))
        self.assertIn("SessionToken", delivery["AWS_CREDENTIALS"])
        env = self.env_credentials()
        del env["AWS_SESSION_TOKEN"]
        self.assert_same_delivery(env)

    @unittest.skipUnless(shutil.which("curl"), "curl is not installed")
    def test_imds_credentials(self):
        imds = self.imds()
        delivery = self.assert_same_delivery({"SEND_SECRETS_IMDS_URL": imds.url})
        self.assertEqual(delivery["AWS_CREDENTIALS"]["SessionToken"], self.creds["Token"])
        self.assertEqual(delivery["AWS_CREDENTIALS"]["Expiration"], "2099-05-09T17:00:00Z")


if __name__ == "__main__":
    unittest.main()
