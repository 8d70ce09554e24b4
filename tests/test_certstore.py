"""Atomic writes of the mTLS file set (enclave.certstore)."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from enclave import certstore
from enclave.certstore import CA_CERT_NAME, CLIENT_CERT_NAME, CLIENT_KEY_NAME, FILE_NAMES

SET_A = (b"cert A\n", b"key A\n", b"ca A\n")
SET_B = (b"cert B\n", b"key B\n", b"ca B\n")


def file_hashes(directory: Path) -> dict[str, str | None]:
    """sha256 of each visible file (following links), None when absent."""
    out = {}
    for name in FILE_NAMES:
        path = directory / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return out


def generations(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(certstore.GENERATION_PREFIX))


class CertStoreTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self._tmp.cleanup)
        self.dir = Path(self._tmp.name) / "certs"

    def read_set(self) -> tuple[bytes, bytes, bytes]:
        return tuple((self.dir / name).read_bytes() for name in
                     (CLIENT_CERT_NAME, CLIENT_KEY_NAME, CA_CERT_NAME))

    def test_write_creates_the_set_with_tight_modes(self):
        files = certstore.write_cert_set(self.dir, *SET_A)
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
        old = certstore.write_cert_set(self.dir, *SET_A)
        new = certstore.write_cert_set(self.dir, *SET_B)
        self.assertEqual(self.read_set(), SET_B)
        self.assertEqual(generations(self.dir), [new.directory.name])
        self.assertFalse(old.directory.exists())

    def test_existing_directory_is_tightened_to_0700(self):
        self.dir.mkdir(mode=0o755)
        os.chmod(self.dir, 0o755)
        certstore.write_cert_set(self.dir, *SET_A)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)

    def test_failure_between_files_leaves_the_old_set_whole(self):
        certstore.write_cert_set(self.dir, *SET_A)
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
                        certstore.write_cert_set(self.dir, *SET_B)
                self.assertIn("No space left on device", str(caught.exception))
                self.assertEqual(file_hashes(self.dir), before)
                self.assertEqual(generations(self.dir), gens_before)  # the partial one is gone

    def test_failure_at_activation_leaves_the_old_set_whole(self):
        certstore.write_cert_set(self.dir, *SET_A)
        before = file_hashes(self.dir)
        gens_before = generations(self.dir)
        with mock.patch.object(certstore, "_replace_link", side_effect=OSError(5, "I/O error")):
            with self.assertRaises(certstore.CertStoreError):
                certstore.write_cert_set(self.dir, *SET_B)
        self.assertEqual(file_hashes(self.dir), before)
        self.assertEqual(generations(self.dir), gens_before)

    def test_failure_after_the_swap_rolls_back_to_the_old_set(self):
        certstore.write_cert_set(self.dir, *SET_A)
        before = file_hashes(self.dir)
        gens_before = generations(self.dir)
        real_fsync = certstore._fsync_dir

        def failing_fsync(path):
            if Path(path) == self.dir:  # the certs directory, right after the .data rename
                raise OSError(5, "I/O error")
            real_fsync(path)

        with mock.patch.object(certstore, "_fsync_dir", failing_fsync):
            with self.assertRaises(certstore.CertStoreError):
                certstore.write_cert_set(self.dir, *SET_B)
        self.assertEqual(file_hashes(self.dir), before)
        self.assertEqual(generations(self.dir), gens_before)

    def test_a_staged_generation_is_invisible_until_activated(self):
        certstore.write_cert_set(self.dir, *SET_A)
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
        certstore.write_cert_set(self.dir, *SET_A)
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
        certstore.write_cert_set(self.dir, *SET_A)
        self.assertEqual(self.read_set(), SET_A)
        self.assertTrue(all((self.dir / name).is_symlink() for name in FILE_NAMES))


if __name__ == "__main__":
    unittest.main()
