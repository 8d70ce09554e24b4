"""Sealed-token test data with provenance (STYLE.md 11): never edit these values.

V1_SEALED was made by the v1 code itself, `enclave.sealing.seal(V1_KEY, V1_TOKEN, V1_CLIENT)` at
commit 243f31a164c681103ed334e9bada67a4b9de5f8e (the last commit with v1 sealing), where
V1_KEY = SHA-256(b"enclave sealing v1 test vector key"). It proves that tokens sealed before the
keyring still open.

`seal_v1` writes the v1 format independently of enclave.sealing (AES-256-GCM, AAD
`google-refresh-token/v1` NUL client id), so tests can make v1 tokens for the refresh tokens a
fake Google issues; tests.test_sealing checks that it reproduces V1_SEALED from its nonce.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.support import remember_secret

V1_KEY = hashlib.sha256(b"enclave sealing v1 test vector key").digest()
V1_TOKEN = "1//0gV1-vector-refresh-token-made-by-the-v1-code"
V1_CLIENT = "123-abc.apps.googleusercontent.com"
V1_SEALED = ("v1.fj-T5h_Qc9ljjmiP.8I2NcmpsGEg3WklZbGqkL2mYlWBA9yg0munFLSPy1wHFK5ajkA-OPrT3D6yo3ns"
             "Tx_fQAjOIMCXP-ALiFCVe6w")
remember_secret(V1_KEY, kind="token sealing key (v1 vector)")
remember_secret(V1_TOKEN, kind="google refresh token (v1 vector)")
remember_secret(V1_SEALED, kind="sealed refresh token (v1 vector)")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def seal_v1(key: bytes, token: str, client_id: str, nonce: bytes | None = None) -> str:
    """A v1 sealed token, as the code before the keyring made it."""
    nonce = os.urandom(12) if nonce is None else nonce
    aad = b"google-refresh-token/v1\x00" + client_id.encode("utf-8")
    sealed = AESGCM(key).encrypt(nonce, token.encode("utf-8"), aad)
    return f"v1.{_b64(nonce)}.{_b64(sealed)}"
