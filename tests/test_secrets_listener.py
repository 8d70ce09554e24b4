"""The secrets channel end to end: listener (real sockets on 127.0.0.1:0) + store + files + TLS."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import random
import select
import socket
import ssl
import tempfile
import threading
import time
import unittest
from pathlib import Path
from unittest import mock

from enclave import certstore, secrets_listener, secretstore
from enclave.addresses import VSOCK_CID_ANY, Address, parse_address
from enclave.config import Settings
from enclave.rpcauth import LOCAL_DEFAULT_RPC_SECRET
from enclave.metrics import Metrics
from enclave.secrets import SecretsError
from enclave.secrets_listener import SecretsListener, wait_for_initial
from enclave.secretstore import RPC_SECRET_GRACE_S, SecretStore
from tests.fakes.pki import TestCA
from tests.support import remember_secret
from tests.test_secrets import (BAD_ENDPOINTS, mtls_object, quiet_enclave_logs, secret_strings,
                                shared_ca, unusable_cas, unusable_string_cases)

LOOPBACK_ANY = parse_address("tcp:127.0.0.1:0")
SHORT_IDLE_S = 0.3  # the injected idle timeout: the drip test runs in well under a second
SHORT_TOTAL_S = 5.0
NEW_RPC_SECRET = "n" * 48
remember_secret(NEW_RPC_SECRET, kind="rpc shared secret")
remember_secret("google-secret-value", kind="google client secret")


def send(address: Address, payload: bytes, *, half_close: bool = True, timeout: float = 10) -> dict:
    """Deliver like socat: write, half-close, read the one-line ack until EOF."""
    with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_ack(sock)


def read_ack(sock: socket.socket) -> dict:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    lines = data.splitlines()
    assert len(lines) == 1, f"expected one ack line, got {data!r}"
    return json.loads(lines[0])


def file_hashes(directory: Path) -> dict:
    out = {}
    for name in certstore.FILE_NAMES:
        path = directory / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return out


class Clock:
    """A store clock the test sets: Unix seconds."""
    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now


class ChannelTestCase(unittest.TestCase):
    """A store over a temporary certs dir and listeners on 127.0.0.1:0, torn down cleanly."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name)
        self.certs_dir = self.tmp / "certs"
        self.metrics = Metrics()
        quiet_enclave_logs(self)

    def make_store(self, *, before_swap=None, **kwargs) -> SecretStore:
        """A store over this test's directory. `before_swap(new_state, changed)` runs under the
        store's lock once a delivery is validated, before anything becomes visible."""
        settings_kwargs = {"certs_dir": self.certs_dir, "secrets_listen": LOOPBACK_ANY}
        settings_kwargs.update(kwargs.pop("settings", {}))
        if before_swap is not None:
            real_apply_update = secretstore.secrets.apply_update

            def apply_update(*args, **kw):
                new_state, changed = real_apply_update(*args, **kw)
                if changed:
                    before_swap(new_state, changed)
                return new_state, changed

            patcher = mock.patch.object(secretstore.secrets, "apply_update", apply_update)
            patcher.start()
            self.addCleanup(patcher.stop)
        store = SecretStore(Settings(**settings_kwargs), self.metrics, **kwargs)
        keyring = store.sealing_keyring()  # generated per boot outside strict environments
        remember_secret(keyring.current if keyring else None, kind="token sealing key")
        return store

    def make_listener(self, store, allowed=("127.0.0.1",), **kwargs) -> SecretsListener:
        kwargs.setdefault("idle_timeout_s", SHORT_IDLE_S)
        kwargs.setdefault("connection_timeout_s", SHORT_TOTAL_S)
        kwargs.setdefault("linger_s", 0.5)
        listener = SecretsListener(LOOPBACK_ANY, store, allowed, self.metrics, **kwargs)
        listener.bind()
        listener.start()
        self.addCleanup(listener.shutdown)
        return listener

    @staticmethod
    def payload(obj: dict) -> bytes:
        return json.dumps(obj).encode()


class RefusedDeliveriesTest(ChannelTestCase):
    def test_each_refusal_changes_nothing_and_the_next_good_delivery_is_accepted(self):
        store = self.make_store()
        listener = self.make_listener(store)
        outsider = self.make_listener(store, allowed=("vsock:3", "10.9.8.7"))
        ca = shared_ca()
        clients = {}  # a new client certificate for every good delivery: each one changes things
        now = dt.datetime.now(dt.timezone.utc)
        expired = ca.issue("expired", not_before=now - dt.timedelta(days=9),
                           not_after=now - dt.timedelta(days=2))
        stranger = ca.issue("stranger")

        def good(i: int) -> dict:
            if i not in clients:
                clients[i] = ca.issue(f"enclave-client-{i}")
            return {"MTLS_CLIENT_CERT_JSON": mtls_object(clients[i]),
                    "ECS_WATERMARK_ENDPOINT": f"https://wm{i}.internal:8443"}

        def drip(address: Address) -> dict:
            # One byte, then nothing for longer than the idle timeout: answered, not hung.
            with socket.create_connection((address.host, address.port), timeout=10) as sock:
                sock.sendall(b"{")
                return read_ack(sock)

        mtls = "MTLS_CLIENT_CERT_JSON"
        cases = [
            ("random bytes", random.Random(7).randbytes(4096), "malformed_json"),
            ("truncated JSON", self.payload(good(0))[:-40], "malformed_json"),
            ("a JSON array", b'[{"ECS_WATERMARK_ENDPOINT": "https://x"}]', "not_an_object"),
            ("wrong types", self.payload({"GOOGLE_OAUTH_CLIENT_ID": 42,
                                          "ECS_WATERMARK_ENDPOINT": ["https://x"]}), "invalid_type"),
            ("300 KiB", b'{"GOOGLE_OAUTH_CLIENT_ID": "' + b"a" * (300 * 1024) + b'"}', "too_large"),
            ("drip slower than the idle timeout", drip, "timeout"),
            ("key not matching certificate",
             self.payload({mtls: mtls_object(ca.issue("client"), key_pem=stranger.key_pem)}),
             "key_mismatch"),
            ("expired certificate", self.payload({mtls: mtls_object(expired)}),
             "certificate_expired"),
            ("CA that is not PEM",
             self.payload({mtls: mtls_object(ca.issue("client"), ca_pem=b"MIIB not a PEM")}),
             "invalid_ca"),
            ("http:// endpoint", self.payload({"ECS_WATERMARK_ENDPOINT": "http://wm.internal:80"}),
             "invalid_endpoint"),
            ("a peer not allowed", ("outsider", self.payload(good(1))), "peer_not_allowed"),
        ]

        ack = send(listener.address, self.payload(good(0)))
        self.assertEqual(ack, {"ok": True, "version": 1,
                               "changed": ["MTLS_CLIENT_CERT_JSON", "ECS_WATERMARK_ENDPOINT"]})
        secrets_seen = secret_strings(good(0)) + secret_strings(good(1))
        for i, (name, what, code) in enumerate(cases, start=1):
            with self.subTest(name):
                hashes, context, version = (file_hashes(self.certs_dir), store.mtls().context,
                                            store.version)
                refusals = {"result": "refused", "reason": code}
                refused_before = self.metrics.value("enclave_secrets_deliveries_total", refusals)
                self.assertIsNotNone(hashes[certstore.CLIENT_KEY_NAME])
                if callable(what):
                    ack = what(listener.address)
                elif isinstance(what, tuple):
                    ack = send(outsider.address, what[1])
                else:
                    ack = send(listener.address, what)
                self.assertIs(ack["ok"], False, ack)
                self.assertEqual(ack["error"]["code"], code, ack)
                self.assertEqual(ack["version"], version)
                for secret in secrets_seen:
                    self.assertNotIn(secret, json.dumps(ack))
                self.assertEqual(file_hashes(self.certs_dir), hashes)
                self.assertIs(store.mtls().context, context)
                self.assertEqual(store.version, version)
                self.assertEqual(self.metrics.value("enclave_secrets_deliveries_total", refusals),
                                 refused_before + 1)
                # ... and the next good delivery goes through at once.
                ack = send(listener.address, self.payload(good(i)))
                self.assertEqual(ack["ok"], True, ack)
                self.assertEqual(ack["version"], version + 1)
                self.assertIsNot(store.mtls().context, context)
                self.assertNotEqual(file_hashes(self.certs_dir), hashes)
        self.assertEqual(self.metrics.value("enclave_secrets_deliveries_total",
                                            {"result": "accepted"}), len(cases) + 1)

    def test_connection_time_limit(self):
        store = self.make_store()
        listener = self.make_listener(store, idle_timeout_s=0.3, connection_timeout_s=0.6)
        with socket.create_connection((listener.address.host, listener.address.port),
                                      timeout=10) as sock:
            # Drip faster than the idle timeout, until the listener answers.
            for byte in b'{"GOOGLE_OAUTH_CLIENT_ID": "' + b"a" * 1000:
                if select.select([sock], [], [], 0.1)[0]:
                    break
                sock.sendall(bytes([byte]))
            ack = read_ack(sock)
        self.assertEqual(ack["error"]["code"], "timeout")
        self.assertIn("within", ack["error"]["message"])
        self.assertEqual(store.version, 0)

    def test_newline_after_a_complete_object_without_half_close(self):
        store = self.make_store()
        listener = self.make_listener(store)
        ack = send(listener.address, b'{\n  "GOOGLE_OAUTH_CLIENT_ID": "abc"\n}\n', half_close=False)
        self.assertEqual(ack, {"ok": True, "version": 1, "changed": ["GOOGLE_OAUTH_CLIENT_ID"]})
        # An identical re-delivery: accepted, same version, nothing changed.
        ack = send(listener.address, b'{"GOOGLE_OAUTH_CLIENT_ID": "abc"}')
        self.assertEqual(ack, {"ok": True, "version": 1, "changed": []})


class RefusedPeersTest(ChannelTestCase):
    """A refused peer costs the one listener thread nothing: it never waits on one."""

    REFUSED_SOURCE = "127.0.0.2"  # another loopback address, left out of the allow-list
    ACK_WAIT_S = 5.0  # bounds a read that never completes (the failure mode), not a speed

    def connect_refused(self, address: Address) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(self.ACK_WAIT_S)
        try:
            sock.bind((self.REFUSED_SOURCE, 0))
        except OSError as exc:
            self.skipTest(f"cannot use {self.REFUSED_SOURCE} as a source address here ({exc})")
        sock.connect((address.host, address.port))
        return sock

    def read_line(self, sock: socket.socket, what: str) -> dict:
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            self.fail(f"no ack for {what}: the listener thread is held by an earlier peer")
        return json.loads(data)

    def silent_refused_peers(self, listener, count: int) -> list[socket.socket]:
        """`count` refused peers that send nothing and keep their end open; each one's ack is
        read before the next connects, so each was answered while the earlier ones still
        held their connections open."""
        socks = []
        for i in range(count):
            sock = self.connect_refused(listener.address)
            ack = self.read_line(sock, f"refused peer {i + 1}")
            self.assertEqual(ack["error"]["code"], "peer_not_allowed", ack)
            socks.append(sock)
        return socks

    def assert_still_lingering(self, listener, socks):
        """The refused connections are all still open on both sides: the allowed sender was
        served while they were (the listener did not wait for them to end)."""
        self.assertEqual(len(listener._lingering), len(socks))
        for sock in socks:
            self.assertNotEqual(sock.fileno(), -1)

    def test_silent_refused_peers_do_not_hold_the_listener(self):
        store = self.make_store()
        # A lingering close longer than the whole test: a listener thread that lingered on a
        # refused peer would still be waiting on the first one when the second connects.
        listener = self.make_listener(store, allowed=("127.0.0.1",), linger_s=600)
        refused = self.silent_refused_peers(listener, 8)
        ack = send(listener.address, self.payload({"GOOGLE_OAUTH_CLIENT_ID": "after-eight"}),
                   timeout=self.ACK_WAIT_S)
        self.assertEqual(ack, {"ok": True, "version": 1, "changed": ["GOOGLE_OAUTH_CLIENT_ID"]})
        self.assert_still_lingering(listener, refused)
        self.assertEqual(self.metrics.value("enclave_secrets_connections_total",
                                            {"peer": "refused"}), 8)

    def test_more_refused_peers_than_lingering_slots_are_reset(self):
        store = self.make_store()
        listener = self.make_listener(store, allowed=("127.0.0.1",), linger_s=600)
        bound = secrets_listener.MAX_LINGERING_REFUSALS
        refused = self.silent_refused_peers(listener, bound)  # every slot taken, and held
        for i in range(4):  # past the bound: answered and reset at once, never queued
            with self.subTest(extra=i):
                try:
                    sock = self.connect_refused(listener.address)
                    ack = self.read_line(sock, f"refused peer {bound + i + 1}")
                    self.assertEqual(ack["error"]["code"], "peer_not_allowed", ack)
                    self.assertEqual(sock.recv(1), b"")  # the reset reads as the end
                except (ConnectionResetError, BrokenPipeError):
                    pass  # the reset reached us first (even connect() may report it)
                # Served after the previous peer's hand-off: every slot is still taken.
                self.assertEqual(len(listener._lingering), bound)
        ack = send(listener.address, self.payload({"GOOGLE_OAUTH_CLIENT_ID": "after-many"}),
                   timeout=self.ACK_WAIT_S)
        self.assertEqual(ack["ok"], True, ack)
        self.assert_still_lingering(listener, refused)

    def test_a_refused_sender_that_half_closes_still_reads_its_ack(self):
        store = self.make_store()
        listener = self.make_listener(store, allowed=("127.0.0.1",), linger_s=600)
        sock = self.connect_refused(listener.address)
        sock.sendall(self.payload({"GOOGLE_OAUTH_CLIENT_ID": "x" * 100_000}))
        sock.shutdown(socket.SHUT_WR)
        ack = read_ack(sock)  # one line, then a clean EOF: no reset ate the ack
        self.assertEqual(ack["error"]["code"], "peer_not_allowed")
        self.assertEqual(store.version, 0)

    def test_shutdown_ends_lingering_refusals(self):
        store = self.make_store()
        listener = self.make_listener(store, allowed=("127.0.0.1",), linger_s=600)
        self.silent_refused_peers(listener, 3)  # their ends stay open until the cleanups
        stopper = threading.Thread(target=listener.shutdown)
        stopper.start()
        stopper.join(self.ACK_WAIT_S)  # bounds a shutdown that waits on a peer (the failure)
        self.assertFalse(stopper.is_alive(), "shutdown waited on a refused peer")
        self.assertEqual(len(listener._lingering), 0)


class SerializationTest(ChannelTestCase):
    def test_two_senders_at_once_are_serialized(self):
        first_inside = threading.Event()
        release_first = threading.Event()
        inside, max_inside = [0], [0]
        lock = threading.Lock()

        def before_swap(state, changed):
            with lock:
                inside[0] += 1
                max_inside[0] = max(max_inside[0], inside[0])
            try:
                if state.version == 1:
                    first_inside.set()
                    self.assertTrue(release_first.wait(10))
            finally:
                with lock:
                    inside[0] -= 1

        store = self.make_store(before_swap=before_swap)
        listener = self.make_listener(store)
        acks = {}
        first = threading.Thread(target=lambda: acks.setdefault("a", send(
            listener.address, self.payload({"GOOGLE_OAUTH_CLIENT_ID": "from-a",
                                            "ECS_WATERMARK_ENDPOINT": "https://a.internal"}))))
        first.start()
        self.assertTrue(first_inside.wait(10))
        # Sender B's whole delivery is on the wire while A is in the middle of being applied.
        with socket.create_connection((listener.address.host, listener.address.port),
                                      timeout=10) as sock_b:
            sock_b.sendall(self.payload({"GOOGLE_OAUTH_CLIENT_ID": "from-b"}))
            sock_b.shutdown(socket.SHUT_WR)
            self.assertEqual(store.version, 0)  # A is held inside the swap: nothing is visible
            release_first.set()
            first.join(10)
            acks["b"] = read_ack(sock_b)
        self.assertEqual(acks["a"], {"ok": True, "version": 1,
                                     "changed": ["ECS_WATERMARK_ENDPOINT", "GOOGLE_OAUTH_CLIENT_ID"]})
        # B was applied on top of A's result, not interleaved with it.
        self.assertEqual(acks["b"], {"ok": True, "version": 2, "changed": ["GOOGLE_OAUTH_CLIENT_ID"]})
        self.assertEqual(max_inside[0], 1)
        self.assertEqual(store.current().get("GOOGLE_OAUTH_CLIENT_ID"), "from-b")
        self.assertEqual(store.current().get("ECS_WATERMARK_ENDPOINT"), "https://a.internal")

    def test_a_second_applier_that_cannot_get_the_lock_is_refused_busy(self):
        held, release = threading.Event(), threading.Event()

        def before_swap(state, changed):
            held.set()
            release.wait(10)

        store = self.make_store(before_swap=before_swap, lock_timeout_s=0.05)
        first = threading.Thread(target=store.deliver, args=(b'{"GOOGLE_OAUTH_CLIENT_ID": "a"}',))
        first.start()
        try:
            self.assertTrue(held.wait(10))
            ack = store.deliver(b'{"GOOGLE_OAUTH_CLIENT_ID": "b"}')
        finally:
            release.set()
            first.join(10)
        self.assertEqual(ack["error"]["code"], "busy")
        self.assertEqual(ack["version"], 0)
        self.assertEqual(store.current().get("GOOGLE_OAUTH_CLIENT_ID"), "a")


class LifecycleTest(ChannelTestCase):
    def test_delivery_at_startup_and_an_hour_later_without_restart(self):
        start = dt.datetime.now(dt.timezone.utc)
        clock = Clock(start.timestamp())
        store = self.make_store(clock=clock)
        listener = self.make_listener(store)
        ca = shared_ca()
        first = ca.issue("enclave-client", not_before=start - dt.timedelta(hours=1),
                         not_after=start + dt.timedelta(minutes=30))
        result = {}
        with self.assertLogs("enclave", logging.INFO) as logs:
            waiter = threading.Thread(target=lambda: result.setdefault(
                "received", wait_for_initial(store, 10)))
            waiter.start()
            ack = send(listener.address, self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object(first)}))
            waiter.join(10)
        self.assertTrue(result["received"])
        self.assertEqual(ack["version"], 1)
        text = "\n".join(logs.output)
        for line in ("Waiting for initial secrets via VSOCK (timeout: 10s)...",
                     "Received initial secrets during startup", "Received secrets update",
                     "Successfully updated certificates"):
            self.assertIn(line, text)
        context_at_start = store.mtls().context

        clock.now = (start + dt.timedelta(hours=1)).timestamp()
        # The start-up certificate has expired by now: re-delivering it is refused...
        ack = send(listener.address, self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object(first)}))
        self.assertEqual(ack["error"]["code"], "certificate_expired")
        # ...and one that only becomes valid after start-up is accepted, same process, same port.
        later = ca.issue("enclave-client", not_before=start + dt.timedelta(minutes=30),
                         not_after=start + dt.timedelta(days=1))
        with self.assertLogs("enclave", logging.INFO) as logs:
            ack = send(listener.address, self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object(later)}))
        self.assertEqual(ack, {"ok": True, "version": 2, "changed": ["MTLS_CLIENT_CERT_JSON"]})
        self.assertIn("Successfully updated certificates", "\n".join(logs.output))
        self.assertIsNot(store.mtls().context, context_at_start)
        self.assertEqual(store.mtls().not_after, later.cert.not_valid_after_utc)
        self.assertEqual(store.health()["secrets"]["updated_at"],
                         dt.datetime.fromtimestamp(clock.now, dt.timezone.utc)
                         .strftime("%Y-%m-%dT%H:%M:%SZ"))

    def test_no_initial_secrets(self):
        store = self.make_store()
        with self.assertLogs("enclave", logging.INFO) as logs:
            self.assertFalse(wait_for_initial(store, 0.05, via="TCP"))
        text = "\n".join(logs.output)
        self.assertIn("Waiting for initial secrets via TCP (timeout: 0.05s)...", text)
        self.assertIn("No initial secrets received (will continue listening in background)", text)

    def test_rpc_secret_rotation_grace(self):
        start = time.time()
        clock = Clock(start)
        store = self.make_store(clock=clock)
        self.assertEqual(store.rpc_secrets(), [LOCAL_DEFAULT_RPC_SECRET])
        ack = store.deliver(self.payload({"ENCLAVE_RPC_SHARED_SECRET": NEW_RPC_SECRET}))
        self.assertEqual(ack["changed"], ["ENCLAVE_RPC_SHARED_SECRET"])
        both = [NEW_RPC_SECRET, LOCAL_DEFAULT_RPC_SECRET]
        self.assertEqual(store.rpc_secrets(start + RPC_SECRET_GRACE_S - 1), both)
        self.assertEqual(store.rpc_secrets(start + 120), both)
        clock.now = start + RPC_SECRET_GRACE_S
        self.assertEqual(store.rpc_secrets(), [NEW_RPC_SECRET])
        self.assertEqual(RPC_SECRET_GRACE_S, 300)

    def test_shutdown_aborts_a_delivery_in_progress_without_applying_it(self):
        store = self.make_store()
        listener = SecretsListener(LOOPBACK_ANY, store, ("127.0.0.1",), self.metrics,
                                   idle_timeout_s=30, connection_timeout_s=30)
        listener.bind()
        listener.start()
        with socket.create_connection((listener.address.host, listener.address.port),
                                      timeout=10) as sock:
            sock.sendall(b'{"GOOGLE_OAUTH_CLIENT_ID": "x"}')  # complete, but no EOF or newline
            for _ in range(500):  # wait until the listener is reading this connection
                if listener._active is not None:
                    break
                threading.Event().wait(0.01)
            listener.shutdown()
        self.assertEqual(store.version, 0)


class StoreTest(ChannelTestCase):
    def test_health_ready_and_metrics(self):
        store = self.make_store()
        self.assertEqual(store.health(), {
            "secrets": {"received": False, "version": 0, "updated_at": None,
                        "source": "channel", "bundle_version": None},
            "mtls": {"configured": False, "not_after": None}})
        self.assertFalse(store.ready())
        self.assertIsNone(store.google_credentials())
        self.assertEqual(len(store.sealing_keyring().current), 32)  # generated per boot (not strict)
        issued = shared_ca().issue("enclave-client")
        payload = {"MTLS_CLIENT_CERT_JSON": mtls_object(issued),
                   "GOOGLE_OAUTH_CLIENT_ID": "client-id",
                   "GOOGLE_OAUTH_CLIENT_SECRET": "google-secret-value",
                   "ENCLAVE_TOKEN_SEALING_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}
        self.assertTrue(store.deliver(self.payload(payload))["ok"])
        health = store.health()
        self.assertEqual(health["secrets"]["received"], True)
        self.assertEqual(health["secrets"]["version"], 1)
        self.assertEqual(health["mtls"], {"configured": True, "not_after":
                                          issued.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")})
        self.assertTrue(store.ready())
        self.assertTrue(store.wait_first(0))
        creds = store.google_credentials()
        self.assertEqual((creds.client_id, creds.client_secret), ("client-id", "google-secret-value"))
        self.assertNotIn("google-secret-value", repr(creds))
        self.assertEqual(store.sealing_keyring().current, bytes(range(32)))
        text = self.metrics.render()
        self.assertIn('enclave_secrets_deliveries_total{result="accepted"} 1', text)
        self.assertIn("enclave_secrets_version 1", text)
        self.assertIn(f"enclave_mtls_cert_expiry_timestamp_seconds "
                      f"{int(issued.cert.not_valid_after_utc.timestamp())}", text)
        for secret in secret_strings(payload):
            self.assertNotIn(secret, json.dumps(health) + text)

    def test_expired_client_certificate_is_not_ready(self):
        issued = shared_ca().issue("enclave-client")
        clock = Clock(time.time())
        store = self.make_store(clock=clock)
        payload = {"MTLS_CLIENT_CERT_JSON": mtls_object(issued),
                   "ECS_WATERMARK_ENDPOINT": "https://wm.local:8443"}
        self.assertTrue(store.deliver(self.payload(payload))["ok"])
        self.assertEqual(store.missing(("mtls",)), [])
        clock.now = issued.cert.not_valid_after_utc.timestamp() + 1
        self.assertEqual(store.missing(("mtls",)), ["mtls"])  # readiness follows what works

    def test_strict_environment_has_no_sealing_key_until_delivered(self):
        store = self.make_store(settings={"env": "production"})
        self.assertIsNone(store.sealing_keyring())

    def test_mtls_from_the_environment(self):
        issued = shared_ca().issue("enclave-client")
        store = self.make_store(settings={"mtls_client_cert_json": json.dumps(mtls_object(issued)),
                                          "ecs_watermark_endpoint": "https://wm.local:8443"})
        snapshot = store.mtls()
        self.assertTrue(snapshot.configured)
        self.assertEqual((snapshot.endpoint, snapshot.generation), ("https://wm.local:8443", 0))
        self.assertTrue(store.ready())
        self.assertEqual(store.health()["secrets"], {"received": False, "version": 0,
                                                     "updated_at": None, "source": "channel",
                                                     "bundle_version": None})
        self.assertEqual((self.certs_dir / "client.crt").read_bytes(), issued.cert_pem)
        # The same material delivered again changes nothing.
        ack = store.deliver(self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object(issued)}))
        self.assertEqual(ack, {"ok": True, "version": 0, "changed": []})
        self.assertIs(store.mtls(), snapshot)

    def test_invalid_mtls_in_the_environment_is_an_error(self):
        key_of_other = shared_ca().issue("other").key_pem
        bad = json.dumps(mtls_object(key_pem=key_of_other))
        with self.assertRaises(SecretsError) as caught:
            self.make_store(settings={"mtls_client_cert_json": bad})
        self.assertEqual(caught.exception.code, "key_mismatch")
        self.assertIn("MTLS_CLIENT_CERT_JSON", caught.exception.message)

    def test_clearing_mtls_removes_the_context_and_the_files(self):
        store = self.make_store()
        store.deliver(self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object()}))
        generation = store.mtls().generation
        ack = store.deliver(b'{"MTLS_CLIENT_CERT_JSON": null}')
        self.assertEqual(ack["changed"], ["MTLS_CLIENT_CERT_JSON"])
        self.assertFalse(store.mtls().configured)
        self.assertGreater(store.mtls().generation, generation)
        self.assertFalse((self.certs_dir / "client.key").exists())

    def test_a_disk_failure_is_refused_and_changes_nothing(self):
        store = self.make_store()
        store.deliver(self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object()}))
        hashes, context = file_hashes(self.certs_dir), store.mtls().context
        real_write = certstore._write_file

        def full_disk(path, data):
            if path.name == certstore.CA_CERT_NAME:  # the last file of the set
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(path, data)

        with mock.patch.object(certstore, "_write_file", full_disk):
            ack = store.deliver(self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object()}))
        self.assertEqual(ack["error"]["code"], "storage_failed")
        self.assertIn("No space left on device", ack["error"]["message"])
        self.assertEqual(ack["version"], 1)
        self.assertEqual(file_hashes(self.certs_dir), hashes)
        self.assertIs(store.mtls().context, context)

    def test_an_unusable_ca_is_refused_and_the_previous_set_stays_in_force(self):
        store = self.make_store()
        first = {"MTLS_CLIENT_CERT_JSON": mtls_object(),
                 "ECS_WATERMARK_ENDPOINT": "https://wm.internal"}
        self.assertTrue(store.deliver(self.payload(first))["ok"])
        for name, ca in unusable_cas():
            with self.subTest(name):
                hashes, snapshot, version = (file_hashes(self.certs_dir), store.mtls(),
                                             store.version)
                gens = sorted(p.name for p in self.certs_dir.iterdir())
                payload = {"MTLS_CLIENT_CERT_JSON": mtls_object(ca_pem=ca.cert_pem),
                           "ECS_WATERMARK_ENDPOINT": "https://other.internal"}
                ack = store.deliver(self.payload(payload))
                self.assertEqual(ack["ok"], False, ack)
                self.assertEqual(ack["error"]["code"], "invalid_ca", ack)
                self.assertEqual(ack["version"], version)
                for secret in secret_strings(payload):
                    self.assertNotIn(secret, json.dumps(ack))
                self.assertEqual(file_hashes(self.certs_dir), hashes)
                self.assertEqual(sorted(p.name for p in self.certs_dir.iterdir()), gens)
                self.assertIs(store.mtls(), snapshot)
                self.assertEqual(store.version, version)
                self.assertEqual(store.mtls().endpoint, "https://wm.internal")
                self.assertEqual(store.health()["mtls"]["configured"], True)

    def test_strings_the_runtime_cannot_use_are_refused_with_their_code(self):
        """A surrogate or control character is a refusal naming the key's rule, never
        `internal_error`, and nothing changes (the old values stay in force)."""
        store = self.make_store()
        first = {"MTLS_CLIENT_CERT_JSON": mtls_object(),
                 "ECS_WATERMARK_ENDPOINT": "https://wm.internal",
                 "GOOGLE_OAUTH_CLIENT_ID": "client-id",
                 "GOOGLE_OAUTH_CLIENT_SECRET": "google-secret-value"}
        self.assertTrue(store.deliver(self.payload(first))["ok"])
        cases = unusable_string_cases() + [
            (f"endpoint: {name}", {"ECS_WATERMARK_ENDPOINT": url}, "invalid_endpoint")
            for name, url in BAD_ENDPOINTS]
        for name, payload, code in cases:
            with self.subTest(name):
                hashes, state, snapshot = file_hashes(self.certs_dir), store.current(), store.mtls()
                ack = store.deliver(json.dumps(payload).encode())
                self.assertEqual(ack["ok"], False, ack)
                self.assertEqual(ack["error"]["code"], code, ack)
                for secret in secret_strings(payload):
                    self.assertNotIn(secret, json.dumps(ack))
                self.assertEqual(file_hashes(self.certs_dir), hashes)
                self.assertIs(store.current(), state)
                self.assertIs(store.mtls(), snapshot)

    def test_a_key_the_tls_library_refuses_is_refused_before_any_change(self):
        from cryptography.hazmat.primitives.asymmetric import rsa
        weak = shared_ca().issue("weak", key=rsa.generate_private_key(65537, 1024))
        store = self.make_store()
        store.deliver(self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object()}))
        hashes, context = file_hashes(self.certs_dir), store.mtls().context
        ack = store.deliver(self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object(weak)}))
        if ack["ok"]:
            self.skipTest("this OpenSSL accepts 1024-bit RSA at its default security level")
        self.assertEqual(ack["error"]["code"], "invalid_certificate")
        self.assertEqual(file_hashes(self.certs_dir), hashes)
        self.assertIs(store.mtls().context, context)
        self.assertEqual(
            sorted(p.name for p in self.certs_dir.iterdir() if p.name.startswith(".gen-")),
            [certstore.live_files(self.certs_dir).directory.name])


class MtlsContextTest(ChannelTestCase):
    """The context the store builds really does mTLS, trusting only the delivered CA."""

    def tls_server(self, ca: TestCA, server_ca: TestCA):
        issued = server_ca.issue("watermark", server=True)
        cert_file, key_file = issued.write(self.tmp, f"server-{id(server_ca)}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=ca.write(self.tmp, "client-ca"))
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        seen = []

        def serve():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.settimeout(10)
            with conn:
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        seen.append(tls.getpeercert()["subject"])
                        tls.sendall(b"hello")
                except (ssl.SSLError, OSError) as exc:
                    seen.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        self.addCleanup(thread.join, 10)
        return listener.getsockname()[1], seen

    def handshake(self, context: ssl.SSLContext, port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                return tls.recv(5)

    def test_handshake_rotation_and_pinning(self):
        ca = shared_ca()
        store = self.make_store()
        store.deliver(self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object(ca.issue("client-one"))}))
        old = store.mtls().context
        self.assertEqual(old.minimum_version, ssl.TLSVersion.TLSv1_2)
        self.assertEqual(old.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(old.check_hostname)
        self.assertEqual(len(old.get_ca_certs()), 1)  # the delivered CA only, no system store

        port, seen = self.tls_server(ca, ca)
        self.assertEqual(self.handshake(old, port), b"hello")
        self.assertEqual(seen[0], ((("commonName", "client-one"),),))

        store.deliver(self.payload({"MTLS_CLIENT_CERT_JSON": mtls_object(ca.issue("client-two"))}))
        new = store.mtls().context
        self.assertIsNot(new, old)
        port, seen = self.tls_server(ca, ca)
        self.assertEqual(self.handshake(new, port), b"hello")
        self.assertEqual(seen[0], ((("commonName", "client-two"),),))
        # The old context still works for whoever holds it (in-flight work finishes).
        port, seen = self.tls_server(ca, ca)
        self.assertEqual(self.handshake(old, port), b"hello")

        # A server whose certificate comes from another CA is not trusted.
        port, seen = self.tls_server(ca, TestCA("Some Other CA"))
        with self.assertRaises(ssl.SSLCertVerificationError):
            self.handshake(new, port)


class VsockBindTest(unittest.TestCase):
    def test_vsock_listener_binds_and_listens(self):
        """Bind only: nothing ever connects to an AF_VSOCK address here."""
        if not hasattr(socket, "AF_VSOCK"):
            self.skipTest("AF_VSOCK is not available in this Python")
        quiet_enclave_logs(self)
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        store = SecretStore(Settings(certs_dir=Path(tmp.name) / "certs"), Metrics())
        rng = random.Random()
        last = None
        for _ in range(5):
            port = rng.randrange(20000, 60000)
            listener = SecretsListener(Address("vsock", "", port, VSOCK_CID_ANY), store, ("vsock:3",))
            try:
                listener.bind()
            except OSError as exc:
                last = exc
                if exc.errno == errno.EADDRINUSE:
                    continue
                self.skipTest(f"AF_VSOCK cannot be bound here ({os.strerror(exc.errno or 0)})")
            try:
                listener.start()
                self.assertEqual(listener.address.family, "vsock")
                self.assertEqual(listener.address.port, port)
                self.assertEqual(str(listener.address), f"vsock:ANY:{port}")
                self.assertEqual(listener._server.socket.family, socket.AF_VSOCK)
            finally:
                listener.shutdown()
            return
        self.skipTest(f"no free vsock port found ({last})")


if __name__ == "__main__":
    unittest.main()
