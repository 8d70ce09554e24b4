"""Test helpers: servers on 127.0.0.1:0 torn down cleanly, raw HTTP over sockets, log capture,
and the registry of secret values the end-of-run log scan looks for."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import io
import json
import logging
import pathlib
import socket
import threading

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x448, x25519

from enclave.addresses import parse_address
from enclave.server import HttpServer, Router

LOOPBACK_ANY_PORT = parse_address("tcp:127.0.0.1:0")


@contextlib.contextmanager
def running_server(router: Router, **kwargs):
    server = HttpServer(LOOPBACK_ANY_PORT, router, **kwargs)
    thread = server.serve_in_thread()
    try:
        yield server
    finally:
        server.drain(timeout=2.0)
        thread.join(timeout=5)


def http_call(port: int, method: str, path: str, body: bytes | None = None,
              headers: dict | None = None, timeout: float = 10.0):
    """One request on a new connection: (status, headers, parsed JSON or raw bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = data
        return resp.status, resp.headers, parsed
    finally:
        conn.close()


def raw_exchange(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes and read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def parse_raw_response(data: bytes) -> tuple[int, dict, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def keep_off_console(*names: str):
    """Keep the named loggers' expected warnings off the console; returns the undo function.

    With no handler anywhere, logging's last resort prints WARNING and up to stderr; a NullHandler
    on the logger prevents that. Unlike raising the logger's level, every record still reaches the
    suite log (tests/run.py), which is scanned for secrets at the end of the run.
    """
    handler = logging.NullHandler()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)

    def undo():
        for logger in loggers:
            logger.removeHandler(handler)
    return undo


@contextlib.contextmanager
def captured_logs(level=logging.DEBUG):
    """Every log record of every logger while the block runs, formatted, in a StringIO."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# -- secret registry and leak scan --------------------------------------------------------------
#
# Tests register every secret value they create or hand to the runtime (at its source: the fake
# Google mints, the test PKI issues keys, the stack sets the client secret...). At the end of the
# run, tests/run.py scans the whole suite log, plus the subprocess output handed to scan_later(),
# for every remembered value and for NEVER_LOGGED_MARKERS; any hit fails the run.

# Shorter values are ignored: short literals ("x", "env", "pw", a 6-character test password) occur
# in ordinary log text by chance, so a hit would say nothing about a leak and would make the scan
# flaky. Every real secret in the suite (tokens, keys, shared secrets) is far longer than this.
MIN_SECRET_CHARS = 8
# Strings that must never reach a log, whatever the value: a PEM private key header means key
# material is being logged.
NEVER_LOGGED_MARKERS = ("PRIVATE KEY",)


@dataclasses.dataclass(frozen=True)
class Leak:
    """One hit of the scan. `digest` names the value (SHA-256 prefix) without revealing it."""
    kind: str
    source: str
    line: int
    digest: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.kind} (sha256 {self.digest})"


def secret_digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _text_forms(value: bytes) -> list[str]:
    """How raw key bytes would show up in a log: hex, base64 and base64url (padding dropped)."""
    return [value.hex(), base64.b64encode(value).decode().rstrip("="),
            base64.urlsafe_b64encode(value).decode().rstrip("=")]


def private_key_lines(pem: bytes | str) -> list[str]:
    """The base64 lines of a private key PEM that carry private bytes (never the header).

    A PKCS#8 body also holds public parts (algorithm id, the public key or RSA modulus) that
    certificates and documents legitimately show; only lines overlapping the private value itself
    are returned, so public data logged elsewhere cannot raise a false alarm. If the private value
    cannot be located (an unknown or encrypted key), every body line is returned.
    """
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    lines = [line.strip() for line in text.splitlines()]
    body = [line for line in lines if line and not line.startswith("-----") and ":" not in line]
    if not body:
        return []
    try:
        der = base64.b64decode("".join(body))
        key = serialization.load_der_private_key(der, password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            size = (key.curve.key_size + 7) // 8
            parts = [key.private_numbers().private_value.to_bytes(size, "big")]
        elif isinstance(key, rsa.RSAPrivateKey):
            numbers = key.private_numbers()
            parts = [n.to_bytes((n.bit_length() + 7) // 8, "big")
                     for n in (numbers.d, numbers.p, numbers.q)]
        elif isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
                              x25519.X25519PrivateKey, x448.X448PrivateKey)):
            parts = [key.private_bytes_raw()]
        else:
            return body
    except (ValueError, TypeError, UnsupportedAlgorithm):  # encrypted or unreadable: every line
        return body
    spans = []
    for part in parts:
        start = der.find(part)
        if start < 0:
            return body
        spans.append((start, start + len(part)))
    width = len(body[0]) * 3 // 4  # bytes per full base64 line (48 for the usual 64 chars)
    chosen = []
    for index, line in enumerate(body):
        low, high = index * width, index * width + len(line) * 3 // 4
        if any(low < end and start < high for start, end in spans):
            chosen.append(line)
    return chosen


class SecretRegistry:
    """Values that must never be logged, each with a kind for the report; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.values: dict[str, str] = {}
        self.texts: list[tuple[str, str]] = []  # (label, text) of subprocess output

    def remember(self, *values, kind: str = "secret") -> None:
        """Record secret values: str as is, bytes also as hex/base64; None, empty, short ignored."""
        with self._lock:
            for value in values:
                if not value:
                    continue
                raw = isinstance(value, (bytes, bytearray))
                forms = _text_forms(bytes(value)) if raw else [str(value)]
                for form in forms:
                    if len(form) >= MIN_SECRET_CHARS:
                        self.values.setdefault(form, kind)

    def remember_private_key(self, pem: bytes | str, kind: str = "private key PEM") -> None:
        self.remember(*private_key_lines(pem), kind=kind)

    def scan_later(self, text: str | bytes | None, label: str = "subprocess output") -> None:
        if not text:
            return
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        with self._lock:
            self.texts.append((label, text))

    def snapshot(self) -> tuple[dict[str, str], list[tuple[str, str]]]:
        with self._lock:
            return dict(self.values), list(self.texts)


REGISTRY = SecretRegistry()


def remember_secret(*values, kind: str = "secret") -> None:
    """Record secret values used by a test; the end-of-run scan fails if any reaches a log."""
    REGISTRY.remember(*values, kind=kind)


def remember_private_key(pem: bytes | str, kind: str = "private key PEM") -> None:
    """Record the private base64 lines of a key PEM (see private_key_lines)."""
    REGISTRY.remember_private_key(pem, kind=kind)


def remember_key_files(directory, kind: str = "private key file") -> None:
    """Register every *.key PEM under a directory (runtime dev PKI, scripts' keys, cert stores)."""
    for path in sorted(pathlib.Path(directory).rglob("*.key")):
        try:
            remember_private_key(path.read_bytes(), kind=f"{kind} {path.name}")
        except OSError:
            pass


def scan_later(text: str | bytes | None, label: str = "subprocess output") -> None:
    """Hand a child's stderr/log text to the end-of-run scan (appended to the suite log)."""
    REGISTRY.scan_later(text, label)


def find_leaks(text: str, secrets, markers=NEVER_LOGGED_MARKERS, source: str = "log") -> list[Leak]:
    """Every occurrence of a secret (a {value: kind} dict or an iterable of values) or a marker.

    Lines are numbered from 1. A value is reported once per line it appears on.
    """
    if not isinstance(secrets, dict):
        secrets = {value: "secret" for value in secrets}
    needles = [(value, kind) for value, kind in secrets.items() if value]
    needles += [(marker, f"marker {marker!r}") for marker in markers]
    leaks = []
    for needle, kind in needles:
        index = text.find(needle)
        last_line = None
        while index >= 0:
            line = text.count("\n", 0, index) + 1
            if line != last_line:
                leaks.append(Leak(kind, source, line, secret_digest(needle)))
                last_line = line
            index = text.find(needle, index + len(needle))
    return sorted(leaks, key=lambda leak: (leak.source, leak.line, leak.kind))


def challenge(service, req) -> tuple[int, dict]:
    """An AttestationService challenge answer (its raw JSON route) as (status, dict)."""
    status, _, body = service.challenge_json(req)
    return status, json.loads(body)
