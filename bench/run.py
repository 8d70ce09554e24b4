"""`make bench`: each figure as a ratio against a baseline measured in the same run.

Bounded (about 2-3 minutes on 2 cores). Prints a table and writes bench/results.json.
Usage: python -m bench.run [ROW ...]   (rows: healthz startup memory zipapp rpcauth challenge
verifier secrets kms token watermark)
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
LOAD_SECONDS = 5  # per measured server in the /healthz row
CONNECTIONS = 16
STARTUP_RUNS = 5
MEMORY_WARM_REQUESTS = 1_000
MEMORY_TOTAL_REQUESTS = 100_000
READY_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str = "/healthz", timeout: float = READY_TIMEOUT_S,
              proc: subprocess.Popen | None = None) -> float:
    """Poll until `path` answers; return the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return time.monotonic()
        except OSError:
            time.sleep(0.001)
    raise RuntimeError(f"nothing answered on port {port} within {timeout}s")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def runtime_env(state: str, http_port: int, secrets_port: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ALFRED_", "ENCLAVE_", "TEE_", "GOOGLE_", "ECS_", "MTLS_"))}
    env.update({
        "ALFRED_ENV": "local",
        "ENCLAVE_HTTP_LISTEN": f"tcp:127.0.0.1:{http_port}",
        "ENCLAVE_SECRETS_LISTEN": f"tcp:127.0.0.1:{secrets_port}",
        "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "0",
        "ENCLAVE_STATE_DIR": state,
        "ENCLAVE_CERTS_DIR": os.path.join(state, "certs"),
        "ENCLAVE_LOG_LEVEL": "WARNING",
    })
    env.update(extra)
    return env


class Runtime:
    """`enclave.py serve` in its own process on free loopback ports."""

    def __init__(self, **extra):
        self.state = tempfile.mkdtemp(prefix="enclave-bench-")
        self.port, self.secrets_port = free_port(), free_port()
        self.env = runtime_env(self.state, self.port, self.secrets_port, **extra)
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "enclave.py"), "serve"],
                                     env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.ready_at = wait_http(self.port, proc=self.proc)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        stop_process(self.proc)
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Baseline:
    def __init__(self, kind: str):
        self.port_file = tempfile.mktemp(prefix="bench-port-")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.baselines", kind, self.port_file],
                                     cwd=ROOT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (os.path.exists(self.port_file) and Path(self.port_file).read_text()):
            if time.monotonic() > deadline:
                raise RuntimeError("baseline did not start")
            time.sleep(0.01)
        self.port = int(Path(self.port_file).read_text())
        wait_http(self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)
        os.unlink(self.port_file)


def row(figure, value, unit, baseline=None, ratio=None, target=None, ok=None, **extra):
    return {"figure": figure, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio,
            "target": target, "pass": ok, **extra}


# -- rows ----------------------------------------------------------------------------------
def bench_healthz() -> list[dict]:
    results = {}
    with Baseline("default") as a:
        loadgen.load("127.0.0.1", a.port, "/healthz", CONNECTIONS, 1)
        results["default"] = loadgen.load("127.0.0.1", a.port, "/healthz", CONNECTIONS, LOAD_SECONDS)
    with Baseline("tuned") as b:
        loadgen.load("127.0.0.1", b.port, "/healthz", CONNECTIONS, 1)
        results["tuned"] = loadgen.load("127.0.0.1", b.port, "/healthz", CONNECTIONS, LOAD_SECONDS)
    with Runtime() as rt:
        loadgen.load("127.0.0.1", rt.port, "/healthz", CONNECTIONS, 1)
        results["ours"] = loadgen.load("127.0.0.1", rt.port, "/healthz", CONNECTIONS, LOAD_SECONDS)
    ours, a, b = results["ours"], results["default"], results["tuned"]
    vs_tuned = ours["rps"] / b["rps"]
    vs_default = ours["rps"] / a["rps"]
    p99_ratio = ours["p99_s"] / b["p99_s"] if ours["p99_s"] and b["p99_s"] else None
    return [
        row("/healthz req/s, 16 keep-alive conns, vs tuned stdlib (b)", round(ours["rps"]), "req/s",
            round(b["rps"]), round(vs_tuned, 2), ">= 0.9", vs_tuned >= 0.9, tool=ours["tool"]),
        row("/healthz req/s vs default stdlib (a)", round(ours["rps"]), "req/s", round(a["rps"]),
            round(vs_default, 1), ">= 20", vs_default >= 20),
        row("/healthz p99 latency vs tuned stdlib (b)", round(ours["p99_s"] * 1000, 2), "ms",
            round(b["p99_s"] * 1000, 2), round(p99_ratio, 2) if p99_ratio else None, "<= 1.2",
            p99_ratio is not None and p99_ratio <= 1.2),
    ]


def bench_startup() -> list[dict]:
    # The baseline's modules are compiled to bytecode at install time; ours are compiled here
    # too (as an image build does), so PYTHONDONTWRITEBYTECODE in the environment cannot make
    # every start of ours recompile the package from source.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "enclave")], check=True)
    base_times, ours = [], []
    for _ in range(STARTUP_RUNS):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "import cryptography.x509, cbor2, http.server, ssl"],
                       check=True)
        base_times.append(time.monotonic() - started)
    for _ in range(STARTUP_RUNS):
        with Runtime() as rt:
            ours.append(rt.ready_at - rt.started)
    base, mine = statistics.median(base_times), statistics.median(ours)
    ratio = mine / base
    return [row("start-up to /healthz (no secrets wait), median of 5", round(mine * 1000), "ms",
                round(base * 1000), round(ratio, 2), "<= 1.5", ratio <= 1.5)]


def _requests(port: int, count: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(count):
        conn.request("GET", "/healthz")
        conn.getresponse().read()
    conn.close()


def bench_memory() -> list[dict]:
    with Runtime() as rt:
        _requests(rt.port, MEMORY_WARM_REQUESTS)
        warm = rt.rss_mb()
        done = MEMORY_WARM_REQUESTS
        deadline = time.monotonic() + 120
        while done < MEMORY_TOTAL_REQUESTS and time.monotonic() < deadline:
            if loadgen.wrk_available():
                done += loadgen.run_wrk(f"http://127.0.0.1:{rt.port}/healthz", CONNECTIONS, 3)["requests"]
            else:
                _requests(rt.port, 5_000)
                done += 5_000
        total = rt.rss_mb()
    growth = total - warm
    return [row(f"resident memory after {done} requests (growth since {MEMORY_WARM_REQUESTS})",
                round(total, 1), "MB", round(warm, 1), round(growth, 2), "growth <= 2 MB, total <= 40 MB",
                growth <= 2 and total <= 40)]


def bench_zipapp() -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name in ("one.pyz", "two.pyz"):
            out = Path(d, name)
            subprocess.run([sys.executable, str(ROOT / "scripts" / "build_zipapp.py"), str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            paths.append(out)
        same = paths[0].read_bytes() == paths[1].read_bytes()
        size = paths[0].stat().st_size
    return [row("dist/enclave.pyz rebuilt twice", size, "bytes", None, None, "byte-identical", same,
                identical=same)]


def _optional(module: str, fn: str = "rows"):
    def call() -> list[dict]:
        import importlib
        return getattr(importlib.import_module(module), fn)()
    return call


ROWS = {
    "healthz": bench_healthz,
    "rpcauth": _optional("bench.bench_rpcauth"),
    "challenge": _optional("bench.bench_attestation", "challenge_rows"),
    "verifier": _optional("bench.bench_attestation", "verifier_rows"),
    "secrets": _optional("bench.bench_secrets"),
    "kms": _optional("bench.bench_kms"),
    "watermark": _optional("bench.bench_watermark"),
    "token": _optional("bench.bench_google"),
    "startup": bench_startup,
    "memory": bench_memory,
    "zipapp": bench_zipapp,
}


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def main(argv: list[str]) -> int:
    names = argv or list(ROWS)
    rows, started = [], time.monotonic()
    for name in names:
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            rows.extend(ROWS[name]())
        except Exception as exc:  # one broken row must not hide the others
            rows.append(row(f"{name}: not measured ({type(exc).__name__}: {exc})", None, "",
                            ok=False))
    header = ("figure", "value", "unit", "baseline", "ratio", "target", "pass")
    table = [header] + [tuple(fmt(r[k]) for k in ("figure", "value", "unit", "baseline", "ratio",
                                                  "target", "pass")) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(line)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    machine = {"cores": os.cpu_count(), "python": sys.version.split()[0],
               "load": "wrk" if loadgen.wrk_available() else "python"}
    RESULTS.write_text(json.dumps({"machine": machine, "seconds": round(time.monotonic() - started, 1),
                                   "rows": rows}, indent=2))
    print(f"\n{len(rows)} figures in {time.monotonic() - started:.0f}s; written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
