"""The KMS client for sealed secrets (docs/DESIGN.md §15): Decrypt with an attested Recipient.

An I/O shell around the trust cores: `sigv4` signs, `cms` reads `CiphertextForRecipient`,
`envelope` parses and opens. The transport is any object with `OutboundClient.request(method,
url, body, headers, timeout)` returning `Response(status, headers, body)`; give it a context
from create_kms_context() (only the bundled Amazon roots, hostname checked).

    envelope.check_pinned(env, pinned_arn, last_version)                      # step 1
    data_key = unwrap_data_key(env, credentials=..., region=..., attest=...,  # steps 2-5
                               transport=..., now=time.time())
    payload = envelope.open(env, data_key)                                    # step 6

Every failure raises KmsError with a stable `code` (KMS_CODES). Messages never carry the
credentials, the data key or the RSA key; KMS's own message is passed on, shortened, because it
names the failing policy or key and nothing secret. Every `now` is Unix seconds (a float).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import functools
import hashlib
import importlib.resources
import json
import re
import ssl
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from . import cms, sigv4, strictjson, tls
from . import envelope as envelope_mod
from .errors import EnclaveError
from .outbound import OutboundError

SERVICE = "kms"
TARGET_PREFIX = "TrentService."
CONTENT_TYPE = "application/x-amz-json-1.1"  # KMS speaks AWS JSON 1.1
ENCRYPTION_ALGORITHM = "SYMMETRIC_DEFAULT"
KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
RSA_KEY_BITS = cms.RSA_KEY_BITS  # the one-shot recipient key (section 15 step 2)
RSA_PUBLIC_EXPONENT = 65537
TIMEOUT_S = 10.0  # one deadline per KMS call over connect, TLS, request and answer
MAX_KMS_MESSAGE_CHARS = 400  # KMS's own error message, shortened, in ours (a denial names
# the principal, action and key: ~250 characters)
MAX_ACCESS_KEY_CHARS = sigv4.MAX_ACCESS_KEY_CHARS
MAX_SECRET_KEY_CHARS = 128  # AWS secret access keys are 40 characters
MAX_SESSION_TOKEN_CHARS = 8192  # STS/IMDS session tokens are 1-2 KiB; headers stay bounded
MAX_EXPIRATION_CHARS = 40  # 2026-05-09T12:00:00.123456+00:00 is 32
MAX_REGION_CHARS = 32
DATA_KEY_BYTES = envelope_mod.DATA_KEY_BYTES

AMAZON_ROOTS_RESOURCE = "data/amazon_roots.pem"
# SHA-256 of each certificate's DER, as Amazon publishes them (enclave/data/README.md).
AMAZON_ROOT_SHA256 = {
    "Amazon Root CA 1": "8ecde6884f3d87b1125ba31ac3fcb13d7016de7f57cc904fe1cb97c6ae98196e",
    "Amazon Root CA 2": "1ba5b2aa8c65401a82960118f80bec4f62304d83cec4713a19c39c011ea46db4",
    "Amazon Root CA 3": "18ce6cfe7bf14e60b2e347b8dfe868cb31d02ebb3ada271569f50343b46db3a4",
    "Amazon Root CA 4": "e35d28419ed02025cfa69038cd623962458da5c695fbdea3c22b0bfb25897092",
    "Starfield Services Root Certificate Authority - G2":
        "568d6905a2c88708a4b3025190edcfedb1974a606a13c6e5290fcb2ae63edab5",
}

# Stable codes (acks, metrics, the seal-secrets exit message).
CODE_ACCESS_DENIED = "kms_access_denied"  # the key policy or key state refuses this caller
CODE_CREDENTIALS_EXPIRED = "kms_credentials_expired"  # credentials or signature refused
CODE_CREDENTIALS_INVALID = "kms_credentials_invalid"  # AWS_CREDENTIALS missing or malformed
CODE_INVALID_CIPHERTEXT = "kms_invalid_ciphertext"  # the encrypted data key does not decrypt
CODE_UNAVAILABLE = "kms_unavailable"  # 5xx, throttling, network, TLS, deadline: retry later
CODE_INVALID_RESPONSE = "kms_invalid_response"  # an answer the enclave must not trust
CODE_INVALID_REQUEST = "kms_invalid_request"  # bad region or endpoint, or KMS could not read it
CODE_ATTESTATION = "kms_attestation_unavailable"  # the attest callback gave no document
KMS_CODES = (CODE_ACCESS_DENIED, CODE_CREDENTIALS_EXPIRED, CODE_CREDENTIALS_INVALID,
             CODE_INVALID_CIPHERTEXT, CODE_UNAVAILABLE, CODE_INVALID_RESPONSE,
             CODE_INVALID_REQUEST, CODE_ATTESTATION)

# KMS error `__type` -> code. Decisions:
# - KMSInvalidStateException, DisabledException, NotFoundException, InvalidKeyUsageException,
#   InvalidGrantTokenException: the key cannot be used by this caller until an operator acts,
#   like a policy denial -> kms_access_denied. KeyUnavailableException is transient (KMS says
#   retry) -> kms_unavailable.
# - UnrecognizedClientException (an unknown or revoked key id/token) and
#   InvalidSignatureException (a wrong secret, or "Signature expired": clock skew) are, for the
#   parent, the same remedy as ExpiredTokenException: deliver fresh credentials (and check the
#   clock) -> kms_credentials_expired.
# - ValidationException, SerializationException, UnknownOperationException: KMS could not read
#   our request -> kms_invalid_request.
# Unknown types: 5xx -> kms_unavailable, 4xx -> kms_access_denied (a refusal we cannot name).
ERROR_TYPES = {
    "AccessDeniedException": CODE_ACCESS_DENIED,
    "KMSInvalidStateException": CODE_ACCESS_DENIED,
    "DisabledException": CODE_ACCESS_DENIED,
    "NotFoundException": CODE_ACCESS_DENIED,
    "InvalidKeyUsageException": CODE_ACCESS_DENIED,
    "InvalidGrantTokenException": CODE_ACCESS_DENIED,
    "ExpiredTokenException": CODE_CREDENTIALS_EXPIRED,
    "UnrecognizedClientException": CODE_CREDENTIALS_EXPIRED,
    "InvalidSignatureException": CODE_CREDENTIALS_EXPIRED,
    "IncompleteSignature": CODE_CREDENTIALS_EXPIRED,
    "MissingAuthenticationToken": CODE_CREDENTIALS_EXPIRED,
    "InvalidCiphertextException": CODE_INVALID_CIPHERTEXT,
    "IncorrectKeyException": CODE_INVALID_CIPHERTEXT,
    "KMSInternalException": CODE_UNAVAILABLE,
    "ThrottlingException": CODE_UNAVAILABLE,
    "KeyUnavailableException": CODE_UNAVAILABLE,
    "DependencyTimeoutException": CODE_UNAVAILABLE,
    "LimitExceededException": CODE_UNAVAILABLE,
    "ServiceUnavailableException": CODE_UNAVAILABLE,
    "InternalFailure": CODE_UNAVAILABLE,
    "ValidationException": CODE_INVALID_REQUEST,
    "SerializationException": CODE_INVALID_REQUEST,
    "UnknownOperationException": CODE_INVALID_REQUEST,
}

_ACCESS_KEY = re.compile(rf"[A-Z0-9]{{16,{MAX_ACCESS_KEY_CHARS}}}")
_SECRET_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_SECRET_KEY_CHARS}}}")
_SESSION_TOKEN = re.compile(rf"[\x21-\x7e]{{1,{MAX_SESSION_TOKEN_CHARS}}}")
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}")
_ERROR_TYPE = re.compile(r"[A-Za-z0-9_.:#-]{1,128}")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")
# Fields of an IMDS credentials document besides the four that matter: accepted and ignored, so
# the parent can pass `/latest/meta-data/iam/security-credentials/ROLE` through unchanged.
_IMDS_EXTRA_FIELDS = frozenset({"Code", "LastUpdated", "Type"})
_CREDENTIAL_FIELDS = frozenset({"AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"})


class KmsError(EnclaveError):
    """A KMS call failed or its answer was refused; `code` is one of KMS_CODES."""

    def __init__(self, code: str, message: str, *, kms_type: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.kms_type = kms_type  # KMS's `__type`, when KMS answered an error
        self.status = status  # the HTTP status, when there was an answer


class TrustAnchorError(EnclaveError):
    """The bundled Amazon roots are missing or not the pinned ones (a broken package)."""


# -- trust ----------------------------------------------------------------------------------

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?"
                       r"-----END CERTIFICATE-----")


@functools.lru_cache(maxsize=1)
def amazon_roots_pem() -> str:
    """The bundled Amazon roots (PEM text), checked against AMAZON_ROOT_SHA256 (fails closed).

    Read with ssl's PEM helpers, not cryptography's parser: Starfield Services G2 has serial
    number 0, which cryptography warns about (and plans to refuse).
    """
    try:
        text = importlib.resources.files(__package__).joinpath(AMAZON_ROOTS_RESOURCE) \
            .read_bytes().decode("ascii")
        ders = [ssl.PEM_cert_to_DER_cert(block) for block in _PEM_CERT.findall(text)]
    except (OSError, ValueError) as exc:
        raise TrustAnchorError(f"cannot load the bundled Amazon roots: {exc}") from None
    got = sorted(hashlib.sha256(der).hexdigest() for der in ders)
    if got != sorted(AMAZON_ROOT_SHA256.values()):
        raise TrustAnchorError("bundled Amazon roots: expected exactly the certificates with "
                               f"SHA-256 {sorted(AMAZON_ROOT_SHA256.values())}, got {got}")
    return "".join(ssl.DER_cert_to_PEM_cert(der) for der in ders)


def create_kms_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The TLS context for KMS (settings in enclave.tls): ONLY the bundled Amazon roots, or
    ONLY a fake's CA file (local/test; config refuses the override in staging/production)."""
    if ca_file:
        return tls.pinned_roots_context(ca_file=ca_file)
    return tls.pinned_roots_context(cadata=amazon_roots_pem())


def default_endpoint(region: str) -> str:
    return f"https://kms.{check_region(region)}.amazonaws.com/"


def check_region(region) -> str:
    if not isinstance(region, str) or len(region) > MAX_REGION_CHARS or \
            not _REGION.fullmatch(region):
        raise KmsError(CODE_INVALID_REQUEST, "AWS_REGION must be a region name such as "
                                             "us-east-1")
    return region


# -- credentials ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AwsCredentials:
    """AWS credentials for ONE call: never stored, logged or answered. The repr hides them."""

    access_key_id: str = dataclasses.field(repr=False)
    secret_access_key: str = dataclasses.field(repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)
    expiration: dt.datetime | None = None

    def __repr__(self) -> str:
        prefix = self.access_key_id[:4] if isinstance(self.access_key_id, str) else "?"
        return (f"AwsCredentials(access_key_id={prefix}..., secret_access_key=<hidden>, "
                f"session_token={'<hidden>' if self.session_token else None}, "
                f"expiration={self.expiration.isoformat() if self.expiration else None})")

    __str__ = __repr__

    @classmethod
    def from_delivery(cls, value, *, now: float) -> "AwsCredentials":
        """Parse a delivery's AWS_CREDENTIALS strictly; an Expiration at or before `now` raises
        kms_credentials_expired, anything missing or malformed kms_credentials_invalid."""
        if value is None:
            raise KmsError(CODE_CREDENTIALS_INVALID, "AWS_CREDENTIALS is missing")
        if not isinstance(value, dict):
            raise KmsError(CODE_CREDENTIALS_INVALID, "AWS_CREDENTIALS must be a JSON object")
        unknown = set(value) - _CREDENTIAL_FIELDS - _IMDS_EXTRA_FIELDS
        if unknown:
            raise KmsError(CODE_CREDENTIALS_INVALID,
                           "AWS_CREDENTIALS has unknown fields: "
                           + ", ".join(sorted(str(k)[:40] for k in unknown))[:200])
        if "Code" in value and value["Code"] != "Success":
            raise KmsError(CODE_CREDENTIALS_INVALID, "AWS_CREDENTIALS.Code is not Success")
        expiration = value.get("Expiration")
        if expiration is not None:
            expiration = _parse_expiration(expiration)
        return cls(value.get("AccessKeyId"), value.get("SecretAccessKey"),
                   value.get("SessionToken"), expiration).checked(now)

    @classmethod
    def from_environ(cls, environ, *, now: float) -> "AwsCredentials":
        """AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (operator tooling)."""
        return cls(environ.get("AWS_ACCESS_KEY_ID") or None,
                   environ.get("AWS_SECRET_ACCESS_KEY") or None,
                   environ.get("AWS_SESSION_TOKEN") or None).checked(now)

    def checked(self, now: float) -> "AwsCredentials":
        """This object if well-formed and not expired at `now` (Unix seconds), else KmsError."""
        if self.access_key_id is None or self.secret_access_key is None:
            raise KmsError(CODE_CREDENTIALS_INVALID,
                           "AccessKeyId and SecretAccessKey are both required")
        if not isinstance(self.access_key_id, str) or \
                not _ACCESS_KEY.fullmatch(self.access_key_id):
            raise KmsError(CODE_CREDENTIALS_INVALID, f"AccessKeyId must be 16..."
                                                     f"{MAX_ACCESS_KEY_CHARS} of A-Z 0-9")
        if not isinstance(self.secret_access_key, str) or \
                not _SECRET_KEY.fullmatch(self.secret_access_key):
            raise KmsError(CODE_CREDENTIALS_INVALID, f"SecretAccessKey must be 1..."
                                                     f"{MAX_SECRET_KEY_CHARS} visible ASCII "
                                                     "characters")
        if self.session_token is not None and (not isinstance(self.session_token, str) or
                                               not _SESSION_TOKEN.fullmatch(self.session_token)):
            raise KmsError(CODE_CREDENTIALS_INVALID, f"SessionToken must be 1..."
                                                     f"{MAX_SESSION_TOKEN_CHARS} visible ASCII "
                                                     "characters")
        if self.expiration is not None and self.expiration <= _aware(now):
            raise KmsError(CODE_CREDENTIALS_EXPIRED,
                           f"AWS credentials expired at {self.expiration.isoformat()}; deliver "
                           "fresh ones")
        return self


def _aware(now: float) -> dt.datetime:
    """Unix seconds as the aware UTC datetime an Expiration compares with."""
    if isinstance(now, bool) or not isinstance(now, (int, float)):
        raise TypeError("now must be Unix seconds (a float)")
    return dt.datetime.fromtimestamp(now, dt.timezone.utc)


def _parse_expiration(text) -> dt.datetime:
    if not isinstance(text, str) or len(text) > MAX_EXPIRATION_CHARS:
        raise KmsError(CODE_CREDENTIALS_INVALID, "AWS_CREDENTIALS.Expiration must be an ISO-8601 "
                                                 "time such as 2026-05-09T12:00:00Z")
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.utcoffset() is None:
        raise KmsError(CODE_CREDENTIALS_INVALID, "AWS_CREDENTIALS.Expiration must be an ISO-8601 "
                                                 "time with a zone, such as 2026-05-09T12:00:00Z")
    return when


# -- the signed call ------------------------------------------------------------------------

def _short(text) -> str:
    if not isinstance(text, str):
        return ""
    return _PRINTABLE.sub("?", text)[:MAX_KMS_MESSAGE_CHARS]


def _error_from_answer(status: int, body: bytes, operation: str) -> KmsError:
    try:
        parsed = strictjson.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        parsed = None
    kms_type = parsed.get("__type") if isinstance(parsed, dict) else None
    if isinstance(kms_type, str) and _ERROR_TYPE.fullmatch(kms_type):
        kms_type = kms_type.rpartition("#")[2]  # "com.amazonaws.kms#AccessDeniedException"
    else:
        kms_type = None
    message = ""
    if isinstance(parsed, dict):  # KMS writes "message"; some front ends "Message"
        message = _short(parsed.get("message", parsed.get("Message")))
    code = ERROR_TYPES.get(kms_type) if kms_type else None
    if code is None:
        if status >= 500:
            code = CODE_UNAVAILABLE
        elif kms_type is None:
            code = CODE_INVALID_RESPONSE  # a 4xx without an AWS error body: not KMS
        else:
            code = CODE_ACCESS_DENIED
    detail = f"{kms_type}: {message}" if kms_type else "no KMS error body"
    return KmsError(code, f"KMS {operation} answered HTTP {status} ({detail})",
                    kms_type=kms_type, status=status)


def call(operation: str, request: dict, *, credentials: AwsCredentials, region: str,
         transport, endpoint: str | None = None, now: float,
         timeout: float = TIMEOUT_S) -> dict:
    """One signed KMS JSON 1.1 call; the 200 answer as a dict, or KmsError."""
    check_region(region)
    if not isinstance(credentials, AwsCredentials):
        raise KmsError(CODE_CREDENTIALS_INVALID, "AWS credentials are missing")
    credentials.checked(now)
    url = endpoint or default_endpoint(region)
    body = json.dumps(request, separators=(",", ":")).encode("utf-8")
    headers = {"Content-Type": CONTENT_TYPE, "X-Amz-Target": TARGET_PREFIX + operation}
    try:
        headers.update(sigv4.sign("POST", url, headers, body,
                                  access_key=credentials.access_key_id,
                                  secret_key=credentials.secret_access_key,
                                  session_token=credentials.session_token, region=region,
                                  service=SERVICE, now=now))
    except sigv4.SigV4Error as exc:
        raise KmsError(CODE_INVALID_REQUEST, f"cannot sign the KMS request: {exc}") from None
    try:
        response = transport.request("POST", url, body, headers, timeout)
    except OutboundError as exc:
        raise KmsError(CODE_UNAVAILABLE, f"KMS {operation} failed: {exc}") from None
    except OSError as exc:
        raise KmsError(CODE_UNAVAILABLE,
                       f"KMS {operation} failed: {type(exc).__name__}") from None
    status = response.status
    if status != 200:
        raise _error_from_answer(status, response.body, operation)
    try:
        answer = strictjson.loads(response.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        raise KmsError(CODE_INVALID_RESPONSE, f"KMS {operation} answered 200 without a JSON "
                                              "object", status=status)
    return answer


def _b64_field(answer: dict, name: str, operation: str) -> bytes:
    value = answer.get(name)
    if not isinstance(value, str) or not value:
        raise KmsError(CODE_INVALID_RESPONSE, f"KMS {operation} answer has no {name}")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise KmsError(CODE_INVALID_RESPONSE,
                       f"KMS {operation} answer: {name} is not base64") from None


def _check_key_id(answer: dict, key_arn: str, operation: str) -> None:
    if answer.get("KeyId") != key_arn:
        raise KmsError(CODE_INVALID_RESPONSE, f"KMS {operation} answered for another key than "
                                              f"{key_arn}")


# -- operations -------------------------------------------------------------------------------

def unwrap_data_key(envelope: envelope_mod.Envelope, *, credentials: AwsCredentials,
                    region: str, attest: Callable[[bytes], bytes], transport,
                    endpoint: str | None = None, now: float,
                    timeout: float = TIMEOUT_S) -> bytes:
    """Section 15 steps 2-5: the envelope's 32-byte data key, decrypted by KMS for this enclave.

    `envelope` must have passed envelope.check_pinned (step 1): its kms_key_arn is the pin.
    attest(spki_der) -> an attestation document whose public_key is spki_der (the NSM in an
    enclave, the dev-shim locally). A fresh RSA-2048 key is made for this call and dropped after
    its one attempt, whatever the outcome.
    """
    if not isinstance(envelope, envelope_mod.Envelope):
        raise TypeError("unwrap_data_key needs a parsed Envelope")
    check_region(region)
    if region != envelope.region:
        raise KmsError(CODE_INVALID_REQUEST, f"AWS_REGION {region} is not the region of the "
                                             f"envelope's key ({envelope.region})")
    if not isinstance(credentials, AwsCredentials):
        raise KmsError(CODE_CREDENTIALS_INVALID, "AWS credentials are missing")
    credentials.checked(now)  # an expired credential costs no key generation and no call

    # (2) A fresh recipient key and a document binding its public key.
    key = _new_recipient_key()
    try:
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        try:
            document = attest(spki)
        except EnclaveError as exc:
            raise KmsError(CODE_ATTESTATION, f"no attestation document for the recipient key: "
                                             f"{exc}") from None
        if not isinstance(document, (bytes, bytearray)) or not document:
            raise KmsError(CODE_ATTESTATION, "the attestation source gave no document")

        # (3) Decrypt with the Recipient.
        request = {
            "CiphertextBlob": base64.b64encode(envelope.encrypted_data_key).decode("ascii"),
            "KeyId": envelope.kms_key_arn,
            "EncryptionContext": dict(envelope.encryption_context),
            "EncryptionAlgorithm": ENCRYPTION_ALGORITHM,
            "Recipient": {"KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
                          "AttestationDocument": base64.b64encode(bytes(document)).decode("ascii")},
        }
        answer = call("Decrypt", request, credentials=credentials, region=region,
                      transport=transport, endpoint=endpoint, now=now, timeout=timeout)

        # (4) The answer: our key, no plaintext, a CiphertextForRecipient.
        _check_key_id(answer, envelope.kms_key_arn, "Decrypt")
        if answer.get("Plaintext") not in (None, ""):
            raise KmsError(CODE_INVALID_RESPONSE, "KMS Decrypt answered a Plaintext despite the "
                                                  "Recipient: refused (never trust a KMS that "
                                                  "ignores the attestation)")
        algorithm = answer.get("EncryptionAlgorithm", ENCRYPTION_ALGORITHM)
        if algorithm != ENCRYPTION_ALGORITHM:
            raise KmsError(CODE_INVALID_RESPONSE, "KMS Decrypt answered another "
                                                  "EncryptionAlgorithm than SYMMETRIC_DEFAULT")
        blob = _b64_field(answer, "CiphertextForRecipient", "Decrypt")

        # (5) The CMS envelope, one attempt with the key.
        try:
            return cms.decrypt_data_key(blob, key)
        except cms.CmsError as exc:
            raise KmsError(CODE_INVALID_RESPONSE, f"KMS Decrypt answer refused: {exc}") from None
    finally:
        del key  # dropped after one attempt: no second try with the same key (no oracle)


def _new_recipient_key() -> rsa.RSAPrivateKey:
    """A fresh RSA-2048 key for one Decrypt (one place, so tests can count or stub it)."""
    return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_KEY_BITS)


@dataclasses.dataclass(frozen=True, repr=False)
class DataKey:
    """A GenerateDataKey result: the plaintext key (secret) and KMS's CiphertextBlob."""

    plaintext: bytes
    ciphertext_blob: bytes
    key_arn: str

    def __repr__(self) -> str:
        return f"DataKey(key_arn={self.key_arn!r}, plaintext=<hidden>)"


def generate_data_key(key_arn: str, encryption_context: dict, *, credentials: AwsCredentials,
                      region: str, transport, endpoint: str | None = None, now: float,
                      timeout: float = TIMEOUT_S) -> DataKey:
    """GenerateDataKey (AES_256) under `key_arn` with `encryption_context` (seal-secrets)."""
    request = {"KeyId": key_arn, "KeySpec": "AES_256",
               "EncryptionContext": dict(encryption_context)}
    answer = call("GenerateDataKey", request, credentials=credentials, region=region,
                  transport=transport, endpoint=endpoint, now=now, timeout=timeout)
    _check_key_id(answer, key_arn, "GenerateDataKey")
    plaintext = _b64_field(answer, "Plaintext", "GenerateDataKey")
    if len(plaintext) != DATA_KEY_BYTES:
        raise KmsError(CODE_INVALID_RESPONSE, f"KMS GenerateDataKey answered a data key of "
                                              f"{len(plaintext)} bytes, expected {DATA_KEY_BYTES}")
    blob = _b64_field(answer, "CiphertextBlob", "GenerateDataKey")
    if len(blob) > envelope_mod.MAX_ENCRYPTED_DATA_KEY_BYTES:
        raise KmsError(CODE_INVALID_RESPONSE, "KMS GenerateDataKey answered an oversized "
                                              "CiphertextBlob")
    return DataKey(plaintext, blob, key_arn)
