"""Sealed deliveries (ENCLAVE_SECRETS_SOURCE=kms): the parent relays ciphertext only.

A delivery is `{"SEALED_SECRETS": <envelope>, "AWS_CREDENTIALS": {...}, "AWS_REGION": "..."}`
(docs/DESIGN.md §15). Opening it, in the order of the design's steps:
(1) the envelope names the pinned key, its bundle_version is no rollback (enclave.envelope);
(2)-(5) KMS Decrypt with a Recipient attestation document for a one-shot RSA key, and the CMS
answer opened inside the enclave (enclave.kms); (6) AES-256-GCM open of the payload
(enclave.envelope). The payload then goes through the plaintext validator unchanged.

The credentials are used for this one call: never stored, logged or answered.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

from . import envelope, kms
from .envelope import EnvelopeError
from .kms import KmsError
from .secrets import KNOWN_KEYS, Bundle, PlaintextRefused, SealedRefused, UnknownKey

SEALED_SECRETS, AWS_CREDENTIALS, AWS_REGION = "SEALED_SECRETS", "AWS_CREDENTIALS", "AWS_REGION"
DELIVERY_KEYS = (SEALED_SECRETS, AWS_CREDENTIALS, AWS_REGION)


class SealedSecretsOpener:
    """Opens sealed deliveries for the one KMS key pinned in the image (ENCLAVE_KMS_KEY_ARN).

    attest(spki_der) -> a document binding that public key (NSM or dev-shim); transport: an
    enclave.outbound.OutboundClient trusting only the Amazon roots (or a fake's CA locally).
    """

    def __init__(self, key_arn: str, *, attest: Callable[[bytes], bytes], transport,
                 endpoint: str | None = None, timeout_s: float = kms.TIMEOUT_S, clock=time.time):
        self.key_arn = key_arn
        self._attest = attest
        self._transport = transport
        self._endpoint = endpoint
        self.timeout_s = timeout_s
        self._clock = clock

    def open(self, delivery: dict, last_bundle_version: int | None) -> tuple[dict, Bundle]:
        """(payload, Bundle), or a SecretsError whose `code` is the ack's (the
        envelope's and KMS's own codes travel as SealedRefused). Nothing here changes what is
        in force."""
        try:
            return self._open(delivery, last_bundle_version)
        except (EnvelopeError, KmsError) as exc:
            raise SealedRefused(exc.code, exc.message) from None

    def _open(self, delivery: dict, last_bundle_version: int | None) -> tuple[dict, Bundle]:
        plaintext = [k for k in delivery if k in KNOWN_KEYS]
        if plaintext:
            raise PlaintextRefused(f"{', '.join(plaintext)}: plaintext secrets are refused; "
                                   "this enclave accepts only a sealed envelope "
                                   f"({SEALED_SECRETS}, ENCLAVE_SECRETS_SOURCE=kms)")
        unknown = [k for k in delivery if k not in DELIVERY_KEYS]
        if unknown:
            raise UnknownKey(f"a sealed delivery holds only {', '.join(DELIVERY_KEYS)}; "
                             f"got {len(unknown)} other key(s)")
        # (1) the pinned key and no rollback, before anything costs a key or a call
        sealed = envelope.check_pinned(envelope.parse(delivery.get(SEALED_SECRETS)),
                                       self.key_arn, last_bundle_version)
        now = self._clock()
        credentials = kms.AwsCredentials.from_delivery(delivery.get(AWS_CREDENTIALS), now=now)
        region = delivery.get(AWS_REGION, sealed.region)
        # (2)-(5) KMS, with a recipient document for a key made for this call only
        data_key = kms.unwrap_data_key(sealed, credentials=credentials, region=region,
                                       attest=self._attest, transport=self._transport,
                                       endpoint=self._endpoint, now=now,
                                       timeout=self.timeout_s)
        # (6) the payload, authenticated with the envelope's AAD
        return envelope.open(sealed, data_key), Bundle(sealed.bundle_version, _digest(sealed))


def _digest(sealed: envelope.Envelope) -> bytes:
    """What identifies an envelope's contents: its encrypted data key, nonce and ciphertext."""
    parts = (sealed.encrypted_data_key, sealed.nonce, sealed.ciphertext)
    return hashlib.sha256(b"".join(len(p).to_bytes(4, "big") + p for p in parts)).digest()
