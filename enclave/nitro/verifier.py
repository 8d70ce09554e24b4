"""Nitro attestation document verifier: bytes and a time in, a VerifiedDocument or one error out.

The steps are numbered as in docs/DESIGN.md §8:
(1) COSE_Sign1 structure, tagged or untagged; (2) payload field types and sizes; (3) cabundle[0]
is a pinned root; (4) chain signatures, basicConstraints, keyUsage, validity; (5) ES384 signature
over ["Signature1", protected, b"", payload] with the original protected bytes; (6) PCRs and the
debug-enclave rule; (7) nonce and maximum age; (8) evidence and response signatures under the
document's public_key. Verification does no I/O and never reads the clock: the caller passes
the time in. A `Verifier` holds its trusted roots and caches what is a pure function of exact
DER bytes (parsed certificates, verified links and chains); `Verifier.production()` trusts the
bundled AWS Nitro root, read once from package data (works from a zipapp).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import hmac
import importlib.resources
import logging
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import EnclaveError
from . import claims as signed_claims
from . import cose

logger = logging.getLogger(__name__)

STEP_NAMES = {
    1: "COSE_Sign1 structure",
    2: "payload fields",
    3: "pinned root",
    4: "certificate chain",
    5: "document signature",
    6: "PCRs",
    7: "nonce and age",
    8: "evidence and response signatures",
}

NITRO_ROOT_RESOURCE = "data/aws_nitro_root_g1.pem"
NITRO_ROOT_DER_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
MAX_DOCUMENT_BYTES = 16 * 1024  # the NSM answers within a 12 KiB buffer; headroom, no more
MAX_PAYLOAD_BYTES = 16 * 1024  # AWS: payload bstr .size (1..16384)
MAX_CERT_BYTES = 1024  # AWS: cert = bytes .size (1..1024)
MAX_CABUNDLE_CERTS = 8  # real bundles hold 4 (root, regional, zonal, instance)
MAX_MODULE_ID_CHARS = 256  # real ids are ~40 characters
MAX_USER_FIELD_BYTES = 1024  # AWS CDDL: user_data = bytes .size (0..1024); real documents use 1024
MAX_PCRS = 32  # AWS: pcrs has 1..32 entries, index 0..31
SHA384_BYTES = 48  # digest is always SHA384, so every PCR is 48 bytes
MAX_TIMESTAMP_MS = 2**64 - 1  # AWS: timestamp: uint .size 8
MESSAGE_HEX_BYTES = 64  # longer values (1 KiB nonces) are shortened in error messages
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000  # with max_age: a document at most 5 min in the future
# Caches hold only results that are pure functions of exact DER bytes (never of time):
CERT_CACHE_MAX_ENTRIES = 256  # parsed certificates and verified links; <= 2 KiB keys: 512 KiB
CHAIN_CACHE_MAX_ENTRIES = 64  # whole verified chains; keys <= 9 KiB each: under 600 KiB
DOCUMENT_FIELDS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
                   "public_key", "user_data", "nonce")
REQUIRED_FIELDS = DOCUMENT_FIELDS[:6]


class VerificationError(EnclaveError):
    """The document (or its evidence) was rejected at `step` (1..8); the message says why."""

    def __init__(self, step: int, message: str):
        super().__init__(f"step {step} ({STEP_NAMES.get(step, '?')}): {message}")
        self.step = step
        self.message = message

    @property
    def step_name(self) -> str:
        return STEP_NAMES.get(self.step, "?")


class TrustAnchorError(EnclaveError):
    """The bundled AWS root is missing or not the published one (a broken package)."""


class _DocumentTime:
    def __repr__(self) -> str:
        return "AT_DOCUMENT_TIME"


AT_DOCUMENT_TIME = _DocumentTime()
"""Pass as `at_ms` to check validity at the document's own timestamp (old test vectors)."""


@dataclass(frozen=True)
class VerifiedDocument:
    raw: bytes
    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: dict
    certificate: bytes
    cabundle: tuple
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    root_der: bytes
    at_ms: int
    debug: bool
    nonce_bound_by: str | None = None  # "document", "evidence" or None (no nonce expected)
    evidence: dict | None = field(default=None)

    @property
    def sha384(self) -> bytes:
        return hashlib.sha384(self.raw).digest()

    def summary(self) -> dict:
        """A JSON-ready description: hex for PCRs and nonce, base64 for keys and user data."""
        b64 = (lambda b: None if b is None else base64.b64encode(b).decode("ascii"))
        evidence = None
        if self.evidence is not None:
            evidence = {"intent": self.evidence.get("intent"),
                        "timestamp_ms": self.evidence.get("timestamp_ms"),
                        "user_data": b64(self.evidence.get("user_data"))}
        return {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp_ms": self.timestamp_ms,
            "pcrs": {str(k): v.hex() for k, v in sorted(self.pcrs.items())},
            "public_key": b64(self.public_key),
            "user_data": b64(self.user_data),
            "nonce": None if self.nonce is None else self.nonce.hex(),
            "debug": self.debug,
            "root_sha256": hashlib.sha256(self.root_der).hexdigest(),
            "verified_at_ms": self.at_ms,
            "nonce_bound_by": self.nonce_bound_by,
            "evidence": evidence,
        }


@functools.lru_cache(maxsize=1)
def nitro_root_der() -> bytes:
    """The bundled AWS Nitro Enclaves Root-G1 (DER), checked against its published SHA-256."""
    try:
        pem = importlib.resources.files(__package__).joinpath(NITRO_ROOT_RESOURCE).read_bytes()
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except (OSError, ValueError) as exc:
        raise TrustAnchorError(f"cannot load the bundled AWS Nitro root: {exc}") from None
    got = hashlib.sha256(der).hexdigest()
    if got != NITRO_ROOT_DER_SHA256:
        raise TrustAnchorError(f"bundled AWS Nitro root: expected DER SHA-256 "
                               f"{NITRO_ROOT_DER_SHA256}, got {got}")
    return der


def pem_to_der_certs(pem: bytes) -> list[bytes]:
    """Every certificate in a PEM bundle as DER (ValueError if there is none)."""
    certs = x509.load_pem_x509_certificates(pem)
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


class _Lru:
    """A small thread-safe LRU map keyed by exact bytes."""

    def __init__(self, max_entries: int):
        self._max = max_entries
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


@dataclass(frozen=True)
class _Cert:
    """What the chain checks need from a certificate, computed once per exact DER."""

    cert: x509.Certificate
    subject: str
    not_before_ms: int
    not_after_ms: int
    is_ca: bool | None  # None: no basicConstraints
    bc_critical: bool
    path_length: int | None
    key_cert_sign: bool | None  # None: no keyUsage
    digital_signature: bool | None
    unknown_critical: tuple


class _Caches:
    """Parsed certificates, verified links and chains: pure functions of exact DER bytes."""

    def __init__(self):
        self.certs = _Lru(CERT_CACHE_MAX_ENTRIES)
        self.links = _Lru(CERT_CACHE_MAX_ENTRIES)
        self.chains = _Lru(CHAIN_CACHE_MAX_ENTRIES)


_KNOWN_CRITICAL = {x509.BasicConstraints.oid, x509.KeyUsage.oid}


def _parse_cert(cache: _Caches, der: bytes, what: str) -> _Cert:
    cached = cache.certs.get(der)
    if cached is not None:
        return cached
    try:
        cert = x509.load_der_x509_certificate(der)
        exts = cert.extensions
    except ValueError as exc:
        raise VerificationError(4, f"{what} is not a DER X.509 certificate ({exc})") from None
    bc = ku = None
    unknown = []
    for ext in exts:
        if isinstance(ext.value, x509.BasicConstraints):
            bc = ext
        elif isinstance(ext.value, x509.KeyUsage):
            ku = ext.value
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            unknown.append(ext.oid.dotted_string)
    parsed = _Cert(
        cert=cert,
        subject=cert.subject.rfc4514_string(),
        not_before_ms=int(cert.not_valid_before_utc.timestamp()) * 1000,
        not_after_ms=int(cert.not_valid_after_utc.timestamp()) * 1000,
        is_ca=None if bc is None else bc.value.ca,
        bc_critical=bool(bc is not None and bc.critical),
        path_length=None if bc is None else bc.value.path_length,
        key_cert_sign=None if ku is None else ku.key_cert_sign,
        digital_signature=None if ku is None else ku.digital_signature,
        unknown_critical=tuple(unknown),
    )
    cache.certs.put(der, parsed)
    return parsed


def _check_link(cache: _Caches, issuer_der: bytes, subject_der: bytes, issuer: _Cert, subject: _Cert,
                what: str) -> None:
    """`subject` is signed by `issuer`: a pure function of the two DER blobs, so it is cached."""
    key = (issuer_der, subject_der)
    if cache.links.get(key):
        return
    try:
        subject.cert.verify_directly_issued_by(issuer.cert)
    except (ValueError, TypeError) as exc:  # name mismatch / unsupported key types
        raise VerificationError(4, f"{what} is not issued by {issuer.subject}: {exc}") from None
    except Exception:  # InvalidSignature
        raise VerificationError(4, f"{what}: signature by {issuer.subject} "
                                   "does not verify") from None
    cache.links.put(key, True)


@dataclass(frozen=True)
class _Chain:
    """A chain whose time-independent checks passed; valid only inside [not_before, not_after]."""

    certs: tuple
    not_before_ms: int
    not_after_ms: int
    leaf_key: object


def _check_chain(cache: _Caches, chain_der: tuple) -> _Chain:
    """Everything in step 4 except validity times: a pure function of the DER bytes, cached."""
    cached = cache.chains.get(chain_der)
    if cached is not None:
        return cached
    names = [f"cabundle[{i}]" for i in range(len(chain_der) - 1)] + ["certificate"]
    chain = [_parse_cert(cache, der, what) for der, what in zip(chain_der, names)]
    last = len(chain) - 1
    for i, (cert, what) in enumerate(zip(chain, names)):
        if cert.unknown_critical:
            raise VerificationError(4, f"{what} has unsupported critical extensions "
                                       f"{list(cert.unknown_critical)}")
        if i < last:
            if cert.is_ca is not True or not cert.bc_critical:
                raise VerificationError(4, f"{what} must be a CA (critical basicConstraints "
                                           f"CA:TRUE), got CA={cert.is_ca}")
            if cert.key_cert_sign is not True:
                raise VerificationError(4, f"{what} must have keyUsage keyCertSign")
            below = last - i - 1  # CA certificates that follow this one
            if cert.path_length is not None and below > cert.path_length:
                raise VerificationError(4, f"{what} allows {cert.path_length} CA certificates "
                                           f"below it, got {below}")
        else:
            if cert.is_ca:
                raise VerificationError(4, "certificate must not be a CA, got CA:TRUE")
            if cert.digital_signature is not True:
                raise VerificationError(4, "certificate must have keyUsage digitalSignature")
        if i:
            _check_link(cache, chain_der[i - 1], chain_der[i], chain[i - 1], cert, what)
    result = _Chain(tuple(zip(names, chain)), max(c.not_before_ms for c in chain),
                    min(c.not_after_ms for c in chain), chain[-1].cert.public_key())
    cache.chains.put(chain_der, result)
    return result


def _explain_validity(chain: _Chain, when: int, label: str):
    for what, cert in chain.certs:
        if not cert.not_before_ms <= when <= cert.not_after_ms:
            raise VerificationError(4, f"{what} ({cert.subject}) is not valid at the {label} "
                                       f"{_time(when)}: valid {_time(cert.not_before_ms)} .. "
                                       f"{_time(cert.not_after_ms)}")
    raise VerificationError(4, f"the chain is not valid at the {label} {_time(when)}")


def _time(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _hex(value) -> str:
    """Hex of bytes for messages; values longer than MESSAGE_HEX_BYTES are shortened."""
    if not isinstance(value, bytes):
        return repr(value)[:80]
    if len(value) > MESSAGE_HEX_BYTES:
        return f"{value[:MESSAGE_HEX_BYTES].hex()}... ({len(value)} bytes)"
    return value.hex()


class _Step:
    current = 0


class Verifier:
    """Verifies Nitro attestation documents against the root certificates it was given.

    `Verifier.production()` trusts only the bundled AWS Nitro Enclaves Root-G1. A verifier is
    safe to share between threads; reuse one to benefit from its certificate caches.
    """

    def __init__(self, trusted_roots):
        """trusted_roots: root certificates (DER); a document's cabundle[0] must equal one."""
        self.trusted_roots = tuple(bytes(r) for r in trusted_roots)
        self._cache = _Caches()

    @classmethod
    def production(cls) -> "Verifier":
        return cls([nitro_root_der()])

    def verify(self, data: bytes, *, at_ms, allow_debug: bool = False,
               expected_pcrs: Mapping[int, bytes | Collection[bytes]] | None = None,
               expected_nonce: bytes | None = None, max_age_ms: int | None = None,
               evidence: bytes | None = None) -> VerifiedDocument:
        """Verify a Nitro attestation document; return it verified or raise VerificationError.

        at_ms: the verification time in Unix milliseconds (required; certificates must be valid
            then), or AT_DOCUMENT_TIME to use the document's own timestamp (old test vectors).
        allow_debug: accept debug enclaves (PCR0 all zero).
        expected_pcrs: {index: bytes} that must match exactly, or {index: collection of
            bytes}, an allow-list (old and new image during a rollout): each pinned index must
            equal one of its values. An empty allow-list raises (fails closed); None or {} pins
            nothing.
        expected_nonce: the nonce must be in the document, or (with `evidence`) in the evidence.
        max_age_ms: reject documents (and evidence) older than this at `at_ms`.
        evidence: a challenge evidence COSE_Sign1 to check under the document's public_key.
        """
        step = _Step()
        try:
            return _verify(step, self._cache, data, self.trusted_roots, at_ms, allow_debug,
                           expected_pcrs, expected_nonce, max_age_ms, evidence)
        except VerificationError:
            raise
        except Exception as exc:  # never fail open: anything unexpected is a rejection
            logger.debug("unexpected error in verification step %d", step.current, exc_info=True)
            raise VerificationError(max(step.current, 1),
                                    f"unexpected {type(exc).__name__}: {exc}") from None


def verify_document(data: bytes, *, roots: list[bytes], at_ms, **options) -> VerifiedDocument:
    """One-shot `Verifier(roots).verify(data, at_ms=at_ms, **options)` (no cache kept)."""
    return Verifier(roots).verify(data, at_ms=at_ms, **options)


def _verify(step, cache, data, roots, at_ms, allow_debug, expected_pcrs, expected_nonce, max_age_ms,
            evidence) -> VerifiedDocument:
    # (1) COSE_Sign1 structure, tagged or untagged.
    step.current = 1
    if not isinstance(data, (bytes, bytearray)):
        raise VerificationError(1, f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise VerificationError(1, "empty document")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise VerificationError(1, f"document is {len(data)} bytes, limit {MAX_DOCUMENT_BYTES}")
    try:
        unverified = cose.decode_sign1(data)
    except cose.CoseError as exc:
        raise VerificationError(1, str(exc)) from None
    if unverified.protected != {cose.HEADER_ALG: cose.ALG_ES384}:
        raise VerificationError(1, f"protected header: expected {{1: -35}} (ES384), "
                                   f"got {unverified.protected!r}")
    if not 1 <= len(unverified.payload) <= MAX_PAYLOAD_BYTES:
        raise VerificationError(1, f"payload is {len(unverified.payload)} bytes, expected "
                                   f"1..{MAX_PAYLOAD_BYTES}")

    # (2) Payload field types and sizes.
    step.current = 2
    try:
        payload = cose.loads_strict(unverified.payload)
    except cose.CoseError as exc:
        raise VerificationError(2, f"payload: {exc}") from None
    fields = _check_payload(payload)
    timestamp_ms = fields["timestamp"]
    at = timestamp_ms if at_ms is AT_DOCUMENT_TIME else at_ms
    if type(at) is not int or at < 0:
        raise VerificationError(2, "at_ms must be Unix milliseconds or AT_DOCUMENT_TIME, "
                                   f"got {at!r:.40}")

    # (3) cabundle[0] equals a pinned root.
    step.current = 3
    cabundle = fields["cabundle"]
    if not roots:
        raise VerificationError(3, "no trusted roots given")
    root_der = next((r for r in roots if r == cabundle[0]), None)
    if root_der is None:
        got = hashlib.sha256(cabundle[0]).hexdigest()
        want = ", ".join(hashlib.sha256(r).hexdigest() for r in roots)
        raise VerificationError(3, f"cabundle[0] is not a pinned root: expected SHA-256 one of "
                                   f"[{want}], got {got}")

    # (4) Chain root -> ... -> certificate: signatures, basicConstraints, keyUsage, validity.
    step.current = 4
    chain = _check_chain(cache, tuple(cabundle) + (fields["certificate"],))
    for when, label in ((at, "verification time"), (timestamp_ms, "document timestamp")):
        if not chain.not_before_ms <= when <= chain.not_after_ms:
            _explain_validity(chain, when, label)

    # (5) ES384 over ["Signature1", protected (original bytes), b"", payload].
    step.current = 5
    leaf_key = chain.leaf_key
    if not (isinstance(leaf_key, ec.EllipticCurvePublicKey)
            and isinstance(leaf_key.curve, ec.SECP384R1)):
        raise VerificationError(5, f"certificate key must be EC P-384 for ES384, got "
                                   f"{type(leaf_key).__name__}")
    try:
        cose.verify(leaf_key, cose.ALG_ES384, unverified.protected_bytes, unverified.payload,
                    unverified.signature)
    except cose.CoseError as exc:
        raise VerificationError(5, str(exc)) from None

    # (6) PCRs: the debug rule, then the expected values.
    step.current = 6
    pcrs = fields["pcrs"]
    pcr0 = pcrs.get(0)
    debug = pcr0 is None or not any(pcr0)
    if debug and not allow_debug:
        raise VerificationError(6, "debug enclave (PCR0 is all zero or missing) rejected; "
                                   "accept it with --allow-debug (allow_debug=True)")
    for index, allowed in sorted(_allow_lists(expected_pcrs).items()):
        got = pcrs.get(index)
        if got is None or not _one_of(got, allowed):
            shown = _hex(got) if got is not None else "absent"
            if len(allowed) == 1:
                raise VerificationError(6, f"PCR{index}: expected {_hex(allowed[0])}, got {shown}")
            raise VerificationError(6, f"PCR{index}: expected one of {len(allowed)} values "
                                       f"[{', '.join(_hex(a) for a in allowed)}], got {shown}")

    # (7) Nonce equality and maximum age.
    step.current = 7
    nonce = fields["nonce"]
    nonce_bound_by = None
    if expected_nonce is not None:
        if nonce is not None and hmac.compare_digest(nonce, expected_nonce):
            nonce_bound_by = "document"
        elif evidence is not None:
            nonce_bound_by = "evidence"  # checked in step 8
        else:
            raise VerificationError(7, f"nonce: expected {_hex(expected_nonce)}, got "
                                       f"{_hex(nonce) if nonce is not None else 'absent'}")
    if max_age_ms is not None:
        _check_age(7, "document", timestamp_ms, at, max_age_ms)

    # (8) Evidence under the document's public_key.
    step.current = 8
    claims = None
    if evidence is not None:
        claims = _check_evidence(evidence, fields["public_key"], data, expected_nonce, at,
                                 max_age_ms)

    return VerifiedDocument(
        raw=data, module_id=fields["module_id"], digest=fields["digest"],
        timestamp_ms=timestamp_ms, pcrs=dict(pcrs), certificate=fields["certificate"],
        cabundle=tuple(cabundle), public_key=fields["public_key"],
        user_data=fields["user_data"], nonce=nonce, root_der=root_der, at_ms=at, debug=debug,
        nonce_bound_by=nonce_bound_by, evidence=claims)


def _allow_lists(expected_pcrs) -> dict[int, tuple]:
    """{index: bytes} or {index: collection of bytes} as {index: tuple of bytes}.

    An index with an empty allow-list fails closed: it would otherwise pin nothing.
    """
    out = {}
    for index, allowed in (expected_pcrs or {}).items():
        if isinstance(allowed, (bytes, bytearray, memoryview)):
            allowed = (bytes(allowed),)
        elif isinstance(allowed, str):  # iterable, but never a PCR value
            raise TypeError(f"PCR{index}: expected bytes or a collection of bytes, got str")
        else:
            allowed = tuple(allowed)
        if not allowed:
            raise VerificationError(6, f"PCR{index}: the allow-list is empty: it would accept "
                                       "no document, expected at least one value")
        out[index] = allowed
    return out


def _one_of(got: bytes, allowed: tuple) -> bool:
    """Whether `got` equals one of `allowed`; every value is compared in constant time."""
    matched = False
    for want in allowed:
        matched |= hmac.compare_digest(got, want)
    return matched


def _check_payload(payload) -> dict:
    def fail(message):
        raise VerificationError(2, message)

    if not isinstance(payload, dict):
        fail(f"payload must be a CBOR map, got {type(payload).__name__}")
    unknown = [k for k in payload if k not in DOCUMENT_FIELDS]
    if unknown:
        fail(f"unexpected fields {sorted(map(repr, unknown))}")
    missing = [k for k in REQUIRED_FIELDS if payload.get(k) is None]
    if missing:
        fail(f"missing required fields {missing}")
    module_id, digest, timestamp = payload["module_id"], payload["digest"], payload["timestamp"]
    if not isinstance(module_id, str) or not 1 <= len(module_id) <= MAX_MODULE_ID_CHARS:
        fail(f"module_id must be text of 1..{MAX_MODULE_ID_CHARS} characters, "
             f"got {module_id!r:.80}")
    if digest != "SHA384":
        fail(f"digest: expected 'SHA384', got {digest!r:.40}")
    if type(timestamp) is not int or not 0 < timestamp <= MAX_TIMESTAMP_MS:
        fail(f"timestamp must be an unsigned integer > 0, got {timestamp!r:.40}")
    pcrs = payload["pcrs"]
    if not isinstance(pcrs, dict) or not 1 <= len(pcrs) <= MAX_PCRS:
        fail(f"pcrs must be a map of 1..{MAX_PCRS} entries")
    for index, value in pcrs.items():
        if type(index) is not int or not 0 <= index < MAX_PCRS:
            fail(f"PCR index must be an integer 0..{MAX_PCRS - 1}, got {index!r:.40}")
        if not isinstance(value, bytes) or len(value) != SHA384_BYTES:
            got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
            fail(f"PCR{index} must be {SHA384_BYTES} bytes (SHA384), got {got}")
    certificate, cabundle = payload["certificate"], payload["cabundle"]
    if not isinstance(certificate, bytes) or not 1 <= len(certificate) <= MAX_CERT_BYTES:
        fail(f"certificate must be 1..{MAX_CERT_BYTES} bytes")
    if not isinstance(cabundle, list) or not 1 <= len(cabundle) <= MAX_CABUNDLE_CERTS:
        fail(f"cabundle must be an array of 1..{MAX_CABUNDLE_CERTS} certificates")
    for i, entry in enumerate(cabundle):
        if not isinstance(entry, bytes) or not 1 <= len(entry) <= MAX_CERT_BYTES:
            fail(f"cabundle[{i}] must be 1..{MAX_CERT_BYTES} bytes")
    out = {"module_id": module_id, "digest": digest, "timestamp": timestamp, "pcrs": pcrs,
           "certificate": certificate, "cabundle": cabundle}
    for name, low in (("public_key", 1), ("user_data", 0), ("nonce", 0)):
        value = payload.get(name)  # CBOR null means absent
        if value is not None and (not isinstance(value, bytes)
                                  or not low <= len(value) <= MAX_USER_FIELD_BYTES):
            got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
            fail(f"{name} must be {low}..{MAX_USER_FIELD_BYTES} bytes, got {got}")
        out[name] = value
    return out


def _describe_size(value) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__


def _check_age(step: int, what: str, timestamp_ms: int, at: int, max_age_ms: int) -> None:
    age = at - timestamp_ms
    if age > max_age_ms:
        raise VerificationError(step, f"{what} is {age} ms old at {_time(at)}, expected at most "
                                      f"{max_age_ms} ms")
    if -age > MAX_FUTURE_SKEW_MS:
        raise VerificationError(step, f"{what} timestamp {_time(timestamp_ms)} is {-age} ms in "
                                      f"the future, expected at most {MAX_FUTURE_SKEW_MS} ms")


def _check_evidence(evidence: bytes, public_key: bytes | None, document: bytes,
                    expected_nonce: bytes | None, at: int, max_age_ms: int | None) -> dict:
    if expected_nonce is None:
        raise VerificationError(8, "evidence can only be checked against an expected nonce")
    if public_key is None:
        raise VerificationError(8, "the document has no public_key to check the evidence with")
    try:
        claims = signed_claims.verify_claims(evidence, public_key, signed_claims.INTENT_CHALLENGE)
    except signed_claims.ClaimsError as exc:
        raise VerificationError(8, f"evidence: {exc}") from None
    nonce, digest = claims.get("nonce"), claims.get("document_sha384")
    ts = claims.get("timestamp_ms")
    if not isinstance(nonce, bytes) or not hmac.compare_digest(nonce, expected_nonce):
        raise VerificationError(8, f"evidence nonce: expected {_hex(expected_nonce)}, "
                                   f"got {_hex(nonce)}")
    want = hashlib.sha384(document).digest()
    if not isinstance(digest, bytes) or not hmac.compare_digest(digest, want):
        raise VerificationError(8, f"evidence document_sha384: expected {want.hex()}, "
                                   f"got {_hex(digest)}")
    if type(ts) is not int or ts <= 0:
        raise VerificationError(8, "evidence timestamp_ms must be a positive integer, "
                                   f"got {ts!r:.40}")
    if max_age_ms is not None:
        _check_age(8, "evidence", ts, at, max_age_ms)
    user_data = claims.get("user_data")  # the challenge's user_data, when one was sent
    if "user_data" in claims and (not isinstance(user_data, bytes)
                                  or len(user_data) > MAX_USER_FIELD_BYTES):
        raise VerificationError(8, f"evidence user_data must be 0..{MAX_USER_FIELD_BYTES} bytes, "
                                   f"got {_describe_size(user_data)}")
    return claims


def verify_response(verified: VerifiedDocument, result, signature: bytes, *,
                    request_body: bytes | None = None) -> dict:
    """Step (8) for a watermark answer: `signature` is a COSE_Sign1 under the document's
    public_key with intent watermark/v1, response_sha256 = SHA-256(canonical_json(result)) and,
    when `request_body` is given, request_sha256 = SHA-256(request_body). Returns the claims."""
    try:
        if verified.public_key is None:
            raise VerificationError(8, "the document has no public_key to check the response with")
        try:
            claims = signed_claims.verify_claims(signature, verified.public_key,
                                            signed_claims.INTENT_WATERMARK)
        except signed_claims.ClaimsError as exc:
            raise VerificationError(8, f"response signature: {exc}") from None
        checks = [("response_sha256", signed_claims.sha256(signed_claims.canonical_json(result)))]
        if request_body is not None:
            checks.append(("request_sha256", signed_claims.sha256(request_body)))
        for name, want in checks:
            got = claims.get(name)
            if not isinstance(got, bytes) or not hmac.compare_digest(got, want):
                raise VerificationError(8, f"{name}: expected {want.hex()}, got {_hex(got)}")
        if type(claims.get("timestamp_ms")) is not int:
            raise VerificationError(8, "response timestamp_ms must be an integer")
        return claims
    except VerificationError:
        raise
    except Exception as exc:
        raise VerificationError(8, f"unexpected {type(exc).__name__}: {exc}") from None
