"""Load generation for the benchmark: wrk when installed, else a bounded pure-Python client."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import threading
import time

WRK_THREADS = 2


def _seconds(value: str) -> float:
    number = float(re.match(r"[\d.]+", value).group())
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if value.endswith(unit):
            return number * scale
    return number


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, connections: int, seconds: float, script: str | None = None) -> dict:
    cmd = ["wrk", f"-t{min(WRK_THREADS, connections)}", f"-c{connections}",
           f"-d{max(1, int(seconds))}s", "--latency", "--timeout", "5s"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], capture_output=True, text=True,
                         timeout=seconds + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p99_s": _seconds(p99.group(1)) if p99 else None,
            "p50_s": _seconds(p50.group(1)) if p50 else None, "requests": total,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else "", "tool": "wrk"}


def run_python(host: str, port: int, path: str, connections: int, seconds: float,
               method: str = "GET", body: bytes | None = None, headers_fn=None) -> dict:
    """Keep-alive clients in threads for `seconds`; latency percentiles from every request."""
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=10)
        mine = []
        while time.monotonic() < stop:
            headers = headers_fn() if headers_fn else {}
            started = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = 200 <= resp.status < 300
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
            mine.append(time.perf_counter() - started)
            if not ok:
                with lock:
                    failures[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    begun = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - begun
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None
    return {"rps": len(latencies) / elapsed, "p99_s": pick(0.99), "p50_s": pick(0.50),
            "requests": len(latencies), "non_2xx": failures[0], "socket_errors": "",
            "tool": "python"}


def load(host: str, port: int, path: str, connections: int, seconds: float) -> dict:
    if wrk_available():
        return run_wrk(f"http://{host}:{port}{path}", connections, seconds)
    return run_python(host, port, path, connections, seconds)
