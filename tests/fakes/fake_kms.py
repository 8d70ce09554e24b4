"""A fake AWS KMS speaking the real protocol (AWS JSON 1.1 over HTTPS, SigV4) on 127.0.0.1.

    fake = FakeKms(ca, attestation_roots=[root.cert_der], allowed_pcr0=[pcr0]).start()
    fake.url, fake.key_arn, fake.credentials()      # endpoint, key, known test credentials
    ...
    fake.stop()

What it checks like KMS does: SigV4 with `enclave.sigv4` against known test credentials (unknown
access key -> UnrecognizedClientException; wrong signature or scope -> InvalidSignatureException;
an X-Amz-Date more than 5 minutes off -> InvalidSignatureException "Signature expired: ...";
an expired session token -> ExpiredTokenException). Operations: GenerateDataKey (KeySpec AES_256
or NumberOfBytes), Encrypt, Decrypt, each with EncryptionContext; Decrypt and GenerateDataKey
with `Recipient` verify the attestation document (`enclave.nitro.Verifier` with the configured
roots, at the current time, at most 5 minutes old), check its PCR0 against an allow-list (the
fake's key policy: not listed -> AccessDeniedException) and answer `CiphertextForRecipient` in
KMS's BER shape (ContentInfo/EnvelopedData v2, KeyTransRecipientInfo v2 with a 32-byte
subjectKeyIdentifier, RSAES-OAEP SHA-256, AES-256-CBC, indefinite lengths, content in
1000-byte chunks) and no `Plaintext`. Ciphertext blobs are opaque: AES-GCM under the key's
material, bound to the key and the EncryptionContext (a different context ->
InvalidCiphertextException). Error bodies are `{"__type", "message"}` with
`Content-Type: application/x-amz-json-1.1`.

Modes (set_mode): "normal"; "hang" (reads the request, answers nothing until the hang bound or
stop()); "500" (KMSInternalException, HTTP 500); "deny" (AccessDeniedException for every
operation, as a key policy without this caller); and, for calls with a Recipient: "plaintext" (answers Plaintext besides CiphertextForRecipient),
"wrong_key_id" (answers another key's ARN), "truncated" and "garbage" (a cut or random
CiphertextForRecipient).

Also a process for the local stack (prints one JSON line: url, port, key_arn, region,
access_key_id, ca_file):
    python -m tests.fakes.fake_kms --port 0 --attestation-root .local/dev-attestation/root.crt \
        --pcr0 HEX [--cert F --key F | --ca-dir DIR] [--key-file F] [--mode MODE]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import http.server
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave import devpki, sigv4
from enclave.nitro import Verifier, VerificationError, cose
from tests.fakes.served import ServedInThread, TlsThreadingServer
from tests.support import remember_secret

log = logging.getLogger(__name__)

# Known test credentials (never valid anywhere else).
TEST_ACCESS_KEY_ID = "AKIAFAKEKMS000000001"
TEST_SECRET_ACCESS_KEY = "fakeKmsSecretAccessKey/ForTests+00000000"
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "111122223333"
CONTENT_TYPE = "application/x-amz-json-1.1"
MAX_SKEW_S = 300  # KMS refuses a signature more than 5 minutes off
MAX_DOCUMENT_AGE_MS = 5 * 60 * 1000  # and an attestation document older than this
MAX_BODY_BYTES = 64 * 1024
MAX_PLAINTEXT_BYTES = 4096  # KMS Encrypt limit
IDLE_TIMEOUT_S = 5.0
HANG_BOUND_S = 5.0  # "hang" answers nothing for at most this long (or until stop())
CHUNK_BYTES = 1000  # KMS writes the encrypted content in 1000-byte chunks
SKI_BYTES = 32
MODES = ("normal", "hang", "500", "deny", "plaintext", "wrong_key_id", "truncated", "garbage")
BLOB_MAGIC = b"\x01FKMS"
GCM_NONCE_BYTES = 12

# KMS's messages, as AWS sends them.
MSG_BAD_SIGNATURE = ("The request signature we calculated does not match the signature you "
                     "provided. Check your AWS Secret Access Key and signing method. Consult the "
                     "service documentation for details.")
MSG_UNRECOGNIZED = "The security token included in the request is invalid."
MSG_EXPIRED_TOKEN = "The security token included in the request is expired"
MSG_INTERNAL = "An internal error has occurred. Please try again later."
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/, ]+)/([0-9]{8})/([^/, ]+)/([^/, ]+)/"
                   r"aws4_request, ?SignedHeaders=([a-z0-9;-]+), ?Signature=([0-9a-f]{64})")


# -- KMS's CiphertextForRecipient shape (a BER writer, also used by tests/test_cms.py) -------

def tlv(tag: int, *parts: bytes) -> bytes:
    content = b"".join(parts)
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    octets = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def indefinite(tag: int, *parts: bytes) -> bytes:
    return bytes([tag, 0x80]) + b"".join(parts) + b"\x00\x00"


def _oid(hex_content: str) -> bytes:
    return tlv(0x06, bytes.fromhex(hex_content))


_ENVELOPED_DATA = _oid("2a864886f70d010703")
_ID_DATA = _oid("2a864886f70d010701")
_RSAES_OAEP = _oid("2a864886f70d010107")
_MGF1 = _oid("2a864886f70d010108")
_SHA256_ALG = tlv(0x30, _oid("608648016503040201"), tlv(0x05))  # KMS writes NULL parameters
_AES256_CBC = _oid("60864801650304012a")


def kms_blob(encrypted_key: bytes, iv: bytes, content: bytes, *, ski: bytes,
             chunk: int | None = CHUNK_BYTES) -> bytes:
    """KMS's shape: indefinite outer nodes, content in `chunk`-byte chunks (None: primitive)."""
    oaep = tlv(0x30, _RSAES_OAEP, tlv(0x30, tlv(0xA0, _SHA256_ALG),
                                      tlv(0xA1, tlv(0x30, _MGF1, _SHA256_ALG))))
    recipient = tlv(0x30, tlv(0x02, b"\x02"), tlv(0x80, ski), oaep, tlv(0x04, encrypted_key))
    enc = (tlv(0x80, content) if chunk is None else indefinite(
        0xA0, *[tlv(0x04, content[i:i + chunk]) for i in range(0, len(content), chunk)]))
    info = indefinite(0x30, _ID_DATA, tlv(0x30, _AES256_CBC, tlv(0x04, iv)), enc)
    enveloped = indefinite(0x30, tlv(0x02, b"\x02"), tlv(0x31, recipient), info)
    return indefinite(0x30, _ENVELOPED_DATA, indefinite(0xA0, enveloped))


def ciphertext_for_recipient(public_key: rsa.RSAPublicKey, plaintext: bytes) -> bytes:
    """What KMS answers: `plaintext` under a fresh AES-256-CBC key wrapped with RSAES-OAEP."""
    content_key, iv = os.urandom(32), os.urandom(16)
    wrapped = public_key.encrypt(content_key, OAEP(mgf=MGF1(hashes.SHA256()),
                                                   algorithm=hashes.SHA256(), label=None))
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return kms_blob(wrapped, iv, encryptor.update(padded) + encryptor.finalize(),
                    ski=hashlib.sha256(spki).digest())


# -- a Nitro-shaped document minter (the `attest` callback of kms.unwrap_data_key in tests) ----

class DocumentMinter:
    """Mints Nitro-shaped documents binding a caller's public key, signed by a dev leaf.

    `minter(spki_der) -> document` is the attest callback. PCR0 is `pcr0` (48 bytes).
    """

    def __init__(self, root: devpki.Issued, pcr0: bytes, *, clock=time.time,
                 module_id: str = "i-0fake0kms0000000-enc0000000000000000"):
        self.root, self.pcr0, self.clock, self.module_id = root, pcr0, clock, module_id
        self.leaf = devpki.issue_leaf(root, label="fake-kms-minter")
        self.public_keys: list[bytes] = []

    def __call__(self, public_key_der: bytes) -> bytes:
        self.public_keys.append(public_key_der)
        pcrs = {i: bytes(48) for i in range(16)}
        pcrs[0] = self.pcr0
        payload = cbor2.dumps({
            "module_id": self.module_id, "digest": "SHA384",
            "timestamp": int(self.clock() * 1000), "pcrs": pcrs,
            "certificate": self.leaf.cert_der, "cabundle": [self.root.cert_der],
            "public_key": public_key_der, "user_data": None, "nonce": None,
        })
        protected = cose.protected_header(cose.ALG_ES384)
        return cose.encode_sign1(protected, payload,
                                 cose.sign(self.leaf.key, cose.ALG_ES384, protected, payload))


# -- the service ----------------------------------------------------------------------------

class KmsFault(Exception):
    """An AWS error answer: HTTP status, `__type`, message (None: no message field)."""

    def __init__(self, status: int, kms_type: str, message: str | None):
        super().__init__(kms_type)
        self.status, self.kms_type, self.message = status, kms_type, message

    def body(self) -> dict:
        out = {"__type": self.kms_type}
        if self.message is not None:
            out["message"] = self.message
        return out


def _bad(kms_type: str, message: str | None, status: int = 400) -> KmsFault:
    return KmsFault(status, kms_type, message)


@dataclass
class _Credential:
    secret: str
    token: str | None = None
    expires_at: float | None = None  # Unix seconds


@dataclass
class _Key:
    key_id: str
    arn: str
    material: bytes


def _amz_time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime(sigv4.AMZ_DATE_FORMAT)


def _context_aad(arn: str, context: dict) -> bytes:
    return arn.encode("ascii") + b"\x00" + json.dumps(context, sort_keys=True,
                                                      separators=(",", ":")).encode("utf-8")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Server"
    sys_version = ""
    timeout = IDLE_TIMEOUT_S

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        log.debug("fake-kms %s " + format, self.client_address[0], *args)

    def _answer(self, status: int, value: dict) -> None:
        body = json.dumps(value, separators=(",", ":")).encode("utf-8")
        self.send_response_only(status)
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n")
        self.wfile.write(b"".join(self._headers_buffer) + body)
        self._headers_buffer = []
        self.log_request(status, len(body))

    def do_GET(self):
        self.close_connection = True
        self._answer(404, {"__type": "UnknownOperationException"})

    def do_POST(self):
        fake: FakeKms = self.server.fake
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self._answer(400, _bad("SerializationException", "Bad request body").body())
            return
        body = self.rfile.read(int(length))
        try:
            status, value = 200, fake.handle(self.command, self.path, self.headers, body)
        except KmsFault as fault:
            status, value = fault.status, fault.body()
        except _Hang:
            fake._release.wait(fake.hang_s)
            self.close_connection = True
            return
        self._answer(status, value)


class _Hang(Exception):
    pass


class FakeKms(ServedInThread):
    """KMS on https://127.0.0.1:PORT/ (port 0 by default) with one symmetric key."""

    THREAD_NAME = "fake-kms"

    def __init__(self, ca=None, *, attestation_roots=(), allowed_pcr0=(),
                 allow_any_pcr0: bool = False, allow_debug: bool = False,
                 region: str = DEFAULT_REGION, account: str = DEFAULT_ACCOUNT,
                 host: str = "127.0.0.1", port: int = 0, cert_file: str | None = None,
                 key_file: str | None = None, hang_s: float = HANG_BOUND_S, clock=time.time,
                 key_id: str | None = None, key_material: bytes | None = None):
        self.region, self.account, self.clock, self.hang_s = region, account, clock, hang_s
        self.verifier = Verifier(list(attestation_roots))
        self.allowed_pcr0 = {bytes(p) for p in allowed_pcr0}
        self.allow_any_pcr0 = allow_any_pcr0  # INSECURE: a key policy without the PCR0 condition
        self.allow_debug = allow_debug
        self.mode = "normal"
        self.calls: list[tuple[str, str]] = []  # (operation, access key id), signature checked
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._credentials = {TEST_ACCESS_KEY_ID: _Credential(TEST_SECRET_ACCESS_KEY)}
        remember_secret(TEST_SECRET_ACCESS_KEY, kind="fake KMS secret access key")
        self._keys: dict[str, _Key] = {}
        self.key_arn = self.add_key(key_id, key_material)
        self._listen(host, port, _Handler, ca=ca, cert_file=cert_file, key_file=key_file)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://{self._server.server_address[0]}:{self.port}/"

    # -- test controls -----------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        if mode == "normal":
            self._release.set()
            self._release = threading.Event()

    def add_key(self, key_id: str | None = None, material: bytes | None = None) -> str:
        key_id = key_id or str(uuid.uuid4())
        material = material or os.urandom(32)
        remember_secret(material, kind="fake KMS key material")
        arn = f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"
        self._keys[key_id] = _Key(key_id, arn, material)
        return arn

    def credentials(self) -> dict:
        """The long-term test credentials, as a delivery's AWS_CREDENTIALS."""
        return {"AccessKeyId": TEST_ACCESS_KEY_ID, "SecretAccessKey": TEST_SECRET_ACCESS_KEY}

    def issue_session(self, expires_at: float) -> dict:
        """Temporary credentials (ASIA..., SessionToken) that KMS refuses after `expires_at`."""
        akid = "ASIAFAKEKMS" + secrets.token_hex(5).upper()[:9]
        secret = secrets.token_urlsafe(30)[:40]
        token = "FwoGZXIvYXdzE" + secrets.token_urlsafe(96)
        remember_secret(secret, token, kind="fake KMS session credentials")
        with self._lock:
            self._credentials[akid] = _Credential(secret, token, expires_at)
        return {"AccessKeyId": akid, "SecretAccessKey": secret, "SessionToken": token,
                "Expiration": dt.datetime.fromtimestamp(expires_at, dt.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ")}

    # -- protocol ----------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers, body: bytes) -> dict:
        now = self.clock()
        akid = self._authenticate(method, path, headers, body, now)
        target = headers.get("X-Amz-Target", "")
        operation = target[len("TrentService."):] if target.startswith("TrentService.") else ""
        handler = {"GenerateDataKey": self._generate_data_key, "Encrypt": self._encrypt,
                   "Decrypt": self._decrypt}.get(operation)
        if handler is None:
            raise _bad("UnknownOperationException", None)
        if (headers.get("Content-Type") or "").split(";")[0].strip() != CONTENT_TYPE:
            raise _bad("SerializationException", "Unexpected content type")
        with self._lock:
            self.calls.append((operation, akid))
        if self.mode == "hang":
            raise _Hang()
        if self.mode == "500":
            raise _bad("KMSInternalException", MSG_INTERNAL, 500)
        if self.mode == "deny":
            raise self._denied(operation, self._keys[self.key_arn.rpartition("/")[2]])
        try:
            request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _bad("SerializationException", "Start of structure or map found where not "
                                                 "expected.") from None
        if not isinstance(request, dict):
            raise _bad("SerializationException", "Expected a JSON object")
        return handler(request, now)

    def _authenticate(self, method, path, headers, body, now) -> str:
        authorization = headers.get("Authorization")
        if not authorization:
            raise _bad("MissingAuthenticationTokenException", "Missing Authentication Token")
        match = _AUTH.fullmatch(authorization.strip())
        if match is None:
            raise _bad("IncompleteSignatureException",
                       "Authorization header requires 'Credential', 'Signature' and "
                       "'SignedHeaders' parameters.")
        akid, date, region, service, signed, signature = match.groups()
        with self._lock:
            credential = self._credentials.get(akid)
        if credential is None:
            raise _bad("UnrecognizedClientException", MSG_UNRECOGNIZED)
        amz_date = headers.get("X-Amz-Date", "")
        try:
            when = dt.datetime.strptime(amz_date, sigv4.AMZ_DATE_FORMAT).replace(
                tzinfo=dt.timezone.utc).timestamp()
        except ValueError:
            raise _bad("IncompleteSignatureException", "Date must be in ISO-8601 'basic format'. "
                                                       f"Got '{amz_date}'.") from None
        if when < now - MAX_SKEW_S:
            raise _bad("InvalidSignatureException",
                       f"Signature expired: {amz_date} is now earlier than "
                       f"{_amz_time(now - MAX_SKEW_S)} ({_amz_time(now)} - 5 min.)")
        if when > now + MAX_SKEW_S:
            raise _bad("InvalidSignatureException",
                       f"Signature not yet current: {amz_date} is still later than "
                       f"{_amz_time(now + MAX_SKEW_S)} ({_amz_time(now)} + 5 min.)")
        if region != self.region:
            raise _bad("InvalidSignatureException",
                       f"Credential should be scoped to a valid region, not '{region}'. ")
        if service != "kms":
            raise _bad("InvalidSignatureException",
                       "Credential should be scoped to correct service: 'kms'. ")
        if date != amz_date[:8]:
            raise _bad("InvalidSignatureException", "Date in Credential scope does not match "
                                                    "YYYYMMDD from ISO-8601 version of date from "
                                                    "HTTP.")
        names = signed.split(";")
        if "host" not in names or "x-amz-date" not in names:
            raise _bad("InvalidSignatureException", MSG_BAD_SIGNATURE)
        pairs = [(name, value) for name in names for value in (headers.get_all(name) or [])]
        req_path, _, query = path.partition("?")
        try:
            canonical = sigv4.canonical_request(method, req_path, query, pairs,
                                                hashlib.sha256(body).hexdigest())
            text = sigv4.string_to_sign(canonical, amz_date, region, service)
            key = sigv4.signing_key(credential.secret, date, region, service)
        except sigv4.SigV4Error:
            raise _bad("InvalidSignatureException", MSG_BAD_SIGNATURE) from None
        if not hmac.compare_digest(sigv4.signature(key, text), signature):
            raise _bad("InvalidSignatureException", MSG_BAD_SIGNATURE)
        token = headers.get("X-Amz-Security-Token")
        if credential.token is None:
            if token is not None:
                raise _bad("UnrecognizedClientException", MSG_UNRECOGNIZED)
        else:
            if token is None or "x-amz-security-token" not in names or \
                    not hmac.compare_digest(token.encode(), credential.token.encode()):
                raise _bad("UnrecognizedClientException", MSG_UNRECOGNIZED)
            if credential.expires_at is not None and now >= credential.expires_at:
                raise _bad("ExpiredTokenException", MSG_EXPIRED_TOKEN)
        return akid

    # -- keys and blobs ------------------------------------------------------------------------
    def _key(self, key_id) -> _Key:
        if not isinstance(key_id, str) or not key_id:
            raise _bad("ValidationException", "1 validation error detected: Value null at "
                                              "'keyId' failed to satisfy constraint: Member must "
                                              "not be null")
        bare = key_id.rpartition(":key/")[2] if key_id.startswith("arn:") else key_id
        key = self._keys.get(bare)
        if key is None or (key_id.startswith("arn:") and key.arn != key_id):
            raise _bad("NotFoundException", f"Key '{key_id}' does not exist")
        return key

    @staticmethod
    def _context(request: dict) -> dict:
        context = request.get("EncryptionContext", {})
        if not isinstance(context, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
            raise _bad("SerializationException", "EncryptionContext must map strings to strings")
        return context

    def _seal_blob(self, key: _Key, plaintext: bytes, context: dict) -> bytes:
        nonce = os.urandom(GCM_NONCE_BYTES)
        sealed = AESGCM(key.material).encrypt(nonce, plaintext, _context_aad(key.arn, context))
        return BLOB_MAGIC + key.key_id.encode("ascii") + nonce + sealed

    def _open_blob(self, blob: bytes, context: dict, key_id) -> tuple[_Key, bytes]:
        id_len = 36  # a UUID
        if len(blob) < len(BLOB_MAGIC) + id_len + GCM_NONCE_BYTES + 16 or \
                not blob.startswith(BLOB_MAGIC):
            raise _bad("InvalidCiphertextException", None)
        blob_key_id = blob[len(BLOB_MAGIC):len(BLOB_MAGIC) + id_len].decode("ascii", "replace")
        key = self._keys.get(blob_key_id)
        if key is None:
            raise _bad("InvalidCiphertextException", None)
        if key_id is not None and self._key(key_id) is not key:
            raise _bad("IncorrectKeyException", "The key ID in the request does not identify a "
                                                "KMS key that can perform this operation.")
        start = len(BLOB_MAGIC) + id_len
        nonce, sealed = blob[start:start + GCM_NONCE_BYTES], blob[start + GCM_NONCE_BYTES:]
        try:
            return key, AESGCM(key.material).decrypt(nonce, sealed, _context_aad(key.arn, context))
        except InvalidTag:
            raise _bad("InvalidCiphertextException", None) from None

    @staticmethod
    def _b64(request: dict, name: str, low: int, high: int) -> bytes:
        value = request.get(name)
        try:
            raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
        except (binascii.Error, ValueError):
            raw = None
        if raw is None:
            raise _bad("SerializationException", f"Invalid base64 in {name}")
        if not low <= len(raw) <= high:
            raise _bad("ValidationException", f"1 validation error detected: Value at '{name}' "
                                              f"failed to satisfy constraint: Member must have "
                                              f"length between {low} and {high}")
        return raw

    def _recipient_key(self, request: dict, now: float, key: _Key,
                       operation: str = "Decrypt") -> rsa.RSAPublicKey | None:
        """The attested public key of a Recipient, after the key policy; None without one."""
        recipient = request.get("Recipient")
        if recipient is None:
            return None
        if not isinstance(recipient, dict) or \
                recipient.get("KeyEncryptionAlgorithm") != "RSAES_OAEP_SHA_256":
            raise _bad("ValidationException", "Recipient.KeyEncryptionAlgorithm must be "
                                              "RSAES_OAEP_SHA_256")
        document = self._b64(recipient, "AttestationDocument", 1, 16384)
        try:
            verified = self.verifier.verify(document, at_ms=int(now * 1000),
                                            allow_debug=self.allow_debug,
                                            max_age_ms=MAX_DOCUMENT_AGE_MS)
        except VerificationError as exc:
            raise _bad("ValidationException", f"Invalid attestation document: {exc}") from None
        try:
            public_key = serialization.load_der_public_key(verified.public_key or b"")
        except ValueError:
            public_key = None
        if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < 2048:
            raise _bad("ValidationException", "The attestation document's public key must be "
                                              "an RSA key of at least 2048 bits")
        pcr0 = verified.pcrs.get(0, b"")
        allowed = self.allow_any_pcr0 or any(hmac.compare_digest(pcr0, p)
                                             for p in self.allowed_pcr0)
        if not allowed:
            raise self._denied(operation, key)
        return public_key

    def _denied(self, operation: str, key: _Key) -> KmsFault:
        return _bad("AccessDeniedException",
                    f"User: arn:aws:sts::{self.account}:assumed-role/enclave-parent/i-0fake is "
                    f"not authorized to perform: kms:{operation} on resource: {key.arn} because "
                    f"no resource-based policy allows the kms:{operation} action")

    def _for_recipient(self, answer: dict, public_key, plaintext: bytes) -> dict:
        blob = ciphertext_for_recipient(public_key, plaintext)
        if self.mode == "truncated":
            blob = blob[:len(blob) // 2]
        elif self.mode == "garbage":
            blob = os.urandom(len(blob))
        answer["CiphertextForRecipient"] = base64.b64encode(blob).decode("ascii")
        if self.mode == "plaintext":
            answer["Plaintext"] = base64.b64encode(plaintext).decode("ascii")
        if self.mode == "wrong_key_id":
            answer["KeyId"] = answer["KeyId"].rpartition("/")[0] + "/" + str(uuid.uuid4())
        return answer

    # -- operations ----------------------------------------------------------------------------
    def _generate_data_key(self, request: dict, now: float) -> dict:
        key = self._key(request.get("KeyId"))
        spec, count = request.get("KeySpec"), request.get("NumberOfBytes")
        if (spec is None) == (count is None):
            raise _bad("ValidationException", "Please specify either number of bytes or key "
                                              "spec.")
        if spec is not None and spec not in ("AES_256", "AES_128"):
            raise _bad("ValidationException", "1 validation error detected: Value at 'keySpec' "
                                              "failed to satisfy constraint: Member must satisfy "
                                              "enum value set: [AES_256, AES_128]")
        if count is not None and (type(count) is not int or not 1 <= count <= 1024):
            raise _bad("ValidationException", "NumberOfBytes must be 1..1024")
        size = count if count is not None else (32 if spec == "AES_256" else 16)
        context = self._context(request)
        recipient = self._recipient_key(request, now, key, "GenerateDataKey")
        data_key = os.urandom(size)
        remember_secret(data_key, kind="fake KMS data key")
        answer = {"CiphertextBlob": base64.b64encode(
            self._seal_blob(key, data_key, context)).decode("ascii"), "KeyId": key.arn}
        if recipient is not None:
            return self._for_recipient(answer, recipient, data_key)
        answer["Plaintext"] = base64.b64encode(data_key).decode("ascii")
        return answer

    def _encrypt(self, request: dict, now: float) -> dict:
        key = self._key(request.get("KeyId"))
        plaintext = self._b64(request, "Plaintext", 1, MAX_PLAINTEXT_BYTES)
        blob = self._seal_blob(key, plaintext, self._context(request))
        return {"CiphertextBlob": base64.b64encode(blob).decode("ascii"), "KeyId": key.arn,
                "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}

    def _decrypt(self, request: dict, now: float) -> dict:
        algorithm = request.get("EncryptionAlgorithm", "SYMMETRIC_DEFAULT")
        if algorithm != "SYMMETRIC_DEFAULT":
            raise _bad("InvalidKeyUsageException", f"{algorithm} is not supported by this key")
        blob = self._b64(request, "CiphertextBlob", 1, 6144)
        key, plaintext = self._open_blob(blob, self._context(request), request.get("KeyId"))
        recipient = self._recipient_key(request, now, key)
        answer = {"KeyId": key.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        if recipient is not None:
            return self._for_recipient(answer, recipient, plaintext)
        answer["Plaintext"] = base64.b64encode(plaintext).decode("ascii")
        return answer


# -- a process for the local stack ------------------------------------------------------------

def _load_key_file(path: str) -> tuple[str, bytes]:
    """The key id and material kept in `path` (0600 JSON), created on first use."""
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        return saved["key_id"], base64.b64decode(saved["material"])
    except FileNotFoundError:
        key_id, material = str(uuid.uuid4()), os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"key_id": key_id, "material": base64.b64encode(material).decode()}, fh)
        return key_id, material


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.fake_kms",
                                     description="A fake AWS KMS (HTTPS, SigV4, attested "
                                                 "Decrypt) for tests and the local stack.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", help="server certificate (PEM); with --key")
    parser.add_argument("--key", help="server private key (PEM)")
    parser.add_argument("--ca-dir", help="without --cert: make a test CA here and write ca.crt")
    parser.add_argument("--region", default=DEFAULT_REGION)
    parser.add_argument("--account", default=DEFAULT_ACCOUNT)
    parser.add_argument("--key-file", help="keep the KMS key's id and material here (0600) so "
                                           "envelopes survive restarts")
    parser.add_argument("--attestation-root", action="append", default=[],
                        help="PEM root(s) attestation documents must chain to (repeatable)")
    parser.add_argument("--pcr0", action="append", default=[],
                        help="hex PCR0 the key policy allows (repeatable)")
    parser.add_argument("--allow-any-pcr0", action="store_true",
                        help="INSECURE: a key policy without the PCR0 condition")
    parser.add_argument("--allow-debug", action="store_true", help="accept debug documents")
    parser.add_argument("--mode", choices=MODES, default="normal")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if bool(args.cert) != bool(args.key) or (not args.cert and not args.ca_dir):
        parser.error("give --cert and --key, or --ca-dir")
    if not args.pcr0 and not args.allow_any_pcr0:
        parser.error("give --pcr0 HEX (the key policy's allow-list) or --allow-any-pcr0")
    roots = []
    for path in args.attestation_root:
        from enclave.nitro import pem_to_der_certs
        with open(path, "rb") as fh:
            roots.extend(pem_to_der_certs(fh.read()))
    cert, key, ca_file = args.cert, args.key, None
    if not cert:
        from tests.fakes.pki import TestCA
        ca = TestCA("Fake KMS Test CA")
        os.makedirs(args.ca_dir, mode=0o700, exist_ok=True)
        ca_file = ca.write(args.ca_dir, "ca")
        cert, key = ca.issue("fake-kms", server=True).write(args.ca_dir, "kms")
    key_id, material = _load_key_file(args.key_file) if args.key_file else (None, None)
    fake = FakeKms(attestation_roots=roots, allowed_pcr0=[bytes.fromhex(p) for p in args.pcr0],
                   allow_any_pcr0=args.allow_any_pcr0, allow_debug=args.allow_debug,
                   region=args.region, account=args.account, host=args.host, port=args.port,
                   cert_file=cert, key_file=key, key_id=key_id, key_material=material)
    fake.set_mode(args.mode)
    if args.allow_any_pcr0:
        log.warning("INSECURE fake KMS: any PCR0 may decrypt")
    return fake.run_as_process(json.dumps({
        "url": fake.url, "port": fake.port, "key_arn": fake.key_arn, "region": fake.region,
        "access_key_id": TEST_ACCESS_KEY_ID, "ca_file": ca_file}))

if __name__ == "__main__":
    sys.exit(main())
