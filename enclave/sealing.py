"""Sealing of Google refresh tokens with AES-256-GCM (DESIGN.md section 9).

Format: `v1.<b64url nonce>.<b64url ciphertext+tag>` (unpadded base64url, canonical). The
additional authenticated data binds the purpose and the OAuth client id, so a sealed token only
unseals for the client it was issued to. Every failure is one SealingError with no detail that
helps an attacker (and never the token).
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import EnclaveError

VERSION = "v1"
PURPOSE = b"google-refresh-token/v1"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce; random per seal (2^32 seals per key stay far below risk)
TAG_BYTES = 16
# Largest refresh token sealed, in bytes of UTF-8. Google documents refresh tokens of up to 512
# bytes (they are ~100 today); 4 KiB is 8x that, so any token Google returns fits, while the
# sealed form (under 5.5 KiB of text) stays far below the 64 KiB request body limit. A token over
# it is refused with a clear 502 by enclave.google, never dropped silently.
MAX_TOKEN_BYTES = 4 * 1024
MAX_SEALED_CHARS = 4 + 16 + 1 + ((MAX_TOKEN_BYTES + TAG_BYTES) * 4 + 2) // 3


class SealingError(EnclaveError):
    """A token could not be sealed or unsealed (wrong key or client, tampered, malformed)."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict unpadded base64url: a non-canonical encoding (spare bits set) is refused."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SealingError("sealed token is malformed") from None
    if _b64encode(data) != text:
        raise SealingError("sealed token is malformed")
    return data


def _aad(client_id: str) -> bytes:
    return PURPOSE + b"\x00" + client_id.encode("utf-8")


def _aead(key: bytes) -> AESGCM:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise SealingError(f"sealing key must be {KEY_BYTES} bytes")
    return AESGCM(bytes(key))


def seal(key: bytes, token: str, client_id: str) -> str:
    """Encrypt `token` for `client_id`; returns `v1.<nonce>.<ciphertext+tag>`."""
    plaintext = token.encode("utf-8")
    if not plaintext or len(plaintext) > MAX_TOKEN_BYTES:
        raise SealingError(f"token must be 1..{MAX_TOKEN_BYTES} bytes")
    nonce = os.urandom(NONCE_BYTES)
    sealed = _aead(key).encrypt(nonce, plaintext, _aad(client_id))
    return f"{VERSION}.{_b64encode(nonce)}.{_b64encode(sealed)}"


def unseal(key: bytes, sealed: str, client_id: str) -> str:
    """Decrypt a sealed token for `client_id`, or raise SealingError."""
    aead = _aead(key)
    if not isinstance(sealed, str) or len(sealed) > MAX_SEALED_CHARS:
        raise SealingError("sealed token is malformed")
    parts = sealed.split(".")
    if len(parts) != 3:
        raise SealingError("sealed token is malformed")
    if parts[0] != VERSION:
        raise SealingError(f"sealed token version must be {VERSION}")
    nonce, ciphertext = _b64decode(parts[1]), _b64decode(parts[2])
    if len(nonce) != NONCE_BYTES or len(ciphertext) <= TAG_BYTES:
        raise SealingError("sealed token is malformed")
    try:
        plaintext = aead.decrypt(nonce, ciphertext, _aad(client_id))
        return plaintext.decode("utf-8")
    except (InvalidTag, UnicodeDecodeError):
        raise SealingError(
            "sealed token does not verify (wrong key or client, or altered)") from None
