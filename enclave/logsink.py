"""Log lines out of the enclave: `ENCLAVE_LOG_SINK=vsock:CID:PORT` (or `tcp:HOST:PORT` locally).

Nothing reads an enclave's console outside debug mode, so with a sink configured every log record
is ALSO sent, as the JSON line of enclave.logs.JsonFormatter (same escaping), to a receiver on
the parent (scripts/enclave-logs.sh). The runtime must never wait for it:

- `emit` formats the record and appends it to a bounded queue (MAX_QUEUED_LINES) without
  blocking; when the queue is full the line is dropped and counted. A request never waits for a
  slow, absent or stuck receiver.
- One daemon thread connects, writes lines in order, and reconnects with exponential backoff
  (BACKOFF_INITIAL_S doubling to BACKOFF_MAX_S). A line being written when the connection broke
  is written again on the next connection (at least once; a receiver may see a partial line).
- `flush(timeout)` waits, bounded, until every queued line has been written (used before an exit
  2 so the start-up failure reaches the parent); `close(timeout)` flushes, stops the thread and
  counts what is left as dropped.
- `stats()`: lines sent, dropped, reconnects, queued, and whether it is connected.

The sink adds nothing to a record: the bytes sent are exactly the formatted line plus "\\n".
Records never contain secret values (the rest of the runtime sees to that); the sink only
moves them. AF_VSOCK is connected only in an enclave; tests use `tcp:` or replace the final
`vsock_connect` (as enclave.egress does).
"""

from __future__ import annotations

import collections
import json
import logging
import select
import socket
import threading
import time
from typing import Callable

from .addresses import VSOCK_CID_ANY, Address, AddressError, parse_address
from .errors import EnclaveError
from .logs import JsonFormatter

VARIABLE = "ENCLAVE_LOG_SINK"
MAX_QUEUED_LINES = 10_000  # ~2-3 MB of typical lines: minutes of logs while the parent restarts
MAX_LINE_BYTES = 64 * 1024  # a longer line (a huge traceback) is replaced by a short notice
CONNECT_TIMEOUT_S = 5.0  # the parent is one hop away; longer means it is not listening
SEND_TIMEOUT_S = 5.0  # a receiver that stops reading this long is abandoned and re-dialled
BACKOFF_INITIAL_S = 0.1  # first retry after a failed connect
BACKOFF_MAX_S = 30.0  # retries never further apart than this
DEFAULT_FLUSH_TIMEOUT_S = 1.0  # logging.shutdown() (flush, then close) waits about twice this
STARTUP_REPORT_TIMEOUT_S = 5.0  # how long an exit 2 waits for its reason to reach the parent
STOP_JOIN_TIMEOUT_S = 2.0  # close() waits at most this long for the sender thread to end
MIN_JOIN_S = 0.1  # ...and at least this long (a short close still lets it notice)

log = logging.getLogger(__name__)


class LogSinkError(EnclaveError):
    """An ENCLAVE_LOG_SINK value that is not a usable receiver address."""


def parse_sink(text: str) -> Address:
    """`vsock:CID:PORT` or `tcp:HOST:PORT` with a real CID and a port 1..65535; LogSinkError."""
    try:
        address = parse_address(text.strip(), VARIABLE)
    except AddressError as exc:
        raise LogSinkError(str(exc)) from None
    if address.family == "vsock" and address.cid == VSOCK_CID_ANY:
        raise LogSinkError(f"{VARIABLE}: the receiver CID must be a number (3 is the parent), "
                           "not ANY")
    if address.port == 0:
        raise LogSinkError(f"{VARIABLE}: port must be 1..65535, got 0")
    return address


def _vsock_connect(sock: socket.socket, address: tuple[int, int]) -> socket.socket:
    sock.connect(address)
    return sock


def _peer_closed(sock: socket.socket) -> bool:
    """The receiver never sends: a readable socket means it closed (EOF) or reset. Checked
    before each write, so a line is not written into a connection the receiver already left."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _too_long_notice(line: str, size: int) -> str:
    """A short JSON line standing in for one longer than MAX_LINE_BYTES (same ts/level/logger)."""
    try:
        entry = json.loads(line)
        head = {key: entry[key] for key in ("ts", "level", "logger") if key in entry}
    except ValueError:
        head = {}
    head["msg"] = f"log line of {size} bytes not sent (over {MAX_LINE_BYTES} bytes)"
    return json.dumps(head, ensure_ascii=False)


class LogSink(logging.Handler):
    """A logging.Handler that queues JSON lines for a sender thread (see the module docstring)."""

    def __init__(self, address: Address, *, max_queued: int = MAX_QUEUED_LINES,
                 vsock_connect: Callable[[socket.socket, tuple[int, int]],
                                         socket.socket] = _vsock_connect,
                 backoff_initial_s: float = BACKOFF_INITIAL_S,
                 backoff_max_s: float = BACKOFF_MAX_S,
                 send_timeout_s: float = SEND_TIMEOUT_S):
        super().__init__()
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.setFormatter(JsonFormatter())
        self.address = address
        self.max_queued = max_queued
        self._vsock_connect = vsock_connect
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._send_timeout_s = send_timeout_s
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[bytes] = collections.deque()
        self._in_flight = False  # a line popped from the queue and not yet written
        self._closing = False
        self._kick = False  # flush() asks a sender in backoff to retry now
        self._sock: socket.socket | None = None
        self.sent = 0
        self.dropped = 0
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="log-sink", daemon=True)
        self._thread.start()

    # -- the runtime's side: never blocks on I/O ---------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            data = line.encode("utf-8", "backslashreplace")
            if len(data) > MAX_LINE_BYTES:
                data = _too_long_notice(line, len(data)).encode("utf-8", "backslashreplace")
            data += b"\n"
        except Exception:  # formatting failed: logging's own policy (handleError) applies
            self.handleError(record)
            return
        with self._cond:
            if self._closing or len(self._queue) >= self.max_queued:
                self.dropped += 1
                return
            self._queue.append(data)
            self._cond.notify_all()

    def flush(self, timeout: float = DEFAULT_FLUSH_TIMEOUT_S) -> bool:
        """Wait (at most `timeout` seconds) until every queued line is written; True if so."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._kick = True  # a sender waiting out a backoff retries at once
            self._cond.notify_all()
            while self._queue or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout: float = DEFAULT_FLUSH_TIMEOUT_S) -> bool:
        """Flush (bounded), stop the sender, count unsent lines as dropped; True if all sent."""
        delivered = self.flush(timeout) if self._thread.is_alive() else not self._queue
        with self._cond:
            self._closing = True
            self.dropped += len(self._queue)
            self._queue.clear()
            sock = self._sock
            self._cond.notify_all()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked writing to a stuck peer
            except OSError:
                pass
        if threading.current_thread() is not self._thread:  # a daemon: never waited on for long
            self._thread.join(min(STOP_JOIN_TIMEOUT_S, max(timeout, MIN_JOIN_S)))
        super().close()
        return delivered

    def stats(self) -> dict:
        with self._cond:
            return {"sent": self.sent, "dropped": self.dropped, "reconnects": self.reconnects,
                    "queued": len(self._queue) + (1 if self._in_flight else 0),
                    "connected": self._sock is not None}

    # -- the sender thread ------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        address = self.address
        if address.family == "vsock":
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock = self._vsock_connect(sock, address.sockaddr)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(address.sockaddr, timeout=CONNECT_TIMEOUT_S)
        sock.settimeout(self._send_timeout_s)
        return sock

    def _next_line(self) -> bytes | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            self._in_flight = True
            return self._queue.popleft()

    def _done(self, sent: bool) -> None:
        with self._cond:
            self._in_flight = False
            if sent:
                self.sent += 1
            self._cond.notify_all()

    def _wait_backoff(self, delay: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._closing or self._kick, delay)
            self._kick = False

    def _closing_now(self) -> bool:
        with self._cond:
            return self._closing

    def _run(self) -> None:
        delay = self._backoff_initial_s
        sock: socket.socket | None = None
        line: bytes | None = None
        ever_connected = warned = False
        while True:
            if line is None:
                line = self._next_line()  # waits for a line; None once closing
                if line is None:
                    break
            if sock is None:
                try:
                    sock = self._connect()
                except OSError as exc:
                    if not warned:  # once per outage, not once per retry
                        log.warning("log sink: cannot reach %s (%s); retrying with backoff, "
                                    "lines are queued, then dropped when the queue is full",
                                    self.address, exc.strerror or type(exc).__name__)
                        warned = True
                    self._wait_backoff(delay)
                    delay = min(delay * 2, self._backoff_max_s)
                    if self._closing_now():
                        break
                    continue
                with self._cond:
                    if self._closing:
                        break
                    self._sock = sock
                    if ever_connected:
                        self.reconnects += 1
                ever_connected, warned, delay = True, False, self._backoff_initial_s
            try:
                if _peer_closed(sock):
                    raise ConnectionResetError(104, "receiver closed the connection")
                sock.sendall(line)
            except OSError as exc:
                with self._cond:
                    self._sock = None
                sock.close()
                sock = None
                if self._closing_now():
                    break
                log.warning("log sink: connection to %s lost (%s); reconnecting",
                            self.address, exc.strerror or type(exc).__name__)
                continue  # the same line again, on a new connection
            self._done(True)
            line = None
        with self._cond:
            if line is not None:  # popped, never written: closing cut it off
                self.dropped += 1
            self._in_flight = False
            self._sock = None
            self._cond.notify_all()
        if sock is not None:
            sock.close()


def from_setting(text: str | None, **kwargs) -> LogSink | None:
    """A started LogSink for an ENCLAVE_LOG_SINK value; None when unset. LogSinkError if bad."""
    if text is None or not text.strip():
        return None
    return LogSink(parse_sink(text), **kwargs)


def report_startup_failure(setting: str | None, problems: list[str], *,
                           timeout: float = STARTUP_REPORT_TIMEOUT_S, **kwargs) -> bool:
    """Send each start-up problem to the sink (a fresh one) before the process exits 2.

    For failures before logging is set up (configuration errors): `setting` is the raw
    ENCLAVE_LOG_SINK value. The lines are those `serve` logs (`start-up failed: ...`, logger
    `enclave`, level error); problems name variables, never values. Returns True when every
    line reached the receiver within `timeout`; never raises for an unusable sink.
    """
    try:
        sink = from_setting(setting, **kwargs)
    except LogSinkError:
        return False  # the problems already name the bad ENCLAVE_LOG_SINK
    if sink is None:
        return False
    logger = logging.getLogger("enclave")
    for problem in problems:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0,
                                   "start-up failed: %s", (problem,), None)
        sink.handle(record)
    return sink.close(timeout)
