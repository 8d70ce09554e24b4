"""The outbound HTTPS client: trust, egress, keep-alive reuse, deadline, error mapping."""

import socket
import tempfile
import threading
import time
import unittest

from enclave.egress import Connector, parse_routes
from enclave.outbound import (OutboundClient, OutboundError, UpstreamTimeout, UpstreamTLSError,
                              UpstreamUnavailable, create_outbound_context)
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
        context = create_outbound_context(CA_FILE)
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(context.check_hostname)
        self.assertGreaterEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)


if __name__ == "__main__":
    unittest.main()
