"""Atomic writes of the mTLS file set (enclave.certstore)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import unittest
from pathlib import Path
from unittest import mock

from enclave import certstore
from enclave.certstore import CA_CERT_NAME, CLIENT_CERT_NAME, CLIENT_KEY_NAME, FILE_NAMES
from enclave.config import Settings
from enclave.metrics import Metrics
from enclave.secretstore import SecretStore

SET_A = (b"cert A\n", b"key A\n", b"ca A\n")
SET_B = (b"cert B\n", b"key B\n", b"ca B\n")
SET_C = (b"cert C\n", b"key C\n", b"ca C\n")
PLAIN = (b"cert from another tool\n", b"key from another tool\n", b"ca from another tool\n")
NO_SET = (None, None, None)


def file_hashes(directory: Path) -> dict[str, str | None]:
    """sha256 of each visible file (following links), None when absent."""
    out = {}
    for name in FILE_NAMES:
        path = directory / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return out


def generations(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(certstore.GENERATION_PREFIX))


def write_cert_set(certs_dir, client_cert: bytes, client_key: bytes, ca_cert: bytes):
    """Stage and activate in one call, as SecretStore does (discarding what did not go live)."""
    files = certstore.stage(certs_dir, client_cert, client_key, ca_cert)
    try:
        certstore.activate(certs_dir, files)
    except BaseException:
        if not certstore.is_live(certs_dir, files):
            certstore.discard(files)
        raise
    return files


class CertStoreTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self._tmp.cleanup)
        self.dir = Path(self._tmp.name) / "certs"

    def read_set(self) -> tuple[bytes, bytes, bytes]:
        return tuple((self.dir / name).read_bytes() for name in
                     (CLIENT_CERT_NAME, CLIENT_KEY_NAME, CA_CERT_NAME))

    def test_write_creates_the_set_with_tight_modes(self):
        files = write_cert_set(self.dir, *SET_A)
        self.assertEqual(self.read_set(), SET_A)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        for name in FILE_NAMES:
            path = self.dir / name
            self.assertTrue(path.is_symlink(), name)
            self.assertEqual(os.readlink(path), f"{certstore.DATA_LINK}/{name}")
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, name)
        self.assertEqual(stat.S_IMODE(os.stat(files.directory).st_mode), 0o700)
        self.assertEqual(files.client_key.read_bytes(), b"key A\n")
        self.assertEqual(certstore.live_files(self.dir).directory, files.directory)

    def test_rewrite_replaces_the_set_and_removes_the_old_generation(self):
        old = write_cert_set(self.dir, *SET_A)
        new = write_cert_set(self.dir, *SET_B)
        self.assertEqual(self.read_set(), SET_B)
        self.assertEqual(generations(self.dir), [new.directory.name])
        self.assertFalse(old.directory.exists())

    def test_existing_directory_is_tightened_to_0700(self):
        self.dir.mkdir(mode=0o755)
        os.chmod(self.dir, 0o755)
        write_cert_set(self.dir, *SET_A)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)

    def test_failure_between_files_leaves_the_old_set_whole(self):
        write_cert_set(self.dir, *SET_A)
        before = file_hashes(self.dir)
        gens_before = generations(self.dir)
        real_write = certstore._write_file
        for fail_at in (1, 2, 3):
            with self.subTest(fail_at=fail_at):
                calls = []

                def flaky_write(path, data):
                    calls.append(path)
                    if len(calls) == fail_at:
                        raise OSError(28, "No space left on device")
                    real_write(path, data)

                with mock.patch.object(certstore, "_write_file", flaky_write):
                    with self.assertRaises(certstore.CertStoreError) as caught:
                        write_cert_set(self.dir, *SET_B)
                self.assertIn("No space left on device", str(caught.exception))
                self.assertEqual(file_hashes(self.dir), before)
                self.assertEqual(generations(self.dir), gens_before)  # the partial one is gone

    def test_failure_at_activation_leaves_the_old_set_whole(self):
        write_cert_set(self.dir, *SET_A)
        before = file_hashes(self.dir)
        gens_before = generations(self.dir)
        with mock.patch.object(certstore, "_replace_link", side_effect=OSError(5, "I/O error")):
            with self.assertRaises(certstore.CertStoreError):
                write_cert_set(self.dir, *SET_B)
        self.assertEqual(file_hashes(self.dir), before)
        self.assertEqual(generations(self.dir), gens_before)

    def test_failure_after_the_swap_rolls_back_to_the_old_set(self):
        write_cert_set(self.dir, *SET_A)
        before = file_hashes(self.dir)
        gens_before = generations(self.dir)
        real_fsync = certstore._fsync_dir

        def failing_fsync(path):
            if Path(path) == self.dir:  # the certs directory, right after the .data rename
                raise OSError(5, "I/O error")
            real_fsync(path)

        with mock.patch.object(certstore, "_fsync_dir", failing_fsync):
            with self.assertRaises(certstore.CertStoreError):
                write_cert_set(self.dir, *SET_B)
        self.assertEqual(file_hashes(self.dir), before)
        self.assertEqual(generations(self.dir), gens_before)

    def test_a_staged_generation_is_invisible_until_activated(self):
        write_cert_set(self.dir, *SET_A)
        before = file_hashes(self.dir)
        staged = certstore.stage(self.dir, *SET_B)
        self.assertEqual(staged.client_cert.read_bytes(), b"cert B\n")
        self.assertEqual(file_hashes(self.dir), before)
        certstore.discard(staged)
        self.assertFalse(staged.directory.exists())
        self.assertEqual(file_hashes(self.dir), before)
        staged = certstore.stage(self.dir, *SET_B)
        certstore.activate(self.dir, staged)
        self.assertEqual(self.read_set(), SET_B)

    def test_clear_removes_the_set(self):
        write_cert_set(self.dir, *SET_A)
        certstore.clear(self.dir)
        self.assertEqual(file_hashes(self.dir), dict.fromkeys(FILE_NAMES))
        self.assertEqual(generations(self.dir), [])
        self.assertIsNone(certstore.live_files(self.dir))
        certstore.clear(self.dir)  # idempotent
        certstore.clear(Path(self._tmp.name) / "never-created")

    def test_plain_files_from_another_tool_are_replaced(self):
        self.dir.mkdir(mode=0o700)
        for name in FILE_NAMES:
            (self.dir / name).write_bytes(b"stale " + name.encode())
        write_cert_set(self.dir, *SET_A)
        self.assertEqual(self.read_set(), SET_A)
        self.assertTrue(all((self.dir / name).is_symlink() for name in FILE_NAMES))


class Crash(BaseException):
    """The process dies here (kill -9): not an error any `except Exception` would handle."""


# Every os function that changes the file system. certstore changes the disk only through
# these, directly or through pathlib, tempfile and shutil (which call them too), so each call is
# one step a crash can come before. A new step in certstore is a new call: counted, and covered.
MUTATING_OS_FUNCTIONS = ("open", "write", "fsync", "mkdir", "rmdir", "unlink", "remove",
                         "rename", "replace", "symlink", "link", "chmod", "truncate", "ftruncate")


class CrashInjector:
    """Counts the file-system steps of the calling thread; dies before step `crash_at`.

    After the crash every further step of that thread raises Crash too, so cleanup code
    (`except BaseException`, `finally`) cannot touch the disk: exactly what a killed process
    leaves behind. Other threads pass through untouched.
    """

    def __init__(self, crash_at: int | None = None):
        self.crash_at = crash_at
        self.steps = 0
        self.crashed = False
        self.trace: list[str] = []

    @contextlib.contextmanager
    def active(self):
        owner = threading.get_ident()
        with contextlib.ExitStack() as stack:
            for name in MUTATING_OS_FUNCTIONS:
                real = getattr(os, name)
                stack.enter_context(mock.patch.object(os, name, self._wrap(name, real, owner)))
            yield self

    def _wrap(self, name, real, owner):
        # fsync only matters when the machine loses power, which this does not model: a killed
        # process loses nothing the kernel already has. Counted as a step, not performed.
        perform = (lambda *args, **kwargs: None) if name == "fsync" else real

        def step(*args, **kwargs):
            if threading.get_ident() != owner:
                return real(*args, **kwargs)
            if self.crashed:
                raise Crash(f"already dead ({name})")
            self.steps += 1
            self.trace.append(f"{self.steps}: {name} {args[0] if args else ''}")
            if self.steps == self.crash_at:
                self.crashed = True
                raise Crash(f"killed before step {self.steps} ({name})")
            return perform(*args, **kwargs)
        return step


def tree_signature(directory: Path):
    """The state of a certs directory with its random names (generations, temporary links)
    replaced by what they hold, so two crashes that left the same leftovers compare equal."""
    if not directory.exists():
        return None

    def describe(path: Path):
        if path.is_symlink():
            target = os.readlink(path)
            return ("link", describe(directory / target) if target.startswith(".gen-")
                    else target)
        if path.is_dir():
            return ("dir", tuple(sorted(describe(p) + (p.name,) for p in path.iterdir())))
        return ("file", path.read_bytes())

    entries = []
    for path in directory.iterdir():
        random_name = path.name.startswith((".gen-", ".tmp-"))
        entries.append((path.name.split("-")[0] if random_name else path.name,) + describe(path))
    return tuple(sorted(entries, key=repr))


def fast_tmp_dir() -> tempfile.TemporaryDirectory:
    """A tmpfs directory where there is one (thousands of small file operations), else /tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return tempfile.TemporaryDirectory(dir=shm)
    return tempfile.TemporaryDirectory()


def visible_set(directory: Path) -> tuple:
    """What a reader opening the three names sees (None for a name it cannot open)."""
    out = []
    for name in (CLIENT_CERT_NAME, CLIENT_KEY_NAME, CA_CERT_NAME):
        try:
            out.append((directory / name).read_bytes())
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def write_plain(directory: Path, contents) -> None:
    """Another tool's files: plain, 0600, no generation, no links."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in zip((CLIENT_CERT_NAME, CLIENT_KEY_NAME, CA_CERT_NAME), contents):
        (directory / name).write_bytes(data)
        os.chmod(directory / name, 0o600)


class CrashAtEveryStepTest(unittest.TestCase):
    """A crash at any step of an update, then a restart: the old complete set or the new one."""

    # (name, set-up before the update, the update, set before, set after)
    SCENARIOS = [
        ("first activation, no directory yet", lambda d: None,
         lambda d: write_cert_set(d, *SET_B), NO_SET, SET_B),
        ("first activation, empty directory", lambda d: d.mkdir(mode=0o700),
         lambda d: write_cert_set(d, *SET_B), NO_SET, SET_B),
        ("rotation", lambda d: write_cert_set(d, *SET_A),
         lambda d: write_cert_set(d, *SET_B), SET_A, SET_B),
        ("first activation over another tool's files", lambda d: write_plain(d, PLAIN),
         lambda d: write_cert_set(d, *SET_B), PLAIN, SET_B),
        ("clear", lambda d: write_cert_set(d, *SET_A),
         lambda d: certstore.clear(d), SET_A, NO_SET),
        ("clear over another tool's files", lambda d: write_plain(d, PLAIN),
         lambda d: certstore.clear(d), PLAIN, NO_SET),
    ]

    def setUp(self):
        self._tmp = fast_tmp_dir()
        self.addCleanup(self._tmp.cleanup)
        self.runs = 0
        logger, handler = logging.getLogger("enclave"), logging.NullHandler()
        logger.addHandler(handler)  # the restart's repair notes stay off the console
        self.addCleanup(logger.removeHandler, handler)

    def fresh_dir(self, setup) -> Path:
        self.runs += 1
        directory = Path(self._tmp.name) / f"run-{self.runs}" / "certs"
        directory.parent.mkdir()
        with CrashInjector().active():  # never crashes; skips the fsyncs
            setup(directory)
        return directory

    @staticmethod
    def restart(directory: Path) -> SecretStore:
        """A new process: a fresh store over the same directory (no state carried over)."""
        return SecretStore(Settings(certs_dir=directory), Metrics())

    def count_steps(self, setup, update) -> int:
        directory = self.fresh_dir(setup)
        injector = CrashInjector()
        with injector.active():
            update(directory)
        self.assertGreater(injector.steps, 0)
        return injector.steps

    def assert_whole(self, directory: Path, before: tuple, after: tuple, where: str) -> tuple:
        if not directory.exists():  # killed before the first mkdir: nothing was ever there
            self.assertIn(NO_SET, (before, after), where)
            return NO_SET
        seen = visible_set(directory)
        self.assertIn(seen, (before, after), f"a mix after {where}")
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700, where)
        for name in FILE_NAMES:
            if (directory / name).exists():
                self.assertEqual(stat.S_IMODE(os.stat(directory / name).st_mode), 0o600,
                                 f"{name} after {where}")
        live = certstore.live_files(directory)
        entries = sorted(p.name for p in directory.iterdir())
        expected = sorted(n for n in FILE_NAMES if os.path.lexists(directory / n))
        if live is not None:
            self.assertTrue(live.directory.is_dir(), where)
            self.assertEqual(stat.S_IMODE(os.stat(live.directory).st_mode), 0o700, where)
            expected = sorted(expected + [certstore.DATA_LINK, live.directory.name])
            for name in FILE_NAMES:
                self.assertEqual(os.readlink(directory / name), f"{certstore.DATA_LINK}/{name}")
        self.assertEqual(entries, expected, f"orphans left after {where}")
        return seen

    def test_crash_at_every_step_then_restart(self):
        for name, setup, update, before, after in self.SCENARIOS:
            with self.subTest(name):
                total = self.count_steps(setup, update)
                outcomes = set()
                for crash_at in range(1, total + 1):
                    directory = self.fresh_dir(setup)
                    injector = CrashInjector(crash_at)
                    with injector.active(), self.assertRaises(Crash):
                        update(directory)
                    where = f"a crash before step {crash_at} of {total}: {injector.trace[-1]}"
                    with CrashInjector().active():
                        self.restart(directory)
                    outcomes.add(self.assert_whole(directory, before, after, where))
                    # The repaired directory takes the next update normally.
                    with CrashInjector().active():
                        write_cert_set(directory, *SET_C)
                    self.assertEqual(visible_set(directory), SET_C, where)
                # Crashes early in the update keep the old set, late ones show the new one.
                self.assertEqual(outcomes, {before, after})

    def test_a_crash_during_the_restart_repair_is_repaired_by_the_next_restart(self):
        for name, setup, update, before, after in self.SCENARIOS:
            with self.subTest(name):
                total = self.count_steps(setup, update)
                states = set()
                for crash_at in range(1, total + 1):
                    directory = self.fresh_dir(setup)
                    with CrashInjector(crash_at).active(), self.assertRaises(Crash):
                        update(directory)
                    state = tree_signature(directory)
                    if state in states:
                        continue  # the same leftovers as an earlier crash point: same repair
                    states.add(state)
                    # Count the repair's steps on a copy of the crashed state...
                    counter = CrashInjector()
                    probe = self.copy_of(directory)
                    with counter.active():
                        self.restart(probe)
                    # ...then kill it before each one, on a fresh copy each time.
                    for repair_crash_at in range(1, counter.steps + 1):
                        attempt = self.copy_of(directory)
                        with CrashInjector(repair_crash_at).active(), \
                                self.assertRaises(Crash):
                            self.restart(attempt)
                        with CrashInjector().active():
                            self.restart(attempt)
                        self.assert_whole(attempt, before, after,
                                          f"a crash before update step {crash_at}, then before "
                                          f"repair step {repair_crash_at}")

    def copy_of(self, directory: Path) -> Path:
        """A copy of a certs directory (links kept as links, modes kept) in a new run folder."""
        self.runs += 1
        target = Path(self._tmp.name) / f"run-{self.runs}" / "certs"
        target.parent.mkdir()
        if directory.exists():
            shutil.copytree(directory, target, symlinks=True)
        return target


if __name__ == "__main__":
    unittest.main()
