"""Atomic writes of the mTLS files: client.crt, client.key and ecs-ca.crt in ENCLAVE_CERTS_DIR.

The three files are replaced as ONE set, the way Kubernetes' AtomicWriter updates secret
volumes. Layout of the directory (mode 0700):

    .gen-XXXXXXXX/client.crt   a generation: a fresh directory, files 0600, never modified
    .gen-XXXXXXXX/client.key
    .gen-XXXXXXXX/ecs-ca.crt
    .data        -> .gen-XXXXXXXX        THE switch: which generation is live (absent: no set)
    client.crt   -> .data/client.crt      the names other programs open: fixed links, made
    client.key   -> .data/client.key      before the first switch and never changed after
    ecs-ca.crt   -> .data/ecs-ca.crt

Every change of what the names show is ONE rename or unlink of `.data`, so a reader (or a
restart after a crash) sees one whole set, never a mix:

- `stage` writes every file of a new generation (each fsynced, then the generation directory);
  the caller builds its TLS context from the staged files.
- `activate` (1) makes sure the three names are the fixed links (`_adopt`), (2) renames a
  temporary link over `.data` (the switch), (3) fsyncs the directory, (4) removes older
  generations. A failure reported after the switch points `.data` back before raising.
- `clear` (1) adopts, (2) unlinks `.data`: the three names dangle at once, (3) removes the
  dangling links and the generations.
- `_adopt`, the very first time: fixed links that dangle while no `.data` exists show what was
  there (nothing). If another tool left plain files, their bytes are first copied into a
  generation that `.data` points at; each name is then turned into its link by one rename that
  swaps a file for a link to the same bytes, so the set shown never changes.
- `recover`, at start-up (SecretStore does it), finishes or undoes whatever a crash interrupted,
  deterministically: with `.data` on a generation, the three names are made its links and
  everything else goes (other generations, temporary links); without it, our dangling links,
  every generation and temporary link go, and files of another tool stay. Either way the result
  is the old complete set or the new one, and no orphan remains.

All changes go through `os` functions (directly or through tempfile/shutil/pathlib), which is
how the tests count every step and kill the update before each one. The runtime never reads
these files back at start-up: the in-memory state is the truth; the files are for TLS and for
other programs.
"""

from __future__ import annotations

import logging
import os
import secrets as _random
import shutil
import stat
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
        _unlink(temp)
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


def _write_generation(certs_dir: Path, contents: dict[str, bytes]) -> CertFiles:
    """A new generation directory holding `contents` (name -> bytes), every byte fsynced."""
    try:
        generation = Path(tempfile.mkdtemp(prefix=GENERATION_PREFIX, dir=certs_dir))  # 0700
    except OSError as exc:
        raise CertStoreError(f"cannot write certificates: {exc.strerror or exc}") from None
    files = CertFiles(generation, generation / CLIENT_CERT_NAME, generation / CLIENT_KEY_NAME,
                      generation / CA_CERT_NAME)
    try:
        for name in FILE_NAMES:
            if name in contents:
                _write_file(generation / name, contents[name])
        _fsync_dir(generation)
    except OSError as exc:
        discard(files)
        raise CertStoreError(f"cannot write certificates: {exc.strerror or exc}") from None
    except BaseException:
        discard(files)
        raise
    return files


def stage(certs_dir: str | os.PathLike, client_cert: bytes, client_key: bytes,
          ca_cert: bytes) -> CertFiles:
    """Write a new generation (not yet live). On failure nothing is left behind."""
    certs_dir = ensure_dir(certs_dir)
    return _write_generation(certs_dir, {CLIENT_CERT_NAME: client_cert,
                                         CLIENT_KEY_NAME: client_key, CA_CERT_NAME: ca_cert})


def _fixed_target(name: str) -> str:
    return f"{DATA_LINK}/{name}"


def _is_fixed_link(certs_dir: Path, name: str) -> bool:
    return _read_link(certs_dir / name) == _fixed_target(name)


def _adopt(certs_dir: Path) -> None:
    """Make the three names the fixed links into `.data`, without changing what they show."""
    names = [name for name in FILE_NAMES if not _is_fixed_link(certs_dir, name)]
    if not names:
        return
    if _read_link(certs_dir / DATA_LINK) is None:
        # No set of ours. What the names show (another tool's files, or nothing) becomes a
        # generation first, so turning a name into a link keeps its bytes.
        contents = {}
        for name in names:
            try:
                contents[name] = (certs_dir / name).read_bytes()
            except FileNotFoundError:
                pass  # absent (or a dangling link): it stays absent
        if contents:
            adopted = _write_generation(certs_dir, contents)
            _replace_link(certs_dir, DATA_LINK, adopted.directory.name)
            _fsync_dir(certs_dir)
    for name in names:
        _replace_link(certs_dir, name, _fixed_target(name))
    _fsync_dir(certs_dir)


def activate(certs_dir: str | os.PathLike, files: CertFiles) -> None:
    """Make a staged generation the live set (one atomic rename of `.data`), then tidy up.

    If a step after the rename fails, `.data` is pointed back at the previous generation (still
    on disk: old generations are removed only after success) and CertStoreError is raised.
    """
    certs_dir = Path(certs_dir)
    try:
        _adopt(certs_dir)
        previous = _read_link(certs_dir / DATA_LINK)
        _replace_link(certs_dir, DATA_LINK, files.directory.name)  # the switch
    except OSError as exc:
        raise CertStoreError(f"cannot activate certificates: {exc.strerror or exc}") from None
    try:
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
            _unlink(certs_dir / DATA_LINK)
        _fsync_dir(certs_dir)
    except OSError as exc:
        log.error("Could not roll the certificate files back: %s", exc.strerror or exc)


def discard(files: CertFiles) -> None:
    """Remove a staged generation that will not be activated."""
    shutil.rmtree(files.directory, ignore_errors=True)


def clear(certs_dir: str | os.PathLike) -> None:
    """Remove the live set (an explicit null for MTLS_CLIENT_CERT_JSON): one unlink of `.data`
    hides all three files at once; the dangling links and the generations go after."""
    certs_dir = Path(certs_dir)
    if not certs_dir.is_dir():
        return
    try:
        if any(os.path.lexists(certs_dir / name) for name in FILE_NAMES):
            _adopt(certs_dir)
        if _unlink(certs_dir / DATA_LINK):  # the switch
            _fsync_dir(certs_dir)
        for name in FILE_NAMES:
            _unlink(certs_dir / name)
        _fsync_dir(certs_dir)
    except OSError as exc:
        raise CertStoreError(f"cannot remove certificates: {exc.strerror or exc}") from None
    _remove_stale(certs_dir, keep=None)


def recover(certs_dir: str | os.PathLike) -> CertFiles | None:
    """At start-up: finish or undo an update a crash interrupted; returns the live files.

    `.data` decides. On a generation of ours: the three names are made its fixed links (a crash
    during the first activation may have left some missing). Absent, or on anything else: no set
    is live, so our dangling links go; files of another tool stay. Then every other generation
    and temporary link is removed. Raises CertStoreError if the directory cannot be repaired.
    """
    certs_dir = Path(certs_dir)
    if not certs_dir.is_dir():
        return None
    repaired = 0
    try:
        if stat.S_IMODE(os.stat(certs_dir).st_mode) != DIR_MODE:
            os.chmod(certs_dir, DIR_MODE)
        live = _read_link(certs_dir / DATA_LINK)
        if live is not None and not (live.startswith(GENERATION_PREFIX) and "/" not in live
                                     and (certs_dir / live).is_dir()):
            log.warning("Certificate files: %s named no generation; no set is live", DATA_LINK)
            _unlink(certs_dir / DATA_LINK)
            live = None
        for name in FILE_NAMES:
            if _is_fixed_link(certs_dir, name) == (live is not None):
                continue
            if live is not None:
                _replace_link(certs_dir, name, _fixed_target(name))
                repaired += 1
            elif _unlink(certs_dir / name):
                repaired += 1
        if repaired:
            _fsync_dir(certs_dir)
    except OSError as exc:
        raise CertStoreError(f"cannot repair the certs directory {certs_dir}: "
                             f"{exc.strerror or exc}") from None
    repaired += _remove_stale(certs_dir, keep=live)
    if repaired:
        log.info("Certificate files: repaired an interrupted update (%s; %d entries fixed)",
                 "the live set kept" if live else "no set live", repaired)
    return live_files(certs_dir)


def _unlink(path: Path) -> bool:
    """Remove a file or link; False if there was none."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


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


def _remove_stale(certs_dir: Path, keep: str | None) -> int:
    """Best effort: other generations and leftover temporary links (a failure is only logged).
    Returns how many entries were removed."""
    try:
        entries = list(os.scandir(certs_dir))
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        try:
            if entry.name.startswith(GENERATION_PREFIX) and entry.name != keep:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
            elif entry.name.startswith(_TEMP_LINK_PREFIX):
                os.unlink(entry.path)
                removed += 1
        except OSError as exc:
            log.warning("Could not remove stale certificate files %s: %s", entry.name,
                        exc.strerror or exc)
    return removed
