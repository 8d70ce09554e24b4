"""Test helpers: servers on 127.0.0.1:0 torn down cleanly, raw HTTP over sockets, log capture."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import socket

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
