"""Egress routes (docs/DESIGN.md §10): parsing and the VSOCK/TCP connector.

No AF_VSOCK socket is ever connected here: the connector's final `connect` on the AF_VSOCK socket
is swapped for a function that checks the socket and address, closes it and dials loopback TCP.
"""

import socket
import threading
import unittest

from enclave.egress import (NOT_ROUTED_CODE, Connector, EgressError, EgressNotRouted, Route,
                            is_routed, parse_routes, require_route)


class ParseTest(unittest.TestCase):
    def test_valid(self):
        routes = parse_routes(" oauth2.googleapis.com:443=vsock:3:8443 , "
                              "Accounts.Google.com:443=vsock:3:8444,[2001:db8::1]:8443=vsock:16:9000")
        self.assertEqual(routes, {
            ("oauth2.googleapis.com", 443): Route("oauth2.googleapis.com", 443, 3, 8443),
            ("accounts.google.com", 443): Route("accounts.google.com", 443, 3, 8444),
            ("2001:db8::1", 8443): Route("2001:db8::1", 8443, 16, 9000),
        })
        self.assertEqual(str(routes[("2001:db8::1", 8443)]), "[2001:db8::1]:8443=vsock:16:9000")

    def test_empty_means_no_routes(self):
        for text in (None, "", "   "):
            with self.subTest(repr(text)):
                self.assertEqual(parse_routes(text), {})

    def test_errors_are_clear(self):
        cases = [
            ("no equals", "oauth2.googleapis.com:443", "expected host:port=vsock:CID:PORT"),
            ("no port", "oauth2.googleapis.com=vsock:3:8443", "expected host:port"),
            ("port zero", "h:0=vsock:3:8443", "port must be 1..65535"),
            ("port too big", "h:70000=vsock:3:8443", "port must be 1..65535"),
            ("port letters", "h:https=vsock:3:8443", "port must be 1..65535"),
            ("empty host", ":443=vsock:3:8443", "missing or invalid host"),
            ("bare IPv6", "2001:db8::1:443=vsock:3:1", "brackets"),
            ("tcp target", "h:443=tcp:127.0.0.1:8443", "must be vsock:CID:PORT"),
            ("ANY cid", "h:443=vsock:ANY:8443", "not ANY"),
            ("bad cid", "h:443=vsock:x:8443", "CID must be a number"),
            ("target port zero", "h:443=vsock:3:0", "target port"),
            ("duplicate", "h:443=vsock:3:1,H:443=vsock:3:2", "duplicate route"),
            ("empty entry", "h:443=vsock:3:1,,g:443=vsock:3:2", "empty entry"),
            ("trailing comma", "h:443=vsock:3:1,", "empty entry"),
        ]
        for name, text, expected in cases:
            with self.subTest(name):
                with self.assertRaises(EgressError) as ctx:
                    parse_routes(text)
                message = str(ctx.exception)
                self.assertIn("ENCLAVE_EGRESS_ROUTES entry", message)
                self.assertIn(expected, message)

    def test_entry_number_is_named(self):
        with self.assertRaises(EgressError) as ctx:
            parse_routes("a:1=vsock:3:1,b:2=vsock:3:2,c=vsock:3:3")
        self.assertIn("entry 3", str(ctx.exception))


class IsRoutedTest(unittest.TestCase):
    ROUTES = parse_routes("oauth2.googleapis.com:443=vsock:3:8001,"
                          "watermark.internal.example:8443=vsock:3:8003,"
                          "[2001:db8::1]:443=vsock:3:9")

    def test_table(self):
        cases = [
            ("exact", "oauth2.googleapis.com", 443, True),
            ("case-insensitive host", "OAuth2.GoogleAPIs.com", 443, True),
            ("other port", "oauth2.googleapis.com", 8443, False),
            ("non-default port", "watermark.internal.example", 8443, True),
            ("default port not implied", "watermark.internal.example", 443, False),
            ("unknown host", "evil.example", 443, False),
            ("suffix is not a match", "x.oauth2.googleapis.com", 443, False),
            ("IPv6 bracketed", "[2001:db8::1]", 443, True),
            ("IPv6 bare", "2001:db8::1", 443, True),
        ]
        for name, host, port, expected in cases:
            with self.subTest(name):
                self.assertIs(is_routed(self.ROUTES, host, port), expected)
                if expected:
                    self.assertEqual(require_route(self.ROUTES, host, port).port, port)
                else:
                    with self.assertRaises(EgressNotRouted) as ctx:
                        require_route(self.ROUTES, host, port)
                    self.assertEqual(ctx.exception.code, "egress_not_routed")

    def test_empty_routes_route_nothing(self):
        self.assertFalse(is_routed(parse_routes(None), "oauth2.googleapis.com", 443))

    def test_parse_errors_carry_a_code(self):
        with self.assertRaises(EgressError) as ctx:
            parse_routes("h:443")
        self.assertEqual(ctx.exception.code, "egress_error")


class EchoServer:
    """A loopback TCP server answering each connection's first line, to prove where we landed."""

    def __init__(self, name: str):
        self.name = name.encode()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.name)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=2)


class ConnectorTest(unittest.TestCase):
    def setUp(self):
        self.direct = EchoServer("direct")
        self.proxy = EchoServer("vsock-proxy")
        self.addCleanup(self.direct.close)
        self.addCleanup(self.proxy.close)
        self.calls = []

    def fake_vsock_connect(self, sock, address):
        """Stands in for AF_VSOCK connect: records, closes the vsock socket, dials loopback."""
        self.calls.append((sock.family, sock.type, sock.gettimeout(), address))
        sock.close()
        return socket.create_connection(("127.0.0.1", self.proxy.port), timeout=2)

    def read(self, sock):
        with sock:
            return sock.recv(64)

    def test_routed_host_goes_over_vsock(self):
        if not hasattr(socket, "AF_VSOCK"):
            self.skipTest("no AF_VSOCK on this platform")
        connector = Connector(parse_routes("oauth2.googleapis.com:443=vsock:3:8443"),
                              vsock_connect=self.fake_vsock_connect)
        self.assertEqual(self.read(connector.connect("OAuth2.googleapis.com", 443, 2.5)),
                         b"vsock-proxy")
        self.assertEqual(self.calls, [(socket.AF_VSOCK, socket.SOCK_STREAM, 2.5, (3, 8443))])

    def test_unrouted_host_goes_direct(self):
        connector = Connector(parse_routes("oauth2.googleapis.com:443=vsock:3:8443"),
                              vsock_connect=self.fake_vsock_connect)
        sock = connector.connect("127.0.0.1", self.direct.port, 2)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        self.assertEqual(self.read(sock), b"direct")
        self.assertEqual(self.calls, [])

    def test_route_matches_host_and_port(self):
        connector = Connector(parse_routes(f"127.0.0.1:{self.direct.port + 1}=vsock:3:1"),
                              vsock_connect=self.fake_vsock_connect)
        self.assertEqual(self.read(connector.connect("127.0.0.1", self.direct.port, 2)), b"direct")
        self.assertEqual(self.calls, [])

    def test_failed_vsock_connect_closes_the_socket(self):
        if not hasattr(socket, "AF_VSOCK"):
            self.skipTest("no AF_VSOCK on this platform")
        created = []

        def refuse(sock, address):
            created.append(sock)
            raise ConnectionRefusedError("no proxy")

        connector = Connector(parse_routes("h:443=vsock:3:8443"), vsock_connect=refuse)
        with self.assertRaises(ConnectionRefusedError):
            connector.connect("h", 443, 1)
        self.assertEqual(created[0].fileno(), -1)

    def test_fail_closed_refuses_unrouted_without_any_socket(self):
        opened = []

        def tcp_connect(host, port, timeout):
            opened.append((host, port))
            raise AssertionError("a fail-closed connector must not dial TCP")

        connector = Connector(parse_routes("oauth2.googleapis.com:443=vsock:3:8443"),
                              fail_closed=True, vsock_connect=self.fake_vsock_connect,
                              tcp_connect=tcp_connect)
        cases = [("unrouted host", "127.0.0.1", self.direct.port),
                 ("routed host, other port", "oauth2.googleapis.com", 8443),
                 ("IPv6 literal", "[::1]", self.direct.port)]
        for name, host, port in cases:
            with self.subTest(name):
                with self.assertRaises(EgressNotRouted) as ctx:
                    connector.connect(host, port, 2)
                error = ctx.exception
                self.assertIsInstance(error, EgressError)  # callers that map EgressError still do
                self.assertEqual(error.code, NOT_ROUTED_CODE)
                self.assertEqual(error.code, "egress_not_routed")
                self.assertEqual((error.host, error.port), (host.strip("[]"), port))
                self.assertIn("egress_not_routed", str(error))
                self.assertIn("ENCLAVE_EGRESS_ROUTES", str(error))
        self.assertEqual(opened, [])
        self.assertEqual(self.calls, [])

    def test_fail_closed_still_uses_routes(self):
        if not hasattr(socket, "AF_VSOCK"):
            self.skipTest("no AF_VSOCK on this platform")
        connector = Connector(parse_routes("oauth2.googleapis.com:443=vsock:3:8443"),
                              fail_closed=True, vsock_connect=self.fake_vsock_connect)
        self.assertEqual(self.read(connector.connect("oauth2.googleapis.com", 443, 2)),
                         b"vsock-proxy")
        self.assertEqual(self.calls, [(socket.AF_VSOCK, socket.SOCK_STREAM, 2, (3, 8443))])

    def test_fail_closed_with_no_routes_refuses_everything(self):
        connector = Connector.from_setting(None, fail_closed=True)
        with self.assertRaises(EgressNotRouted):
            connector.connect("127.0.0.1", self.direct.port, 2)

    def test_direct_fallback_is_the_default(self):
        """Local development keeps direct TCP unless the caller asks for fail_closed."""
        self.assertFalse(Connector().fail_closed)
        self.assertEqual(self.read(Connector().connect("127.0.0.1", self.direct.port, 2)),
                         b"direct")

    def test_from_setting(self):
        connector = Connector.from_setting("h:443=vsock:3:8443")
        self.assertEqual(connector.route_for("H", 443), Route("h", 443, 3, 8443))
        self.assertIsNone(connector.route_for("h", 444))


if __name__ == "__main__":
    unittest.main()
