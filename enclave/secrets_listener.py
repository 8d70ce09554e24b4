"""The secrets listener (docs/DESIGN.md §4): one socket, TCP or AF_VSOCK, served by one thread.

Wire protocol, compatible with `cat secrets.json | socat - VSOCK-CONNECT:$CID:7777`:
the sender writes one JSON object and half-closes, or ends a complete object with a newline;
the listener answers at once with ONE line of JSON and closes:
`{"ok": true, "version": 4, "changed": [...]}` or
`{"ok": false, "version": 3, "error": {"code": "...", "message": "..."}}`.

Choices:
- One connection at a time: the server is a plain (non-threading) socketserver.TCPServer, so a
  second sender waits in the listen backlog until the first is answered (at most
  CONNECTION_TIMEOUT_S plus the lingering close); deliveries can never interleave. The store's
  own lock also serializes any other caller of `SecretStore.apply`.
- A peer not in the allowed list is refused before any of its bytes is read: the decision is
  made on its address alone and the `peer_not_allowed` ack is sent at once, without waiting
  (a few hundred bytes always fit a new connection's buffer). A refused peer never costs the
  listener thread any waiting: its lingering close (below) runs beside it, in one short-lived
  thread per refused connection, at most MAX_LINGERING_REFUSALS at once; past that bound the
  connection is reset at once (SO_LINGER 0), so a flood of silent refused peers can neither
  hold the listener nor grow without bound.
- After the ack, a lingering close: shut down our side, then discard what the sender may still
  be writing (bounded), so its kernel does not get a reset that could eat the ack. For an
  allowed sender it runs on the listener thread (the next delivery waits at most LINGER_S).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import socketserver
import struct
import threading
import time

from .addresses import Address, peer_label
from .metrics import Metrics
from .secrets import (MAX_DELIVERY_BYTES, DeliveryTimeout, PeerNotAllowed, TooLarge,
                      is_complete_object)

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 10.0  # a sender silent this long is answered `timeout`
CONNECTION_TIMEOUT_S = 30.0  # a whole delivery must arrive within this
ACK_SEND_TIMEOUT_S = 5.0  # writing the one-line ack
LINGER_S = 1.0  # after the ack: how long to discard what the sender still writes
LINGER_MAX_BYTES = 1024 * 1024  # ...and how much of it
# Refused connections lingering beside the listener thread at once (each a thread for at most
# LINGER_S); more than this many at once is a flood, and the rest are reset without lingering.
MAX_LINGERING_REFUSALS = 16
LINGER_JOIN_S = 2.0  # shutdown: how long to wait for each lingering refusal to end
_SO_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends a reset
RECV_CHUNK_BYTES = 64 * 1024
LISTEN_BACKLOG = 8  # senders queued behind the one being served
SHUTDOWN_POLL_S = 0.1  # how often serve_forever checks for shutdown (bounds shutdown latency)
STOP_CHECK_S = 0.1  # start-up window: how often SIGTERM is checked while waiting for secrets

M_CONNECTIONS = "enclave_secrets_connections_total"


def _normalize_peer(label: str) -> str:
    if label.startswith("vsock:"):
        return label
    try:
        ip = ipaddress.ip_address(label)
    except ValueError:
        return label
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class _Server(socketserver.TCPServer):
    def __init__(self, listener: SecretsListener, address: Address):
        self.address_family = address.socket_family
        self.allow_reuse_address = address.family == "tcp"  # restart without TIME_WAIT trouble
        self.request_queue_size = LISTEN_BACKLOG
        self.listener = listener
        super().__init__(address.sockaddr, _Handler, bind_and_activate=True)

    def verify_request(self, request, client_address) -> bool:
        try:
            return self.listener._admit(request, client_address)
        except Exception:  # an error here would escape serve_forever and end the listener
            log.exception("Secrets listener: unexpected error checking a peer")
            return False

    def handle_error(self, request, client_address) -> None:
        log.exception("Secrets listener: unexpected error serving a connection")


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.listener._serve(self.request, self.client_address)


class SecretsListener:
    """`bind()` first (before anything else at start-up), then `start()`; `shutdown()` at exit."""

    def __init__(self, address: Address, store, allowed_peers, metrics: Metrics | None = None, *,
                 idle_timeout_s: float = IDLE_TIMEOUT_S,
                 connection_timeout_s: float = CONNECTION_TIMEOUT_S,
                 linger_s: float = LINGER_S):
        self._configured = address
        self._store = store
        self._allowed = frozenset(_normalize_peer(p) for p in allowed_peers)
        self._metrics = metrics or Metrics()
        self._idle_timeout_s = idle_timeout_s
        self._connection_timeout_s = connection_timeout_s
        self._linger_s = linger_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._active: socket.socket | None = None
        # Refused connections lingering beside the listener: socket -> its thread.
        self._lingering: dict[socket.socket, threading.Thread] = {}
        self._lingering_lock = threading.Lock()
        self._metrics.describe(M_CONNECTIONS, "counter", "Connections to the secrets listener")

    @property
    def address(self) -> Address:
        """The bound address (the actual port when bound to port 0)."""
        if self._server is None:
            return self._configured
        bound = self._server.socket.getsockname()
        if self._configured.family == "vsock":
            return Address("vsock", "", bound[1], self._configured.cid)
        return Address("tcp", self._configured.host, bound[1])

    def bind(self) -> None:
        """Bind and listen (raises OSError). From here on a sender waits instead of failing."""
        self._server = _Server(self, self._configured)
        if not self._allowed:
            log.warning("Secrets listener: no allowed peers; every delivery will be refused")
        log.info("Secrets listener bound on %s (allowed peers: %s)", self.address,
                 ", ".join(sorted(self._allowed)) or "none")

    def start(self) -> threading.Thread:
        """Serve in one daemon thread (returned; `shutdown()` joins it)."""
        if self._server is None:
            self.bind()
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": SHUTDOWN_POLL_S},
                                        name="secrets-listener", daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop serving: abort a delivery in progress (not applied), join, close the socket.

        `timeout` bounds the wait for a delivery still inside a KMS call (up to its 10 s
        deadline): past it the thread is left to finish (it is a daemon, and the store refuses
        to apply anything once stopping)."""
        self._stopping = True
        active = self._active
        if active is not None:
            try:
                active.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._server is None:
            return
        if self._thread is not None:
            stopper = threading.Thread(target=self._server.shutdown, name="secrets-stop",
                                       daemon=True)
            stopper.start()
            ends = None if timeout is None else time.monotonic() + timeout  # one budget for both
            stopper.join(timeout)
            self._thread.join(None if ends is None else max(0.0, ends - time.monotonic()))
            if self._thread.is_alive():
                log.warning("Secrets listener still busy with a delivery after %gs; not waiting",
                            timeout)
            self._thread = None
        self._server.server_close()
        with self._lingering_lock:
            lingering = list(self._lingering.items())
        for sock, thread in lingering:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes its recv: the linger ends now
            except OSError:
                pass
            thread.join(LINGER_JOIN_S)

    # --- one connection ---------------------------------------------------------------------

    def _admit(self, sock: socket.socket, client_address) -> bool:
        """Peer check, before any byte is read. A refused peer gets the ack, then the close."""
        peer = _normalize_peer(peer_label(sock.family, client_address))
        if peer in self._allowed:
            self._metrics.inc(M_CONNECTIONS, {"peer": "allowed"})
            return True
        self._metrics.inc(M_CONNECTIONS, {"peer": "refused"})
        ack = self._store.refuse(PeerNotAllowed(f"peer {peer} is not in "
                                                f"ENCLAVE_SECRETS_ALLOWED_PEERS"), peer)
        if self._send_ack(sock, ack, timeout=0):  # never waits on the peer
            self._linger_aside(sock)  # discards, never parses, what it wrote
        return False  # socketserver closes this socket object (a lingering copy stays open)

    def _linger_aside(self, sock: socket.socket) -> None:
        """The lingering close of a refused connection, off the listener thread (bounded)."""
        if self._start_linger_thread(sock):
            return
        log.warning("Secrets listener: %d refused connections already closing; resetting "
                    "this one", MAX_LINGERING_REFUSALS)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _SO_LINGER_RESET)
        except OSError:
            pass

    def _start_linger_thread(self, sock: socket.socket) -> bool:
        with self._lingering_lock:
            if self._stopping or len(self._lingering) >= MAX_LINGERING_REFUSALS:
                return False
            try:
                # socketserver closes `sock` when _admit returns; this duplicate keeps the
                # connection open (no reset) until the linger ends.
                copy = sock.dup()
            except OSError:
                return False
            thread = threading.Thread(target=self._linger_then_close, args=(copy,),
                                      name="secrets-refused-linger", daemon=True)
            self._lingering[copy] = thread
            try:
                thread.start()
            except RuntimeError:  # no thread to be had
                del self._lingering[copy]
                copy.close()
                return False
            return True

    def _linger_then_close(self, sock: socket.socket) -> None:
        try:
            self._linger(sock)
        finally:
            with self._lingering_lock:
                self._lingering.pop(sock, None)
            sock.close()

    def _serve(self, sock: socket.socket, client_address) -> None:
        peer = _normalize_peer(peer_label(sock.family, client_address))
        self._active = sock
        try:
            try:
                data = self._receive(sock)
            except (TooLarge, DeliveryTimeout) as exc:
                ack = self._store.refuse(exc, peer)
            except OSError as exc:
                log.warning("Secrets delivery from %s: connection failed (%s)", peer,
                            exc.strerror or exc.__class__.__name__)
                return
            else:
                if self._stopping:
                    log.warning("Secrets delivery from %s not applied: shutting down", peer)
                    return
                ack = self._store.deliver(data, peer)
            if self._send_ack(sock, ack):
                self._linger(sock)
        finally:
            self._active = None

    def _receive(self, sock: socket.socket) -> bytes:
        """One delivery: until EOF, or a newline after a complete object. Raises on limits."""
        deadline = time.monotonic() + self._connection_timeout_s
        buffer = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeliveryTimeout(
                    f"delivery not complete within {self._connection_timeout_s:g} s")
            sock.settimeout(min(self._idle_timeout_s, remaining))
            try:
                chunk = sock.recv(RECV_CHUNK_BYTES)
            except TimeoutError:
                if deadline - time.monotonic() <= 0:
                    raise DeliveryTimeout(
                        f"delivery not complete within {self._connection_timeout_s:g} s") from None
                raise DeliveryTimeout(f"no data for {self._idle_timeout_s:g} s; end the delivery "
                                      f"with EOF (half-close) or a newline") from None
            if not chunk or self._stopping:
                return bytes(buffer)
            buffer += chunk
            if len(buffer) > MAX_DELIVERY_BYTES:
                raise TooLarge(f"delivery must be at most {MAX_DELIVERY_BYTES} bytes")
            if b"\n" in chunk and is_complete_object(bytes(buffer)):
                return bytes(buffer)

    @staticmethod
    def _send_ack(sock: socket.socket, ack: dict, timeout: float = ACK_SEND_TIMEOUT_S) -> bool:
        line = json.dumps(ack, separators=(", ", ": ")).encode("utf-8") + b"\n"
        try:
            sock.settimeout(timeout)
            sock.sendall(line)
        except OSError as exc:
            log.warning("Secrets listener: could not send the ack (%s)",
                        exc.strerror or exc.__class__.__name__)
            return False
        try:
            sock.shutdown(socket.SHUT_WR)  # our EOF right after the one line
        except OSError:
            return False  # the sender already closed after reading the ack: nothing to linger for
        return True

    def _linger(self, sock: socket.socket) -> None:
        """Discard what the sender still writes until its EOF (bounded), then let it close."""
        deadline = time.monotonic() + self._linger_s
        discarded = 0
        try:
            while discarded < LINGER_MAX_BYTES and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                sock.settimeout(remaining)
                chunk = sock.recv(RECV_CHUNK_BYTES)
                if not chunk:
                    return
                discarded += len(chunk)
        except OSError:
            return


def wait_for_initial(store, timeout: float, via: str = "VSOCK",
                     stop: threading.Event | None = None) -> bool:
    """The start-up window: wait for the first valid delivery, logging the operator lines.
    Returns early (False) when `stop` is set: SIGTERM during the window stops at once."""
    log.info("Waiting for initial secrets via %s (timeout: %gs)...", via, timeout)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if store.wait_first(max(0.0, min(remaining, STOP_CHECK_S))):
            log.info("Received initial secrets during startup")
            return True
        if stop is not None and stop.is_set():
            log.info("Stop requested during the start-up window")
            return False
        if remaining <= 0:
            break
    log.warning("No initial secrets received (will continue listening in background)")
    return False
