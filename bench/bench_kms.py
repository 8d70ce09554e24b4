"""Sealed (`kms`) delivery -> ack p50 against the fake KMS, as a ratio to the raw in-process cost
of what the runtime must do (docs/DESIGN.md §14, target <= 1.5).

    python -m bench.bench_kms [N]

`run(n)` starts the fake KMS in this process (HTTPS on 127.0.0.1:0; its key policy allows this
checkout's dev-shim PCR0 with documents from a dev root made for the run) and `enclave.py serve`
in its own process with ENCLAVE_SECRETS_SOURCE=kms, then makes n sealed deliveries the way
`send-secrets.sh --kms` does (connect, write, half-close, read the ack line), timing each from
connect to the ack. Every delivery is a different envelope with a higher bundle_version and a
changed payload, so each one costs the whole section 15 path: a fresh RSA-2048 key, a dev-shim
recipient document, a SigV4-signed Decrypt over a new TLS connection, the CMS envelope (OAEP),
AES-GCM and the section 4 validator.

The baseline, measured interleaved with the deliveries (one baseline round before each), is the
raw cost of the crypto and I/O the path cannot avoid, in this process: RSA-2048 key generation +
one RSA-OAEP (SHA-256) decrypt of a 32-byte key + one AES-256-GCM open of a payload of the same
size + one HTTPS request over a new loopback TLS connection (to the same fake KMS, which answers
a GET with a 404 at once). RSA key generation dominates both and varies a lot from key to key,
hence medians over many rounds.

Needs a runtime that knows ENCLAVE_SECRETS_SOURCE; without it the row says so and is skipped.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave import attestation, devpki, envelope, kms
from enclave.addresses import parse_address
from enclave.host.send_secrets import exchange
from enclave.outbound import OutboundClient
from tests.fakes.fake_kms import DEFAULT_REGION, FakeKms
from tests.fakes.pki import TestCA

TARGET_RATIO = 1.5
DEFAULT_N = 40
MIN_N, MAX_N = 5, 200
WARMUP_DELIVERIES = 2  # first connection, imports, the dev leaf on the runtime side
ACK_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 30.0
# The runtime's variable for the CA that KMS TLS trusts instead of the Amazon roots (the same
# choice as scripts/start-local.sh's KMS_CA_ENV).
KMS_CA_ENV = "ENCLAVE_OUTBOUND_CA_FILE"
ROOT = Path(__file__).resolve().parent.parent
FIGURE = "sealed (kms) delivery -> ack p50 against the fake KMS"


def _seal(fake: FakeKms, transport, creds, version: int) -> bytes:
    """One sealed delivery (bytes on the wire), bundle_version `version`."""
    payload = {"GOOGLE_OAUTH_CLIENT_ID": f"bench-kms-{version}.apps.googleusercontent.com"}
    context = {"purpose": envelope.PURPOSE, envelope.BUNDLE_VERSION_FIELD: str(version)}
    now = time.time()
    data_key = kms.generate_data_key(fake.key_arn, context, credentials=creds,
                                     region=DEFAULT_REGION, transport=transport,
                                     endpoint=fake.url, now=now)
    sealed = envelope.seal(payload, kms_key_arn=fake.key_arn, bundle_version=version,
                           data_key=data_key.plaintext,
                           encrypted_data_key=data_key.ciphertext_blob, nonce=os.urandom(12))
    return json.dumps({"SEALED_SECRETS": sealed, "AWS_CREDENTIALS": fake.credentials(),
                       "AWS_REGION": DEFAULT_REGION}).encode()


class _Baseline:
    """One round of the raw work: keygen + OAEP decrypt + GCM open + one new-TLS request."""

    def __init__(self, fake: FakeKms, ca_file: str, plaintext_bytes: int):
        self.host, self.port = "127.0.0.1", fake.port
        self.context = kms.create_kms_context(ca_file)
        self.data_key = os.urandom(32)
        self.nonce = os.urandom(12)
        self.sealed = AESGCM(self.data_key).encrypt(self.nonce, os.urandom(plaintext_bytes), b"aad")
        self.oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                 label=None)

    def round(self) -> float:
        started = time.perf_counter()
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        keygen = time.perf_counter() - started
        wrapped = key.public_key().encrypt(self.data_key, self.oaep)  # KMS's side: not timed
        started = time.perf_counter()
        key.decrypt(wrapped, self.oaep)
        AESGCM(self.data_key).decrypt(self.nonce, self.sealed, b"aad")
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=10)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
        finally:
            conn.close()
        return keygen + time.perf_counter() - started


def _start_runtime(state: str, fake: FakeKms, ca_file: str):
    from bench.run import free_port, runtime_env, wait_http
    http_port, secrets_port = free_port(), free_port()
    env = runtime_env(state, http_port, secrets_port, ENCLAVE_SECRETS_SOURCE="kms",
                      ENCLAVE_KMS_KEY_ARN=fake.key_arn, ENCLAVE_KMS_ENDPOINT=fake.url,
                      **{KMS_CA_ENV: ca_file})
    proc = subprocess.Popen([sys.executable, str(ROOT / "enclave.py"), "serve"], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(http_port, timeout=READY_TIMEOUT_S, proc=proc)
    except Exception:
        _stop(proc)
        raise
    return proc, secrets_port


def _stop(proc) -> None:
    from bench.run import stop_process
    stop_process(proc)


def _deliver(port: int, delivery: bytes) -> tuple[float, dict]:
    started = time.perf_counter()
    line = exchange(parse_address(f"tcp:127.0.0.1:{port}"), delivery)
    return time.perf_counter() - started, json.loads(line)


def run(n: int = DEFAULT_N) -> dict:
    n = max(MIN_N, min(int(n), MAX_N))
    with tempfile.TemporaryDirectory(prefix="bench-kms-") as tmp:
        state = os.path.join(tmp, "state")
        root = devpki.load_or_create_root(state)  # the runtime loads this same dev root
        ca = TestCA("Bench KMS CA")
        ca_file = ca.write(tmp)
        fake = FakeKms(ca, attestation_roots=[root.cert_der],
                       allowed_pcr0=[attestation.measure_code()]).start()
        transport = OutboundClient(context=kms.create_kms_context(ca_file))
        proc = None
        try:
            creds = kms.AwsCredentials.from_delivery(fake.credentials(),
                                                     now=time.time())
            deliveries = [_seal(fake, transport, creds, version)
                          for version in range(1, WARMUP_DELIVERIES + n + 1)]
            plaintext_bytes = len(base64.b64decode(
                json.loads(deliveries[0])["SEALED_SECRETS"]["ciphertext"])) - 16
            baseline = _Baseline(fake, ca_file, plaintext_bytes)
            proc, port = _start_runtime(state, fake, ca_file)
            for delivery in deliveries[:WARMUP_DELIVERIES]:
                _, ack = _deliver(port, delivery)
                if ack.get("ok") is not True:
                    error = ack.get("error") or {}
                    return {"figure": FIGURE, "error": f"the runtime refused a sealed delivery: "
                                                       f"{error.get('code')}: "
                                                       f"{error.get('message')}"}
            ours, raw, refused = [], [], 0
            for delivery in deliveries[WARMUP_DELIVERIES:]:
                raw.append(baseline.round())
                seconds, ack = _deliver(port, delivery)
                ours.append(seconds)
                if ack.get("ok") is not True:
                    refused += 1
        finally:
            if proc is not None:
                _stop(proc)
            transport.close()
            fake.stop()
    p50, base_p50 = statistics.median(ours), statistics.median(raw)
    ratio = p50 / base_p50
    return {
        "figure": FIGURE,
        "n": n,
        "p50_ms": round(p50 * 1000, 1),
        "p95_ms": round(sorted(ours)[min(n - 1, round(0.95 * (n - 1)))] * 1000, 1),
        "baseline_p50_ms": round(base_p50 * 1000, 1),
        "ratio": round(ratio, 2),
        "refused": refused,
        "decrypt_calls": sum(1 for op, _ in fake.calls if op == "Decrypt"),
        "target_ratio": TARGET_RATIO,
        "ok": ratio <= TARGET_RATIO and refused == 0,
    }


def rows() -> list[dict]:
    """The `make bench` row (same keys as bench.run.row)."""
    result = run()
    if "skipped" in result or "error" in result:
        reason = result.get("skipped") or result["error"]
        state = "skipped" if "skipped" in result else "not measured"
        return [{"figure": f"{FIGURE}: {state} ({reason})", "value": None, "unit": "",
                 "baseline": None, "ratio": None, "target": f"<= {TARGET_RATIO:g}",
                 "pass": None if "skipped" in result else False}]
    return [{"figure": f"{FIGURE} ({result['n']} deliveries, p95 {result['p95_ms']} ms) vs raw "
                       "RSA-2048 keygen + OAEP decrypt + AES-GCM open + one loopback TLS request",
             "value": result["p50_ms"], "unit": "ms", "baseline": result["baseline_p50_ms"],
             "ratio": result["ratio"], "target": f"<= {TARGET_RATIO:g}", "pass": result["ok"]}]


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_N), indent=2))
