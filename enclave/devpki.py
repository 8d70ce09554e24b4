"""INSECURE dev-shim PKI: a local root kept under the state directory and short-lived leaves.

The root (EC P-384, CN says INSECURE) lives in `<state_dir>/dev-attestation/` (directory 0700,
key 0600) so restarts keep the same root and verifiers can pin it. Leaves signed by it are
shaped like Nitro leaves: P-384, 3 hours of validity, basicConstraints CA:FALSE, keyUsage
digitalSignature (the dev-shim source issues one per boot and renews it before it expires).
Nothing here is trustworthy: it exists for local development.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import EnclaveError

logger = logging.getLogger(__name__)

DEV_DIR_NAME = "dev-attestation"
ROOT_KEY_FILE = "root.key"
ROOT_CERT_FILE = "root.crt"
LOCK_FILE = ".lock"
ROOT_COMMON_NAME = "INSECURE enclave dev-shim root"
LEAF_COMMON_NAME = "INSECURE enclave dev-shim leaf"
ORGANIZATION = "INSECURE dev-shim (not an AWS Nitro Enclave)"
ROOT_LIFETIME = dt.timedelta(days=3650)  # long-lived like the AWS root (30 years there)
ROOT_BACKDATE = dt.timedelta(hours=1)  # tolerate small clock differences between tools
LEAF_LIFETIME = dt.timedelta(hours=3)  # real Nitro leaves live about 3 hours
LEAF_BACKDATE = dt.timedelta(minutes=1)
DIR_MODE = 0o700
KEY_MODE = 0o600
CERT_MODE = 0o644
MAX_PEM_BYTES = 64 * 1024  # a root key or certificate PEM is < 2 KiB


class DevPkiError(EnclaveError):
    """The dev root cannot be created or loaded (permissions, corrupt files)."""


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_der: bytes

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def names_itself_insecure(root_der: bytes) -> bool:
    """Whether a root certificate says INSECURE in its subject, as every dev-shim root does:
    the mark that makes a document `insecure` for the runtime, probe and verify alike."""
    try:
        subject = x509.load_der_x509_certificate(root_der).subject.rfc4514_string()
    except ValueError:
        return False
    return "INSECURE" in subject


def dev_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / DEV_DIR_NAME


def _utc(now: float | None) -> dt.datetime:
    """`now` (Unix seconds, default time.time()) as an aware UTC datetime, whole seconds."""
    seconds = time.time() if now is None else now
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(microsecond=0)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _make_root(moment: dt.datetime) -> Issued:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(ROOT_COMMON_NAME)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - ROOT_BACKDATE)
        .not_valid_after(moment + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(sign=True, cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return Issued(cert, key, cert.public_bytes(serialization.Encoding.DER))


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write atomically: a temporary file in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _locked(directory: Path):
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, KEY_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_root(directory: Path, moment: dt.datetime) -> Issued:
    key_path, cert_path = directory / ROOT_KEY_FILE, directory / ROOT_CERT_FILE
    hint = f"delete {directory} to create a new dev root"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes()[:MAX_PEM_BYTES], None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes()[:MAX_PEM_BYTES])
    except (OSError, ValueError, TypeError) as exc:
        raise DevPkiError(f"cannot load the dev root from {directory} ({type(exc).__name__}); "
                          f"{hint}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise DevPkiError(f"{key_path} is not an EC P-384 key; {hint}")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise DevPkiError(f"{key_path} does not match {cert_path}; {hint}")
    if "INSECURE" not in cert.subject.rfc4514_string():
        raise DevPkiError(f"{cert_path} does not say INSECURE in its subject; {hint}")
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise DevPkiError(f"{cert_path} is not valid now (valid "
                          f"{cert.not_valid_before_utc:%Y-%m-%d}.."
                          f"{cert.not_valid_after_utc:%Y-%m-%d}); {hint}")
    return Issued(cert, key, cert.public_bytes(serialization.Encoding.DER))


def load_or_create_root(state_dir: str | os.PathLike, now: float | None = None) -> Issued:
    """The persistent dev root under `<state_dir>/dev-attestation/`, created on first use.
    `now` is Unix seconds (default time.time())."""
    moment = _utc(now)
    directory = dev_dir(state_dir)
    try:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(directory, DIR_MODE)
        with _locked(directory):
            key_path, cert_path = directory / ROOT_KEY_FILE, directory / ROOT_CERT_FILE
            if key_path.exists() and cert_path.exists():
                return _load_root(directory, moment)
            root = _make_root(moment)
            _write_private(key_path, root.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), KEY_MODE)
            _write_private(cert_path, root.cert_pem, CERT_MODE)
            logger.warning("Created an INSECURE dev-shim attestation root in %s", directory)
            return root
    except OSError as exc:
        raise DevPkiError(f"cannot use {directory} for the dev root: {exc.strerror}") from None


def read_root_pem(state_dir: str | os.PathLike) -> bytes:
    """The dev root certificate PEM, without creating anything (for verifiers)."""
    path = dev_dir(state_dir) / ROOT_CERT_FILE
    try:
        return path.read_bytes()[:MAX_PEM_BYTES]
    except OSError as exc:
        raise DevPkiError(f"no dev root at {path} ({exc.strerror}); start the runtime in "
                          "dev-shim mode once, or pass --root") from None


def issue_leaf(root: Issued, now: float | None = None, *,
               lifetime: dt.timedelta = LEAF_LIFETIME, label: str = "") -> Issued:
    """A fresh P-384 leaf signed by the dev root, valid `lifetime` from `now` (Unix seconds,
    default time.time())."""
    moment = _utc(now)
    key = ec.generate_private_key(ec.SECP384R1())
    common_name = f"{LEAF_COMMON_NAME} {label}".strip()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - LEAF_BACKDATE)
        .not_valid_after(moment + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign=True, cert_sign=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
                       critical=False)
        .sign(root.key, hashes.SHA384())
    )
    return Issued(cert, key, cert.public_bytes(serialization.Encoding.DER))
