"""A fake ECS watermark service: HTTPS that REQUIRES a client certificate from the dev CA.

It answers POST /v1/watermark with a deterministic result, and can be told to reject a given
client certificate (a real CRL, so the TLS handshake fails with "certificate revoked"), to hang,
to answer 500, or to answer non-JSON. Every accepted connection's client certificate is recorded.

Run standalone for the local stack:
  python -m tests.fakes.fake_watermark --port 8443 --cert server.crt --key server.key \
      --ca ca.crt --ca-key ca.key
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import socket
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from enclave.server import PromptShutdownMixin

log = logging.getLogger(__name__)

WATERMARK_PATH = "/v1/watermark"
WATERMARK_KEY = b"fake-watermark-key"  # deterministic results, for tests only
MAX_BODY_BYTES = 1024 * 1024
HANG_LIMIT_SECONDS = 30.0  # a hanging answer never outlives this
IDLE_TIMEOUT_SECONDS = 15.0


# Odd answers a broken or hostile service could send (200, application/json), by mode name.
DEEP_NESTING = 100_000  # far past any recursion limit: a recursive parser would blow up
ODD_ANSWERS = {
    "lone_surrogate": b'{"watermark": "\\ud800", "algorithm": "x"}',  # an escape with no pair
    "nan": b'{"watermark": NaN}',
    "infinity": b'{"watermark": "x", "score": -Infinity}',
    "huge_float": b'{"watermark": "x", "score": 1e999}',  # a valid token that parses to inf
    "deep": b"[" * DEEP_NESTING + b"]" * DEEP_NESTING,
}


def watermark_for(body: dict) -> dict:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    mark = hmac.new(WATERMARK_KEY, canonical.encode(), hashlib.sha256).hexdigest()
    return {"watermark": mark, "algorithm": "fake-hmac-sha256"}


DRAIN_SECONDS = 1.0  # after a refused handshake, how long we read the client's bytes


def _drain(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(DRAIN_SECONDS)
        while sock.recv(65536):
            pass
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_SECONDS
    server: "FakeWatermark"

    def setup(self):
        raw = self.request
        try:
            self.request = self.server.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            # The alert is sent; read what the client already wrote before closing, so the
            # kernel does not answer with a reset that could overtake the alert.
            _drain(raw)
            raise
        der = self.request.getpeercert(binary_form=True)
        self.client_cn = None
        if der:
            cert = x509.load_der_x509_certificate(der)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            self.client_cn = names[0].value if names else None
            self.server.record_client(hashlib.sha256(der).hexdigest(), self.client_cn)
        super().setup()

    def log_message(self, fmt, *args):
        log.debug("fake watermark: " + fmt, *args)

    def _answer(self, status: int, body: bytes, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._answer(413, b'{"error":"too_large"}')
        raw = self.rfile.read(length)
        self.server.requests += 1
        mode = self.server.mode
        if mode == "hang":
            self.server.release.wait(self.server.hang_seconds)
            self.close_connection = True
            return
        if mode == "error500":
            return self._answer(500, b'{"error":"internal"}')
        if mode == "non_json":
            return self._answer(200, b"<html>not json</html>", "text/html")
        if mode in ODD_ANSWERS:
            return self._answer(200, ODD_ANSWERS[mode])
        if self.path != self.server.path:
            return self._answer(404, b'{"error":"not_found"}')
        try:
            body = json.loads(raw)
        except ValueError:
            return self._answer(400, b'{"error":"bad_json"}')
        result = {**watermark_for(body), "client": self.client_cn}
        self._answer(200, json.dumps(result).encode())


class FakeWatermark(PromptShutdownMixin, ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, cert_file: str, key_file: str, ca_cert_pem: bytes, ca_key=None,
                 host: str = "127.0.0.1", port: int = 0, path: str = WATERMARK_PATH):
        self.cert_file, self.key_file = cert_file, key_file
        self.ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        self.ca_cert_pem = ca_cert_pem
        self.ca_key = ca_key
        self.path = path
        self.mode = "ok"
        self.hang_seconds = HANG_LIMIT_SECONDS
        self.release = threading.Event()
        self.requests = 0
        self.clients: list[tuple[str, str | None]] = []  # (sha256 of DER, CN) per connection
        self._lock = threading.Lock()
        self._revoked: set[int] = set()
        self.context = self._build_context()
        super().__init__((host, port), _Handler)

    # -- what tests steer ---------------------------------------------------------------
    def reject(self, cert: x509.Certificate) -> None:
        """Revoke `cert` (by serial): new handshakes presenting it fail."""
        self._revoked.add(cert.serial_number)
        self.context = self._build_context()

    def accept_again(self, cert: x509.Certificate) -> None:
        self._revoked.discard(cert.serial_number)
        self.context = self._build_context()

    def record_client(self, fingerprint: str, cn: str | None) -> None:
        with self._lock:
            self.clients.append((fingerprint, cn))

    def handle_error(self, request, client_address):  # failed handshakes are expected here
        log.debug("fake watermark: connection from %s failed", client_address)

    def get_request(self):
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()

    # -- TLS -----------------------------------------------------------------------------
    def _crl_pem(self) -> bytes | None:
        if self.ca_key is None:
            return None
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=1)))
        for serial in sorted(self._revoked):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=1)).build())
        algorithm = None if self.ca_key.__class__.__name__.startswith("Ed") else hashes.SHA256()
        return builder.sign(self.ca_key, algorithm).public_bytes(serialization.Encoding.PEM)

    def _build_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        context.verify_mode = ssl.CERT_REQUIRED  # a client certificate is mandatory
        crl = self._crl_pem()
        with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as f:
            f.write(self.ca_cert_pem + (crl or b""))
        try:
            context.load_verify_locations(cafile=f.name)
        finally:
            os.unlink(f.name)
        if crl is not None:
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="fake-watermark", daemon=True)
        thread.start()
        return thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--cert", required=True, help="server certificate PEM")
    parser.add_argument("--key", required=True, help="server key PEM")
    parser.add_argument("--ca", required=True, help="CA that issues client certificates")
    parser.add_argument("--ca-key", help="the CA's key (enables revocation)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fake-watermark %(message)s")
    ca_key = None
    if args.ca_key:
        with open(args.ca_key, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(args.ca, "rb") as f:
        server = FakeWatermark(args.cert, args.key, f.read(), ca_key, args.host, args.port)
    log.info("listening on https://%s:%d%s (client certificate required)",
             args.host, server.server_address[1], WATERMARK_PATH)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
