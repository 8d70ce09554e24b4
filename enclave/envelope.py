"""The sealed-secrets envelope (docs/DESIGN.md §15): strict parsing, pinning, opening, sealing.

    {"v": 1,
     "kms_key_arn": "arn:aws:kms:REGION:ACCOUNT:key/ID",
     "encryption_context": {"purpose": "enclave-secrets/v1", "bundle_version": "7"},
     "encrypted_data_key": "<base64 KMS CiphertextBlob>",
     "nonce": "<base64, 12 bytes>",
     "ciphertext": "<base64 AES-256-GCM(data key, nonce, payload) including the 16-byte tag>"}

AAD = the ASCII bytes of json.dumps({"v", "kms_key_arn", "encryption_context"}, sort_keys=True,
separators=(",", ":"), ensure_ascii=True). The plaintext is a section 4 payload (a JSON object)
plus `"bundle_version": int`, equal to the context's. `encrypted_data_key` is not in the AAD: KMS
binds it to the key and the encryption context, and refuses a tampered one.

A trust core: values in, values out; no I/O, no clock. Every failure raises EnvelopeError with a
stable `code` (ENVELOPE_CODES); no message ever contains the data key or a plaintext value.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from types import MappingProxyType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import strictjson
from .errors import EnclaveError

ENVELOPE_VERSION = 1
PURPOSE = "enclave-secrets/v1"
CONTEXT_KEYS = ("bundle_version", "purpose")  # exactly these, both required
ENVELOPE_KEYS = frozenset({"v", "kms_key_arn", "encryption_context", "encrypted_data_key",
                           "nonce", "ciphertext"})
DATA_KEY_BYTES = 32  # AES-256, GenerateDataKey KeySpec AES_256
NONCE_BYTES = 12  # the AES-GCM standard nonce
TAG_BYTES = 16  # AES-GCM full-length tag
# KMS: a CiphertextBlob is at most 6144 bytes (an AES_256 data key's is ~180).
MAX_ENCRYPTED_DATA_KEY_BYTES = 6144
# A delivery is at most 256 KiB of JSON (section 4): base64 costs 4/3, so the ciphertext of a
# deliverable envelope is below 192 KiB.
MAX_CIPHERTEXT_BYTES = 192 * 1024
MAX_ARN_CHARS = 256  # a key ARN is ~75 characters; the longest partition/region add little
MAX_BUNDLE_VERSION_DIGITS = 15  # below 2**53: exact in every JSON reader
BUNDLE_VERSION_FIELD = "bundle_version"

CODE_MALFORMED = "envelope_malformed"  # not the section 15 shape (before any key is used)
CODE_KEY_MISMATCH = "envelope_key_mismatch"  # sealed under another KMS key than the pinned one
CODE_ROLLBACK = "bundle_rollback"  # bundle_version lower than the last one applied
CODE_INVALID = "envelope_invalid"  # does not open under the data key, or inconsistent inside
ENVELOPE_CODES = (CODE_MALFORMED, CODE_KEY_MISMATCH, CODE_ROLLBACK, CODE_INVALID)

# Key ARNs only (no alias ARNs, no bare key ids): KMS answers the key ARN in Decrypt's KeyId,
# and the pin is compared with it. Partitions aws, aws-cn, aws-us-gov, aws-iso...
_KEY_ARN = re.compile(
    r"arn:(aws|aws-us-gov):kms:([a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}):([0-9]{12}):key/"
    r"((?:mrk-[0-9a-f]{32})|(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}))")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_BUNDLE_VERSION = re.compile(rf"0|[1-9][0-9]{{0,{MAX_BUNDLE_VERSION_DIGITS - 1}}}")


class EnvelopeError(EnclaveError):
    """An envelope refused; `code` is one of ENVELOPE_CODES (stable, for acks and metrics)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True, repr=False)
class Envelope:
    """A parsed envelope: well-formed, NOT yet opened (nothing here is authenticated)."""

    version: int
    kms_key_arn: str
    region: str  # from the ARN
    encryption_context: MappingProxyType  # {"purpose": ..., "bundle_version": "N"} (strings)
    bundle_version: int
    encrypted_data_key: bytes
    nonce: bytes
    ciphertext: bytes  # including the tag

    @property
    def aad(self) -> bytes:
        return aad(self.version, self.kms_key_arn, dict(self.encryption_context))

    def __repr__(self) -> str:
        return (f"Envelope(v={self.version}, kms_key_arn={self.kms_key_arn!r}, "
                f"bundle_version={self.bundle_version}, ciphertext={len(self.ciphertext)} bytes)")


def _malformed(message: str) -> EnvelopeError:
    return EnvelopeError(CODE_MALFORMED, f"sealed envelope is malformed: {message}")


def aad(version: int, kms_key_arn: str, encryption_context: dict) -> bytes:
    """The AES-GCM additional data: the canonical JSON of v, kms_key_arn, encryption_context."""
    text = json.dumps({"v": version, "kms_key_arn": kms_key_arn,
                       "encryption_context": encryption_context},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return text.encode("ascii")


def parse_key_arn(value) -> tuple[str, str]:
    """(the ARN, its region) for a KMS key ARN, or EnvelopeError (envelope_malformed)."""
    if not isinstance(value, str) or len(value) > MAX_ARN_CHARS:
        raise _malformed(f"kms_key_arn must be a key ARN string of at most {MAX_ARN_CHARS} "
                         "characters")
    match = _KEY_ARN.fullmatch(value)
    if match is None:
        raise _malformed("kms_key_arn must be arn:aws:kms:REGION:ACCOUNT:key/KEY-ID "
                         f"(a key ARN, not an alias), got {value!r}")
    return value, match[2]


def _b64(envelope: dict, name: str, low: int, high: int) -> bytes:
    """Standard base64 with padding, canonical (re-encodes to the same text), low..high bytes."""
    text = envelope[name]
    if not isinstance(text, str) or len(text) > (high + 2) // 3 * 4:
        raise _malformed(f"{name} must be a base64 string of at most {high} bytes")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise _malformed(f"{name} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise _malformed(f"{name} is not canonical base64 (padding or trailing bits)")
    if not low <= len(raw) <= high:
        expected = f"{low}" if low == high else f"{low}..{high}"
        raise _malformed(f"{name} must decode to {expected} bytes, got {len(raw)}")
    return raw


def _context(value) -> tuple[MappingProxyType, int]:
    if not isinstance(value, dict):
        raise _malformed("encryption_context must be a JSON object")
    if sorted(value) != sorted(CONTEXT_KEYS):
        raise _malformed(f"encryption_context must have exactly the keys "
                         f"{', '.join(CONTEXT_KEYS)}, got {', '.join(sorted(map(str, value)))}")
    for key, item in value.items():
        if not isinstance(item, str) or not _PRINTABLE_ASCII.fullmatch(item):
            raise _malformed(f"encryption_context.{key} must be a printable ASCII string")
    if value["purpose"] != PURPOSE:
        raise _malformed(f"encryption_context.purpose must be {PURPOSE!r}, "
                         f"got {value['purpose']!r}")
    version_text = value[BUNDLE_VERSION_FIELD]
    if not _BUNDLE_VERSION.fullmatch(version_text):
        raise _malformed(f"encryption_context.bundle_version must be a decimal integer of at "
                         f"most {MAX_BUNDLE_VERSION_DIGITS} digits without leading zeros, "
                         f"got {version_text!r}")
    return MappingProxyType(dict(value)), int(version_text)


def parse(envelope_obj) -> Envelope:
    """Check the section 15 shape strictly; return the Envelope or raise (envelope_malformed)."""
    if not isinstance(envelope_obj, dict):
        raise _malformed("expected a JSON object")
    keys = set(envelope_obj)
    if keys != ENVELOPE_KEYS:
        parts = []
        if ENVELOPE_KEYS - keys:
            parts.append("missing " + ", ".join(sorted(ENVELOPE_KEYS - keys)))
        if keys - ENVELOPE_KEYS:
            parts.append("unknown " + ", ".join(sorted(map(str, keys - ENVELOPE_KEYS)))[:200])
        raise _malformed("; ".join(parts))
    version = envelope_obj["v"]
    if type(version) is not int or version != ENVELOPE_VERSION:
        raise _malformed(f"v must be {ENVELOPE_VERSION}, got {version!r:.20}")
    arn, region = parse_key_arn(envelope_obj["kms_key_arn"])
    context, bundle_version = _context(envelope_obj["encryption_context"])
    encrypted_data_key = _b64(envelope_obj, "encrypted_data_key", 1, MAX_ENCRYPTED_DATA_KEY_BYTES)
    nonce = _b64(envelope_obj, "nonce", NONCE_BYTES, NONCE_BYTES)
    ciphertext = _b64(envelope_obj, "ciphertext", TAG_BYTES + 2, MAX_CIPHERTEXT_BYTES)
    # (TAG_BYTES + 2: the smallest plaintext is {"bundle_version":0}, far above 2 bytes.)
    return Envelope(version, arn, region, context, bundle_version, encrypted_data_key, nonce,
                    ciphertext)


def check_pinned(envelope: Envelope, pinned_arn: str,
                 last_bundle_version: int | None) -> Envelope:
    """Section 15 opening step 1: the pinned key, then no rollback. Returns the envelope.

    last_bundle_version: the highest bundle_version applied since boot (None: none yet). An
    equal version is allowed (a re-delivery of the same bundle is a no-op downstream).
    """
    if not isinstance(envelope, Envelope):
        raise TypeError("check_pinned needs a parsed Envelope")
    if not isinstance(pinned_arn, str) or envelope.kms_key_arn != pinned_arn:
        raise EnvelopeError(CODE_KEY_MISMATCH,
                            f"envelope is sealed under {envelope.kms_key_arn}, this image accepts "
                            f"only {pinned_arn}")
    if last_bundle_version is not None and envelope.bundle_version < last_bundle_version:
        raise EnvelopeError(CODE_ROLLBACK,
                            f"bundle_version {envelope.bundle_version} is lower than "
                            f"{last_bundle_version}, the last one applied (rollback refused)")
    return envelope


def open(envelope: Envelope, data_key: bytes) -> dict:  # noqa: A001 - the envelope's verb
    """Section 15 opening step 6: AES-256-GCM open with the AAD, then check the plaintext.

    Returns the payload (a dict, `bundle_version` removed) or raises EnvelopeError
    (envelope_invalid). The payload goes through the section 4 validator unchanged.
    """
    if not isinstance(envelope, Envelope):
        raise TypeError("open needs a parsed Envelope")
    if not isinstance(data_key, (bytes, bytearray)) or len(data_key) != DATA_KEY_BYTES:
        raise EnvelopeError(CODE_INVALID, f"the data key must be {DATA_KEY_BYTES} bytes")
    try:
        plaintext = AESGCM(bytes(data_key)).decrypt(envelope.nonce, envelope.ciphertext,
                                                    envelope.aad)
    except (InvalidTag, ValueError):
        raise EnvelopeError(CODE_INVALID, "sealed envelope does not open under its data key "
                                          "(tampered, or sealed with another key or context)"
                            ) from None
    # Authenticated from here on: what follows catches a sealer's mistake, not an attacker.
    try:
        payload = strictjson.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EnvelopeError(CODE_INVALID, "sealed payload is not strict UTF-8 JSON (no "
                                          "duplicate keys, no NaN)") from None
    if not isinstance(payload, dict):
        raise EnvelopeError(CODE_INVALID, "sealed payload must be a JSON object")
    inner = payload.pop(BUNDLE_VERSION_FIELD, None)
    if type(inner) is not int or inner != envelope.bundle_version:
        raise EnvelopeError(CODE_INVALID, f"sealed payload's bundle_version must be the integer "
                                          f"{envelope.bundle_version} of the encryption context")
    return payload


def seal(payload: dict, *, kms_key_arn: str, bundle_version: int, data_key: bytes,
         encrypted_data_key: bytes, nonce: bytes) -> dict:
    """The envelope (a JSON-ready dict) for `payload` under a GenerateDataKey result.

    `nonce` must be 12 fresh random bytes (never reused with the same data key); the caller
    draws it, so that this function stays free of I/O. The result passes parse().
    """
    if not isinstance(payload, dict):
        raise EnvelopeError(CODE_MALFORMED, "the payload to seal must be a JSON object")
    if BUNDLE_VERSION_FIELD in payload:
        raise EnvelopeError(CODE_MALFORMED, "the payload must not carry bundle_version: it is "
                                            "set from --bundle-version")
    if type(bundle_version) is not int or not 0 <= bundle_version < 10 ** MAX_BUNDLE_VERSION_DIGITS:
        raise EnvelopeError(CODE_MALFORMED, "bundle_version must be a non-negative integer of at "
                                            f"most {MAX_BUNDLE_VERSION_DIGITS} digits")
    if not isinstance(data_key, (bytes, bytearray)) or len(data_key) != DATA_KEY_BYTES:
        raise EnvelopeError(CODE_MALFORMED, f"the data key must be {DATA_KEY_BYTES} bytes")
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise EnvelopeError(CODE_MALFORMED, f"the nonce must be {NONCE_BYTES} bytes")
    if not isinstance(encrypted_data_key, (bytes, bytearray)):
        raise EnvelopeError(CODE_MALFORMED, "the encrypted data key must be bytes")
    context = {"purpose": PURPOSE, BUNDLE_VERSION_FIELD: str(bundle_version)}
    body = dict(payload)
    body[BUNDLE_VERSION_FIELD] = bundle_version
    try:
        plaintext = json.dumps(body, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError):
        raise EnvelopeError(CODE_MALFORMED, "the payload is not JSON-serializable") from None
    ciphertext = AESGCM(bytes(data_key)).encrypt(
        bytes(nonce), plaintext, aad(ENVELOPE_VERSION, kms_key_arn, context))
    b64 = (lambda raw: base64.b64encode(bytes(raw)).decode("ascii"))
    envelope = {"v": ENVELOPE_VERSION, "kms_key_arn": kms_key_arn,
                "encryption_context": context, "encrypted_data_key": b64(encrypted_data_key),
                "nonce": b64(nonce), "ciphertext": b64(ciphertext)}
    parse(envelope)  # the same checks the enclave makes: never emit what it would refuse
    return envelope
