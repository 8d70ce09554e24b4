"""Attestation figures of docs/DESIGN.md §14, each against a raw baseline measured in this run.

    python -m bench.bench_attestation [challenge|verifier]

challenge_rows(): POST /v1/attestation/challenge requests/s over HTTP (16 keep-alive connections,
    best of 2 x 4 s) against `enclave.py serve` in dev-shim, vs the raw in-process rate of the
    signatures one challenge needs (best of 3 x 1 s slices taken before, between and after the
    load runs): one ES384 signature by the dev leaf (the document) and one by the signing
    identity (the evidence; Ed25519 here, pinned through the environment), over payloads of the
    exact sizes the server signs. Target >= 0.7. The machine is shared and noisy: best-of on both
    sides compares the two at their least disturbed.
verifier_rows(): enclave.nitro.Verifier.verify on the real production Nitro document (at its
    own timestamp) vs the raw rate of the signature check it cannot cache: the ES384 verification
    of the document's COSE signature (the chain's signatures are pure functions of the DER bytes
    and are cached). Target >= 0.8. The cold rate (caches cleared per document, so four chain
    links are verified too) is reported alongside.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_DOCUMENT = ROOT / "tests" / "data" / "nitro" / "blocky_nitrite_nitro_attestation.b64"
CHALLENGE_PATH = "/v1/attestation/challenge"
CHALLENGE_SECONDS = 4  # per run; two runs
CHALLENGE_RUNS = 2
WARMUP_SECONDS = 1
RAW_SLICE_SECONDS = 1.0  # three slices: before, between and after the HTTP runs
VERIFY_SECONDS = 3.0  # per side (verifier, raw), interleaved in slices
SLICE_SECONDS = 0.25
COLD_SECONDS = 1.0
CHALLENGE_TARGET = 0.7
VERIFIER_TARGET = 0.8
# A fixed valid nonce (32 bytes): the server signs a fresh document per request all the same.
NONCE = base64.b64encode(bytes(range(32))).decode("ascii")
BODY = json.dumps({"nonce": NONCE}).encode()

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
""" % BODY.decode()


def _rate(fn, seconds: float) -> float:
    """Calls of fn per second over about `seconds` (checks the clock every 16 calls)."""
    n, started = 0, time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(16):
            fn()
        n += 16
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - started)


def _interleaved(fns: dict, seconds: float, slice_s: float = SLICE_SECONDS) -> dict:
    """Rates of several functions measured in alternating slices (robust to a noisy machine)."""
    counts = {name: 0 for name in fns}
    spent = {name: 0.0 for name in fns}
    while min(spent.values()) < seconds:
        for name, fn in fns.items():
            n, started = 0, time.perf_counter()
            deadline = started + slice_s
            while True:
                fn()
                n += 1
                now = time.perf_counter()
                if now >= deadline:
                    break
            counts[name] += n
            spent[name] += now - started
    return {name: counts[name] / spent[name] for name in fns}


# -- challenge ----------------------------------------------------------------------------
def _post_challenge(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", CHALLENGE_PATH, body=BODY,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"challenge answered {resp.status}: {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


def raw_challenge_signers(answer: dict):
    """One challenge's signatures, in process: ES384 (P-384) over the document's Sig_structure and
    Ed25519 over the evidence's, with the byte sizes taken from a real answer."""
    from enclave.nitro import cose

    document = cose.decode_sign1(base64.b64decode(answer["document"]))
    evidence = cose.decode_sign1(base64.b64decode(answer["evidence"]))
    doc_tbs = cose.sig_structure(document.protected_bytes, document.payload)
    ev_tbs = cose.sig_structure(evidence.protected_bytes, evidence.payload)
    leaf = ec.generate_private_key(ec.SECP384R1())
    ident = ed25519.Ed25519PrivateKey.generate()
    algorithm = ec.ECDSA(hashes.SHA384())

    def one_challenge():
        leaf.sign(doc_tbs, algorithm)
        ident.sign(ev_tbs)

    one_challenge()
    return one_challenge


def _load_challenges(port: int, seconds: float) -> dict:
    from bench import loadgen

    if loadgen.wrk_available():
        fd, script = tempfile.mkstemp(prefix="bench-challenge-", suffix=".lua")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(WRK_SCRIPT)
            return loadgen.run_wrk(f"http://127.0.0.1:{port}{CHALLENGE_PATH}", 16, seconds,
                                   script=script)
        finally:
            os.unlink(script)
    return loadgen.run_python("127.0.0.1", port, CHALLENGE_PATH, 16, seconds, method="POST",
                              body=BODY, headers_fn=lambda: {"Content-Type": "application/json"})


def measure_challenge(runs: int = CHALLENGE_RUNS, seconds: float = CHALLENGE_SECONDS) -> dict:
    """Best of `runs` HTTP load runs vs best of `runs + 1` raw slices taken before, between and
    after them (the server idle meanwhile): both sides see the machine at its least disturbed."""
    from bench.run import Runtime

    identity_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    with Runtime(TEE_ATTESTATION_SIGNING_PRIVATE_KEY=identity_pem) as rt:
        answer = _post_challenge(rt.port)
        _check_answer(answer, rt.state)
        one_challenge = raw_challenge_signers(answer)
        raw = [_rate(one_challenge, RAW_SLICE_SECONDS)]
        _load_challenges(rt.port, WARMUP_SECONDS)
        loads = []
        for _ in range(runs):
            loads.append(_load_challenges(rt.port, seconds))
            raw.append(_rate(one_challenge, RAW_SLICE_SECONDS))
    best = max(loads, key=lambda r: r["rps"])
    best["non_2xx"] = sum(r["non_2xx"] for r in loads)
    best["socket_errors"] = "; ".join(r["socket_errors"] for r in loads if r["socket_errors"])
    return {"http": best, "http_runs": [round(r["rps"]) for r in loads], "raw": max(raw),
            "raw_runs": [round(r) for r in raw],
            "document_bytes": len(base64.b64decode(answer["document"]))}


def _check_answer(answer: dict, state_dir: str) -> None:
    """The answer under load is the real thing: it verifies with the dev root and the nonce."""
    from enclave import devpki
    from enclave.nitro import verifier as verify

    roots = verify.pem_to_der_certs(devpki.read_root_pem(state_dir))
    verify.verify_document(base64.b64decode(answer["document"]), roots=roots,
                           at_ms=int(time.time() * 1000), expected_nonce=base64.b64decode(NONCE),
                           evidence=base64.b64decode(answer["evidence"]), max_age_ms=60_000)


def challenge_rows() -> list[dict]:
    from bench.run import row

    result = measure_challenge()
    http, raw = result["http"], result["raw"]
    ratio = http["rps"] / raw
    failures = http["non_2xx"] or bool(http["socket_errors"])
    return [row("/v1/attestation/challenge req/s, 16 keep-alive conns, vs raw signatures "
                "(ES384 + Ed25519) in process", round(http["rps"]), "req/s", round(raw),
                round(ratio, 2), f">= {CHALLENGE_TARGET}",
                ratio >= CHALLENGE_TARGET and not failures, tool=http["tool"],
                p99_ms=round(http["p99_s"] * 1000, 2) if http["p99_s"] else None,
                non_2xx=http["non_2xx"], socket_errors=http["socket_errors"],
                http_runs=result["http_runs"], raw_runs=result["raw_runs"],
                document_bytes=result["document_bytes"])]


# -- verifier -----------------------------------------------------------------------------
def measure_verifier(seconds: float = VERIFY_SECONDS) -> dict:
    from enclave.nitro import AT_DOCUMENT_TIME, Verifier, cose

    document = base64.b64decode(PRODUCTION_DOCUMENT.read_text())
    verifier = Verifier.production()

    def verify_once():
        verifier.verify(document, at_ms=AT_DOCUMENT_TIME)

    verified = verifier.verify(document, at_ms=AT_DOCUMENT_TIME)
    leaf_key = x509.load_der_x509_certificate(verified.certificate).public_key()
    sign1 = cose.decode_sign1(document)
    tbs = cose.sig_structure(sign1.protected_bytes, sign1.payload)
    der_signature = cose.raw_to_der(sign1.signature)
    algorithm = ec.ECDSA(hashes.SHA384())

    def raw_once():
        leaf_key.verify(der_signature, tbs, algorithm)

    rates = _interleaved({"verifier": verify_once, "raw": raw_once}, seconds)

    def cold_once():  # a new verifier: nothing cached
        Verifier.production().verify(document, at_ms=AT_DOCUMENT_TIME)

    cold = _rate(cold_once, COLD_SECONDS)
    return {**rates, "cold": cold, "document_bytes": len(document)}


def verifier_rows() -> list[dict]:
    from bench.run import row

    result = measure_verifier()
    ratio = result["verifier"] / result["raw"]
    return [row("verifier docs/s, real Nitro document (chain cached) vs raw ES384 verify",
                round(result["verifier"]), "docs/s", round(result["raw"]), round(ratio, 2),
                f">= {VERIFIER_TARGET}", ratio >= VERIFIER_TARGET,
                cold_docs_per_s=round(result["cold"]), document_bytes=result["document_bytes"])]


if __name__ == "__main__":
    which = sys.argv[1:] or ["challenge", "verifier"]
    out = []
    for name in which:
        out.extend(challenge_rows() if name == "challenge" else verifier_rows())
    print(json.dumps(out, indent=2))
