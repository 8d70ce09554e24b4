"""Decoding documents as people pass them around: raw CBOR, base64 (standard or URL-safe), hex."""

from __future__ import annotations

import base64
import binascii
import re

_B64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
_HEX = re.compile(rb"[0-9a-fA-F]+")
# First byte of a raw COSE_Sign1: array(4), indefinite array, or tag 18.
_RAW_COSE_FIRST_BYTES = (0x84, 0x9F, 0xD2)


def decode_b64(text: str) -> bytes:
    """Standard or URL-safe base64, whitespace ignored (ValueError otherwise)."""
    compact = "".join(text.split())
    if not _B64.fullmatch(compact):
        raise ValueError("not base64")
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def read_document_bytes(data: bytes) -> bytes:
    """A document given as raw CBOR, base64 (standard or URL-safe) or hex; ValueError if none."""
    if not data:
        raise ValueError("empty document")
    if data[0] in _RAW_COSE_FIRST_BYTES:
        return bytes(data)
    text = data.strip()
    if _HEX.fullmatch(text) and len(text) % 2 == 0:
        return bytes.fromhex(text.decode("ascii"))
    try:
        return decode_b64(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("document is neither raw CBOR, base64 nor hex") from None
