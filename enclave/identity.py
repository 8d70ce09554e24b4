"""The attested signing identity: signs CBOR claims as COSE_Sign1; a pure check for verifiers.

The identity's public key (DER SubjectPublicKeyInfo) is the attestation document's `public_key`,
so a third party holding a verified document can check anything this identity signed.

Claims signed today (CBOR maps; digests are raw bytes):

- challenge evidence: {"intent": "attestation-challenge/v1", "nonce": bytes,
  "document_sha384": SHA-384 of the exact document bytes served, "timestamp_ms": int}
- watermark (POST /v1/rpc/watermark): {"intent": "watermark/v1", "timestamp_ms": int,
  "request_sha256": SHA-256 of the raw request body bytes,
  "response_sha256": SHA-256 of canonical_json(result)}, where `result` is the upstream JSON
  value returned to the caller and canonical_json is
  json.dumps(result, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode().
"""

from __future__ import annotations

import hashlib
import json
import logging

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from . import cose
from .errors import EnclaveError

logger = logging.getLogger(__name__)

INTENT_CHALLENGE = "attestation-challenge/v1"
INTENT_WATERMARK = "watermark/v1"
MAX_CLAIMS_BYTES = 4 * 1024  # claims are a handful of digests and integers
MAX_PUBLIC_KEY_DER_BYTES = 1024  # the document's public_key field holds at most 1024 bytes


class IdentityError(EnclaveError):
    """A signing key that cannot be used (wrong type, unreadable PEM)."""


class ClaimsError(EnclaveError):
    """Signed claims that do not verify or do not have the expected shape."""


def canonical_json(value) -> bytes:
    """The exact bytes hashed into `response_sha256`: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class SigningIdentity:
    """A private key (Ed25519 -> EdDSA, EC P-384 -> ES384) and its DER public key."""

    def __init__(self, private_key, *, generated: bool = False):
        try:
            self._signer = cose.Signer(private_key)
        except cose.CoseError as exc:
            raise IdentityError(f"TEE_ATTESTATION_SIGNING_PRIVATE_KEY: {exc}") from None
        self.alg = self._signer.alg
        self.generated = generated
        self.public_key_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def alg_name(self) -> str:
        return cose.ALG_NAMES[self.alg]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER public key, hex: safe to log."""
        return hashlib.sha256(self.public_key_der).hexdigest()

    @classmethod
    def from_pem(cls, pem: bytes) -> "SigningIdentity":
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except TypeError:
            raise IdentityError("TEE_ATTESTATION_SIGNING_PRIVATE_KEY: encrypted keys are not "
                                "supported (use an unencrypted PKCS#8 PEM)") from None
        except ValueError:
            raise IdentityError("TEE_ATTESTATION_SIGNING_PRIVATE_KEY: not a readable PEM private "
                                "key (expected PKCS#8, Ed25519 or EC P-384)") from None
        except Exception as exc:  # unsupported algorithms surface as various exception types
            raise IdentityError("TEE_ATTESTATION_SIGNING_PRIVATE_KEY: unsupported key "
                                f"({type(exc).__name__}); use Ed25519 or EC P-384") from None
        return cls(key)

    @classmethod
    def generate(cls, kind: str = "ed25519") -> "SigningIdentity":
        """A fresh per-boot identity (local development only)."""
        if kind == "ed25519":
            key = ed25519.Ed25519PrivateKey.generate()
        elif kind == "p384":
            key = ec.generate_private_key(ec.SECP384R1())
        else:
            raise IdentityError(f"unknown key kind {kind!r} (ed25519 or p384)")
        return cls(key, generated=True)

    def sign_claims(self, claims: dict) -> bytes:
        """An untagged COSE_Sign1 over CBOR `claims`, protected header {1: alg}."""
        payload = cbor2.dumps(claims, canonical=True)
        if len(payload) > MAX_CLAIMS_BYTES:
            raise ClaimsError(f"claims are {len(payload)} bytes, limit {MAX_CLAIMS_BYTES}")
        return self._signer.sign1(payload)

    def __repr__(self) -> str:  # never show key material
        return f"SigningIdentity(alg={self.alg_name}, sha256={self.fingerprint[:16]})"


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
    """Check a COSE_Sign1 made by sign_claims; return its claims or raise ClaimsError.

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
