"""Sealing of Google refresh tokens with AES-256-GCM under a keyring (docs/DESIGN.md §9).

A trust core: it takes keys, tokens and client ids and does no I/O.

Format v2 (what `seal` makes): `v2.<kid>.<b64url nonce>.<b64url ciphertext+tag>`, unpadded
base64url, canonical. `kid` names the key (`key_id`: a hash of it, not secret), so `unseal`
picks the key without trying each one, and says so when the key is gone. The additional
authenticated data binds the purpose, the kid and the OAuth client id: a sealed token only
unseals for the client it was issued to, and only under the key its kid names.

Format v1 (older tokens, still opened): `v1.<b64url nonce>.<b64url ciphertext+tag>`, AAD purpose
and client id. It names no key, so `unseal` tries the current key, then each previous one.

A Keyring holds the current key (every seal) and up to MAX_PREVIOUS_KEYS previous ones (only
unseal). `needs_reseal` tells a caller that a token it opened should be handed back sealed under
the current key, so clients migrate. Every failure is one SealingError; no message holds a key
or a token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import EnclaveError

VERSION = "v2"  # what seal() makes
VERSION_V1 = "v1"  # still opened by unseal()
PURPOSE = b"google-refresh-token/v2"
PURPOSE_V1 = b"google-refresh-token/v1"
KID_CONTEXT = b"enclave-token-sealing-kid/v1\x00"  # domain separation for key_id's hash
KID_BYTES = 8  # 64 bits: names one of at most 1 + MAX_PREVIOUS_KEYS keys, collisions negligible
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce; random per seal (2^32 seals per key stay far below risk)
TAG_BYTES = 16
# Keys kept besides the current one, only to open older tokens. Each one is tried for every v1
# token (no kid) and must be kept until every token sealed under it has been refreshed; four
# covers a rotation per quarter for a year, and keeps the v1 search short.
MAX_PREVIOUS_KEYS = 4
# Largest refresh token sealed, in bytes of UTF-8. Google documents refresh tokens of up to 512
# bytes (they are ~100 today); 4 KiB is 8x that, so any token Google returns fits, while the
# sealed form (under 5.5 KiB of text) stays far below the 64 KiB request body limit. A token over
# it is refused with a clear 502 by enclave.google, never dropped silently.
MAX_TOKEN_BYTES = 4 * 1024


def _b64_chars(size: int) -> int:
    """Length of the unpadded base64 of `size` bytes."""
    return (size * 4 + 2) // 3


KID_CHARS = _b64_chars(KID_BYTES)  # 11
# The longest sealed token: v2 (the longer format) of a MAX_TOKEN_BYTES token.
MAX_SEALED_CHARS = (len(VERSION) + 1 + KID_CHARS + 1 + _b64_chars(NONCE_BYTES) + 1
                    + _b64_chars(MAX_TOKEN_BYTES + TAG_BYTES))


class SealingError(EnclaveError):
    """A token could not be sealed or unsealed (wrong key or client, tampered, malformed, key
    gone), or a keyring is unusable."""


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


def key_id(key: bytes) -> str:
    """The key's name in v2 tokens: unpadded base64url of the first KID_BYTES of
    SHA-256(KID_CONTEXT + key). Not secret (it reveals nothing usable about the key)."""
    _check_key(key)
    return _b64encode(hashlib.sha256(KID_CONTEXT + bytes(key)).digest()[:KID_BYTES])


def _check_key(key) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise SealingError(f"a sealing key must be {KEY_BYTES} bytes")


@dataclass(frozen=True)
class Keyring:
    """The current sealing key and the previous ones (newest first), each KEY_BYTES.

    Raises SealingError for a key of the wrong size, more than MAX_PREVIOUS_KEYS previous keys
    or a key given twice. The repr shows kids only, never a key.
    """

    current: bytes = field(repr=False)
    previous: tuple[bytes, ...] = field(default=(), repr=False)
    kids: tuple[str, ...] = field(init=False, repr=False, compare=False)  # current first

    def __post_init__(self):
        _check_key(self.current)
        if not isinstance(self.previous, tuple):
            raise SealingError("previous sealing keys must be a tuple")
        if len(self.previous) > MAX_PREVIOUS_KEYS:
            raise SealingError(f"at most {MAX_PREVIOUS_KEYS} previous sealing keys, "
                               f"got {len(self.previous)}")
        for key in self.previous:
            _check_key(key)
        object.__setattr__(self, "current", bytes(self.current))
        object.__setattr__(self, "previous", tuple(bytes(k) for k in self.previous))
        object.__setattr__(self, "kids", tuple(key_id(k) for k in self.keys))
        if len(set(self.kids)) != len(self.kids):
            raise SealingError("a sealing key appears twice in the keyring")

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Every key, current first."""
        return (self.current,) + self.previous

    @property
    def current_kid(self) -> str:
        return self.kids[0]

    def __repr__(self) -> str:
        return f"Keyring(kids={self.kids!r})"


def _aad(kid: str, client_id: str) -> bytes:
    return PURPOSE + b"\x00" + kid.encode("ascii") + b"\x00" + client_id.encode("utf-8")


def _aad_v1(client_id: str) -> bytes:
    return PURPOSE_V1 + b"\x00" + client_id.encode("utf-8")


def seal(keyring: Keyring, token: str, client_id: str) -> str:
    """Encrypt `token` for `client_id` under the current key: `v2.<kid>.<nonce>.<ct+tag>`."""
    plaintext = token.encode("utf-8")
    if not plaintext or len(plaintext) > MAX_TOKEN_BYTES:
        raise SealingError(f"token must be 1..{MAX_TOKEN_BYTES} bytes")
    kid = keyring.current_kid
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(keyring.current).encrypt(nonce, plaintext, _aad(kid, client_id))
    return f"{VERSION}.{kid}.{_b64encode(nonce)}.{_b64encode(sealed)}"


def _open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> str | None:
    """The plaintext, or None when the tag does not verify (or it is not UTF-8)."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad).decode("utf-8")
    except (InvalidTag, UnicodeDecodeError):
        return None


def _nonce_and_ciphertext(nonce_text: str, ciphertext_text: str) -> tuple[bytes, bytes]:
    nonce, ciphertext = _b64decode(nonce_text), _b64decode(ciphertext_text)
    if len(nonce) != NONCE_BYTES or len(ciphertext) <= TAG_BYTES:
        raise SealingError("sealed token is malformed")
    return nonce, ciphertext


def unseal(keyring: Keyring, sealed: str, client_id: str) -> tuple[str, str]:
    """Decrypt a sealed token for `client_id`: (token, kid of the key that opened it).

    v2: the key its kid names (a kid not in the keyring: SealingError saying the key is gone).
    v1: the current key, then each previous key. Raises SealingError otherwise.
    """
    if not isinstance(sealed, str) or len(sealed) > MAX_SEALED_CHARS:
        raise SealingError("sealed token is malformed")
    parts = sealed.split(".")
    if parts[0] == VERSION and len(parts) == 4:
        kid = parts[1]
        nonce, ciphertext = _nonce_and_ciphertext(parts[2], parts[3])
        if kid not in keyring.kids:
            if len(_b64decode(kid)) != KID_BYTES:
                raise SealingError("sealed token is malformed")
            raise SealingError(f"sealed under a key this enclave no longer holds (kid {kid})")
        token = _open(keyring.keys[keyring.kids.index(kid)], nonce, ciphertext,
                      _aad(kid, client_id))
        if token is not None:
            return token, kid
    elif parts[0] == VERSION_V1 and len(parts) == 3:
        nonce, ciphertext = _nonce_and_ciphertext(parts[1], parts[2])
        for key, kid in zip(keyring.keys, keyring.kids):
            token = _open(key, nonce, ciphertext, _aad_v1(client_id))
            if token is not None:
                return token, kid
    elif parts[0] in (VERSION, VERSION_V1):
        raise SealingError("sealed token is malformed")
    else:
        raise SealingError(f"sealed token version must be {VERSION} or {VERSION_V1}")
    raise SealingError("sealed token does not verify (wrong key or client, or altered)")


def needs_reseal(keyring: Keyring, sealed: str) -> bool:
    """True when `sealed` (already opened by `unseal`) is not a v2 token under the current key:
    the caller should hand the token back sealed anew, so clients migrate off old keys."""
    return not sealed.startswith(f"{VERSION}.{keyring.current_kid}.")
