"""Watermark RPC under load, and mTLS rotation under that load (docs/DESIGN.md §5, §14).

    python -m bench.bench_watermark

Three processes on loopback, as in the local stack: the runtime (`enclave.py serve`, via
bench.run.Runtime), the fake mTLS watermark service (`python -m tests.fakes.fake_watermark`, client
certificate required) and this one, the load generator: 16 keep-alive connections in threads
(bench.loadgen.run_python), each request signed with a fresh nonce (wrk's Lua cannot HMAC).

1. Signed POST /v1/rpc/watermark requests/s and p99 at 16 connections (after a warm-up).
2. The same load while 100 rotations are delivered over the secrets listener, alternating among
   three client certificates from the same CA (every delivery a real swap, acked ok): the count of
   failed requests (non-2xx or transport error), target 0.

Bounded: about 6 s of setup and warm-up, 5 s measured, at most ROTATION_LOAD_S under rotation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from bench import loadgen
from enclave.addresses import parse_address
from enclave.host.send_secrets import exchange
from enclave.rpcauth import LOCAL_DEFAULT_RPC_SECRET
from enclave.rpcauth import new_nonce, sign_request
from tests.fakes.pki import TestCA

CONNECTIONS = 16
TARGET = "/v1/rpc/watermark"
BODY = json.dumps({"document_id": "bench-doc", "text": "x" * 256}).encode()
WARM_S = 1.0
LOAD_S = 5.0
ROTATIONS = 100
ROTATION_LOAD_S = 12.0  # the rotation phase's load; rotations are spread over most of it
ROTATION_START_S = 0.5  # load runs alone this long before the first rotation
ROTATION_TAIL_S = 0.5  # and at least this long after the last
ROTATION_SPREAD = 0.7  # rotations are paced over this share of the window: the rest is slack
CERTIFICATES = 3
ACK_TIMEOUT_S = 10.0
FAKE_READY_S = 15.0


def _deliver(port: int, payload: bytes) -> dict:
    return json.loads(exchange(parse_address(f"tcp:127.0.0.1:{port}"), payload))


def _payload(ca: TestCA, issued, endpoint: str) -> bytes:
    return json.dumps({
        "MTLS_CLIENT_CERT_JSON": {"client_cert": issued.cert_pem.decode(),
                                  "client_key": issued.key_pem.decode(),
                                  "ca_cert": ca.cert_pem.decode()},
        "ECS_WATERMARK_ENDPOINT": endpoint,
    }).encode()


def _signed_headers() -> dict:
    headers = sign_request(LOCAL_DEFAULT_RPC_SECRET, "POST", TARGET, BODY, int(time.time()),
                           new_nonce())
    headers["Content-Type"] = "application/json"
    return headers


class _FakeWatermark:
    """`python -m tests.fakes.fake_watermark` on a free port, with a throwaway PKI."""

    def __init__(self, directory: str, ca: TestCA):
        from bench.run import ROOT, free_port
        server_cert, server_key = ca.issue("127.0.0.1", server=True).write(directory, "server")
        ca_file = ca.write(directory, "ca")
        ca_key = os.path.join(directory, "ca.key")
        with open(ca_key, "wb") as f:
            f.write(_key_pem(ca.key))
        os.chmod(ca_key, 0o600)
        self.port = free_port()
        self.log = open(os.path.join(directory, "fake.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.fake_watermark", "--port", str(self.port),
             "--cert", server_cert, "--key", server_key, "--ca", ca_file, "--ca-key", ca_key],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + FAKE_READY_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake watermark exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("fake watermark did not start") from None
                time.sleep(0.02)
        self.endpoint = f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        from bench.run import stop_process
        stop_process(self.proc)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load(port: int, seconds: float) -> dict:
    return loadgen.run_python("127.0.0.1", port, TARGET, CONNECTIONS, seconds, method="POST",
                              body=BODY, headers_fn=_signed_headers)


def _rotate_under_load(port: int, secrets_port: int, payloads: list[bytes]) -> dict:
    """ROTATIONS deliveries paced over the load; the load's failures are the figure."""
    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(_load(port, ROTATION_LOAD_S)),
                              name="watermark-load")
    began = time.monotonic()
    loader.start()
    window_end = began + ROTATION_LOAD_S - ROTATION_TAIL_S
    time.sleep(ROTATION_START_S)
    interval = ROTATION_SPREAD * (window_end - time.monotonic()) / ROTATIONS
    acks_ok, refused, ack_ms = 0, [], []
    try:
        for i in range(ROTATIONS):
            if time.monotonic() > window_end:
                break  # bounded: report fewer rotations (and fail the row) rather than overrun
            started = time.perf_counter()
            ack = _deliver(secrets_port, payloads[(i + 1) % len(payloads)])
            ack_ms.append((time.perf_counter() - started) * 1000)
            if ack.get("ok") and ack.get("changed"):
                acks_ok += 1
            else:
                refused.append(ack)
            pause = began + ROTATION_START_S + (i + 1) * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    finally:
        loader.join(ROTATION_LOAD_S + 30)
    ack_ms.sort()
    return {**result, "rotations": len(ack_ms), "rotations_ok": acks_ok, "refused": refused[:3],
            "ack_p50_ms": round(ack_ms[len(ack_ms) // 2], 1) if ack_ms else None,
            "rotation_window_s": round(window_end - began - ROTATION_START_S, 1)}


def run() -> dict:
    from bench.run import Runtime
    with tempfile.TemporaryDirectory(prefix="bench-watermark-") as tmp:
        ca = TestCA("Bench Watermark CA")
        certs = [ca.issue(f"bench-wm-client-{i}") for i in range(CERTIFICATES)]
        with _FakeWatermark(tmp, ca) as fake, Runtime() as rt:
            payloads = [_payload(ca, c, fake.endpoint) for c in certs]
            ack = _deliver(rt.secrets_port, payloads[0])
            if not ack.get("ok"):
                raise RuntimeError(f"initial delivery refused: {ack}")
            warm = _load(rt.port, WARM_S)
            if warm["requests"] == 0 or warm["non_2xx"] == warm["requests"]:
                raise RuntimeError(f"watermark RPC does not answer 200 (warm-up: {warm})")
            steady = _load(rt.port, LOAD_S)
            rotation = _rotate_under_load(rt.port, rt.secrets_port, payloads)
    return {"steady": steady, "rotation": rotation}


def rows() -> list[dict]:
    from bench.run import row
    result = run()
    steady, rot = result["steady"], result["rotation"]
    p99_ms = round(steady["p99_s"] * 1000, 2) if steady["p99_s"] else None
    p50_ms = round(steady["p50_s"] * 1000, 2) if steady["p50_s"] else None
    failed = rot["non_2xx"]
    rotations_ok = rot["rotations_ok"] == ROTATIONS
    return [
        row(f"watermark RPC req/s, {CONNECTIONS} keep-alive conns (signed, mTLS to fake, "
            f"{steady['requests']} requests, {steady['non_2xx']} failed)",
            round(steady["rps"]), "req/s", ok=steady["non_2xx"] == 0, tool=steady["tool"],
            p50_ms=p50_ms, p99_ms=p99_ms, failed=steady["non_2xx"]),
        row(f"watermark RPC p99 latency, {CONNECTIONS} conns (p50 {p50_ms} ms)", p99_ms, "ms"),
        row(f"mTLS rotation under load: failed requests during {rot['rotations']} rotations "
            f"({rot['rotations_ok']} acked ok, ack p50 {rot['ack_p50_ms']} ms; "
            f"{rot['requests']} requests at {round(rot['rps'])} req/s, {CONNECTIONS} conns)",
            failed, "requests", target="0 (100 rotations)", ok=failed == 0 and rotations_ok,
            rotations=rot["rotations"], rotations_ok=rot["rotations_ok"],
            requests=rot["requests"], p99_ms=round(rot["p99_s"] * 1000, 2) if rot["p99_s"] else None,
            refused=rot["refused"]),
    ]


if __name__ == "__main__":
    print(json.dumps(run(), indent=2, default=str))
