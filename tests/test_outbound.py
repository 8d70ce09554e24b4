"""The outbound HTTPS client: trust, egress, keep-alive reuse, deadline, error mapping,
and the strict JSON parser for upstream answers."""

import http.client
import json
import random
import socket
import ssl
import tempfile
import threading
import time
import unittest

from enclave import tls
from enclave.egress import Connector, EgressError, parse_routes
from enclave.errors import ApiError
from enclave.outbound import (MAX_JSON_DEPTH, OutboundClient, OutboundError,
                              UpstreamInvalidResponse, UpstreamTimeout, UpstreamTLSError,
                              UpstreamUnavailable, nesting_exceeds,
                              parse_json)
from tests.fakes.fake_google import FakeGoogle
from tests.fakes.pki import TestCA


def setUpModule():
    global CA, TMP, CA_FILE, FAKE
    CA = TestCA()
    TMP = tempfile.TemporaryDirectory(prefix="outbound-test-")
    CA_FILE = CA.write(TMP.name)
    FAKE = FakeGoogle(CA).start()


def tearDownModule():
    FAKE.stop()
    TMP.cleanup()


class OutboundTest(unittest.TestCase):
    def setUp(self):
        FAKE.set_mode("normal")
        self.addCleanup(FAKE.set_mode, "normal")

    def client(self, **kwargs):
        client = OutboundClient(ca_file=CA_FILE, **kwargs)
        self.addCleanup(client.close)
        return client

    def test_post_form_answers_status_headers_body(self):
        status, headers, body = self.client().post_form(FAKE.revoke_url, {"token": "unknown"})
        self.assertEqual(status, 400)
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertIn(b'"invalid_token"', body)

    def test_post_json_is_sent_as_json(self):
        # The fake accepts only forms, so a JSON body is refused exactly as Google does.
        response = self.client().post_json(FAKE.token_url, {"grant_type": "refresh_token"})
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json()["error"], "invalid_request")

    def test_keep_alive_connections_are_reused(self):
        client = self.client()
        before = FAKE.tls_connections
        for _ in range(10):
            self.assertEqual(client.post_form(FAKE.revoke_url, {"token": "x"}).status, 400)
        self.assertEqual(FAKE.tls_connections - before, 1)
        self.assertEqual(client.connections_opened, 1)
        self.assertEqual(client.idle_connections(), 1)

    def test_reuse_disabled_opens_one_connection_per_request(self):
        client = self.client(reuse=False)
        before = FAKE.tls_connections
        for _ in range(5):
            self.assertEqual(client.post_form(FAKE.revoke_url, {"token": "x"}).status, 400)
        self.assertEqual(FAKE.tls_connections - before, 5)
        self.assertEqual(client.idle_connections(), 0)

    def test_concurrent_requests_share_a_bounded_pool(self):
        client = self.client()
        before = FAKE.tls_connections
        statuses = []

        def work():
            for _ in range(5):
                statuses.append(client.post_form(FAKE.revoke_url, {"token": "x"}).status)

        threads = [threading.Thread(target=work) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(statuses, [400] * 30)
        self.assertLessEqual(FAKE.tls_connections - before, 6)

    def test_connection_closed_by_the_server_while_idle_is_replaced(self):
        with FakeGoogle(CA, idle_timeout_s=0.2) as fake:
            client = self.client()
            self.assertEqual(client.post_form(fake.revoke_url, {"token": "x"}).status, 400)
            time.sleep(0.5)  # the fake closes the idle connection
            self.assertEqual(client.post_form(fake.revoke_url, {"token": "x"}).status, 400)
            self.assertEqual(client.connections_opened, 2)

    def test_stale_connection_not_detected_idle_is_retried_once(self):
        from unittest import mock
        from enclave import outbound
        with FakeGoogle(CA, idle_timeout_s=0.2) as fake:
            client = self.client()
            self.assertEqual(client.post_form(fake.revoke_url, {"token": "x"}).status, 400)
            time.sleep(0.5)
            # Pretend the idle check missed the close: the send/receive fails and is retried once.
            with mock.patch.object(outbound._EgressHTTPSConnection, "dropped", return_value=False):
                self.assertEqual(client.post_form(fake.revoke_url, {"token": "x"}).status, 400)
            self.assertEqual(client.connections_opened, 2)
            self.assertEqual(fake.state.revoke_requests, 2)

    def test_system_trust_store_does_not_trust_the_test_ca(self):
        client = OutboundClient()
        self.addCleanup(client.close)
        with self.assertRaises(UpstreamTLSError) as ctx:
            client.post_form(FAKE.revoke_url, {"token": "x"})
        self.assertIn("certificate verification failed", str(ctx.exception))

    def test_host_name_is_checked(self):
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = CA.issue("elsewhere", server=True, hosts=("other.example",)).write(tmp, "s")
            with FakeGoogle(cert_file=cert, key_file=key) as fake:
                with self.assertRaises(UpstreamTLSError):
                    self.client().post_form(fake.revoke_url, {"token": "x"})

    def test_deadline_raises_upstream_timeout(self):
        FAKE.set_mode("hang")
        client = self.client(timeout_s=0.5)
        with self.assertRaises(UpstreamTimeout):
            client.post_form(FAKE.token_url, {"grant_type": "refresh_token"})
        FAKE.set_mode("normal")
        # The timed-out connection was discarded; the next request works on a new one.
        self.assertEqual(client.post_form(FAKE.revoke_url, {"token": "x"}).status, 400)
        self.assertEqual(client.connections_opened, 2)

    def test_per_call_timeout_overrides_the_default(self):
        FAKE.set_mode("hang")
        with self.assertRaises(UpstreamTimeout):
            self.client().post_form(FAKE.token_url, {"grant_type": "x"}, timeout=0.3)

    def test_refused_connection_is_upstream_unavailable(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with self.assertRaises(UpstreamUnavailable):
            self.client().post_form(f"https://127.0.0.1:{port}/token", {})

    def test_only_https_urls(self):
        for url in ("http://127.0.0.1/token", "ftp://x/y", "https:///nohost"):
            with self.subTest(url), self.assertRaises(OutboundError):
                self.client().post_form(url, {})

    def test_tls_runs_over_the_egress_route_with_the_route_host_name(self):
        calls = []

        def fake_vsock_connect(sock, address):
            calls.append((sock.family, address))
            sock.close()
            return socket.create_connection(("127.0.0.1", FAKE.port), timeout=2)

        connector = Connector(parse_routes("localhost:443=vsock:3:8443"),
                              vsock_connect=fake_vsock_connect)
        client = self.client(connector=connector)
        # https://localhost/ -> port 443 -> routed; the certificate is checked for "localhost".
        self.assertEqual(client.post_form("https://localhost/revoke", {"token": "x"}).status, 400)
        self.assertEqual(client.post_form("https://localhost/revoke", {"token": "x"}).status, 400)
        self.assertEqual(calls, [(socket.AF_VSOCK, (3, 8443))])

    def test_context_settings(self):
        import ssl
        context = tls.outbound_context(CA_FILE)
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(context.check_hostname)
        self.assertGreaterEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)

    def test_answer_over_the_size_bound_is_upstream_invalid_response(self):
        FAKE.set_mode("oversize")
        with self.assertRaises(UpstreamInvalidResponse) as ctx:
            self.client().post_form(FAKE.token_url, {"grant_type": "x"})
        self.assertEqual((ctx.exception.status, ctx.exception.code),
                         (502, "upstream_invalid_response"))


class ErrorClassesTest(unittest.TestCase):
    """Outbound failures are the API's upstream errors: status and code come with the class."""

    def test_each_failure_carries_its_status_and_code(self):
        host = "upstream.example"
        cases = [
            ("timeout", socket.timeout("x"), UpstreamTimeout, 504, "upstream_timeout"),
            ("refused", ConnectionRefusedError(111, "refused"), UpstreamUnavailable, 502,
             "upstream_unavailable"),
            ("egress", EgressError("no route"), UpstreamUnavailable, 502, "upstream_unavailable"),
            ("cut mid-body", http.client.IncompleteRead(b"x", 5), UpstreamUnavailable, 502,
             "upstream_unavailable"),
            ("TLS", ssl.SSLError(1, "bad"), UpstreamTLSError, 502, "upstream_tls_error"),
            ("not HTTP", http.client.BadStatusLine("SSH-2.0"), UpstreamInvalidResponse, 502,
             "upstream_invalid_response"),
            ("header line too long", http.client.LineTooLong("header line"),
             UpstreamInvalidResponse, 502, "upstream_invalid_response"),
        ]
        for name, raised, kind, status, code in cases:
            with self.subTest(name):
                error = OutboundClient._map_error(host, raised)
                self.assertIsInstance(error, kind)
                self.assertIsInstance(error, OutboundError)
                self.assertIsInstance(error, ApiError)
                self.assertEqual((error.status, error.code), (status, code))
                self.assertIn(host, error.message)
                self.assertEqual(json.loads(json.dumps(error.body()))["error"]["code"], code)


def _no_constant(name):
    raise ValueError(name)


class ParseJsonTest(unittest.TestCase):
    def test_accepts_strict_json(self):
        deepest = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
        cases = [
            ("object", b'{"a": [1, 2.5, -3e10, true, null, "x"]}'),
            ("paired surrogates", b'{"emoji": "\\ud83d\\ude00"}'),
            ("escaped backslash then ud800", b'{"path": "\\\\ud800"}'),
            ("brackets inside strings do not count", b'{"s": "' + b"[{" * 10_000 + b'"}'),
            ("escaped quote inside a string", b'{"s": "a\\"[[[[", "t": []}'),
            ("as deep as allowed", deepest),
            ("non-ASCII", '{"name": "Zoë ✓"}'.encode()),
            ("many small arrays", b"[" + b",".join([b"[1]"] * 10_000) + b"]"),
        ]
        for name, data in cases:
            with self.subTest(name):
                value = parse_json(data)
                self.assertEqual(value, json.loads(data))
                # what it returns always encodes to strict JSON
                encoded = json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
                json.loads(encoded, parse_constant=_no_constant)

    def test_refuses_what_is_not_strict_json(self):
        deep = 100_000
        cases = [
            ("NaN", b'{"a": NaN}'),
            ("Infinity", b'{"a": Infinity}'),
            ("-Infinity", b'[-Infinity]'),
            ("1e999 parses to inf", b'{"a": 1e999}'),
            ("-1e999", b'[-1e999]'),
            ("lone high surrogate", b'{"a": "\\ud800"}'),
            ("lone low surrogate", b'{"a": "x\\udc00y"}'),
            ("lone surrogate in a key", b'{"\\udbff": 1}'),
            ("reversed pair", b'["\\ude00\\ud83d"]'),
            ("encoded surrogate bytes", b'{"a": "\xed\xa0\x80"}'),
            ("not UTF-8", b'{"a": "\xff"}'),
            ("one level too deep", b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)),
            ("arrays 100k deep", b"[" * deep + b"]" * deep),
            ("objects 100k deep", b'{"a":' * deep + b"1" + b"}" * deep),
            ("100k deep, never closed", b"[" * deep),
            ("deep after a string", b'["x", ' + b"[" * deep + b"]" * deep + b"]"),
            ("deep after an unterminated string", b"[" * deep + b'"abc'),
            ("HTML", b"<html>nope</html>"),
            ("empty", b""),
            ("huge integer", b"1" * 5000),
        ]
        for name, data in cases:
            with self.subTest(name):
                with self.assertRaises(UpstreamInvalidResponse) as ctx:
                    parse_json(data, "the test upstream")
                self.assertEqual((ctx.exception.status, ctx.exception.code),
                                 (502, "upstream_invalid_response"))
                self.assertIn("the test upstream", ctx.exception.message)

    def test_message_never_quotes_the_answer(self):
        secret = "ya29.secret-in-a-broken-answer"
        for data in (f'{{"access_token": "{secret}", }}'.encode(),
                     f'{{"access_token": "{secret}" NaN}}'.encode(),
                     f'{{"access_token": "{secret}", "x": 1e999}}'.encode()):
            with self.subTest(data=data[-12:]):
                with self.assertRaises(UpstreamInvalidResponse) as ctx:
                    parse_json(data)
                self.assertNotIn(secret, ctx.exception.message)

    def test_depth_scan_agrees_with_the_real_depth(self):
        rng = random.Random(7)  # fixed seed: the same documents every run
        pieces = ['"', "\\", "[", "]", "{", "}", "a", "\n", "é"]

        def text():
            return "".join(rng.choice(pieces) for _ in range(rng.randrange(6)))

        def value(depth):
            if depth == 0 or rng.random() < 0.25:
                return rng.choice([1, 2.5, None, True, text()])
            if rng.random() < 0.5:
                return [value(depth - 1) for _ in range(rng.randrange(1, 4))]
            return {text(): value(depth - 1) for _ in range(rng.randrange(1, 4))}

        def depth_of(v):
            if isinstance(v, list):
                return 1 + max(map(depth_of, v), default=0)
            if isinstance(v, dict):
                return 1 + max(map(depth_of, v.values()), default=0)
            return 0

        for n in range(300):
            doc = value(rng.randrange(12))
            data = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
            real = depth_of(doc)
            for limit in (0, 1, real - 1, real, real + 1):
                if limit >= 0:
                    with self.subTest(n=n, limit=limit, depth=real):
                        self.assertEqual(nesting_exceeds(data, limit), real > limit)

    def test_depth_scan_is_linear_on_hostile_input(self):
        # Stray quotes and escapes: a naive string regex retries from every quote (quadratic,
        # minutes for 1 MiB). Bounded generously: the linear scan takes milliseconds.
        size = 1024 * 1024
        for name, data in (("quotes", b'"\\' * (size // 2)),
                           ("escaped quotes", b'\\"' * (size // 2)),
                           ("brackets", b"[" * size), ("mixed", b'["' * (size // 2)),
                           ("just under the limit, repeated",
                            (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) * (size // 128)),
                           ("alternating", b"[" + b"[]" * (size // 2) + b"[")):
            with self.subTest(name):
                started = time.perf_counter()
                with self.assertRaises(UpstreamInvalidResponse):
                    parse_json(data)
                self.assertLess(time.perf_counter() - started, 2.0)


if __name__ == "__main__":
    unittest.main()
