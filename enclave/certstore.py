"""Atomic writes of the mTLS files: client.crt, client.key and ecs-ca.crt in ENCLAVE_CERTS_DIR.

The three files are replaced as ONE set, the way Kubernetes' AtomicWriter updates secret
volumes. Layout of the directory (mode 0700):

    .gen-XXXXXXXX/client.crt   a generation: a fresh directory, files 0600, never modified
    .gen-XXXXXXXX/client.key
    .gen-XXXXXXXX/ecs-ca.crt
    .data        -> .gen-XXXXXXXX        the one symlink that says which generation is live
    client.crt   -> .data/client.crt      the names other programs open (symlinks, made once)
    client.key   -> .data/client.key
    ecs-ca.crt   -> .data/ecs-ca.crt

An update (1) `stage`: writes every file of a new generation (each fsynced, then the generation
directory fsynced), (2) the caller builds its TLS context from the staged files, (3) `activate`:
points `.data` at the new generation with one rename of a temporary symlink (atomic), fsyncs the
certs directory, and removes older generations.

Guarantee: a failure or crash at any point before the `.data` rename leaves the old set whole
(a half-written generation is never referenced and is removed by the next update); after it,
the new set is complete. A failure reported after the rename (linking, fsync) points `.data`
back at the old generation before raising. A reader always sees one generation's files. The one exception is the
very first activation in a directory that holds plain files from another tool: the visible names
are turned into symlinks one rename at a time, so a crash in that window may leave a mix.
The runtime itself never reads these files back at start-up: the in-memory state is the truth.
"""

from __future__ import annotations

import logging
import os
import secrets as _random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EnclaveError

log = logging.getLogger(__name__)

CLIENT_CERT_NAME = "client.crt"
CLIENT_KEY_NAME = "client.key"
CA_CERT_NAME = "ecs-ca.crt"
FILE_NAMES = (CLIENT_CERT_NAME, CLIENT_KEY_NAME, CA_CERT_NAME)
DIR_MODE = 0o700  # only the runtime's user may list or enter the certs directory
FILE_MODE = 0o600  # the key above all, and the certificates alike: nothing else reads them
DATA_LINK = ".data"
GENERATION_PREFIX = ".gen-"
_TEMP_LINK_PREFIX = ".tmp-link-"


class CertStoreError(EnclaveError):
    """The files could not be written; the old set is still in place."""


@dataclass(frozen=True)
class CertFiles:
    """One generation's files (paths inside the generation directory, which never changes)."""

    directory: Path
    client_cert: Path
    client_key: Path
    ca_cert: Path


def _write_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist), write all of `data`, fsync, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_link(directory: Path, name: str, target: str) -> None:
    """Make `directory/name` a symlink to `target` with one atomic rename."""
    temp = directory / f"{_TEMP_LINK_PREFIX}{_random.token_hex(8)}"
    os.symlink(target, temp)
    try:
        os.replace(temp, directory / name)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def ensure_dir(certs_dir: str | os.PathLike) -> Path:
    """Create the certs directory if needed and make it 0700."""
    certs_dir = Path(certs_dir)
    try:
        certs_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(certs_dir, DIR_MODE)
    except OSError as exc:
        raise CertStoreError(f"cannot prepare the certs directory {certs_dir}: "
                             f"{exc.strerror or exc}") from None
    return certs_dir


def stage(certs_dir: str | os.PathLike, client_cert: bytes, client_key: bytes,
          ca_cert: bytes) -> CertFiles:
    """Write a new generation (not yet live). On failure nothing is left behind."""
    certs_dir = ensure_dir(certs_dir)
    try:
        generation = Path(tempfile.mkdtemp(prefix=GENERATION_PREFIX, dir=certs_dir))  # 0700
    except OSError as exc:
        raise CertStoreError(f"cannot write certificates: {exc.strerror or exc}") from None
    files = CertFiles(generation, generation / CLIENT_CERT_NAME, generation / CLIENT_KEY_NAME,
                      generation / CA_CERT_NAME)
    try:
        _write_file(files.client_cert, client_cert)
        _write_file(files.client_key, client_key)
        _write_file(files.ca_cert, ca_cert)
        _fsync_dir(generation)
    except OSError as exc:
        discard(files)
        raise CertStoreError(f"cannot write certificates: {exc.strerror or exc}") from None
    except BaseException:
        discard(files)
        raise
    return files


def activate(certs_dir: str | os.PathLike, files: CertFiles) -> None:
    """Make a staged generation the live set (one atomic rename), then tidy up.

    If a step after the rename fails, `.data` is pointed back at the previous generation (still
    on disk: old generations are removed only after success) and CertStoreError is raised.
    """
    certs_dir = Path(certs_dir)
    previous = _read_link(certs_dir / DATA_LINK)
    try:
        _replace_link(certs_dir, DATA_LINK, files.directory.name)
    except OSError as exc:
        raise CertStoreError(f"cannot activate certificates: {exc.strerror or exc}") from None
    try:
        for name in FILE_NAMES:
            target = f"{DATA_LINK}/{name}"
            path = certs_dir / name
            if not (path.is_symlink() and os.readlink(path) == target):
                _replace_link(certs_dir, name, target)
        _fsync_dir(certs_dir)
    except OSError as exc:
        _roll_back(certs_dir, previous)
        raise CertStoreError(f"cannot activate certificates: {exc.strerror or exc}") from None
    _remove_stale(certs_dir, keep=files.directory.name)


def _read_link(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _roll_back(certs_dir: Path, previous: str | None) -> None:
    """Best effort: make the previous generation live again (or none, if there was none)."""
    try:
        if previous is not None:
            _replace_link(certs_dir, DATA_LINK, previous)
        else:
            (certs_dir / DATA_LINK).unlink(missing_ok=True)
        _fsync_dir(certs_dir)
    except OSError as exc:
        log.error("Could not roll the certificate files back: %s", exc.strerror or exc)


def discard(files: CertFiles) -> None:
    """Remove a staged generation that will not be activated."""
    shutil.rmtree(files.directory, ignore_errors=True)


def write_cert_set(certs_dir: str | os.PathLike, client_cert: bytes, client_key: bytes,
                   ca_cert: bytes) -> CertFiles:
    """Stage and activate in one call."""
    files = stage(certs_dir, client_cert, client_key, ca_cert)
    try:
        activate(certs_dir, files)
    except BaseException:
        if not is_live(certs_dir, files):
            discard(files)
        raise
    return files


def clear(certs_dir: str | os.PathLike) -> None:
    """Remove the live set (an explicit null for MTLS_CLIENT_CERT_JSON)."""
    certs_dir = Path(certs_dir)
    if not certs_dir.is_dir():
        return
    try:
        for name in FILE_NAMES:
            path = certs_dir / name
            if path.is_symlink() or path.exists():
                path.unlink()
        (certs_dir / DATA_LINK).unlink(missing_ok=True)
        _fsync_dir(certs_dir)
    except OSError as exc:
        raise CertStoreError(f"cannot remove certificates: {exc.strerror or exc}") from None
    _remove_stale(certs_dir, keep=None)


def live_files(certs_dir: str | os.PathLike) -> CertFiles | None:
    """The live generation's files, or None."""
    certs_dir = Path(certs_dir)
    try:
        name = os.readlink(certs_dir / DATA_LINK)
    except OSError:
        return None
    generation = certs_dir / name
    return CertFiles(generation, generation / CLIENT_CERT_NAME, generation / CLIENT_KEY_NAME,
                     generation / CA_CERT_NAME)


def is_live(certs_dir: str | os.PathLike, files: CertFiles) -> bool:
    """Whether `files` is the live generation (after a failed activation: was it rolled back?)."""
    live = live_files(certs_dir)
    return live is not None and live.directory.name == files.directory.name


def _remove_stale(certs_dir: Path, keep: str | None) -> None:
    """Best effort: old generations and leftover temporary links (a failure is only logged)."""
    try:
        entries = list(os.scandir(certs_dir))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.name.startswith(GENERATION_PREFIX) and entry.name != keep:
                shutil.rmtree(entry.path)
            elif entry.name.startswith(_TEMP_LINK_PREFIX):
                os.unlink(entry.path)
        except OSError as exc:
            log.warning("Could not remove stale certificate files %s: %s", entry.name,
                        exc.strerror or exc)
