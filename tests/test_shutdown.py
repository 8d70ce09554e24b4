"""Servers stop promptly: shutdown() wakes the accept loop instead of waiting for a poll."""

import tempfile
import time
import unittest

from enclave.server import HttpServer, Router
from tests.fakes.fake_watermark import FakeWatermark
from tests.fakes.pki import TestCA
from tests.support import LOOPBACK_ANY_PORT, http_call

# socketserver polls for shutdown every 0.5 s; a prompt stop is well under that even on a
# loaded 2-core machine.
PROMPT_STOP_SECONDS = 0.2
ROUNDS = 3  # the worst of a few rounds, so that a lucky poll cannot hide a slow stop


def _router() -> Router:
    router = Router()
    router.add("GET", "/healthz", lambda req: (200, {"status": "ok"}))
    return router


class PromptShutdown(unittest.TestCase):
    def test_http_server_drain_returns_at_once(self):
        for round_ in range(ROUNDS):
            with self.subTest(round=round_):
                server = HttpServer(LOOPBACK_ANY_PORT, _router())
                thread = server.serve_in_thread()
                self.assertEqual(http_call(server.port, "GET", "/healthz")[0], 200)  # loop is up
                started = time.monotonic()
                self.assertTrue(server.drain(timeout=2.0))
                elapsed = time.monotonic() - started
                thread.join(5)
                self.assertFalse(thread.is_alive())
                self.assertLess(elapsed, PROMPT_STOP_SECONDS)

    def test_a_stopped_loop_can_serve_again(self):
        server = HttpServer(LOOPBACK_ANY_PORT, _router())
        self.addCleanup(server.server_close)
        for _ in range(2):
            thread = server.serve_in_thread()
            self.assertEqual(http_call(server.port, "GET", "/healthz")[0], 200)
            started = time.monotonic()
            server.shutdown()
            self.assertLess(time.monotonic() - started, PROMPT_STOP_SECONDS)
            thread.join(5)
            self.assertFalse(thread.is_alive())

    def test_fake_watermark_stops_at_once(self):
        ca = TestCA("Shutdown Test CA")
        with tempfile.TemporaryDirectory() as directory:
            cert, key = ca.issue("127.0.0.1", server=True).write(directory, "server")
            for round_ in range(ROUNDS):
                with self.subTest(round=round_):
                    fake = FakeWatermark(cert, key, ca.cert_pem, ca.key)
                    thread = fake.serve_in_thread()
                    started = time.monotonic()
                    fake.stop()
                    elapsed = time.monotonic() - started
                    thread.join(5)
                    self.assertFalse(thread.is_alive())
                    self.assertLess(elapsed, PROMPT_STOP_SECONDS)


if __name__ == "__main__":
    unittest.main()
