"""Per-request cost of the signed-RPC check: precheck + finish (HMAC-SHA256 + replay cache).

    python -m bench.bench_rpcauth [N]

`run(n)` signs n distinct requests up front (signing is the client's cost), then times the
server-side check on each, in process, with headers as the server sees them
(email.message.Message). docs/DESIGN.md §14 target: <= 50 us per request.
"""

from __future__ import annotations

import json
import sys
import time
from email.message import Message

from enclave.metrics import Metrics
from enclave.rpcauth import RpcAuthenticator, new_nonce, sign_request

TARGET_US = 50.0
DEFAULT_N = 20_000
MAX_N = 60_000  # stays below the replay cache capacity and well under 20 s
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
PREVIOUS_SECRET = "bench-previous-secret-0123456789abcdef0123"
TARGET = "/v1/rpc/google/token/exchange"
BODY = json.dumps({"code": "4/0A" + "x" * 70, "redirect_uri": "https://app.example/cb"}).encode()


def _requests(n: int, now: int) -> list[Message]:
    out = []
    for _ in range(n):
        msg = Message()
        msg["Host"] = "127.0.0.1:8181"
        msg["Content-Type"] = "application/json"
        msg["Content-Length"] = str(len(BODY))
        for name, value in sign_request(SECRET, "POST", TARGET, BODY, now, new_nonce()).items():
            msg[name] = value
        out.append(msg)
    return out


def run(n: int = DEFAULT_N) -> dict:
    n = max(100, min(int(n), MAX_N))
    now = int(time.time())
    # The rotation case (current + previous secret): the check computes a MAC per secret, so two
    # secrets are the upper bound of its cost.
    auth = RpcAuthenticator(lambda t: [SECRET, PREVIOUS_SECRET], 30, Metrics(),
                            replay_capacity=MAX_N + 1)
    requests = _requests(n, now)
    started = time.perf_counter()
    for headers in requests:
        auth.finish(auth.precheck("POST", TARGET, headers, now), BODY, now)
    elapsed = time.perf_counter() - started
    per_request_us = elapsed / n * 1e6
    return {
        "figure": "signed RPC check (precheck + finish: HMAC + replay cache), in process",
        "n": n,
        "secrets_tried": 2,
        "per_request_us": round(per_request_us, 2),
        "target_us": TARGET_US,
        "ok": per_request_us <= TARGET_US,
    }


def rows() -> list[dict]:
    """The `make bench` row (same keys as bench.run.row)."""
    result = run()
    return [{"figure": "signed RPC check cost (HMAC x2 secrets + replay cache), in process",
             "value": result["per_request_us"], "unit": "us/request", "baseline": None,
             "ratio": None, "target": f"<= {TARGET_US:g} us", "pass": result["ok"]}]


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_N), indent=2))
