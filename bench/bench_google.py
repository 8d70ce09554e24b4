"""Token exchange requests/s against the fake Google: pooled keep-alive vs a new TLS connection
per request (docs/DESIGN.md §14, target ratio >= 3).

    python -m bench.bench_google [SECONDS]

`run(seconds)` splits the time between the two modes (sequential requests, one client thread,
in process, through GoogleOAuth.exchange) and returns the figures as a dict.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from email.message import Message

from enclave.google import GoogleOAuth
from enclave.outbound import OutboundClient
from enclave.request import Request
from enclave.sealing import Keyring
from tests.fakes.fake_google import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeGoogle
from tests.fakes.pki import TestCA

TARGET_RATIO = 3.0
DEFAULT_SECONDS = 6.0
MAX_SECONDS = 18.0  # the bench stays under 20 s whatever it is asked
WARMUP_REQUESTS = 5
REDIRECT = "https://app.example/oauth/callback"


def _request(code: str) -> Request:
    body = json.dumps({"code": code, "redirect_uri": REDIRECT}).encode()
    headers = Message()
    headers["Content-Type"] = "application/json"
    path = "/v1/rpc/google/token/exchange"
    return Request("POST", path, path, {}, headers, body)


def _measure(fake: FakeGoogle, ca_file: str, reuse: bool, seconds: float) -> dict:
    client = OutboundClient(ca_file=ca_file, reuse=reuse)
    keyring = Keyring(os.urandom(32))
    google = GoogleOAuth(lambda: (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET), lambda: keyring,
                         client, fake.token_url, fake.revoke_url)
    try:
        for _ in range(WARMUP_REQUESTS):
            google.exchange(_request(fake.mint_code(REDIRECT)))
        tls_before = fake.tls_connections
        count = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            status, _ = google.exchange(_request(fake.mint_code(REDIRECT)))
            if status != 200:
                raise RuntimeError(f"exchange answered {status}")
            count += 1
        elapsed = time.perf_counter() - started
        return {"requests": count, "seconds": round(elapsed, 3),
                "requests_per_s": round(count / elapsed, 1),
                "tls_connections": fake.tls_connections - tls_before}
    finally:
        client.close()


def run(seconds: float = DEFAULT_SECONDS) -> dict:
    seconds = max(0.5, min(float(seconds), MAX_SECONDS))
    with tempfile.TemporaryDirectory(prefix="bench-google-") as tmp:
        ca = TestCA()
        ca_file = ca.write(tmp)
        with FakeGoogle(ca) as fake:
            new_conn = _measure(fake, ca_file, reuse=False, seconds=seconds / 2)
            reused = _measure(fake, ca_file, reuse=True, seconds=seconds / 2)
    ratio = reused["requests_per_s"] / max(new_conn["requests_per_s"], 1e-9)
    return {
        "figure": "token exchange requests/s against the fake Google",
        "reuse": reused,
        "new_connection_per_request": new_conn,
        "ratio": round(ratio, 2),
        "target_ratio": TARGET_RATIO,
        "ok": ratio >= TARGET_RATIO,
    }


def rows() -> list[dict]:
    """The `make bench` row (same keys as bench.run.row)."""
    result = run()
    return [{"figure": "token exchange req/s vs the fake Google (baseline: new TLS conn/request)",
             "value": result["reuse"]["requests_per_s"], "unit": "req/s",
             "baseline": result["new_connection_per_request"]["requests_per_s"],
             "ratio": result["ratio"], "target": f">= {TARGET_RATIO:g}x", "pass": result["ok"]}]


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SECONDS), indent=2))
