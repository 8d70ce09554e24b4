"""COSE_Sign1 (RFC 9052) encode/decode and ES384 / EdDSA signatures over its Sig_structure.

Signatures are always computed over the ORIGINAL protected-header bytes, never a re-encoding.
ES384 signatures are raw r||s (96 bytes), as COSE and the Nitro documents use them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ..errors import EnclaveError

COSE_SIGN1_TAG = 18
HEADER_ALG = 1  # COSE header label "alg"
ALG_ES384 = -35
ALG_EDDSA = -8
ALG_NAMES = {ALG_ES384: "ES384", ALG_EDDSA: "EdDSA"}
P384_SCALAR_BYTES = 48
ES384_SIGNATURE_BYTES = 2 * P384_SCALAR_BYTES  # raw r||s
ED25519_SIGNATURE_BYTES = 64
MAX_SIGN1_BYTES = 64 * 1024  # a Nitro document is < 12 KiB; claims are < 1 KiB
MAX_CBOR_DEPTH = 16  # COSE_Sign1 and the Nitro payload nest 3 levels; nothing legit goes deeper
SIGNATURE1_CONTEXT = "Signature1"
_ES384 = ec.ECDSA(hashes.SHA384())  # immutable: one instance for every ES384 sign and verify


class CoseError(EnclaveError):
    """Malformed COSE_Sign1, unsupported algorithm or a signature that does not verify."""


@dataclass(frozen=True)
class Sign1:
    """A decoded COSE_Sign1. `protected_bytes` are kept exactly as received."""

    protected_bytes: bytes
    protected: dict
    unprotected: dict
    payload: bytes
    signature: bytes
    tagged: bool

    @property
    def alg(self):
        return self.protected.get(HEADER_ALG)


def loads_strict(data: bytes, max_depth: int = MAX_CBOR_DEPTH):
    """Decode exactly one CBOR item: no duplicate map keys, bounded depth, no trailing bytes.

    Definite and indefinite lengths are both accepted: AWS has encoded the attestation payload
    (and NSM answers) with indefinite-length maps since early 2026. Chunks of an indefinite
    string must be definite strings of the same type (cbor2 enforces it). Signatures are always
    checked over the bytes as received, never a re-encoding, so this weakens nothing.
    """
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp, allow_indefinite=True, allow_duplicate_keys=False,
                                  max_depth=max_depth).decode()
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, ...)
        raise CoseError(f"malformed CBOR: {exc}") from None
    if fp.tell() != len(data):
        raise CoseError(f"{len(data) - fp.tell()} trailing bytes after the CBOR item")
    return value


def protected_header(alg: int) -> bytes:
    """The protected header bytes for `alg` alone: {1: -35} encodes as a1 01 38 22."""
    return cbor2.dumps({HEADER_ALG: alg})


def _bstr(data: bytes) -> bytes:
    """CBOR byte string (major type 2) with the shortest length encoding, as cbor2 writes it."""
    n = len(data)
    if n < 24:
        head = bytes([0x40 | n])
    elif n < 0x100:
        head = bytes([0x58, n])
    elif n < 0x10000:
        head = b"\x59" + n.to_bytes(2, "big")
    elif n < 0x100000000:
        head = b"\x5a" + n.to_bytes(4, "big")
    else:
        head = b"\x5b" + n.to_bytes(8, "big")
    return head + data


_ARRAY4 = b"\x84"
_SIGNATURE1 = cbor2.dumps(SIGNATURE1_CONTEXT)
_EMPTY_MAP = b"\xa0"
_TAG18 = b"\xd2"


def sig_structure(protected_bytes: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """The bytes that are signed: CBOR ["Signature1", protected, external_aad, payload].

    Built by concatenation (this runs once per signature); equal to cbor2.dumps of the list.
    """
    return b"".join((_ARRAY4, _SIGNATURE1, _bstr(protected_bytes), _bstr(external_aad),
                     _bstr(payload)))


def encode_sign1(protected_bytes: bytes, payload: bytes, signature: bytes,
                 unprotected: dict | None = None, *, tagged: bool = False) -> bytes:
    """CBOR [protected, unprotected, payload, signature], tagged 18 if asked."""
    body = b"".join((_ARRAY4, _bstr(protected_bytes), cbor2.dumps(dict(unprotected or {})),
                     _bstr(payload), _bstr(signature)))
    return (_TAG18 + body) if tagged else body


def decode_sign1(data: bytes) -> Sign1:
    """Parse a tagged (18) or untagged COSE_Sign1; checks structure only, not the signature."""
    if not isinstance(data, (bytes, bytearray)):
        raise CoseError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_SIGN1_BYTES:
        raise CoseError(f"COSE_Sign1 is {len(data)} bytes, limit {MAX_SIGN1_BYTES}")
    value = loads_strict(bytes(data))
    tagged = isinstance(value, cbor2.CBORTag)
    if tagged:
        if value.tag != COSE_SIGN1_TAG:
            raise CoseError(f"expected CBOR tag {COSE_SIGN1_TAG} (COSE_Sign1), got tag {value.tag}")
        value = value.value
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        got = f"array of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__
        raise CoseError(f"expected a 4-element COSE_Sign1 array, got {got}")
    protected_bytes, unprotected, payload, signature = value
    if not isinstance(protected_bytes, bytes):
        raise CoseError("protected header must be a byte string, "
                        f"got {type(protected_bytes).__name__}")
    if not isinstance(unprotected, Mapping):  # a frozendict inside a tag
        raise CoseError(f"unprotected header must be a map, got {type(unprotected).__name__}")
    if not isinstance(payload, bytes):
        raise CoseError(f"payload must be a byte string, got {type(payload).__name__}")
    if not isinstance(signature, bytes):
        raise CoseError(f"signature must be a byte string, got {type(signature).__name__}")
    protected = loads_strict(protected_bytes) if protected_bytes else {}
    if not isinstance(protected, dict):
        raise CoseError(f"protected header must encode a map, got {type(protected).__name__}")
    return Sign1(protected_bytes, protected, dict(unprotected), payload, signature, tagged)


def alg_for_key(key) -> int:
    """The COSE alg for a private or public key: Ed25519 -> EdDSA, EC P-384 -> ES384."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return ALG_EDDSA
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if isinstance(key.curve, ec.SECP384R1):
            return ALG_ES384
        raise CoseError(f"EC curve {key.curve.name} is not supported (use P-384)")
    raise CoseError(f"key type {type(key).__name__} is not supported (use Ed25519 or EC P-384)")


def sign(private_key, alg: int, protected_bytes: bytes, payload: bytes) -> bytes:
    """Sign the Sig_structure; ES384 answers raw r||s (96 bytes), EdDSA 64 bytes.

    `alg` must be alg_for_key(private_key) (callers check once, not per signature).
    """
    return _sign_bytes(private_key, alg, sig_structure(protected_bytes, payload))


def _sign_bytes(private_key, alg: int, to_sign: bytes) -> bytes:
    if alg == ALG_EDDSA:
        return private_key.sign(to_sign)
    if alg != ALG_ES384:
        raise CoseError(f"unsupported COSE alg {alg!r}")
    r, s = decode_dss_signature(private_key.sign(to_sign, _ES384))
    return r.to_bytes(P384_SCALAR_BYTES, "big") + s.to_bytes(P384_SCALAR_BYTES, "big")


def verify(public_key, alg: int, protected_bytes: bytes, payload: bytes, signature: bytes) -> None:
    """Verify a signature over the Sig_structure or raise CoseError (one message per cause)."""
    if alg not in ALG_NAMES:
        raise CoseError(f"unsupported COSE alg {alg!r} (expected ES384 -35 or EdDSA -8)")
    key_alg = alg_for_key(public_key)
    if key_alg != alg:
        raise CoseError(f"alg {ALG_NAMES[alg]} does not match the key ({ALG_NAMES[key_alg]})")
    to_sign = sig_structure(protected_bytes, payload)
    try:
        if alg == ALG_EDDSA:
            if len(signature) != ED25519_SIGNATURE_BYTES:
                raise CoseError(f"EdDSA signature must be {ED25519_SIGNATURE_BYTES} bytes, "
                                f"got {len(signature)}")
            public_key.verify(signature, to_sign)
        else:
            public_key.verify(raw_to_der(signature), to_sign, _ES384)
    except InvalidSignature:
        raise CoseError(f"{ALG_NAMES[alg]} signature does not verify") from None


def raw_to_der(signature: bytes) -> bytes:
    """ES384 raw r||s (exactly 96 bytes) to the DER form cryptography expects."""
    if len(signature) != ES384_SIGNATURE_BYTES:
        raise CoseError(f"ES384 signature must be {ES384_SIGNATURE_BYTES} bytes raw r||s, "
                        f"got {len(signature)} bytes")
    r = int.from_bytes(signature[:P384_SCALAR_BYTES], "big")
    s = int.from_bytes(signature[P384_SCALAR_BYTES:], "big")
    return encode_dss_signature(r, s)


class Signer:
    """COSE_Sign1 for one key, protected header {1: alg}, empty unprotected header, no
    external_aad. Everything before the payload is encoded once: the Sig_structure
    ["Signature1", protected, h'', payload] and the COSE_Sign1 [protected, {}, payload, sig]
    are each a cached prefix + bstr(payload) (+ bstr(sig)), equal to their cbor2 encodings."""

    def __init__(self, private_key):
        self._key = private_key
        self.alg = alg_for_key(private_key)  # CoseError for an unsupported key
        self.protected = protected_header(self.alg)
        self._to_sign_prefix = b"".join((_ARRAY4, _SIGNATURE1, _bstr(self.protected), _bstr(b"")))
        self._sign1_prefix = b"".join((_ARRAY4, _bstr(self.protected), _EMPTY_MAP))

    def sign1(self, payload: bytes, *, tagged: bool = False) -> bytes:
        payload_bstr = _bstr(payload)
        signature = _sign_bytes(self._key, self.alg, self._to_sign_prefix + payload_bstr)
        body = b"".join((self._sign1_prefix, payload_bstr, _bstr(signature)))
        return (_TAG18 + body) if tagged else body


def sign1(private_key, payload: bytes, *, tagged: bool = False) -> bytes:
    """A complete COSE_Sign1 over `payload`, protected header {1: alg} for the key."""
    return Signer(private_key).sign1(payload, tagged=tagged)
