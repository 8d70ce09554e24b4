"""Claims signed by an enclave's attested identity, and their pure check.

The identity's public key (DER SubjectPublicKeyInfo) is the attestation document's `public_key`,
so a third party holding a verified document can check anything that identity signed:

- challenge evidence: {"intent": "attestation-challenge/v1", "nonce": bytes,
  "document_sha384": SHA-384 of the exact document bytes served, "timestamp_ms": int}
- watermark (POST /v1/rpc/watermark): {"intent": "watermark/v1", "timestamp_ms": int,
  "request_sha256": SHA-256 of the raw request body bytes,
  "response_sha256": SHA-256 of canonical_json(result)}, where `result` is the upstream JSON
  value returned to the caller.

Claims are a CBOR map in an untagged COSE_Sign1 with protected header {1: alg} only.
"""

from __future__ import annotations

import hashlib
import json

from cryptography.hazmat.primitives import serialization

from ..errors import EnclaveError
from . import cose

INTENT_CHALLENGE = "attestation-challenge/v1"
INTENT_WATERMARK = "watermark/v1"
MAX_CLAIMS_BYTES = 4 * 1024  # claims are a handful of digests and integers
MAX_PUBLIC_KEY_DER_BYTES = 1024  # the document's public_key field holds at most 1024 bytes


class ClaimsError(EnclaveError):
    """Signed claims that do not verify or do not have the expected shape."""


def canonical_json(value) -> bytes:
    """The exact bytes hashed into `response_sha256`: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def load_public_key(public_key_der: bytes):
    """A DER SubjectPublicKeyInfo holding Ed25519 or EC P-384, or ClaimsError."""
    if not isinstance(public_key_der, bytes) or not public_key_der:
        raise ClaimsError("no public key to check the signature with")
    if len(public_key_der) > MAX_PUBLIC_KEY_DER_BYTES:
        raise ClaimsError(f"public key is {len(public_key_der)} bytes, "
                          f"limit {MAX_PUBLIC_KEY_DER_BYTES}")
    try:
        key = serialization.load_der_public_key(public_key_der)
    except Exception:
        raise ClaimsError("public key is not a DER SubjectPublicKeyInfo") from None
    try:
        cose.alg_for_key(key)
    except cose.CoseError as exc:
        raise ClaimsError(f"public key: {exc}") from None
    return key


def verify_claims(cose_bytes: bytes, public_key_der: bytes, expected_intent: str) -> dict:
    """Check a COSE_Sign1 made over claims; return the claims or raise ClaimsError.

    The signature is checked before the payload is parsed. Pure: no I/O, no clock.
    """
    key = load_public_key(public_key_der)
    try:
        unverified = cose.decode_sign1(cose_bytes)
        alg = unverified.alg
        if unverified.protected != {cose.HEADER_ALG: alg}:
            raise cose.CoseError(f"protected header must be {{1: alg}} only, "
                                 f"got keys {sorted(unverified.protected, key=repr)}")
        cose.verify(key, alg, unverified.protected_bytes, unverified.payload,
                    unverified.signature)
        if len(unverified.payload) > MAX_CLAIMS_BYTES:
            raise cose.CoseError(f"claims are {len(unverified.payload)} bytes, "
                                 f"limit {MAX_CLAIMS_BYTES}")
        claims = cose.loads_strict(unverified.payload)
    except cose.CoseError as exc:
        raise ClaimsError(str(exc)) from None
    if not isinstance(claims, dict):
        raise ClaimsError(f"claims must be a CBOR map, got {type(claims).__name__}")
    intent = claims.get("intent")
    if intent != expected_intent:
        raise ClaimsError(f"intent: expected {expected_intent!r}, got {intent!r}")
    return claims
