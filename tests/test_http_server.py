"""The hardened HTTP server: JSON answers, every limit, the connection cap and the drain."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import unittest
from pathlib import Path

from enclave.app import Runtime
from enclave.config import Settings
from enclave.errors import ApiError
from enclave.metrics import Metrics
from enclave.server import HttpServer, RequestHandler, Router
from tests.support import (LOOPBACK_ANY_PORT, captured_logs, http_call, parse_raw_response,
                           raw_exchange, running_server, scan_later)

RPC_SH = Path(__file__).resolve().parent.parent / "scripts" / "rpc.sh"


def make_router(gate: threading.Event | None = None, entered: threading.Event | None = None):
    router = Router()
    router.add("GET", "/healthz", lambda req: (200, {"status": "ok"}))
    router.add("POST", "/echo", lambda req: (200, {"echo": req.json()}))

    def boom(req):
        raise RuntimeError("secret internal detail")

    def refuse(req):
        raise ApiError(409, "conflict_example", "a clear sentence")

    def slow(req):
        entered.set()
        gate.wait(5)
        return 200, {"slow": True}

    router.add("GET", "/boom", boom)
    router.add("GET", "/refuse", refuse)
    router.add("GET", "/slow", slow)
    return router


WAIT_SECONDS = 5.0  # every wait on a condition gives up after this
POLL_SECONDS = 0.005
DRIP_SECONDS = 0.3  # a dripping client's pace: each drip inside the tests' 0.5 s idle timeout


def wait_until(predicate, timeout: float = WAIT_SECONDS) -> bool:
    """Poll a condition (bounded); True once it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def read_response(sock: socket.socket) -> bytes:
    """One whole answer (head and Content-Length bytes of body) from a keep-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    _, headers, body = parse_raw_response(data)
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" + body


def post(port, body: bytes, headers: dict) -> bytes:
    lines = ["POST /echo HTTP/1.1", "Host: x"] + [f"{k}: {v}" for k, v in headers.items()]
    return raw_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


class Answers(unittest.TestCase):
    def setUp(self):
        ctx = running_server(make_router())
        self.server = ctx.__enter__()
        self.addCleanup(ctx.__exit__, None, None, None)
        self.port = self.server.port

    def test_json_answer_headers(self):
        status, headers, body = http_call(self.port, "GET", "/healthz")
        self.assertEqual((status, body), (200, {"status": "ok"}))
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(headers["Cache-Control"], "no-store")
        self.assertEqual(int(headers["Content-Length"]), len(json.dumps(body, separators=(",", ":"))))

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(conn.close)
        for _ in range(20):
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            resp.read()
        conn.request("POST", "/echo", body=b'{"a": 1}', headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual(json.loads(resp.read()), {"echo": {"a": 1}})

    def test_each_answer_is_one_write_on_a_nodelay_socket(self):
        writes, nodelay = [], []

        class Counting(RequestHandler):
            def setup(self):
                super().setup()
                nodelay.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                real = self.wfile.write
                self.wfile.write = lambda data: (writes.append(len(data)), real(data))[1]

        with running_server(make_router(), handler_class=Counting) as server:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            for path in ("/healthz", "/nope", "/refuse", "/healthz"):
                conn.request("GET", path)
                conn.getresponse().read()
            conn.request("POST", "/echo", body=b'{"a": 1}', headers={"Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()
        self.assertEqual(len(writes), 5, writes)  # five answers, five writes
        self.assertTrue(nodelay and all(nodelay), nodelay)

    def test_error_table(self):
        big = b"x" * (64 * 1024 + 1)
        cases = [
            ("unknown path", lambda: http_call(self.port, "GET", "/nope"), 404, "not_found"),
            ("wrong method", lambda: http_call(self.port, "DELETE", "/healthz"), 405,
             "method_not_allowed"),
            ("malformed JSON", lambda: http_call(self.port, "POST", "/echo", b"{nope",
                                                 {"Content-Type": "application/json"}), 400,
             "malformed_json"),
            ("JSON nested too deeply", lambda: http_call(
                self.port, "POST", "/echo", b"[" * 60000, {"Content-Type": "application/json"}), 400,
             "malformed_json"),
            ("JSON that is not an object", lambda: http_call(
                self.port, "POST", "/echo", b"[1]", {"Content-Type": "application/json"}), 400,
             "invalid_request"),
            ("wrong content type", lambda: http_call(self.port, "POST", "/echo", b"{}",
                                                     {"Content-Type": "text/plain"}), 415,
             "unsupported_media_type"),
            ("oversized", lambda: http_call(self.port, "POST", "/echo", big,
                                            {"Content-Type": "application/json"}), 413,
             "body_too_large"),
            ("handler error", lambda: http_call(self.port, "GET", "/boom"), 500, "internal_error"),
            ("handler ApiError", lambda: http_call(self.port, "GET", "/refuse"), 409,
             "conflict_example"),
        ]
        for name, call, status, code in cases:
            with self.subTest(name):
                with captured_logs() as logs:
                    got_status, headers, body = call()
                self.assertEqual(got_status, status)
                self.assertEqual(body["error"]["code"], code)
                self.assertEqual(headers["Content-Type"], "application/json")
                self.assertNotIn("Traceback", json.dumps(body))
                self.assertNotIn("secret internal detail", json.dumps(body))
                if status == 405:
                    self.assertEqual(headers["Allow"], "GET")
                if status == 500:
                    self.assertIn("Traceback", logs.getvalue())  # logged, not sent

    def test_raw_protocol_errors(self):
        cases = [
            ("chunked", post(self.port, b"2\r\n{}\r\n0\r\n\r\n",
                             {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}),
             501),
            ("missing length", post(self.port, b"", {"Content-Type": "application/json"}), 411),
            ("two lengths", post(self.port, b"{}", {"Content-Length": "2\r\nContent-Length: 3",
                                                    "Content-Type": "application/json"}), 400),
            ("garbage length", post(self.port, b"{}", {"Content-Length": "-2",
                                                       "Content-Type": "application/json"}), 400),
            ("non-ASCII digit length", post(self.port, b"{}", {"Content-Length": "\u00b2",
                                                               "Content-Type": "application/json"}), 400),
            ("request line too long",
             raw_exchange(self.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"), 414),
            ("not HTTP", raw_exchange(self.port, b"hello there\r\n\r\n"), 400),
            ("HTTP/2.0 request line", raw_exchange(self.port, b"GET /healthz HTTP/2.0\r\n\r\n"), 505),
            ("folded header line", raw_exchange(
                self.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n continued\r\n\r\n"), 400),
            ("space before the colon", raw_exchange(
                self.port, b"GET /healthz HTTP/1.1\r\nContent-Length : 0\r\n\r\n"), 400),
            ("header line too long", raw_exchange(
                self.port, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"), 431),
            ("too many headers", raw_exchange(
                self.port, b"GET /healthz HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n"), 431),
            ("two Content-Length headers on a GET", raw_exchange(
                self.port, b"GET /healthz HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 24\r\n\r\n"
                b"GET /healthz HTTP/1.1\r\n\r\n"), 400),
            ("two Host headers", raw_exchange(
                self.port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400),
            ("bare CR inside a header value", raw_exchange(
                self.port, b"GET /healthz HTTP/1.1\r\nX-A: a\rContent-Length: 5\r\n\r\n"), 400),
        ]
        for name, data, status in cases:
            with self.subTest(name):
                got, headers, body = parse_raw_response(data)
                self.assertEqual(got, status)
                self.assertIn("error", json.loads(body))
                self.assertEqual(headers["content-type"], "application/json")

    def test_a_body_on_a_get_is_never_read_as_the_next_request(self):
        smuggled = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        data = raw_exchange(self.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: "
                            + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
        self.assertEqual(data.count(b"HTTP/1.1 "), 1, data)  # one answer, then the close
        self.assertIn(b"Connection: close", data)

    def test_http_1_0_closes_and_expect_100_continue_is_answered(self):
        data = raw_exchange(self.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        status, headers, _ = parse_raw_response(data)
        self.assertEqual((status, headers.get("connection")), (200, "close"))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 8\r\nExpect: 100-continue\r\n\r\n")
            self.assertEqual(sock.recv(4096), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b'{"a": 1}')
            status, _, body = parse_raw_response(read_response(sock))
        self.assertEqual((status, json.loads(body)), (200, {"echo": {"a": 1}}))

    def test_clients_cannot_fill_the_metrics_with_invented_methods(self):
        for i in range(600):
            raw_exchange(self.port, f"M{i} /healthz HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        http_call(self.port, "GET", "/healthz")
        m = self.server.metrics
        labels = {"method": "GET", "route": "/healthz", "status": "200"}
        wait_until(lambda: m.value("enclave_http_requests_total", labels))
        self.assertEqual(m.value("enclave_http_requests_total", labels), 1)
        self.assertGreater(m.value("enclave_http_requests_total",
                                   {"method": "OTHER", "route": "/healthz", "status": "405"}), 0)

    def test_metrics_count_requests_by_route_and_status(self):
        http_call(self.port, "GET", "/healthz")
        http_call(self.port, "GET", "/nope")
        m = self.server.metrics
        # the server records a request just after its answer is written: wait for it (bounded)
        ok = {"method": "GET", "route": "/healthz", "status": "200"}
        missing = {"method": "GET", "route": "unmatched", "status": "404"}
        wait_until(lambda: m.value("enclave_http_requests_total", ok)
                   and m.value("enclave_http_requests_total", missing))
        self.assertEqual(m.value("enclave_http_requests_total",
                                 {"method": "GET", "route": "/healthz", "status": "200"}), 1)
        self.assertEqual(m.value("enclave_http_requests_total",
                                 {"method": "GET", "route": "unmatched", "status": "404"}), 1)


class Targets(unittest.TestCase):
    """Origin-form targets are split by the server itself; anything else is refused with 400."""

    def setUp(self):
        ctx = running_server(make_router())
        self.server = ctx.__enter__()
        self.addCleanup(ctx.__exit__, None, None, None)

    def get(self, target: bytes) -> tuple[int, dict, bytes]:
        data = raw_exchange(self.server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\n\r\n")
        self.assertTrue(data, "the connection was dropped without an answer")
        return parse_raw_response(data)

    def test_refused_targets_answer_400_invalid_target(self):
        cases = [
            ("authority-like //, urlsplit raised on it", b"//[?x"),
            ("authority-like //, with a query", b"//x/healthz?q"),
            ("authority-like //", b"//x/healthz"),
            ("a lone //", b"//"),
            ("fragment", b"/healthz#frag"),
            ("fragment after a query", b"/healthz?a#b"),
            ("NUL", b"/heal\x00thz"),
            ("SOH", b"/heal\x01thz"),
            ("bare CR", b"/healthz\rX"),
            ("ESC and BEL", b"/healthz\x1b[31m\x07"),
            ("TAB", b"/healthz\tx"),
            ("DEL", b"/healthz?\x7f"),
            ("raw UTF-8", "/healthz?q=\u00e9t\u00e9".encode("utf-8")),
            ("C1 control", b"/healthz\x85"),
            ("latin-1 byte", b"/healthz?q=\xe9"),
        ]
        for name, target in cases:
            with self.subTest(name), captured_logs() as logs:
                status, headers, body = self.get(target)
                self.assertEqual(status, 400)
                self.assertEqual(headers["content-type"], "application/json")
                self.assertEqual(json.loads(body)["error"]["code"], "invalid_target")
                self.assertNotIn("Traceback", logs.getvalue())

    def test_accepted_targets_are_split_at_the_first_question_mark(self):
        cases = [
            ("plain", b"/healthz", 200),
            ("empty query", b"/healthz?", 200),
            ("query", b"/healthz?q", 200),
            ("percent-encoded UTF-8", b"/healthz?q=%C3%A9t%C3%A9", 200),
            ("slashes and a question mark in the query", b"/healthz?next=//x/y?z", 200),
            ("unknown path with a query", b"/nope?x", 404),
            ("a path that only ends like a route", b"/x/healthz", 404),
        ]
        for name, target, status in cases:
            with self.subTest(name):
                self.assertEqual(self.get(target)[0], status)

    def test_the_query_reaches_the_handler_parsed(self):
        seen = []
        router = Router()
        router.add("GET", "/q", lambda req: (seen.append((req.target, req.path, req.query)),
                                             (200, {}))[1])
        with running_server(router) as server:
            self.assertEqual(http_call(server.port, "GET", "/q?a=1&a=2&b=%C3%A9&c")[0], 200)
        self.assertEqual(seen, [("/q?a=1&a=2&b=%C3%A9&c", "/q", {"a": ["1", "2"], "b": ["\u00e9"]})])

    def test_an_exception_outside_the_handler_answers_500_not_a_dropped_connection(self):
        class BrokenRouter(Router):
            def match(self, method, path):
                raise RuntimeError("secret internal detail")

        with running_server(BrokenRouter()) as server, captured_logs() as logs:
            data = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(data, "the connection was dropped without an answer")
        status, headers, body = parse_raw_response(data)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (500, "internal_error"))
        self.assertEqual(headers.get("connection"), "close")
        self.assertNotIn(b"secret internal detail", data)
        self.assertIn("Traceback", logs.getvalue())  # logged, not sent


class Head(unittest.TestCase):
    """HEAD /healthz answers as GET does, without the body, and the connection stays usable."""

    def setUp(self):
        runtime = Runtime(Settings(), metrics=Metrics())  # no secrets: ?ready=1 answers 503
        ctx = running_server(runtime.router())
        self.server = ctx.__enter__()
        self.addCleanup(ctx.__exit__, None, None, None)

    def test_head_answers_like_get_without_a_body(self):
        cases = [("health", "/healthz", 200), ("not ready", "/healthz?ready=1", 503),
                 ("unknown path", "/nope", 404)]
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as sock:
            for name, target, status in cases:
                with self.subTest(name):
                    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    get_status, get_headers, get_body = parse_raw_response(read_response(sock))
                    self.assertEqual(get_status, status)
                    sock.sendall(f"HEAD {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = sock.recv(65536)
                        self.assertTrue(chunk, "the connection was closed")
                        data += chunk
                    head_status, head_headers, rest = parse_raw_response(data)
                    self.assertEqual(rest, b"")  # no body bytes
                    self.assertEqual(head_status, status)
                    self.assertEqual(int(head_headers["content-length"]), len(get_body))
                    self.assertEqual(head_headers["content-type"], get_headers["content-type"])
                    self.assertNotIn("connection", head_headers)
                    # keep-alive: the next answer on this connection starts where the head ended
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    next_status, _, body = parse_raw_response(read_response(sock))
                    self.assertEqual(next_status, 200)
                    self.assertEqual(json.loads(body)["status"], "degraded")

    @unittest.skipUnless(shutil.which("openssl") and shutil.which("curl") and shutil.which("bash"),
                         "needs bash, openssl and curl")
    def test_rpc_sh_head_does_not_wait_for_a_body(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
        env["ENCLAVE_RUNTIME_BASE_URL"] = f"http://127.0.0.1:{self.server.port}"
        result = subprocess.run(["bash", str(RPC_SH), "HEAD", "/healthz"], env=env,
                                capture_output=True, text=True, timeout=10)  # curl waits 30 s
        scan_later(result.stderr, "rpc.sh stderr")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith("HTTP/1.1 200"), result.stdout)

    def test_other_methods_still_list_get_and_head(self):
        status, headers, _ = http_call(self.server.port, "DELETE", "/healthz")
        self.assertEqual((status, headers["Allow"]), (405, "GET, HEAD"))


class Limits(unittest.TestCase):
    def test_idle_connection_is_closed_after_the_timeout(self):
        with running_server(make_router(), idle_timeout=0.5) as server:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                started = time.monotonic()
                self.assertEqual(sock.recv(1), b"")  # the server closed it
                self.assertLess(time.monotonic() - started, 5)  # 0.5 s, not the 10 s default

    def test_a_client_dripping_its_request_is_cut_off_at_the_deadline(self):
        cases = [
            ("head", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Drip: ", b"a"),
            ("body", b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n", b" "),
        ]
        with running_server(make_router(), idle_timeout=0.5, head_deadline=1.0,
                            body_deadline=1.0) as server:
            for name, start, drip in cases:
                with self.subTest(name):
                    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                        sock.sendall(start)
                        sock.settimeout(DRIP_SECONDS)
                        began, closed = time.monotonic(), False
                        while time.monotonic() - began < 8:  # bounded: 27 drips at most
                            try:  # wait for the close, at most one drip interval
                                if sock.recv(1) == b"":
                                    closed = True
                                    break
                            except socket.timeout:
                                pass
                            except OSError:
                                closed = True
                                break
                            try:
                                sock.sendall(drip)
                            except OSError:
                                closed = True
                                break
                        self.assertTrue(closed, "the dripping connection was never closed")
                        self.assertLess(time.monotonic() - began, 5)

    def test_connection_beyond_the_cap_gets_503_and_the_server_stays_responsive(self):
        with running_server(make_router(), max_connections=2) as server:
            holders = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                       for _ in range(2)]
            try:
                # make sure both holders are accepted before the third arrives
                for sock in holders:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    self.assertIn(b"200 OK", sock.recv(65536))
                status, headers, body = parse_raw_response(
                    raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
                self.assertEqual(status, 503)
                self.assertEqual(json.loads(body)["error"]["code"], "too_many_connections")
                # a slot holder is still served
                holders[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertIn(b"200 OK", holders[0].recv(65536))
                # a freed slot is taken by a new client
                holders.pop().close()
                self.assertTrue(wait_until(
                    lambda: http_call(server.port, "GET", "/healthz")[0] == 200))
            finally:
                for sock in holders:
                    sock.close()

    def test_drain_finishes_in_flight_requests(self):
        gate, entered = threading.Event(), threading.Event()
        server = HttpServer(LOOPBACK_ANY_PORT, make_router(gate, entered))
        thread = server.serve_in_thread()
        result = {}

        def client():
            result["answer"] = http_call(server.port, "GET", "/slow")

        t = threading.Thread(target=client)
        t.start()
        self.assertTrue(entered.wait(5))
        opener = threading.Thread(target=lambda: wait_until(lambda: server.draining)
                                  and gate.set())  # the request finishes during the drain
        opener.start()
        self.assertTrue(server.drain(timeout=5))
        opener.join(5)
        t.join(5)
        thread.join(5)
        self.assertEqual(result["answer"][0], 200)


if __name__ == "__main__":
    unittest.main()
