"""The attested signing identity: signs CBOR claims (enclave.nitro.claims) as COSE_Sign1.

Its public key (DER SubjectPublicKeyInfo) is the attestation document's `public_key`.
"""

from __future__ import annotations

import hashlib
import logging

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .errors import EnclaveError
from .nitro import cose
from .nitro.claims import MAX_CLAIMS_BYTES, ClaimsError

logger = logging.getLogger(__name__)

class IdentityError(EnclaveError):
    """A signing key that cannot be used (wrong type, unreadable PEM)."""


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
