"""Attestation sources (nsm, static, dev-shim), the start-up factory and the HTTP handlers.

Every source answers raw COSE_Sign1 bytes in the AWS Nitro format whose `public_key` is the
signing identity's DER public key. The nsm and dev-shim sources also mint recipient documents
whose `public_key` is a key the caller gives (the one-shot RSA key of a KMS Decrypt, docs/DESIGN.md
§15); a static document cannot. The dev-shim source is INSECURE by design: it says so in
its root certificate, its logs and /healthz.
"""

from __future__ import annotations

import abc
import base64
import datetime as dt
import functools
import hashlib
import json
import logging
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives import serialization

from . import devpki
from .config import ConfigError
from .errors import ApiError, EnclaveError
from .identity import IdentityError, SigningIdentity
from .nitro import cose, verifier
from .nitro.claims import INTENT_CHALLENGE
from .nitro.encoding import decode_b64, read_document_bytes
from .server import JSON_TYPE

logger = logging.getLogger(__name__)

CHALLENGE_NONCE_MIN_BYTES = 16  # at least 128 bits, so a nonce cannot be guessed
CHALLENGE_NONCE_MAX_BYTES = 64
CHALLENGE_USER_DATA_MAX_BYTES = 512
DOCUMENT_CACHE_SECONDS = 30.0  # a cached dev-shim document is at most this old
DEV_SHIM_PCR_COUNT = 16  # like Nitro: PCR0..15, 48 bytes each
DEV_LEAF_RENEW_BEFORE = dt.timedelta(hours=1)  # minted documents stay verifiable >= 1 h
CBOR_MAP_MAJOR = 0xA0  # CBOR major type 5 (map) with a count below 24 in the low bits
NSM_DEVICE = "/dev/nsm"  # TEE_ATTESTATION_DOCUMENT_PATH value that selects the NSM source
MAX_STATIC_DOCUMENT_FILE_BYTES = 64 * 1024  # base64 of a 16 KiB document, with room to spare
# A recipient document's public_key: the NSM takes at most 1 KiB (nsm.NSM_USER_FIELD_MAX_BYTES,
# the verifier's MAX_USER_FIELD_BYTES); an RSA-2048 DER SubjectPublicKeyInfo is 294 bytes.
RECIPIENT_PUBLIC_KEY_MAX_BYTES = 1024
# The challenge answer, as server.json_bytes would encode it. Every %s is a standard base64 string
# (A-Z a-z 0-9 + / =: nothing JSON escapes) except nonce_bound_document, which is json.dumps(bool).
_CHALLENGE_JSON = (b'{"nonce":"%s","document":"%s","nonce_bound_document":%s,'
                   b'"evidence":"%s","public_key":"%s"}')


class AttestationError(EnclaveError):
    """The source could not produce a document at run time (the endpoint answers 503)."""


class AttestationConfigError(ConfigError):
    """Attestation cannot start with this configuration (the caller exits 2)."""

    def __init__(self, message: str):
        super().__init__([message])


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


@functools.lru_cache(maxsize=1)
def measure_code() -> bytes:
    """Dev-shim PCR0, measured once per process: SHA-384 of the running zipapp, else
    measure_tree() of the package's source directory."""
    package = sys.modules[__package__]
    archive = getattr(getattr(package, "__loader__", None), "archive", None)  # zipimporter
    if archive:
        return hashlib.sha384(Path(archive).read_bytes()).digest()
    return measure_tree(Path(package.__file__).resolve().parent)


def measure_tree(package_dir: Path) -> bytes:
    """SHA-384 over every <package>/**/*.py sorted by path relative to the package's parent;
    each file contributes len(path) (8 bytes big-endian), path (UTF-8), len(content) (8 bytes)
    and content."""
    digest = hashlib.sha384()
    files = sorted((p.relative_to(package_dir.parent).as_posix(), p)
                   for p in package_dir.rglob("*.py"))
    for rel, path in files:
        name, content = rel.encode("utf-8"), path.read_bytes()
        digest.update(len(name).to_bytes(8, "big") + name)
        digest.update(len(content).to_bytes(8, "big") + content)
    return digest.digest()


def payload_fields(document: bytes) -> dict:
    """The payload map of a document, UNVERIFIED (for describing our own documents)."""
    return cose.loads_strict(cose.decode_sign1(document).payload)


class AttestationSource(abc.ABC):
    """Where documents come from: name 'nsm', 'static' or 'dev-shim'."""

    name: str = ""
    nonce_bound: bool = False  # documents carry the caller's nonce and user_data
    binds_recipient: bool = False  # recipient_document() can bind a caller's public key
    insecure: bool = False

    @abc.abstractmethod
    def document(self, nonce: bytes | None = None, user_data: bytes | None = None) -> bytes:
        """Raw COSE_Sign1 bytes; raises AttestationError."""

    def recipient_document(self, public_key_der: bytes) -> bytes:
        """A fresh document whose public_key is `public_key_der` (a DER SubjectPublicKeyInfo,
        checked by check_recipient_key) instead of the signing identity's, with no nonce and no
        user_data; raises AttestationError."""
        raise AttestationError(
            f"the {self.name} attestation source cannot bind a recipient public key; "
            "ENCLAVE_SECRETS_SOURCE=kms needs TEE_ATTESTATION_DOCUMENT_PATH=/dev/nsm (or "
            "ENCLAVE_RUNTIME_MODE=dev-shim locally)")

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


def check_recipient_key(public_key_der) -> bytes:
    """`public_key_der` as bytes if it is a DER SubjectPublicKeyInfo the NSM can carry, else
    AttestationError (a document never binds something that is not a public key)."""
    if not isinstance(public_key_der, (bytes, bytearray)):
        raise AttestationError(f"recipient public_key must be bytes, got "
                               f"{type(public_key_der).__name__}")
    if not 1 <= len(public_key_der) <= RECIPIENT_PUBLIC_KEY_MAX_BYTES:
        raise AttestationError(f"recipient public_key is {len(public_key_der)} bytes, expected "
                               f"1..{RECIPIENT_PUBLIC_KEY_MAX_BYTES} (the NSM's limit)")
    public_key_der = bytes(public_key_der)
    try:
        serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError):
        raise AttestationError("recipient public_key is not a DER SubjectPublicKeyInfo") from None
    return public_key_der


class NsmSource(AttestationSource):
    """Fresh, nonce-bound documents from the Nitro Secure Module."""

    name, nonce_bound, binds_recipient, insecure = "nsm", True, True, False

    def __init__(self, identity: SigningIdentity, device):
        self._identity = identity
        self._device = device

    def document(self, nonce=None, user_data=None) -> bytes:
        from .nsm import NsmError  # imported with the device: ctypes is not needed elsewhere
        try:
            return self._device.attestation(user_data=user_data, nonce=nonce,
                                            public_key=self._identity.public_key_der)
        except NsmError as exc:
            raise AttestationError(str(exc)) from None

    def recipient_document(self, public_key_der: bytes) -> bytes:
        from .nsm import NsmError
        public_key_der = check_recipient_key(public_key_der)
        try:
            return self._device.attestation(user_data=None, nonce=None, public_key=public_key_der)
        except NsmError as exc:
            raise AttestationError(str(exc)) from None

    def ready(self) -> bool:
        return self._device.is_open

    def close(self) -> None:
        self._device.close()


class StaticSource(AttestationSource):
    """One document from a file or inline base64, served as-is (not nonce-bound)."""

    name, nonce_bound = "static", False

    def __init__(self, document: bytes, identity: SigningIdentity, origin: str = "document"):
        try:
            fields = payload_fields(document)
        except cose.CoseError as exc:
            raise AttestationConfigError(f"{origin}: not a COSE_Sign1 attestation document "
                                         f"({exc})") from None
        if not isinstance(fields, dict):
            raise AttestationConfigError(f"{origin}: the payload is not a CBOR map")
        public_key = fields.get("public_key")
        if public_key != identity.public_key_der:
            got = ("absent" if not isinstance(public_key, bytes)
                   else f"SHA-256 {hashlib.sha256(public_key).hexdigest()}")
            raise AttestationConfigError(
                f"{origin}: the document's public_key does not match the signing identity "
                f"(expected SHA-256 {identity.fingerprint}, got {got}); the document must be "
                "minted for TEE_ATTESTATION_SIGNING_PRIVATE_KEY")
        cabundle = fields.get("cabundle")
        first = cabundle[0] if isinstance(cabundle, list) and cabundle else None
        self.insecure = isinstance(first, bytes) and devpki.names_itself_insecure(first)
        self._document = bytes(document)

    @classmethod
    def from_file(cls, path: str, identity: SigningIdentity) -> "StaticSource":
        origin = "TEE_ATTESTATION_DOCUMENT_PATH"
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_STATIC_DOCUMENT_FILE_BYTES + 1)
        except OSError as exc:
            raise AttestationConfigError(f"{origin}: cannot read {path} ({exc.strerror})") from None
        if len(data) > MAX_STATIC_DOCUMENT_FILE_BYTES:
            raise AttestationConfigError(f"{origin}: file is larger than "
                                         f"{MAX_STATIC_DOCUMENT_FILE_BYTES} bytes")
        try:
            return cls(read_document_bytes(data), identity, origin)
        except ValueError as exc:
            raise AttestationConfigError(f"{origin}: {exc}") from None

    @classmethod
    def from_base64(cls, text: str, identity: SigningIdentity) -> "StaticSource":
        origin = "TEE_ATTESTATION_DOCUMENT"
        try:
            return cls(decode_b64(text), identity, origin)
        except ValueError:
            raise AttestationConfigError(f"{origin}: not base64") from None

    def document(self, nonce=None, user_data=None) -> bytes:
        return self._document


class DevShimSource(AttestationSource):
    """INSECURE local documents of the exact Nitro shape, signed by a dev leaf (ES384)."""

    name, nonce_bound, binds_recipient, insecure = "dev-shim", True, True, True

    def __init__(self, identity: SigningIdentity, root: devpki.Issued, *, clock=time.time,
                 module_id: str | None = None):
        self._identity = identity
        self._root = root
        self._clock = clock
        self.module_id = module_id or f"dev-shim-{secrets.token_hex(8)}"
        self._pcrs = {i: bytes(verifier.SHA384_BYTES) for i in range(DEV_SHIM_PCR_COUNT)}
        self._pcrs[0] = measure_code()
        map_header = bytes([CBOR_MAP_MAJOR | len(verifier.DOCUMENT_FIELDS)])  # 9 entries: a9
        self._head = map_header + b"".join(cbor2.dumps(x) for x in (
            "module_id", self.module_id, "digest", "SHA384", "timestamp"))
        self._nonce_key = cbor2.dumps("nonce")
        self._identity_key = cbor2.dumps(self._identity.public_key_der) + cbor2.dumps("user_data")
        self._lock = threading.Lock()
        self._signer, self._middle = self._issue_leaf()

    @property
    def root_der(self) -> bytes:
        return self._root.cert_der

    def _issue_leaf(self) -> tuple[cose.Signer, bytes]:
        """A new leaf's signer (ES384) and the payload fields that only change with it,
        pre-encoded, up to and including the "public_key" key (its value is added per
        document)."""
        leaf = devpki.issue_leaf(self._root, self._clock(), label=self.module_id)
        logger.warning("INSECURE dev-shim attestation leaf issued for %s, valid until %s",
                       self.module_id, leaf.cert.not_valid_after_utc.isoformat())
        self._renew_at = (leaf.cert.not_valid_after_utc - DEV_LEAF_RENEW_BEFORE).timestamp()
        middle = b"".join(cbor2.dumps(x) for x in (
            "pcrs", self._pcrs, "certificate", leaf.cert_der, "cabundle", [self._root.cert_der],
            "public_key"))
        return cose.Signer(leaf.key), middle

    def _current_signer(self) -> tuple[cose.Signer, bytes]:
        with self._lock:
            if self._clock() >= self._renew_at:
                self._signer, self._middle = self._issue_leaf()
            return self._signer, self._middle

    def document(self, nonce=None, user_data=None) -> bytes:
        for name, value in (("nonce", nonce), ("user_data", user_data)):
            if value is not None and len(value) > verifier.MAX_USER_FIELD_BYTES:
                raise AttestationError(f"{name} is {len(value)} bytes, limit "
                                       f"{verifier.MAX_USER_FIELD_BYTES}")
        return self._mint(self._identity_key, nonce, user_data)

    def recipient_document(self, public_key_der: bytes) -> bytes:
        public_key_der = check_recipient_key(public_key_der)
        return self._mint(cbor2.dumps(public_key_der) + cbor2.dumps("user_data"), None, None)

    def _mint(self, key_and_user_data_key: bytes, nonce, user_data) -> bytes:
        """Sign a payload whose public_key value (followed by the "user_data" key) is given
        pre-encoded: the signing identity's for documents, a caller's for recipient ones."""
        signer, middle = self._current_signer()
        # The CBOR map of the Nitro payload, in the NSM's field order, from pre-encoded parts:
        # equal to cbor2.dumps({"module_id": ..., "digest": ..., ..., "nonce": nonce}).
        payload = b"".join((self._head, cbor2.dumps(int(self._clock() * 1000)), middle,
                            key_and_user_data_key, cbor2.dumps(user_data), self._nonce_key,
                            cbor2.dumps(nonce)))
        return signer.sign1(payload)


@dataclass
class Attestation:
    """What start-up built: the signing identity and the document source."""

    identity: SigningIdentity
    source: AttestationSource
    required: bool = False

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def insecure(self) -> bool:
        return self.source.insecure

    @property
    def binds_recipient(self) -> bool:
        """Whether recipient_document() can work (nsm, dev-shim): what the kms secrets source
        needs, to check at start-up."""
        return self.source.binds_recipient

    def recipient_document(self, public_key_der: bytes) -> bytes:
        """A fresh document binding `public_key_der` (DER SPKI, at most 1 KiB) as its
        public_key: the `attest` callback of kms.unwrap_data_key. Raises AttestationError
        (from a static source always)."""
        return self.source.recipient_document(public_key_der)

    def close(self) -> None:
        self.source.close()


def _load_identity(settings) -> SigningIdentity:
    if settings.signing_private_key_pem is not None:
        try:
            return SigningIdentity.from_pem(settings.signing_private_key_pem)
        except IdentityError as exc:
            raise AttestationConfigError(str(exc)) from None
    # TEE_ATTESTATION_SIGNING_PRIVATE_KEY=ephemeral (config refuses it unset in staging and
    # production): made in memory now, never written anywhere; NSM documents bind its public key.
    identity = SigningIdentity.generate()
    logger.info("Per-boot %s signing identity (public key SHA-256 %s)", identity.alg_name,
                identity.fingerprint)
    return identity


def build_attestation(settings, clock=None, *, nsm_open=None) -> Attestation:
    """Load the signing identity and the source chosen by `settings`.

    clock: a zero-argument callable returning Unix seconds (default time.time), used for
        document timestamps and dev certificates. nsm_open: path -> NsmDevice (default NsmDevice), for a fake device.
    Raises AttestationConfigError (exit 2) on any misconfiguration.
    """
    clock = clock or time.time
    if settings.mode == "disabled":
        raise AttestationConfigError("ENCLAVE_RUNTIME_MODE=disabled: attestation is off and the "
                                     "runtime refuses to serve")
    identity = _load_identity(settings)
    path, inline = settings.attestation_document_path, settings.attestation_document_b64
    if settings.mode == "dev-shim":
        if not settings.allow_insecure_dev_attestation or settings.attestation_required:
            raise AttestationConfigError(
                "ENCLAVE_RUNTIME_MODE=dev-shim requires TEE_ALLOW_INSECURE_DEV_ATTESTATION=true "
                "and TEE_ATTESTATION_REQUIRED=false")
        if path or inline:
            logger.warning("dev-shim mode: TEE_ATTESTATION_DOCUMENT(_PATH) is ignored")
        try:
            root = devpki.load_or_create_root(settings.state_dir, clock())
        except devpki.DevPkiError as exc:
            raise AttestationConfigError(str(exc)) from None
        source: AttestationSource = DevShimSource(identity, root, clock=clock)
        logger.warning("INSECURE dev-shim attestation: documents chain to the local dev root in "
                       "%s; never trust them outside development",
                       devpki.dev_dir(settings.state_dir))
    elif path == NSM_DEVICE:
        from .nsm import NsmDevice, NsmError  # only here: ctypes costs start-up time elsewhere
        try:
            device = (nsm_open or NsmDevice)(path)
        except NsmError as exc:
            raise AttestationConfigError(f"TEE_ATTESTATION_DOCUMENT_PATH: {exc}") from None
        source = NsmSource(identity, device)
        try:
            probe = source.document()
        except AttestationError as exc:
            source.close()
            raise AttestationConfigError(f"TEE_ATTESTATION_DOCUMENT_PATH: {exc}") from None
        logger.info("NSM attestation ready (%d-byte document)", len(probe))
    elif path or inline:
        source = (StaticSource.from_file(path, identity) if path
                  else StaticSource.from_base64(inline, identity))
        _check_static(source, settings)
    else:
        raise AttestationConfigError("ENCLAVE_RUNTIME_MODE=remote requires "
                                     "TEE_ATTESTATION_DOCUMENT_PATH or TEE_ATTESTATION_DOCUMENT")
    logger.info("Attestation source %s, signing identity %s (public key SHA-256 %s)",
                source.name, identity.alg_name, identity.fingerprint)
    return Attestation(identity, source, settings.attestation_required)


def _check_static(source: StaticSource, settings) -> None:
    """A static document must verify against the AWS root at its own timestamp when required."""
    try:
        verifier.Verifier.production().verify(source.document(), at_ms=verifier.AT_DOCUMENT_TIME)
    except verifier.VerificationError as exc:
        if settings.attestation_required:
            raise AttestationConfigError(f"static attestation document rejected: {exc}") from None
        logger.warning("static attestation document does not verify against the AWS root: %s",
                       exc)


class AttestationService:
    """Handlers for GET /v1/attestation/document and POST /v1/attestation/challenge."""

    def __init__(self, attestation: Attestation, metrics=None, *, clock=time.time):
        self._attestation = attestation
        self._source = attestation.source
        self._identity = attestation.identity
        self._public_key_b64 = base64.b64encode(self._identity.public_key_der)
        self._nonce_bound_json = json.dumps(bool(self._source.nonce_bound)).encode()
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None
        if metrics is not None:
            metrics.describe("enclave_attestation_documents_total", "counter",
                             "Attestation documents served, by endpoint, source and outcome")

    def _count(self, endpoint: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.inc("enclave_attestation_documents_total",
                              {"endpoint": endpoint, "source": self._source.name,
                               "outcome": outcome})

    def _mint(self, endpoint: str, nonce=None, user_data=None) -> bytes:
        try:
            document = self._source.document(nonce, user_data)
        except AttestationError as exc:
            self._count(endpoint, "error")
            logger.error("attestation source %s failed: %s", self._source.name, exc)
            raise ApiError(503, "attestation_unavailable",
                           "the attestation source could not produce a document") from None
        self._count(endpoint, "ok")
        return document

    def _describe(self, document: bytes) -> dict:
        fields = payload_fields(document)
        module_id = fields.get("module_id")
        dev_shim = isinstance(module_id, str) and module_id.startswith("dev-shim")
        return {
            # the document's own shape; `insecure`: it chains to an INSECURE (dev-shim) root
            "format": "dev-shim" if dev_shim else "aws-nitro",
            "document": _b64(document),
            "public_key": _b64(fields.get("public_key")),
            "module_id": module_id,
            "timestamp_ms": fields.get("timestamp"),
            "pcrs": {str(k): v.hex() for k, v in sorted(fields.get("pcrs", {}).items())},
            "insecure": self._source.insecure,
        }

    def document(self, req) -> tuple[int, dict]:
        """GET /v1/attestation/document (static and dev-shim documents are cached)."""
        if self._source.name == "nsm":
            return 200, self._describe(self._mint("document"))
        with self._lock:
            now = self._clock()
            cached = self._cached
            fresh = cached is not None and (self._source.name == "static"
                                            or now - cached[0] < DOCUMENT_CACHE_SECONDS)
            if fresh:
                self._count("document", "cached")
                return 200, dict(cached[1])
            body = self._describe(self._mint("document"))
            self._cached = (now, body)
            return 200, dict(body)

    def challenge_json(self, req) -> tuple[int, str, bytes]:
        """POST /v1/attestation/challenge {"nonce": base64 16..64 bytes, "user_data"?: base64},
        a raw route: the JSON answer is formatted from base64 strings, without json.dumps."""
        body = req.json()
        nonce = _b64_field(body, "nonce", "invalid_nonce", CHALLENGE_NONCE_MIN_BYTES,
                           CHALLENGE_NONCE_MAX_BYTES, required=True)
        user_data = _b64_field(body, "user_data", "invalid_user_data", 0,
                               CHALLENGE_USER_DATA_MAX_BYTES, required=False)
        if self._source.nonce_bound:
            document = self._mint("challenge", nonce, user_data)
        else:
            document = self._mint("challenge")
        claims = {
            "intent": INTENT_CHALLENGE,
            "nonce": nonce,
            "document_sha384": hashlib.sha384(document).digest(),
            "timestamp_ms": int(self._clock() * 1000),
        }
        if user_data is not None:
            # A static document cannot carry it, so the signed evidence always does (for nsm
            # and dev-shim documents it is in the document too).
            claims["user_data"] = user_data
        evidence = self._identity.sign_claims(claims)
        b64 = base64.b64encode
        return 200, JSON_TYPE, _CHALLENGE_JSON % (b64(nonce), b64(document), self._nonce_bound_json,
                                                  b64(evidence), self._public_key_b64)

    def health(self) -> dict:
        return {"source": self._source.name, "insecure": self._source.insecure}

    def ready(self) -> bool:
        return self._source.ready()


def _b64_field(body: dict, name: str, code: str, low: int, high: int, *, required: bool):
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, code, f"{name} is required: base64 of {low}..{high} bytes")
        return None
    if not isinstance(value, str):
        raise ApiError(400, code, f"{name} must be a base64 string")
    try:
        decoded = decode_b64(value)
    except ValueError:
        raise ApiError(400, code, f"{name} is not valid base64") from None
    if not low <= len(decoded) <= high:
        raise ApiError(400, code, f"{name} must decode to {low}..{high} bytes, "
                                  f"got {len(decoded)}")
    return decoded
