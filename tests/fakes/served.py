"""What the HTTPS fakes share: a TLS server that handshakes per connection, and the lifecycle
(serve in a thread, stop promptly, context manager)."""

from __future__ import annotations

import http.server
import logging
import signal
import socket
import ssl
import tempfile
import threading

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05  # how often serve_forever looks for shutdown: stop() returns this fast
JOIN_TIMEOUT_S = 5.0


class ServedInThread:
    """For a fake holding `_server` (a socketserver), `_release` (an Event its hanging modes
    wait on), `_tmp` (a TemporaryDirectory or None) and `_thread`; THREAD_NAME names it."""

    THREAD_NAME = "fake"
    _thread: threading.Thread | None = None
    _tmp = None

    def _listen(self, host: str, port: int, handler, *, ca=None, cert_file=None, key_file=None,
                server_class=None) -> None:
        """Bind the HTTPS server: the given certificate, or one issued now by the TestCA `ca`
        for THREAD_NAME (kept in a temporary directory removed at stop)."""
        if cert_file is None:
            if ca is None:
                raise ValueError(f"{type(self).__name__} needs a TestCA or a "
                                 "cert_file/key_file pair")
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.THREAD_NAME}-")
            cert_file, key_file = ca.issue(self.THREAD_NAME, server=True).write(self._tmp.name,
                                                                               "server")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        self._server = (server_class or TlsThreadingServer)((host, port), self, context, handler)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, name=self.THREAD_NAME,
                                        kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()  # a hanging handler returns now
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=JOIN_TIMEOUT_S)
        if self._tmp is not None:
            self._tmp.cleanup()

    def run_as_process(self, banner: str) -> int:
        """`python -m tests.fakes.X`: serve, print `banner` (one line) once listening, and stop
        cleanly on SIGTERM or Ctrl-C; the exit code."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        self.start()
        print(banner, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        return 0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class TlsThreadingServer(http.server.ThreadingHTTPServer):
    """HTTPS with the TLS handshake in each connection's own thread, never in the accept loop
    (a client that stalls its handshake cannot block the fake). `fake` is the owning fake."""

    daemon_threads = True
    block_on_close = False
    IDLE_TIMEOUT_S = 10.0  # a connection silent this long is dropped

    def __init__(self, address, fake, context: ssl.SSLContext, handler):
        self.fake = fake
        self.tls_context = context
        super().__init__(address, handler)

    def on_tls_connection(self) -> None:
        """Called once per completed handshake (a fake may count them)."""

    def finish_request(self, request, client_address):
        request.settimeout(getattr(self.RequestHandlerClass, "timeout", None)
                           or self.IDLE_TIMEOUT_S)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self.tls_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.debug("%s TLS handshake failed: %s", type(self.fake).__name__, exc)
            return
        self.on_tls_connection()
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except (OSError, ssl.SSLError):
            pass
        finally:
            tls.close()
