"""The secrets validator and merger: a trust core that takes bytes and a time and does no I/O.

`parse_delivery(data)` turns the bytes of one delivery into an unverified JSON object.
`apply_update(current, unverified, now)` validates every key (all-or-nothing) and merges it into
the current state (`now` is Unix seconds, like every time this module takes): keys present replace, absent keys are kept, an explicit `null` clears a key,
unknown keys reject the whole delivery. ENCLAVE_TOKEN_SEALING_KEY is held as a sealing.Keyring:
a list states the whole keyring, one key rotates it (see `merge_sealing_key`). Files, TLS contexts and locks live around this module
(enclave.secretstore); nothing here opens a file or a socket or reads the clock.

Every failure is one subclass of SecretsError with a stable snake_case `code`. Messages name the
key and say what was expected; they never contain a secret value.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Mapping, NamedTuple
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from . import sealing, strictjson
from .errors import EnclaveError

MAX_DELIVERY_BYTES = 256 * 1024  # one delivery; a certificate bundle is a few KiB
MIN_RPC_SECRET_BYTES = 32  # a delivered or configured RPC shared secret: at least 256 bits
SEALING_KEY_BYTES = sealing.KEY_BYTES  # each token sealing key is an AES-256 key
MAX_SEALING_KEYS = 1 + sealing.MAX_PREVIOUS_KEYS  # a list delivery: current + previous keys
MAX_ENDPOINT_CHARS = 2048  # ECS_WATERMARK_ENDPOINT: a URL longer than this is a mistake
MAX_HOSTNAME_CHARS = 253  # RFC 1035 2.3.4, in the ASCII (IDNA) form, without a trailing dot
MAX_LABEL_CHARS = 63  # RFC 1035 2.3.4

MTLS_CLIENT_CERT_JSON = "MTLS_CLIENT_CERT_JSON"
ECS_WATERMARK_ENDPOINT = "ECS_WATERMARK_ENDPOINT"
GOOGLE_OAUTH_CLIENT_ID = "GOOGLE_OAUTH_CLIENT_ID"
GOOGLE_OAUTH_CLIENT_SECRET = "GOOGLE_OAUTH_CLIENT_SECRET"
ENCLAVE_RPC_SHARED_SECRET = "ENCLAVE_RPC_SHARED_SECRET"
ENCLAVE_TOKEN_SEALING_KEY = "ENCLAVE_TOKEN_SEALING_KEY"
# Every key a delivery may carry, in the order validation and `changed` lists use.
KNOWN_KEYS = (MTLS_CLIENT_CERT_JSON, ECS_WATERMARK_ENDPOINT, GOOGLE_OAUTH_CLIENT_ID,
              GOOGLE_OAUTH_CLIENT_SECRET, ENCLAVE_RPC_SHARED_SECRET, ENCLAVE_TOKEN_SEALING_KEY)
MTLS_FIELDS = ("client_cert", "client_key", "ca_cert")
# A key name is echoed in an error only when it looks like a variable name (a sender could
# put anything, even a secret, in a key).
_ECHOABLE_KEY = re.compile(r"^[A-Za-z0-9_.]{1,64}$")
# C0 controls, DEL and C1 controls: refused in credentials (they go into form fields and header
# values, where a control character is refused or splits the field) and anywhere in a URL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# One DNS label in its ASCII form: letters, digits, inner hyphens (RFC 952/1123 "LDH").
_LDH_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
# A last label that resolvers and URL parsers read as a number (decimal or hex), i.e. an IPv4
# address in a form other than the dotted quad: refused rather than guessed at.
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
# The part of the URL after the host: a port, then a path of printable ASCII without spaces
# (what http.client can put in a request line); no query or fragment.
_NETLOC_PORT = re.compile(r"^(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[0-9]{1,5}))?$")
_PATH = re.compile(r"^(?:/[\x21-\x7e]*)?$")


# --- errors ----------------------------------------------------------------------------------

class SecretsError(EnclaveError):
    """A refused delivery. `code` is stable snake_case; the message never holds a secret."""

    code = "invalid_secrets"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class MalformedJson(SecretsError):
    code = "malformed_json"


class NotAnObject(SecretsError):
    code = "not_an_object"


class UnknownKey(SecretsError):
    code = "unknown_key"


class InvalidType(SecretsError):
    code = "invalid_type"


class InvalidCertificate(SecretsError):
    code = "invalid_certificate"


class KeyMismatch(SecretsError):
    code = "key_mismatch"


class CertificateExpired(SecretsError):
    code = "certificate_expired"


class CertificateNotYetValid(SecretsError):
    code = "certificate_not_yet_valid"


class InvalidCa(SecretsError):
    code = "invalid_ca"


class InvalidEndpoint(SecretsError):
    code = "invalid_endpoint"


class InvalidSecret(SecretsError):
    code = "invalid_secret"


class EndpointNotRoutable(SecretsError):
    """staging/production: ECS_WATERMARK_ENDPOINT has no ENCLAVE_EGRESS_ROUTES route."""
    code = "endpoint_not_routable"


class RequiredSecret(SecretsError):
    """A delivery would clear a secret the configuration needs (ENCLAVE_READY_REQUIRES)."""
    code = "required_secret"


class TooLarge(SecretsError):
    code = "too_large"


class DeliveryTimeout(SecretsError):
    code = "timeout"


class PeerNotAllowed(SecretsError):
    code = "peer_not_allowed"


class Busy(SecretsError):
    code = "busy"


class Bundle(NamedTuple):
    """A sealed bundle as applied: its bundle_version and a digest of the envelope's contents
    (the same version may be re-delivered only with the same contents)."""

    version: int
    digest: bytes


class PlaintextRefused(SecretsError):
    """A plaintext secret key in a delivery while only sealed envelopes are accepted (kms)."""
    code = "plaintext_refused"


class BundleRollback(SecretsError):
    """A sealed bundle older than one applied since boot (found again under the store's lock)."""
    code = "bundle_rollback"


class SealedRefused(SecretsError):
    """A sealed delivery refused while opening it: each instance carries the envelope's or
    KMS's own code (envelope_*, bundle_rollback, kms_*), as a delivery refusal, so the store
    needs nothing of KMS to answer it. The class code names the family only."""

    code = "sealed_refused"

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Stopping(SecretsError):
    """The runtime is stopping: a delivery still being opened is not applied."""
    code = "stopping"


class StorageFailed(SecretsError):
    code = "storage_failed"


# --- state -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MtlsMaterial:
    """Validated mTLS material, PEMs re-serialized (so equal material compares equal)."""

    client_cert_pem: bytes  # the leaf first, then any intermediates the sender included
    client_key_pem: bytes = field(repr=False)  # PKCS#8, unencrypted
    ca_cert_pem: bytes = field(repr=False)
    not_before: datetime = field(compare=False, default=None)
    not_after: datetime = field(compare=False, default=None)


@dataclass(frozen=True)
class SecretsState:
    """The secrets in force. Replaced as a whole, never mutated."""

    version: int = 0  # +1 per accepted delivery that changed something
    values: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    updated_at: float | None = None  # time of the last change, Unix seconds
    received: bool = False  # a valid delivery has been accepted (even one that changed nothing)
    previous_rpc_secret: str | None = field(default=None, repr=False)  # kept for a grace period
    rpc_rotated_at: float | None = None  # Unix seconds

    def get(self, key: str):
        return self.values.get(key)

    @property
    def mtls(self) -> MtlsMaterial | None:
        return self.values.get(MTLS_CLIENT_CERT_JSON)

    @property
    def mtls_not_after(self) -> datetime | None:
        material = self.mtls
        return material.not_after if material else None


def initial_state(values: Mapping[str, object]) -> SecretsState:
    """Version 0 from values already validated elsewhere (configuration, `validate_value`); a
    single sealing key becomes a keyring of that key."""
    unknown = set(values) - set(KNOWN_KEYS)
    if unknown:
        raise UnknownKey(f"unknown keys in initial values: {', '.join(sorted(unknown))}")
    values = {k: v for k, v in values.items() if v is not None}
    if ENCLAVE_TOKEN_SEALING_KEY in values:
        values[ENCLAVE_TOKEN_SEALING_KEY] = merge_sealing_key(
            None, values[ENCLAVE_TOKEN_SEALING_KEY])
    return SecretsState(values=MappingProxyType(values))


# --- parsing ---------------------------------------------------------------------------------

def parse_delivery(data: bytes) -> dict:
    """The bytes of one delivery as a JSON object (unverified), or a SecretsError."""
    if len(data) > MAX_DELIVERY_BYTES:
        raise TooLarge(f"delivery must be at most {MAX_DELIVERY_BYTES} bytes, got {len(data)}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedJson("delivery is not UTF-8 text") from None
    if not text.strip():
        raise MalformedJson("delivery is empty: expected one JSON object")
    try:
        unverified = strictjson.loads(text)
    except RecursionError:
        raise MalformedJson("delivery is nested too deeply") from None
    except json.JSONDecodeError as exc:
        # The decoder's message names a position, never the document's content.
        raise MalformedJson(f"delivery is not valid JSON ({exc.msg} at line {exc.lineno} "
                            f"column {exc.colno})") from None
    except ValueError as exc:  # from the hooks: duplicate key, NaN/Infinity
        raise MalformedJson(f"delivery is not valid JSON ({exc})") from None
    if not isinstance(unverified, dict):
        raise NotAnObject(f"delivery must be one JSON object, got a JSON {_json_type(unverified)}")
    return unverified


def is_complete_object(buffer: bytes) -> bool:
    """True when `buffer` ends with a newline after one complete JSON object (no half-close)."""
    if not buffer.endswith(b"\n") or not buffer.rstrip().endswith(b"}"):
        return False
    try:
        return isinstance(json.loads(buffer.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# --- per-key validation ----------------------------------------------------------------------

def _require_str(key: str, unverified) -> str:
    if not isinstance(unverified, str):
        raise InvalidType(f"{key} must be a string or null, got a JSON {_json_type(unverified)}")
    if not unverified:
        raise InvalidType(f"{key} must not be empty (use null to clear it)")
    return unverified


def _is_utf8(text: str) -> bool:
    """False for a string holding a lone UTF-16 surrogate (JSON "\\ud800" decodes to one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _require_credential(key: str, unverified) -> str:
    """A non-empty string that is UTF-8 text without control characters (invalid_secret)."""
    value = _require_str(key, unverified)
    if not _is_utf8(value):
        raise InvalidSecret(f"{key} must be UTF-8 text; it holds a lone UTF-16 surrogate")
    if _CONTROL.search(value):
        raise InvalidSecret(f"{key} must not contain control characters")
    return value


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _aware(now: float) -> datetime:
    """Unix seconds as the aware UTC datetime X.509 validity compares with."""
    return datetime.fromtimestamp(now, timezone.utc)


def _validate_mtls(unverified, now: float) -> MtlsMaterial:
    key = MTLS_CLIENT_CERT_JSON
    if isinstance(unverified, str):  # the original system also sends the object as a string
        try:
            unverified = strictjson.loads(unverified)
        except (ValueError, RecursionError):
            raise InvalidType(f"{key} as a string must hold a JSON object; "
                              "it is not valid JSON") from None
    if not isinstance(unverified, dict):
        raise InvalidType(f"{key} must be an object with {', '.join(MTLS_FIELDS)} "
                          f"(or a JSON string holding one), got a JSON {_json_type(unverified)}")
    extra = sorted(k for k in unverified if k not in MTLS_FIELDS)
    if extra:
        shown = ", ".join(k if _ECHOABLE_KEY.match(k) else "<unprintable>" for k in extra)
        raise UnknownKey(f"{key} has unknown fields ({shown}); expected {', '.join(MTLS_FIELDS)}")
    pems = {}
    for name in MTLS_FIELDS:
        value = unverified.get(name)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if name not in unverified else f"a JSON {_json_type(value)}"
            raise InvalidType(f"{key}.{name} must be a PEM string, got {got}")
        if not _is_utf8(value):
            raise InvalidType(f"{key}.{name} must be PEM text; it holds a lone UTF-16 surrogate")
        pems[name] = value.encode("utf-8")

    # (1) the client chain parses; the first certificate is the client's.
    try:
        chain = x509.load_pem_x509_certificates(pems["client_cert"])
    except ValueError:
        raise InvalidCertificate(f"{key}.client_cert is not a PEM certificate") from None
    leaf = chain[0]
    # (2) the key parses, unencrypted.
    try:
        private_key = serialization.load_pem_private_key(pems["client_key"], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidCertificate(f"{key}.client_key is not an unencrypted PEM "
                                 "private key") from None
    # (3) the key matches the certificate.
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        matches = (private_key.public_key().public_bytes(*spki)
                   == leaf.public_key().public_bytes(*spki))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        matches = False
    if not matches:
        raise KeyMismatch("client_key does not match client_cert")
    # (4) the certificate is within its validity period at `now`.
    moment = _aware(now)
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if moment < not_before:
        raise CertificateNotYetValid(f"client_cert is valid from {_utc(not_before)}, "
                                     f"now is {_utc(moment)}")
    if moment > not_after:
        raise CertificateExpired(f"client_cert expired at {_utc(not_after)}, "
                                 f"now is {_utc(moment)}")
    # (5) the CA (one or more certificates) parses...
    try:
        cas = x509.load_pem_x509_certificates(pems["ca_cert"])
    except ValueError:
        raise InvalidCa(f"{key}.ca_cert is not a PEM certificate (or bundle)") from None
    # (6) ...and every certificate in it can verify a server at `now`: a bundle is trusted as a
    # whole, so one unusable member refuses it (the old CA stays in force).
    for index, ca in enumerate(cas, start=1):
        where = f"{key}.ca_cert" + (f" certificate {index} of {len(cas)}" if len(cas) > 1 else "")
        _check_ca(ca, where, now)

    pem = serialization.Encoding.PEM
    return MtlsMaterial(
        client_cert_pem=b"".join(c.public_bytes(pem) for c in chain),
        client_key_pem=private_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()),
        ca_cert_pem=b"".join(c.public_bytes(pem) for c in cas),
        not_before=not_before, not_after=not_after,
    )


def _check_ca(ca: x509.Certificate, where: str, now: float) -> None:
    """A CA certificate usable as a trust anchor at `now` (Unix seconds), or InvalidCa naming
    the rule."""
    moment = _aware(now)
    not_before, not_after = ca.not_valid_before_utc, ca.not_valid_after_utc
    if moment < not_before:
        raise InvalidCa(f"{where} is valid from {_utc(not_before)}, now is {_utc(moment)}")
    if moment > not_after:
        raise InvalidCa(f"{where} expired at {_utc(not_after)}, now is {_utc(moment)}")
    try:
        extensions = ca.extensions
    except ValueError:  # duplicate or malformed extensions
        raise InvalidCa(f"{where} has malformed extensions") from None
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise InvalidCa(f"{where} has no basicConstraints; expected CA:TRUE") from None
    if not constraints.ca:
        raise InvalidCa(f"{where} has basicConstraints CA:FALSE; expected CA:TRUE")
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return  # no keyUsage: not restricted (RFC 5280 4.2.1.3)
    if not usage.key_cert_sign:
        raise InvalidCa(f"{where} has a keyUsage without keyCertSign; expected keyCertSign")


def _validate_endpoint(unverified) -> str:
    """An https:// URL the runtime can connect to: the host passes the IDNA codec that `socket`
    and `ssl` (server_hostname) apply, or is an IP literal; everything else is printable ASCII."""
    key = ECS_WATERMARK_ENDPOINT
    value = _require_str(key, unverified)
    if len(value) > MAX_ENDPOINT_CHARS:
        raise InvalidEndpoint(f"{key} must be at most {MAX_ENDPOINT_CHARS} characters, "
                              f"got {len(value)}")
    if not _is_utf8(value):
        raise InvalidEndpoint(f"{key} must be UTF-8 text; it holds a lone UTF-16 surrogate")
    # Checked before parsing: urlsplit silently drops tabs and newlines.
    if _CONTROL.search(value) or any(c.isspace() for c in value):
        raise InvalidEndpoint(f"{key} must not contain spaces or control characters")
    if "?" in value or "#" in value:
        raise InvalidEndpoint(f"{key} must not have a query or fragment")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise InvalidEndpoint(f"{key} must be an https:// URL with a host; "
                              "it does not parse") from None
    if parts.scheme != "https":
        raise InvalidEndpoint(f"{key} must be an https:// URL, got scheme "
                              f"{parts.scheme + '://' if parts.scheme else 'none'}")
    if "@" in parts.netloc:
        raise InvalidEndpoint(f"{key} must not carry credentials")
    netloc = _NETLOC_PORT.match(parts.netloc)
    if netloc is None:
        raise InvalidEndpoint(f"{key} must be https://HOST[:PORT][/PATH]; the host and port "
                              "do not parse")
    _check_host(key, netloc.group("host"))
    port = netloc.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        raise InvalidEndpoint(f"{key} port must be 1..65535, got {int(port)}")
    if not _PATH.match(parts.path):
        raise InvalidEndpoint(f"{key} path must be printable ASCII (percent-encode the rest)")
    return value


def _check_host(key: str, host: str) -> None:
    """The URL's host: an IPv4 dotted quad, a bracketed IPv6 address without a zone, or a DNS
    name whose IDNA (ASCII) form has LDH labels of 1..63 and at most 253 characters."""
    if not host:
        raise InvalidEndpoint(f"{key} must be an https:// URL with a host")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidEndpoint(f"{key} host in brackets must be an IPv6 address") from None
        if "%" in host:
            raise InvalidEndpoint(f"{key} IPv6 host must not carry a zone id")
        return
    try:
        ipaddress.IPv4Address(host)
        return
    except ValueError:
        pass
    try:
        ascii_name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise InvalidEndpoint(f"{key} host is not a valid IDNA hostname (empty label, label "
                              f"over {MAX_LABEL_CHARS} characters or a disallowed character)"
                              ) from None
    labels = ascii_name.split(".")
    if not all(labels):
        raise InvalidEndpoint(f"{key} host must not have an empty label (or a trailing dot)")
    if len(ascii_name) > MAX_HOSTNAME_CHARS:
        raise InvalidEndpoint(f"{key} host must be at most {MAX_HOSTNAME_CHARS} characters "
                              f"in IDNA form, got {len(ascii_name)}")
    for label in labels:
        if len(label) > MAX_LABEL_CHARS or not _LDH_LABEL.match(label):
            raise InvalidEndpoint(f"{key} host labels must be 1..{MAX_LABEL_CHARS} letters, "
                                  "digits or inner hyphens")
        if label.startswith("xn--"):
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                raise InvalidEndpoint(f"{key} host has an invalid IDNA A-label") from None
    if _NUMERIC_LABEL.match(labels[-1]):
        raise InvalidEndpoint(f"{key} host looks like an IPv4 address but is not a dotted quad")


def _validate_rpc_secret(unverified) -> str:
    key = ENCLAVE_RPC_SHARED_SECRET
    value = _require_credential(key, unverified)
    size = len(value.encode("utf-8"))
    if size < MIN_RPC_SECRET_BYTES:
        raise InvalidSecret(f"{key} must be at least {MIN_RPC_SECRET_BYTES} bytes, got {size}")
    return value


def _decode_sealing_key(name: str, unverified) -> bytes:
    value = _require_credential(name, unverified)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret(f"{name} must be base64") from None
    if len(raw) != SEALING_KEY_BYTES:
        raise InvalidSecret(f"{name} must decode to {SEALING_KEY_BYTES} bytes, got {len(raw)}")
    return raw


def _validate_sealing_key(unverified) -> bytes | sealing.Keyring:
    """A base64 string: one key (bytes), the new current key. A list of base64 strings: the
    whole keyring (a sealing.Keyring), current first, then the previous keys newest first."""
    key = ENCLAVE_TOKEN_SEALING_KEY
    if not isinstance(unverified, list):
        return _decode_sealing_key(key, unverified)
    if not 1 <= len(unverified) <= MAX_SEALING_KEYS:
        raise InvalidSecret(f"{key} as a list must hold 1..{MAX_SEALING_KEYS} keys (current "
                            f"first), got {len(unverified)}")
    keys: list[bytes] = []
    for index, item in enumerate(unverified):
        name = f"{key}[{index}]"
        if not isinstance(item, str) or not item:
            got = "an empty string" if item == "" else f"a JSON {_json_type(item)}"
            raise InvalidType(f"{name} must be a non-empty base64 string, got {got}")
        raw = _decode_sealing_key(name, item)
        if raw in keys:
            raise InvalidSecret(f"{name} is the same key as {key}[{keys.index(raw)}]; "
                                "each key may appear once")
        keys.append(raw)
    return sealing.Keyring(keys[0], tuple(keys[1:]))


def merge_sealing_key(keyring: sealing.Keyring | None,
                      delivered: bytes | sealing.Keyring) -> sealing.Keyring:
    """The keyring after a delivery of ENCLAVE_TOKEN_SEALING_KEY (validated, not null).

    A list (a Keyring) states the whole keyring. One key becomes the current key and the key it
    replaces becomes the newest previous key (the oldest beyond sealing.MAX_PREVIOUS_KEYS is
    dropped), so tokens sealed under it keep opening; the current key again changes nothing, and
    a previous key again becomes current (a rollback).
    """
    if isinstance(delivered, sealing.Keyring):
        return delivered
    if keyring is None:
        return sealing.Keyring(delivered)
    if delivered == keyring.current:
        return keyring
    previous = tuple(k for k in keyring.keys if k != delivered)
    return sealing.Keyring(delivered, previous[:sealing.MAX_PREVIOUS_KEYS])


def validate_value(key: str, unverified, now: float):
    """One key's canonical value (None for an explicit null), or a SecretsError.
    `now` (Unix seconds) is the time certificates must be valid at."""
    if unverified is None:
        return None
    if key == MTLS_CLIENT_CERT_JSON:
        return _validate_mtls(unverified, now)
    if key == ECS_WATERMARK_ENDPOINT:
        return _validate_endpoint(unverified)
    if key in (GOOGLE_OAUTH_CLIENT_ID, GOOGLE_OAUTH_CLIENT_SECRET):
        return _require_credential(key, unverified)
    if key == ENCLAVE_RPC_SHARED_SECRET:
        return _validate_rpc_secret(unverified)
    if key == ENCLAVE_TOKEN_SEALING_KEY:
        return _validate_sealing_key(unverified)
    raise UnknownKey(_unknown_message([key]))


def _unknown_message(keys) -> str:
    shown = [k if isinstance(k, str) and _ECHOABLE_KEY.match(k) else "<unprintable>" for k in keys]
    return f"unknown key {', '.join(sorted(shown))}; expected some of {', '.join(KNOWN_KEYS)}"


# --- merge -----------------------------------------------------------------------------------

def apply_update(current: SecretsState, unverified: dict, now: float
                 ) -> tuple[SecretsState, list[str]]:
    """Validate a whole delivery, then merge it. Returns (new state, changed keys).
    `now` is Unix seconds, and so are the times the state records (updated_at, rpc_rotated_at).

    All-or-nothing: the first invalid key raises and nothing is merged. A delivery that changes
    nothing returns a state with the same version (only `received` may flip to True).
    Rotating ENCLAVE_RPC_SHARED_SECRET records the previous secret and the time, for a grace
    period decided by the caller; clearing it (null) is a revocation and keeps no previous one.
    ENCLAVE_TOKEN_SEALING_KEY merges into the keyring in force (`merge_sealing_key`); null
    clears every sealing key.
    """
    if not isinstance(unverified, dict):
        raise NotAnObject(f"delivery must be one JSON object, got a JSON {_json_type(unverified)}")
    unknown = [k for k in unverified if k not in KNOWN_KEYS]
    if unknown:
        raise UnknownKey(_unknown_message(unknown))
    validated = {key: validate_value(key, unverified[key], now)
                 for key in KNOWN_KEYS if key in unverified}

    merged = dict(current.values)
    for key, value in validated.items():
        if value is None:
            merged.pop(key, None)
        elif key == ENCLAVE_TOKEN_SEALING_KEY:
            merged[key] = merge_sealing_key(current.values.get(key), value)
        else:
            merged[key] = value
    changed = [k for k in KNOWN_KEYS if current.values.get(k) != merged.get(k)]
    if not changed:
        return (current if current.received else replace(current, received=True)), []

    previous, rotated_at = current.previous_rpc_secret, current.rpc_rotated_at
    if ENCLAVE_RPC_SHARED_SECRET in changed:
        old = current.values.get(ENCLAVE_RPC_SHARED_SECRET)
        new = merged.get(ENCLAVE_RPC_SHARED_SECRET)
        previous, rotated_at = (old, now) if new is not None and old is not None else (None, None)
    state = SecretsState(version=current.version + 1, values=MappingProxyType(merged),
                         updated_at=now, received=True, previous_rpc_secret=previous,
                         rpc_rotated_at=rotated_at)
    return state, changed


def rpc_secrets(state: SecretsState, now: float, grace_seconds: float) -> list[str]:
    """The shared secrets an RPC may be signed with at `now` (Unix seconds): current, then
    previous within the grace."""
    secrets = []
    current = state.values.get(ENCLAVE_RPC_SHARED_SECRET)
    if current is not None:
        secrets.append(current)
    if (state.previous_rpc_secret is not None and state.rpc_rotated_at is not None
            and 0 <= now - state.rpc_rotated_at < grace_seconds):
        secrets.append(state.previous_rpc_secret)
    return secrets
