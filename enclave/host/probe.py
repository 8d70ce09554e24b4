"""`probe BASE_URL`: the fail-closed start-up probe for host services (docs/DESIGN.md §11).

A host service (API, worker) runs this before it trusts the runtime. Every check below must hold;
one line is printed per check (`ok   name` or `FAIL name: reason`) and the exit code is 0 only
when all of them held, 1 otherwise, 2 on usage errors. A check that could not run is a FAIL.

  healthz                   GET /healthz answers 200 with the documented JSON shape
                            (strict: mode remote, no dev-shim source)
  healthz ready             GET /healthz?ready=1 answers 200 {"ready": true}
  metrics                   GET /metrics answers 200 in the Prometheus text format
  document                  GET /v1/attestation/document answers 200 with the documented shape
  document verifies         the document verifies (enclave.verify) now, against the AWS Nitro
                            root (+ --root); the INSECURE dev root (and INSECURE --root files)
                            only with --allow-insecure-dev; its JSON summary matches the document
  challenge                 POST /v1/attestation/challenge with a fresh random nonce answers
                            200 with the documented shape, echoing the nonce
  challenge verifies        that document and evidence verify, bound to the nonce, fresh, under
                            the same public key as the document endpoint's
  challenge refuses bad nonce   a 4-byte nonce answers 400
  rpc PATH refuses unsigned     an unsigned POST answers 401 (every RPC path)
  rpc PATH refuses tampered     a POST whose body changed after signing answers 401
  rpc signed request accepted   a correctly signed POST (refresh with an empty object: refused
                            as invalid before any upstream call) is not refused with 401

Trust: by default only the AWS Nitro root and non-INSECURE --root files, so a dev-shim runtime
fails `document verifies` at step 3. --allow-insecure-dev (development only) also trusts the
INSECURE dev root under --state-dir and INSECURE --root files; it contradicts
--require-attestation (exit 2).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import ssl
import sys
import time
from urllib.parse import urlsplit

from .. import nitro, tls
from ..rpcauth import new_nonce, sign_request
from .args import UsageError, resolve_secret
from .trust import add_pcr_arguments, is_insecure_root, pcr_allow_lists, trusted_roots

HELP = "fail-closed start-up probe of a running runtime"

DEFAULT_TIMEOUT_S = 5.0  # per request; a healthy runtime answers in milliseconds
MAX_TIMEOUT_S = 120.0
MAX_ANSWER_BYTES = 256 * 1024  # every answer probed is < 16 KiB; more is a broken server
CHALLENGE_NONCE_BYTES = 32  # inside the 16..64 bytes the endpoint accepts
BAD_NONCE_BYTES = 4  # below the 16-byte minimum: must answer 400
CHALLENGE_MAX_AGE_MS = 5 * 60 * 1000  # a challenge answer minted for this probe is seconds old
RPC_PATHS = (
    "/v1/rpc/google/token/exchange",
    "/v1/rpc/google/token/refresh",
    "/v1/rpc/google/token/revoke",
    "/v1/rpc/watermark",
)
# A signed request with no side effect: the handler refuses the empty object (400) before it
# looks at credentials or calls Google. Anything but 401 proves the signature was accepted.
SIGNED_PROBE_PATH = "/v1/rpc/google/token/refresh"
SIGNED_PROBE_BODY = b"{}"
TAMPERED_SIGNED_BODY = b'{"probe": "signed"}'
TAMPERED_SENT_BODY = b'{"probe": "tampered"}'
HEALTH_KEYS = ("status", "mode", "env", "secrets", "mtls", "attestation", "uptime_s")
DOCUMENT_KEYS = ("format", "document", "public_key", "module_id", "timestamp_ms", "pcrs",
                 "insecure")
CHALLENGE_KEYS = ("nonce", "document", "nonce_bound_document", "evidence", "public_key")


class CheckFailed(Exception):
    """One check did not hold; the message says expected vs. got."""


class Unreachable(CheckFailed):
    """The runtime could not be reached at all."""


def add_arguments(parser) -> None:
    parser.add_argument("base_url", metavar="BASE_URL", help="e.g. http://127.0.0.1:8181")
    parser.add_argument("--secret", help="RPC shared secret (default: ENCLAVE_RPC_SHARED_SECRET, "
                                         "or the local default when ALFRED_ENV is local)")
    parser.add_argument("--require-attestation", action="store_true",
                        help="strict: also require mode remote and an nsm/static source, refuse "
                             "dev-shim documents; contradicts --allow-insecure-dev")
    parser.add_argument("--allow-insecure-dev", action="store_true",
                        help="development only: accept INSECURE dev-shim documents: trust the "
                             "dev root from --state-dir (and INSECURE --root files)")
    parser.add_argument("--root", action="append", default=[], metavar="PEM",
                        help="also trust this root certificate file (repeatable); the AWS Nitro "
                             "Root-G1 is always trusted")
    parser.add_argument("--state-dir", metavar="DIR", default=None,
                        help="where the dev root lives, with --allow-insecure-dev (default "
                             "$ENCLAVE_STATE_DIR or .local)")
    add_pcr_arguments(parser, checked="; checked on every document")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"per-request timeout (default {DEFAULT_TIMEOUT_S:g})")


# -- helpers ------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _keys(value, keys: tuple, what: str) -> dict:
    _expect(isinstance(value, dict), f"{what}: expected a JSON object, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    _expect(not missing, f"{what}: missing {', '.join(missing)}")
    return value


def _b64_field(obj: dict, name: str, what: str) -> bytes:
    value = obj.get(name)
    _expect(isinstance(value, str) and value != "", f"{what}: {name} must be a base64 string")
    try:
        return nitro.decode_b64(value)
    except ValueError:
        raise CheckFailed(f"{what}: {name} is not base64") from None


# -- the probe ----------------------------------------------------------------------------

class Probe:
    def __init__(self, base_url: str, *, timeout: float, secret: str | None, strict: bool,
                 roots: list[bytes], dev_root_note: str,
                 expected_pcrs: dict[int, tuple[bytes, ...]],
                 clock=time.time):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"BASE_URL must be an http:// or https:// URL, got {base_url!r}")
        if parts.query or parts.fragment:
            raise UsageError("BASE_URL must not carry a query or fragment")
        try:
            port = parts.port
        except ValueError:
            raise UsageError("BASE_URL has an invalid port") from None
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.secret = secret
        self.strict = strict
        self.verifier = nitro.Verifier(roots)
        self.dev_root_note = dev_root_note
        self.expected_pcrs = expected_pcrs
        self.clock = clock
        self.results: list[tuple[str, bool, str]] = []
        self.document_public_key: bytes | None = None

    # -- HTTP --
    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, str, bytes]:
        target = self.prefix + path
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=tls.https_client_context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        sent = {"Connection": "close", **(headers or {})}
        if body is not None:
            sent.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, target, body=body, headers=sent)
            resp = conn.getresponse()
            data = resp.read(MAX_ANSWER_BYTES + 1)
            _expect(len(data) <= MAX_ANSWER_BYTES,
                    f"{method} {path}: answer larger than {MAX_ANSWER_BYTES} bytes")
            return resp.status, resp.getheader("Content-Type") or "", data
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise Unreachable(f"{method} {self.base_url}{path}: {reason}") from None
        except http.client.HTTPException as exc:
            raise CheckFailed(f"{method} {path}: malformed HTTP answer "
                              f"({type(exc).__name__})") from None
        finally:
            conn.close()

    def call_json(self, method: str, path: str, body: bytes | None = None,
                  headers: dict | None = None, expect_status: int = 200):
        status, ctype, data = self.call(method, path, body, headers)
        _expect(status == expect_status,
                f"{method} {path}: expected HTTP {expect_status}, got {status}"
                + _error_code_suffix(data))
        _expect(ctype.split(";")[0].strip() == "application/json",
                f"{method} {path}: expected application/json, got {ctype or 'no Content-Type'}")
        try:
            return json.loads(data)
        except ValueError:
            raise CheckFailed(f"{method} {path}: the answer is not JSON") from None

    def _signed(self, path: str, body: bytes, secret: str) -> dict:
        headers = sign_request(secret, "POST", self.prefix + path, body,
                               int(self.clock()), new_nonce())
        headers["Content-Type"] = "application/json"
        return headers

    # -- running checks --
    def check(self, name: str, fn, *args):
        """Run one check; record and print its line. Returns fn's result or None."""
        try:
            detail = fn(*args)
        except CheckFailed as exc:
            self._line(name, False, str(exc))
            if isinstance(exc, Unreachable):
                raise
            return None
        except Exception as exc:  # never fail open on a probe bug either
            self._line(name, False, f"unexpected {type(exc).__name__}: {exc}")
            return None
        self._line(name, True, detail if isinstance(detail, str) else "")
        return detail

    def _line(self, name: str, ok: bool, detail: str) -> None:
        self.results.append((name, ok, detail))
        if ok:
            print(f"ok   {name}" + (f" ({detail})" if detail else ""), flush=True)
        else:
            print(f"FAIL {name}: {detail}", flush=True)

    def run(self) -> bool:
        names = ["healthz", "healthz ready", "metrics", "document", "document verifies",
                 "challenge", "challenge verifies", "challenge refuses bad nonce"]
        names += [f"rpc {p} refuses unsigned" for p in RPC_PATHS]
        names += [f"rpc {p} refuses tampered" for p in RPC_PATHS]
        names.append("rpc signed request accepted")
        try:
            self._run_all()
        except Unreachable:
            done = {name for name, _, _ in self.results}
            for name in names:
                if name not in done:
                    self._line(name, False, "not run: the runtime is unreachable")
        return bool(self.results) and all(ok for _, ok, _ in self.results)

    def _run_all(self) -> None:
        self.check("healthz", self.check_healthz)
        self.check("healthz ready", self.check_ready)
        self.check("metrics", self.check_metrics)
        document = self.check("document", self.check_document_shape)
        if document is None:
            self._line("document verifies", False, "not run: no well-formed document answer")
        else:
            self.check("document verifies", self.check_document_verifies, document)
        challenge = self.check("challenge", self.check_challenge_shape)
        if challenge is None:
            self._line("challenge verifies", False, "not run: no well-formed challenge answer")
        else:
            self.check("challenge verifies", self.check_challenge_verifies, challenge)
        self.check("challenge refuses bad nonce", self.check_bad_nonce)
        for path in RPC_PATHS:
            self.check(f"rpc {path} refuses unsigned", self.check_unsigned, path)
        for path in RPC_PATHS:
            self.check(f"rpc {path} refuses tampered", self.check_tampered, path)
        self.check("rpc signed request accepted", self.check_signed)

    # -- the checks --
    def check_healthz(self) -> str:
        body = _keys(self.call_json("GET", "/healthz"), HEALTH_KEYS, "/healthz")
        _expect(body["status"] in ("ok", "degraded"),
                f"/healthz: status must be ok or degraded, got {body['status']!r}")
        _keys(body["secrets"], ("received", "version", "updated_at"), "/healthz secrets")
        _keys(body["mtls"], ("configured", "not_after"), "/healthz mtls")
        _keys(body["attestation"], ("source",), "/healthz attestation")
        _expect(isinstance(body["uptime_s"], (int, float)), "/healthz: uptime_s must be a number")
        source = body["attestation"].get("source")
        if self.strict:
            _expect(body["mode"] == "remote",
                    f"--require-attestation: expected mode remote, got {body['mode']!r}")
            _expect(source in ("nsm", "static"),
                    f"--require-attestation: expected attestation source nsm or static, "
                    f"got {source!r}")
        return f"status={body['status']} mode={body['mode']} env={body['env']} source={source}"

    def check_ready(self) -> str:
        body = self.call_json("GET", "/healthz?ready=1")
        _expect(isinstance(body, dict) and body.get("ready") is True,
                "/healthz?ready=1: expected \"ready\": true")
        return ""

    def check_metrics(self) -> str:
        status, ctype, data = self.call("GET", "/metrics")
        _expect(status == 200, f"GET /metrics: expected HTTP 200, got {status}")
        _expect(ctype.startswith("text/plain"), f"GET /metrics: expected text/plain, got {ctype}")
        _expect(b"# TYPE " in data, "GET /metrics: no '# TYPE' line: not the Prometheus format")
        return ""

    def check_document_shape(self) -> dict:
        body = _keys(self.call_json("GET", "/v1/attestation/document"), DOCUMENT_KEYS,
                     "/v1/attestation/document")
        _expect(body["format"] in ("aws-nitro", "dev-shim"),
                f"document: format must be aws-nitro or dev-shim, got {body['format']!r}")
        _expect(isinstance(body["insecure"], bool), "document: insecure must be a boolean")
        _expect(isinstance(body["timestamp_ms"], int), "document: timestamp_ms must be an integer")
        _expect(isinstance(body["module_id"], str), "document: module_id must be a string")
        _expect(isinstance(body["pcrs"], dict), "document: pcrs must be an object")
        body["_document"] = _b64_field(body, "document", "document")
        body["_public_key"] = _b64_field(body, "public_key", "document")
        return body

    def _verify(self, document: bytes, **kwargs) -> tuple[nitro.VerifiedDocument, bool]:
        """The verified document and whether it chains to an INSECURE (dev-shim) root."""
        try:
            verified = self.verifier.verify(
                document, at_ms=int(self.clock() * 1000), allow_debug=False,
                expected_pcrs=self.expected_pcrs or None, **kwargs)
        except nitro.VerificationError as exc:
            hint = f" ({self.dev_root_note})" if exc.step == 3 and self.dev_root_note else ""
            raise CheckFailed(f"{exc}{hint}") from None
        insecure = is_insecure_root(verified.root_der)
        if self.strict:
            _expect(not verified.module_id.startswith("dev-shim"),
                    f"--require-attestation: module_id {verified.module_id!r} is a dev-shim")
            _expect(not is_insecure_root(verified.root_der),
                    "--require-attestation: the document chains to an INSECURE root")
        return verified, insecure

    def check_document_verifies(self, body: dict) -> str:
        verified, insecure = self._verify(body["_document"])
        pcrs = {str(k): v.hex() for k, v in sorted(verified.pcrs.items())}
        mismatches = [name for name, got, want in (
            ("public_key", body["_public_key"], verified.public_key),
            ("module_id", body["module_id"], verified.module_id),
            ("timestamp_ms", body["timestamp_ms"], verified.timestamp_ms),
            ("pcrs", {str(k): str(v).lower() for k, v in body["pcrs"].items()}, pcrs),
            ("insecure", body["insecure"], insecure),
            ("format", body["format"],
             "dev-shim" if verified.module_id.startswith("dev-shim") else "aws-nitro"),
        ) if got != want]
        _expect(not mismatches, "the JSON summary does not match the verified document: "
                                + ", ".join(mismatches))
        if self.strict:
            _expect(body["format"] == "aws-nitro" and not body["insecure"],
                    "--require-attestation: the document is not an aws-nitro document")
        self.document_public_key = verified.public_key
        label = "INSECURE dev root" if insecure else "AWS Nitro root"
        return f"{verified.module_id}, {label}"

    def check_challenge_shape(self) -> dict:
        nonce = secrets.token_bytes(CHALLENGE_NONCE_BYTES)
        request = json.dumps({"nonce": _b64(nonce)}).encode("ascii")
        body = _keys(self.call_json("POST", "/v1/attestation/challenge", request),
                     CHALLENGE_KEYS, "/v1/attestation/challenge")
        echoed = _b64_field(body, "nonce", "challenge")
        _expect(echoed == nonce, "challenge: the answer does not echo the nonce sent")
        _expect(isinstance(body["nonce_bound_document"], bool),
                "challenge: nonce_bound_document must be a boolean")
        body["_nonce"] = nonce
        body["_document"] = _b64_field(body, "document", "challenge")
        body["_evidence"] = _b64_field(body, "evidence", "challenge")
        body["_public_key"] = _b64_field(body, "public_key", "challenge")
        return body

    def check_challenge_verifies(self, body: dict) -> str:
        # The fresh random nonce is what proves freshness. A static (not nonce-bound) document
        # is as old as the runtime, so the age bound applies only to a freshly minted one.
        max_age = CHALLENGE_MAX_AGE_MS if body["nonce_bound_document"] else None
        verified, _ = self._verify(body["_document"], expected_nonce=body["_nonce"],
                                   evidence=body["_evidence"], max_age_ms=max_age)
        _expect(verified.public_key == body["_public_key"],
                "challenge: public_key does not match the document's")
        if self.document_public_key is not None:
            _expect(verified.public_key == self.document_public_key,
                    "challenge: signed by a different identity than the document endpoint's")
        if body["nonce_bound_document"]:
            _expect(verified.nonce == body["_nonce"],
                    "challenge: nonce_bound_document is true but the document holds another nonce")
        return f"nonce bound by {verified.nonce_bound_by}"

    def check_bad_nonce(self) -> str:
        request = json.dumps({"nonce": _b64(bytes(BAD_NONCE_BYTES))}).encode("ascii")
        status, _, data = self.call("POST", "/v1/attestation/challenge", request)
        _expect(status == 400, f"a {BAD_NONCE_BYTES}-byte nonce: expected HTTP 400, got {status}")
        return ""

    def _expect_401(self, status: int, data: bytes, what: str) -> None:
        _expect(status == 401, f"{what}: expected HTTP 401, got {status}"
                + _error_code_suffix(data))
        try:
            code = json.loads(data)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        _expect(code == "unauthorized", f"{what}: expected error code unauthorized, got {code!r}")

    def check_unsigned(self, path: str) -> str:
        status, _, data = self.call("POST", path, SIGNED_PROBE_BODY)
        self._expect_401(status, data, "unsigned POST")
        return ""

    def check_tampered(self, path: str) -> str:
        # Without a secret, a random one: the server must refuse that just the same.
        secret = self.secret or secrets.token_urlsafe(32)
        headers = self._signed(path, TAMPERED_SIGNED_BODY, secret)
        status, _, data = self.call("POST", path, TAMPERED_SENT_BODY, headers)
        self._expect_401(status, data, "POST with a body changed after signing")
        return ""

    def check_signed(self) -> str:
        if self.secret is None:
            raise CheckFailed("no secret: pass --secret or set ENCLAVE_RPC_SHARED_SECRET")
        headers = self._signed(SIGNED_PROBE_PATH, SIGNED_PROBE_BODY, self.secret)
        status, _, data = self.call("POST", SIGNED_PROBE_PATH, SIGNED_PROBE_BODY, headers)
        _expect(status != 401, f"POST {SIGNED_PROBE_PATH}: a signed request was refused with "
                               "401 (wrong secret, or clocks more than the allowed skew apart?)")
        _expect(status < 500 or status == 503,
                f"POST {SIGNED_PROBE_PATH}: expected a 4xx validation answer, got {status}"
                + _error_code_suffix(data))
        return f"HTTP {status}{_error_code_suffix(data)}"


def _error_code_suffix(data: bytes) -> str:
    try:
        code = json.loads(data)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f" ({code})" if isinstance(code, str) and len(code) <= 64 else ""


def build(args, environ=None) -> Probe:
    environ = os.environ if environ is None else environ
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise UsageError(f"--timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds")
    strict = args.require_attestation
    roots, note = trusted_roots(args.root, allow_insecure_dev=args.allow_insecure_dev,
                                state_dir=args.state_dir, environ=environ, strict=strict)
    return Probe(args.base_url, timeout=args.timeout, secret=resolve_secret(args, environ),
                 strict=strict, roots=roots, dev_root_note=note,
                 expected_pcrs=pcr_allow_lists(args.pcr, args.pcrs))


def run(args) -> int:
    try:
        probe = build(args)
    except UsageError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    except nitro.TrustAnchorError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    ok = probe.run()
    failed = sum(1 for _, good, _ in probe.results if not good)
    print(f"probe: {len(probe.results) - failed} ok, {failed} failed: "
          + ("all checks hold" if ok else "NOT SAFE TO USE"), flush=True)
    return 0 if ok else 1
