"""The hardened HTTP/1.1 server: JSON answers, strict limits, one write per response.

Built on socketserver and http.server. Limits: idle timeout per connection, a cap on
concurrent connections (the one beyond answers 503 and is closed), body limits, and a
graceful drain on shutdown that returns at once. Targets are origin-form ASCII (else 400
invalid_target). Every error answers JSON; tracebacks go to the log, never to clients.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import re
import selectors
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable
from urllib.parse import parse_qs

from .addresses import Address
from .errors import ApiError
from .metrics import HTTP_REQUEST_BUCKETS_SECONDS, Metrics
from .request import Headers, Request, target_problem
from .rpcauth import AuthError

log = logging.getLogger(__name__)

IDLE_TIMEOUT_SECONDS = 10.0  # a keep-alive connection silent this long is closed
MAX_CONNECTIONS = 64  # concurrent connections; the 65th gets 503 and is closed
MAX_BODY_BYTES = 64 * 1024  # default POST body limit
MAX_REQUEST_LINE_BYTES = 8192  # longer request lines answer 414
MAX_HEADER_LINE_BYTES = 8192  # one header line; longer answers 431
MAX_HEADER_COUNT = 100  # header lines per request (http.client's own limit); more answers 431
DRAIN_SECONDS = 5.0  # on shutdown, in-flight requests get this long to finish
DRAIN_POLL_SECONDS = 0.01
MAX_RECORD_KEYS = 1024  # cached metric keys; (method, route, status) combinations are few
LINGER_SECONDS = 2.0  # after an early error answer, drop the unread body this long at most
LINGER_MAX_BYTES = 2 * 1024 * 1024  # ...and at most this much of it
HEAD_DEADLINE_SECONDS = 10.0  # the request line and headers must arrive within this
BODY_DEADLINE_SECONDS = 30.0  # the whole body (up to 1 MiB) must arrive within this
READ_BUFFER_BYTES = 64 * 1024
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OVERFLOW_WRITE_SECONDS = 1.0  # how long the accept thread may spend telling a client "busy"
LISTEN_BACKLOG = 128
JSON_TYPE = "application/json"

_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")  # ASCII digits only ("²".isdigit() is True)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: methods, header names

Handler = Callable[[Request], "tuple[int, dict]"]


class BadRequest(Exception):
    """A request head we refuse to parse; the connection is closed after the answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    auth: bool = False
    max_body: int = MAX_BODY_BYTES
    raw: bool = False  # handler returns (status, content_type, bytes) instead of (status, dict)


class Router:
    def __init__(self):
        self._routes: dict[str, dict[str, Route]] = {}

    def add(self, method: str, path: str, handler: Handler, *, head: bool = False,
            **kwargs) -> None:
        """head=True (GET routes): HEAD runs the GET handler and answers without the body."""
        route = Route(method, path, handler, **kwargs)
        by_method = self._routes.setdefault(path, {})
        by_method[method] = route
        if head and method == "GET":
            by_method["HEAD"] = route

    def match(self, method: str, path: str) -> tuple[Route | None, list[str]]:
        """The route, or None and the allowed methods ([] for an unknown path)."""
        by_method = self._routes.get(path)
        if by_method is None:
            return None, []
        route = by_method.get(method)
        return route, sorted(by_method)


_ONE = (1.0,)
_PHRASES = {s.value: s.phrase for s in HTTPStatus}  # HTTPStatus(n) costs an enum lookup
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # one encoder, reused


def _encode(status: int, body: bytes, content_type: str, close: bool,
            extra: dict | None = None) -> bytes:
    """Status line, headers and body as one buffer, so the response is one write."""
    phrase = _PHRASES.get(status, "")
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
    ]
    for name, value in (extra or {}).items():
        lines.append(f"{name}: {value}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_bytes(value) -> bytes:
    return _JSON.encode(value).encode("utf-8")


def error_body(code: str, message: str) -> bytes:
    return json_bytes({"error": {"code": code, "message": message}})




BUSY_RESPONSE = _encode(503, error_body("too_many_connections", "server is at its connection limit"),
                        JSON_TYPE, close=True)


class _DeadlineReader(io.RawIOBase):
    """The connection's read side with a deadline over a whole request head or body.

    The idle timeout bounds each read; the deadline bounds their sum, so a client that drips
    a byte every few seconds cannot hold a connection slot for ever.
    """

    def __init__(self, sock: socket.socket, idle_timeout: float):
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.deadline: float | None = None
        self._timeout = idle_timeout

    def readable(self) -> bool:
        return True

    def clear_deadline(self) -> None:
        """Back to the idle timeout alone, also for the answer's write on the same socket."""
        self.deadline = None
        if self._timeout != self.idle_timeout:
            self.sock.settimeout(self.idle_timeout)
            self._timeout = self.idle_timeout

    def readinto(self, buffer) -> int:
        timeout = self.idle_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request not received within its deadline")
            timeout = min(timeout, left)
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout
        return self.sock.recv_into(buffer)


class RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "enclave"
    sys_version = ""
    timeout = IDLE_TIMEOUT_SECONDS  # applied by StreamRequestHandler.setup
    head_deadline = HEAD_DEADLINE_SECONDS
    body_deadline = BODY_DEADLINE_SECONDS
    server: "HttpServer"

    busy = False  # True while a request is being handled (drain waits for it)

    def setup(self):
        super().setup()  # the idle timeout on the socket, wfile
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader, READ_BUFFER_BYTES)
        self.server.handlers.add(self)

    def finish(self):
        self.server.handlers.discard(self)
        super().finish()

    # -- responses ---------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str = JSON_TYPE,
              extra: dict | None = None) -> None:
        self._status = status
        data = _encode(status, body, content_type, self.close_connection, extra)
        if self.command == "HEAD" and body:  # the GET answer's headers, never its body
            data = data[:len(data) - len(body)]
        self.wfile.write(data)

    def _send_internal_error(self) -> None:
        try:
            self._send(500, error_body("internal_error", "internal error"))
        except OSError:
            pass

    def send_json(self, status: int, value, extra: dict | None = None) -> None:
        self._send(status, json_bytes(value), JSON_TYPE, extra)

    def log_message(self, fmt, *args):  # route http.server's own messages into logging
        log.debug("%s " + fmt, self.address_string(), *args)

    def address_string(self):
        client = self.client_address
        return str(client[0]) if isinstance(client, tuple) and client else "-"

    # -- request loop ------------------------------------------------------------------
    def handle_one_request(self):
        """Read one request head (strictly), dispatch it, answer in one write."""
        self._status = 0
        self.command, self.request_version, self.requestline = "", "HTTP/1.1", ""
        # the wait for a keep-alive request plus its whole head
        self._reader.deadline = time.monotonic() + self.timeout + self.head_deadline
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE_BYTES + 1)
            if not line:
                self.close_connection = True
                return
            if len(line) > MAX_REQUEST_LINE_BYTES:
                raise BadRequest(414, "request_line_too_long", "request line too long")
            self._parse_head(line)
        except BadRequest as exc:
            self.close_connection = True
            self._send(exc.status, error_body(exc.code, exc.message))
            return
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        except Exception:  # a bug while parsing: answer, never drop the connection
            log.exception("error while reading a request head")
            self.close_connection = True
            self._send_internal_error()
            return
        self._reader.clear_deadline()
        if self.server.draining:
            self.close_connection = True
        self.busy = True  # a plain attribute: no lock per request; drain() polls it
        started = time.perf_counter()
        label = "unmatched"
        try:
            label = self._dispatch()
        except (TimeoutError, ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception:  # a bug outside the handler: answer, never drop the connection
            log.exception("error while dispatching %s", self.command)
            self.close_connection = True
            if not self._status:  # nothing was sent yet
                self._send_internal_error()
        finally:
            self.busy = False
            if self._status:
                self.server.record(self.command, label, self._status, time.perf_counter() - started)

    def _parse_head(self, line: bytes) -> None:
        """Request line and headers per RFC 9112, refusing what smuggling attacks rely on:
        obs-fold continuation lines, whitespace before the colon, non-token names."""
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3:
            raise BadRequest(400, "bad_request", "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            if version.startswith("HTTP/"):
                raise BadRequest(505, "http_version_not_supported", "use HTTP/1.1")
            raise BadRequest(400, "bad_request", "malformed request line")
        if not _TOKEN.fullmatch(method) or not target.startswith("/"):
            raise BadRequest(400, "bad_request", "malformed request line")
        problem = target_problem(target)
        if problem is not None:
            raise BadRequest(400, "invalid_target", problem)
        self.command, self.path, self.request_version = method, target, version
        self.requestline = f"{method} {target} {version}"
        items = []
        readline = self.rfile.readline
        while True:
            raw = readline(MAX_HEADER_LINE_BYTES + 1)
            if len(raw) > MAX_HEADER_LINE_BYTES:
                raise BadRequest(431, "headers_too_large", "a header line is too long")
            if raw in (b"\r\n", b"\n"):
                break
            if not raw:
                raise ConnectionError("client closed inside the request head")
            if raw[0] in b" \t":
                raise BadRequest(400, "bad_request", "folded header lines are not accepted")
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or not _TOKEN.fullmatch(name):
                raise BadRequest(400, "bad_request", "malformed header line")
            value = value.strip(" \t\r\n")
            if "\r" in value or "\x00" in value or "\n" in value:
                raise BadRequest(400, "bad_request", "a header value holds CR, LF or NUL")
            items.append((name, value))
            if len(items) > MAX_HEADER_COUNT:
                raise BadRequest(431, "headers_too_large", "too many header lines")
        self.headers = headers = Headers(items)
        for name in ("Content-Length", "Host"):  # one each at most (RFC 9112 6.3, 3.2)
            if len(headers.get_all(name) or ()) > 1:
                raise BadRequest(400, "bad_request", f"more than one {name} header")
        connection = (headers.get("Connection") or "").lower()
        if version == "HTTP/1.0":
            self.close_connection = "keep-alive" not in connection
        else:
            self.close_connection = "close" in connection

    def _dispatch(self) -> str:
        self._body_consumed = True
        target = self.path  # origin-form, checked by _parse_head: no "#", no "//" prefix
        path, has_query, query_text = target.partition("?")
        query = parse_qs(query_text) if has_query else {}
        route, allowed = self.server.router.match(self.command, path)
        if route is None:
            self._discard_body()
            if not allowed:
                self._send(404, error_body("not_found", "no such endpoint"))
                return "unmatched"
            self._send(405, error_body("method_not_allowed",
                                       f"use {', '.join(allowed)} for this endpoint"),
                       extra={"Allow": ", ".join(allowed)})
            return path
        try:
            request = Request(self.command, target, path, query, self.headers, b"",
                              self.client_address)
            self._read_body(route, request)
            status, *rest = route.handler(request)
            if route.raw:
                content_type, payload = rest
                self._send(status, payload, content_type)
            else:
                self.send_json(status, rest[0])
        except ApiError as exc:
            if not self._body_consumed:  # unread body bytes would desync the stream
                self.close_connection = True
            self._send(exc.status, json_bytes(exc.body()), extra=exc.headers)
            if not self._body_consumed:
                self._linger()
        except (TimeoutError, ConnectionError):
            raise
        except Exception:
            log.exception("handler error on %s %s", self.command, route.path)
            self.close_connection = True
            self._send(500, error_body("internal_error", "internal error"))
        return route.path

    _body_consumed = True

    def _linger(self) -> None:
        """Lingering close: after an early answer, read (and drop) what the client is still
        sending, bounded, so that closing does not reset the connection under its feet and
        destroy the answer before the client reads it."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
            while dropped < LINGER_MAX_BYTES and time.monotonic() < deadline:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

    def _discard_body(self) -> None:
        """Keep the stream in sync: a body we do not read means the connection must close."""
        lengths = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers or any(v != "0" for v in lengths):
            self.close_connection = True

    def _read_body(self, route: Route, request: Request) -> None:
        if route.method not in ("POST", "PUT", "PATCH"):
            self._discard_body()
            if route.auth:
                self._authenticate(request)
            return
        self._body_consumed = False
        if self.headers.get("Transfer-Encoding") is not None:
            raise ApiError(501, "transfer_encoding_not_supported",
                           "Transfer-Encoding is not supported; send Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise ApiError(411, "length_required", "Content-Length is required")
        if len(lengths) > 1 or not _CONTENT_LENGTH.fullmatch(lengths[0]):
            raise ApiError(400, "invalid_content_length", "Content-Length must be one number")
        length = int(lengths[0])
        if length > route.max_body:
            raise ApiError(413, "body_too_large",
                           f"body is {length} bytes; the limit is {route.max_body} bytes")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != JSON_TYPE:
            raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
        pending = self._precheck(request) if route.auth else None
        if (length and self.request_version == "HTTP/1.1"  # HTTP/1.0 expectations are ignored
                and (self.headers.get("Expect") or "").lower() == "100-continue"):
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for this
        self._reader.deadline = time.monotonic() + self.body_deadline
        body = self.rfile.read(length) if length else b""
        self._reader.clear_deadline()
        if len(body) != length:
            self.close_connection = True
            raise ConnectionError("client closed before sending the whole body")
        self._body_consumed = True
        request.body = body
        if route.auth:
            self._finish_auth(pending, request)

    # -- authentication hooks (the authenticator is enclave.rpcauth's) ---------------
    def _authenticate(self, request: Request) -> None:
        self._finish_auth(self._precheck(request), request)

    def _precheck(self, request: Request):
        auth = self.server.authenticator
        if auth is None:
            raise ApiError(503, "auth_not_configured", "RPC authentication is not configured")
        try:
            return auth.precheck(request.method, request.target, self.headers, time.time())
        except ApiError:
            raise
        except Exception:  # an authenticator bug must fail closed, never open
            log.exception("authenticator error")
            raise AuthError("authenticator_error") from None

    def _finish_auth(self, pending, request: Request) -> None:
        try:
            self.server.authenticator.finish(pending, request.body, time.time())
        except ApiError:
            raise
        except Exception:
            log.exception("authenticator error")
            raise AuthError("authenticator_error") from None


class PromptShutdownMixin:
    """serve_forever() that shutdown() wakes at once.

    socketserver's loop polls for a shutdown request every 0.5 s, so every stop waits up to
    that long. Here the loop also watches one end of a socketpair; shutdown() writes a byte to
    the other end. Put the mixin first in the bases of a socketserver server class.
    """

    _wake_r = _wake_w = None
    _stop_requested = False
    _loop_stopped: threading.Event | None = None

    def server_activate(self):
        super().server_activate()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._loop_stopped = threading.Event()  # unset until a loop has run and ended

    def serve_forever(self, poll_interval=None):  # poll_interval: unused, there is no poll
        self._loop_stopped.clear()
        try:
            with selectors.PollSelector() as selector:  # as socketserver's own selector
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stop_requested:
                    ready = selector.select()
                    if self._stop_requested:
                        break
                    for key, _ in ready:
                        if key.fileobj is self:
                            self._handle_request_noblock()
                        else:
                            self._drain_wakeups()
                    self.service_actions()
        finally:
            self._stop_requested = False
            self._drain_wakeups()
            self._loop_stopped.set()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:  # BlockingIOError: nothing left to read
            pass

    def shutdown(self):
        """Stop serve_forever and wait for it (like socketserver: call it from another thread)."""
        self._stop_requested = True
        try:
            self._wake_w.send(b"\0")
        except OSError:  # closed, or a full buffer: the loop is awake already
            pass
        self._loop_stopped.wait()

    def server_close(self):
        super().server_close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()


class HttpServer(PromptShutdownMixin, socketserver.ThreadingMixIn, socketserver.TCPServer):
    """ThreadingHTTPServer with a connection cap, TCP_NODELAY, metrics and a graceful drain."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: Address, router: Router, *, metrics: Metrics | None = None,
                 authenticator=None,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT_SECONDS,
                 head_deadline: float = HEAD_DEADLINE_SECONDS,
                 body_deadline: float = BODY_DEADLINE_SECONDS, handler_class=RequestHandler):
        self.address_family = address.socket_family
        self.router = router
        self.metrics = metrics or Metrics()
        self.authenticator = authenticator
        self.max_connections = max_connections
        self.draining = False
        self._lock = threading.Lock()
        self._connections: set = set()
        self.handlers: set = set()  # live RequestHandlers (set add/discard are atomic)
        self._record_keys: dict = {}  # (method, route, status) -> prebuilt metric series keys
        handler = type("BoundHandler", (handler_class,), {
            "timeout": idle_timeout, "head_deadline": head_deadline, "body_deadline": body_deadline})
        self.metrics.describe("enclave_http_requests_total", "counter",
                              "HTTP requests by method, route and status")
        self.metrics.describe("enclave_http_request_seconds", "histogram",
                              "HTTP request handling time by route",
                              buckets=HTTP_REQUEST_BUCKETS_SECONDS)
        self.metrics.describe("enclave_http_connections_rejected_total", "counter",
                              "connections refused at the connection cap")
        self.metrics.describe("enclave_http_connections_open", "gauge",
                              "HTTP connections open now")
        self.metrics.gauge_fn("enclave_http_connections_open", lambda: len(self._connections))
        super().__init__(address.sockaddr, handler, bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    @property
    def port(self) -> int:
        return self.server_address[1]

    # -- connection cap --------------------------------------------------------------
    def process_request(self, request, client_address):
        with self._lock:
            full = len(self._connections) >= self.max_connections or self.draining
            if not full:
                self._connections.add(request)
        if full:
            self.metrics.inc("enclave_http_connections_rejected_total")
            try:
                request.settimeout(OVERFLOW_WRITE_SECONDS)
                request.sendall(BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        if self.address_family in (socket.AF_INET, socket.AF_INET6):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections.discard(request)

    def handle_error(self, request, client_address):
        log.exception("connection error")

    # -- metrics and drain ---------------------------------------------------------------
    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        cached = self._record_keys.get((method, route, status))
        if cached is None:
            label = method if method in KNOWN_METHODS else "OTHER"  # clients choose methods
            cached = (self.metrics.series_keys((
                ("enclave_http_requests_total",
                 {"method": label, "route": route, "status": str(status)}),)),
                self.metrics.histogram("enclave_http_request_seconds", {"route": route}))
            if len(self._record_keys) < MAX_RECORD_KEYS:
                self._record_keys[(method, route, status)] = cached
        self.metrics.add_keyed(cached[0], _ONE, cached[1], seconds)

    def drain(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Stop accepting, let in-flight requests finish (bounded), then close idle connections."""
        self.draining = True
        self.shutdown()
        deadline = time.monotonic() + timeout
        while any(h.busy for h in list(self.handlers)) and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_SECONDS)
        clean = not any(h.busy for h in list(self.handlers))
        with self._lock:
            leftovers = list(self._connections)
        for conn in leftovers:  # idle keep-alive connections: wake their readers
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()
        return clean

    def serve_in_thread(self, name: str = "http") -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        thread.start()
        return thread
