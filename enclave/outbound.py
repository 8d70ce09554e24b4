"""The one HTTPS client for outbound calls (Google OAuth), over the egress connector.

- Trust: enclave.tls.outbound_context (the system store); ENCLAVE_OUTBOUND_CA_FILE adds a CA for
  fakes (config refuses it in staging/production).
- Transport: TLS over `egress.Connector.connect(host, port)` (AF_VSOCK when routed) with
  `server_hostname=host`.
- Keep-alive: idle connections are pooled per (host, port) and reused; bounded.
- Deadline: one per request (10 s default) over connect, handshake, send and the whole answer.
  A deadline miss raises UpstreamTimeout (handlers answer 504).
- Errors: every failure is one of enclave.errors' upstream ApiErrors (UpstreamTimeout 504,
  UpstreamTLSError, UpstreamUnavailable, UpstreamInvalidResponse 502), raised here, so handlers
  let them propagate and nothing maps them again. OutboundError is their root, UpstreamError.
- JSON: `parse_json` is the one strict parser for upstream answers (see its docstring).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import select
import socket
import ssl
import threading
import time
from collections import deque
from itertools import accumulate
from typing import NamedTuple
from urllib.parse import urlencode, urlsplit

from . import tls
from .egress import NOT_ROUTED_CODE, Connector, EgressError
from .errors import (EgressNotRouted, UpstreamError, UpstreamInvalidResponse, UpstreamTimeout,
                     UpstreamTLSError, UpstreamUnavailable)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0  # per request, all phases (docs/DESIGN.md §9)
MAX_CONNECTIONS_PER_HOST = 32  # in use at once per (host, port); the server caps requests at 64
MAX_IDLE_PER_HOST = 16  # idle keep-alive connections kept per (host, port)
IDLE_TTL_S = 45.0  # drop idle connections before typical server keep-alive timeouts (60 s+)
MAX_RESPONSE_BYTES = 1024 * 1024  # an OAuth answer is a few KiB; a watermark result is small
READ_CHUNK_BYTES = 64 * 1024
USER_AGENT = "enclave-runtime"
# Nesting levels allowed in an upstream JSON answer. Real answers nest 2-4 levels. The C parser
# and encoder recurse once per level, and the server encodes the answer (one level deeper) with
# its own frames already on the stack: 64 stays far below sys.getrecursionlimit() (1000).
MAX_JSON_DEPTH = 64

# Every failure is an upstream ApiError (enclave.errors); these names are kept for callers.
OutboundError = UpstreamError
__all__ = ["MAX_JSON_DEPTH", "MAX_RESPONSE_BYTES", "OutboundClient", "OutboundError",
           "Response", "UpstreamInvalidResponse", "UpstreamTLSError", "UpstreamTimeout",
           "UpstreamUnavailable", "nesting_exceeds", "parse_json"]

_STRING = re.compile(rb'"[^"]*"')  # once escapes are dropped, a string runs quote to quote
_TO_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_BRACKET_RUN = re.compile(rb"\[+|\]+")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \uD800-\uDFFF, paired or not
_PASS_MIN_DROP = 16  # a pass must drop 1/16 of the brackets to be worth another one


def nesting_exceeds(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if the JSON text's brackets (outside strings) nest deeper than `limit`.

    Linear, every step at C speed (bytes.translate/replace, re), never recursive. Exact for
    valid JSON. For invalid JSON it is exact up to the first error, the only part the parser
    reads, and may over-count after it: the parser run afterwards stays within `limit`.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # the common case: too few brackets to nest that deep
    if b"\\" in data:  # drop escapes, \\ first then \", so each quote left delimits a string
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Keep brackets and quotes only. Two quotes with nothing kept between them (an empty
    # string, or the end of one string and the start of the next) go in pairs; the strings
    # left are the few holding brackets, and go with them. A lone quote left is unterminated.
    stream = data.translate(_TO_SQUARE, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in stream:
        stream = _STRING.sub(b"", stream).replace(b'"', b"")
    # Each pass drops the innermost pairs: one level off the deepest path, at C speed, while
    # that drops a lot. Then the rest (few leaves, so few runs) is measured run by run.
    passes, bound = 0, len(stream) // _PASS_MIN_DROP
    while stream and passes < limit:
        shorter = stream.replace(b"[]", b"")
        passes += 1
        dropped = len(stream) - len(shorter)
        stream = shorter
        if dropped < bound:
            break
    if not stream:
        return False
    runs = _BRACKET_RUN.findall(stream)
    depths = accumulate(len(run) if run[0] == 0x5B else -len(run) for run in runs)
    return next(filter((limit - passes).__lt__, depths), None) is not None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 is valid JSON syntax but parses to inf
        raise ValueError("number out of range")
    return value


# One decoder, built once (json.loads with hooks would build one per call).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def parse_json(data: bytes, what: str = "the upstream"):
    """Strict JSON of an upstream answer, or UpstreamInvalidResponse (502).

    Strict UTF-8; nesting at most MAX_JSON_DEPTH (checked by a linear bracket scan BEFORE the
    recursive parser runs; RecursionError is caught as well); no NaN, Infinity or out-of-range
    float; no lone surrogate (an unpaired \\uD800-\\uDFFF escape). What it returns can always be
    encoded by json.dumps(allow_nan=False) and then as UTF-8: the answer stays valid JSON.
    """
    try:
        if nesting_exceeds(data):
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        value = _DECODER.decode(data.decode("utf-8"))
        if _SURROGATE_ESCAPE.search(data):  # rare: only then pay for a full check
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UpstreamInvalidResponse(f"{what} answered JSON with a lone surrogate") from None
    except UnicodeDecodeError:
        raise UpstreamInvalidResponse(f"{what} answered text that is not UTF-8") from None
    except RecursionError:
        raise UpstreamInvalidResponse(f"{what} answered JSON nested too deep") from None
    except ValueError as exc:
        # Only the head of the parser's own sentence ("Expecting value: line 1 column 1"),
        # never a piece of the answer, which may hold a token.
        reason = str(exc.args[0] if exc.args else "").split(":", 1)[0][:80]
        raise UpstreamInvalidResponse(f"{what} answered invalid JSON ({reason})") from None
    return value


class Response(NamedTuple):
    """An answer: unpacks as (status, headers, body)."""

    status: int
    headers: dict[str, str]  # lower-case names (last value wins)
    body: bytes

    def json(self):
        """The body as strict JSON (parse_json), or None when it is not."""
        try:
            return parse_json(self.body)
        except UpstreamInvalidResponse:
            return None

    def json_strict(self, what: str = "the upstream"):
        """The body as strict JSON, or UpstreamInvalidResponse naming `what` answered."""
        return parse_json(self.body, what)


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline passed")
        return left


class _EgressHTTPSConnection(http.client.HTTPSConnection):
    """HTTPSConnection whose socket comes from the egress connector (VSOCK or TCP)."""

    def __init__(self, host: str, port: int, *, context: ssl.SSLContext, connector: Connector,
                 timeout: float):
        super().__init__(host, port, timeout=timeout, context=context)
        self._egress = connector
        self._tls_context = context
        self.last_used = time.monotonic()
        self.sent = False  # the current request was handed to the socket in full

    def connect(self) -> None:
        raw = self._egress.connect(self.host, self.port, self.timeout)
        try:
            self.sock = self._tls_context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def dropped(self) -> bool:
        """True if the peer closed this idle connection (readable before we asked anything)."""
        sock = self.sock
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class _HostPool:
    def __init__(self):
        self.idle: deque[_EgressHTTPSConnection] = deque()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS_PER_HOST)


class OutboundClient:
    """HTTPS requests with pooled keep-alive connections; `reuse=False` opens one per request."""

    def __init__(self, connector: Connector | None = None, *, ca_file: str | None = None,
                 context: ssl.SSLContext | None = None, reuse: bool = True,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.connector = connector or Connector()
        self._context = context
        self._ca_file = ca_file
        self.reuse = reuse
        self.timeout_s = timeout_s
        self._pools: dict[tuple[str, int], _HostPool] = {}
        self._lock = threading.Lock()
        self.connections_opened = 0  # new TLS connections (to prove reuse)
        self._closed = False  # after close(), connections are never pooled again

    def context(self) -> ssl.SSLContext:
        """The TLS context, built on first use: loading the system trust store costs ~40 ms,
        which start-up should not pay before the first outbound call."""
        if self._context is None:
            with self._lock:
                if self._context is None:
                    self._context = tls.outbound_context(self._ca_file)
        return self._context

    # -- pool ------------------------------------------------------------------------------
    def _pool(self, key: tuple[str, int]) -> _HostPool:
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = _HostPool()
            return pool

    def _take_idle(self, pool: _HostPool) -> _EgressHTTPSConnection | None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not pool.idle:
                    return None
                conn = pool.idle.pop()  # most recently used first
            if now - conn.last_used < IDLE_TTL_S and not conn.dropped():
                return conn
            conn.close()

    def _give_back(self, pool: _HostPool, conn: _EgressHTTPSConnection) -> None:
        conn.last_used = time.monotonic()
        with self._lock:
            if self.reuse and not self._closed and len(pool.idle) < MAX_IDLE_PER_HOST:
                pool.idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close every idle connection; in-flight ones finish, then close instead of pooling."""
        with self._lock:
            self._closed = True
            conns = [c for pool in self._pools.values() for c in pool.idle]
            for pool in self._pools.values():
                pool.idle.clear()
        for conn in conns:
            conn.close()

    def idle_connections(self) -> int:
        with self._lock:
            return sum(len(pool.idle) for pool in self._pools.values())

    # -- requests --------------------------------------------------------------------------
    def request(self, method: str, url: str, body: bytes = b"", headers: dict | None = None,
                timeout: float | None = None) -> Response:
        """Send one request and read the whole answer within the deadline."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise OutboundError("outbound URLs must be https:// with a host")
        host, port = parts.hostname, parts.port or 443
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        all_headers.update(headers or {})
        if not self.reuse:
            all_headers["Connection"] = "close"
        deadline = _Deadline(self.timeout_s if timeout is None else timeout)
        pool = self._pool((host, port))
        try:
            if not pool.slots.acquire(timeout=deadline.remaining()):
                raise socket.timeout("no free connection slot")
        except socket.timeout:
            raise UpstreamTimeout(f"{host}: deadline passed waiting for a connection") from None
        try:
            return self._request_in_slot(pool, host, port, method, target, body, all_headers,
                                         deadline)
        finally:
            pool.slots.release()

    def _request_in_slot(self, pool, host, port, method, target, body, headers, deadline):
        conn = self._take_idle(pool) if self.reuse else None
        reused = conn is not None
        while True:
            try:
                if conn is None:
                    conn = _EgressHTTPSConnection(host, port, context=self.context(),
                                                  connector=self.connector,
                                                  timeout=deadline.remaining())
                must_close, response = self._exchange(conn, method, target, body, headers,
                                                      deadline)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ssl.SSLEOFError) as exc:
                conn.close()
                if reused and not conn.sent:
                    # A kept-alive connection the server closed while idle, found while sending:
                    # the server cannot have seen the whole request, so it is sent once more on
                    # a fresh connection. Once fully sent, never again: a POST (a single-use
                    # authorization code) may already have been processed.
                    log.debug("stale keep-alive connection to %s:%d, reconnecting", host, port)
                    conn, reused = None, False
                    continue
                if isinstance(exc, ssl.SSLEOFError) and not reused:
                    # A TLS-level EOF on a fresh connection: after a TLS 1.3 handshake this is
                    # how a server that refused our client certificate often looks.
                    raise UpstreamTLSError(
                        f"{host}: TLS connection closed without an answer") from None
                raise UpstreamUnavailable(
                    f"{host}: connection closed ({type(exc).__name__})") from None
            except BaseException as exc:
                if conn is not None:
                    conn.close()
                raise self._map_error(host, exc) from None
            if must_close:
                conn.close()
            else:
                self._give_back(pool, conn)
            return response

    def _exchange(self, conn: _EgressHTTPSConnection, method, target, body, headers,
                  deadline: _Deadline) -> tuple[bool, Response]:
        if conn.sock is None:
            conn.timeout = deadline.remaining()
            conn.connect()
            with self._lock:
                self.connections_opened += 1
        conn.sent = False
        sock = conn.sock  # kept: http.client drops conn.sock when the answer says "close"
        sock.settimeout(deadline.remaining())
        conn.request(method, target, body=body, headers=headers)
        conn.sent = True
        sock.settimeout(deadline.remaining())
        resp = conn.getresponse()
        chunks, size = [], 0
        while not resp.isclosed():  # closed once the whole body is read
            sock.settimeout(deadline.remaining())
            chunk = resp.read(READ_CHUNK_BYTES)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise UpstreamInvalidResponse(
                    f"{conn.host}: answer larger than {MAX_RESPONSE_BYTES} bytes")
            chunks.append(chunk)
        headers_out = {k.lower(): v for k, v in resp.getheaders()}
        must_close = resp.will_close or not self.reuse or conn.sock is None
        return must_close, Response(resp.status, headers_out, b"".join(chunks))

    @staticmethod
    def _map_error(host: str, exc: BaseException) -> BaseException:
        if isinstance(exc, OutboundError):
            return exc
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return UpstreamTimeout(f"{host}: no answer within the deadline")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return UpstreamTLSError(
                f"{host}: certificate verification failed ({exc.verify_message})")
        if isinstance(exc, ssl.SSLError):
            reason = getattr(exc, "reason", None) or type(exc).__name__
            return UpstreamTLSError(f"{host}: TLS failed ({reason})")
        if isinstance(exc, EgressError):
            if exc.code == NOT_ROUTED_CODE:
                return EgressNotRouted(f"{host}: {exc}")
            return UpstreamUnavailable(f"{host}: {exc}")
        if isinstance(exc, (OSError, http.client.IncompleteRead,
                            http.client.ImproperConnectionState)):
            return UpstreamUnavailable(f"{host}: connection failed ({type(exc).__name__})")
        if isinstance(exc, http.client.HTTPException):  # BadStatusLine, LineTooLong, ...
            return UpstreamInvalidResponse(f"{host}: the answer is not valid HTTP "
                                           f"({type(exc).__name__})")
        return exc

    def post_form(self, url: str, fields: dict, timeout: float | None = None) -> Response:
        body = urlencode(fields).encode("ascii")
        return self.request("POST", url, body,
                            {"Content-Type": "application/x-www-form-urlencoded"}, timeout)

    def post_json(self, url: str, value, timeout: float | None = None) -> Response:
        body = json.dumps(value, separators=(",", ":")).encode("utf-8")
        return self.request("POST", url, body, {"Content-Type": "application/json"}, timeout)
