"""`serve` start-up: who may use the published local secret, and busy listen addresses."""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from dataclasses import replace
from pathlib import Path

from enclave import service
from enclave.addresses import parse_address
from enclave.config import Settings
from enclave.errors import EnclaveError, RpcSecretNotReady
from enclave.secrets import Bundle
from enclave.metrics import Metrics
from enclave.rpcauth import LOCAL_DEFAULT_RPC_SECRET, AuthError, new_nonce, sign_request
from tests.support import keep_off_console

ROOT = Path(__file__).resolve().parent.parent
STRONG_SECRET = "service-start-test-secret-" + "q" * 20
SUBPROCESS_TIMEOUT_S = 60
_quiet = []


def setUpModule():
    _quiet.append(keep_off_console("enclave", "enclave.devpki", "enclave.attestation",
                                   "enclave.rpcauth", "enclave.secrets_listener"))


def tearDownModule():
    while _quiet:
        _quiet.pop()()


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ALFRED_", "ENCLAVE_", "TEE_", "GOOGLE_", "ECS_", "MTLS_"))}
    env.update(extra)
    return env


class TempState(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)
        self.base = Settings(state_dir=self.dir / "state", certs_dir=self.dir / "certs",
                             http_listen=parse_address("tcp:127.0.0.1:0"),
                             secrets_listen=parse_address("tcp:127.0.0.1:0"),
                             secrets_initial_timeout_s=0.0)

    def hold_port(self) -> int:
        """A loopback port held (listening) by this test until it ends."""
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        return sock.getsockname()[1]


class LocalDefaultSecretInTheAuthenticator(TempState):
    """The authenticator gets the published secret only when config allowed it AND the
    listeners it is about to bind are on loopback."""

    def accepts_local_default(self, settings: Settings) -> bool:
        runtime = service.build_services(settings, Metrics())
        self.addCleanup(runtime.close)
        headers = sign_request(LOCAL_DEFAULT_RPC_SECRET, "POST", "/v1/rpc/x", b"{}",
                               int(time.time()), new_nonce())
        try:
            runtime.authenticator.verify("POST", "/v1/rpc/x", headers, b"{}", time.time())
        except (AuthError, RpcSecretNotReady):  # the default alone is no secret at all
            return False
        return True

    def test_table(self):
        vsock_http = parse_address("vsock:ANY:8181")
        public_http = parse_address("tcp:0.0.0.0:8181")
        vsock_secrets = parse_address("vsock:ANY:7777")
        cases = [
            ("config allowed it, loopback", {"allow_local_default_secret": True}, True),
            ("a Settings built by hand (not allowed)", {}, False),
            ("allowed, but HTTP on vsock",
             {"allow_local_default_secret": True, "http_listen": vsock_http}, False),
            ("allowed, but HTTP on every interface",
             {"allow_local_default_secret": True, "http_listen": public_http}, False),
            ("allowed, but secrets on vsock",
             {"allow_local_default_secret": True, "secrets_listen": vsock_secrets}, False),
            ("allowed, but ALFRED_ENV=test", {"allow_local_default_secret": True, "env": "test"},
             False),
        ]
        for name, changes, accepted in cases:
            with self.subTest(name):
                settings = replace(self.base, **changes)
                self.assertEqual(self.accepts_local_default(settings), accepted)


class BusyAddresses(TempState):
    def test_in_process_start_names_the_variable_and_address(self):
        for variable, field in (("ENCLAVE_HTTP_LISTEN", "http_listen"),
                                ("ENCLAVE_SECRETS_LISTEN", "secrets_listen")):
            with self.subTest(variable):
                port = self.hold_port()
                address = f"tcp:127.0.0.1:{port}"
                # A long start-up window: a busy HTTP port must be found before it, not after.
                settings = replace(self.base, secrets_initial_timeout_s=8.0,
                                   **{field: parse_address(address)})
                started = time.monotonic()
                with self.assertRaises(EnclaveError) as ctx:
                    running = service.start(settings)
                    running.stop()
                self.assertLess(time.monotonic() - started, 4)
                message = str(ctx.exception)
                self.assertIn(variable, message)
                self.assertIn(address, message)
                self.assertNotIn("Errno", message)

    def test_serve_exits_2_naming_the_variable_and_address(self):
        for variable in ("ENCLAVE_HTTP_LISTEN", "ENCLAVE_SECRETS_LISTEN"):
            with self.subTest(variable):
                address = f"tcp:127.0.0.1:{self.hold_port()}"
                env = clean_env(**{
                    "ALFRED_ENV": "local",
                    "ENCLAVE_HTTP_LISTEN": "tcp:127.0.0.1:0",
                    "ENCLAVE_SECRETS_LISTEN": "tcp:127.0.0.1:0",
                    "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "0",
                    "ENCLAVE_STATE_DIR": str(self.dir / "state"),
                    "ENCLAVE_CERTS_DIR": str(self.dir / "certs"),
                    variable: address,
                })
                result = subprocess.run([sys.executable, str(ROOT / "enclave.py"), "serve"],
                                        env=env, cwd=self.dir, capture_output=True, text=True,
                                        timeout=SUBPROCESS_TIMEOUT_S)
                self.assertEqual(result.returncode, 2, result.stderr)
                line = next((l for l in result.stderr.splitlines() if variable in l), "")
                self.assertIn(address, line, result.stderr)
                self.assertNotIn("Errno", result.stderr)
                self.assertNotIn("Traceback", result.stderr)



class StopDuringASealedDelivery(TempState):
    """SIGTERM while a sealed delivery is inside its KMS call (up to 10 s): the runtime stops
    within the design's 6 s, and the delivery, when KMS answers later, is not applied."""

    def test_stop_is_bounded_and_nothing_is_applied(self):
        entered, release = threading.Event(), threading.Event()

        class SlowOpener:  # stands in for enclave.sealed.SealedSecretsOpener: KMS is slow
            def open(self, delivery, last_bundle_version):
                entered.set()
                release.wait(SUBPROCESS_TIMEOUT_S)
                return {"GOOGLE_OAUTH_CLIENT_ID": "applied-too-late"}, Bundle(1, b"d")

        running = service.start(self.base)
        self.addCleanup(release.set)
        store = running.runtime.store
        store._sealed = SlowOpener()
        port = running.listener.address.port
        sender = threading.Thread(target=self._send, args=(port,), daemon=True)
        sender.start()
        self.assertTrue(entered.wait(SUBPROCESS_TIMEOUT_S))
        started = time.monotonic()
        running.stop()
        self.assertLess(time.monotonic() - started, 6.0)  # the design's bound after SIGTERM
        release.set()  # KMS answers after the stop
        sender.join(SUBPROCESS_TIMEOUT_S)
        for thread in threading.enumerate():
            if thread.name.startswith("secrets"):
                thread.join(SUBPROCESS_TIMEOUT_S)
        self.assertEqual(store.version, 0)
        self.assertIsNone(store.current().get("GOOGLE_OAUTH_CLIENT_ID"))

    @staticmethod
    def _send(port: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=SUBPROCESS_TIMEOUT_S) as s:
                s.sendall(b'{"SEALED_SECRETS": {}}')
                s.shutdown(socket.SHUT_WR)
                s.recv(4096)
        except OSError:
            pass  # the listener may close without an ack while stopping


if __name__ == "__main__":
    unittest.main()
