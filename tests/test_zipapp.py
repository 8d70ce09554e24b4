"""The zipapp: two builds are byte-identical, and it runs the same commands as enclave.py."""

import os
import subprocess
import sys
import tempfile
import unittest
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build_zipapp.py"


def build(out: Path, epoch: str | None = None) -> bytes:
    env = dict(os.environ)
    env.pop("SOURCE_DATE_EPOCH", None)
    if epoch is not None:
        env["SOURCE_DATE_EPOCH"] = epoch
    subprocess.run([sys.executable, str(BUILD), str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL, timeout=60)
    return out.read_bytes()


class Zipapp(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: [p.unlink() for p in self.dir.iterdir()] and self.dir.rmdir())

    def test_two_builds_are_byte_identical(self):
        self.assertEqual(build(self.dir / "a.pyz"), build(self.dir / "b.pyz"))

    def test_source_date_epoch_is_honoured(self):
        build(self.dir / "c.pyz", epoch="1700000000")
        with zipfile.ZipFile(self.dir / "c.pyz") as zf:
            stamps = {info.date_time for info in zf.infolist()}
            names = zf.namelist()
        self.assertEqual(stamps, {(2023, 11, 14, 22, 13, 20)})
        self.assertEqual(names[1:], sorted(names[1:]))  # sorted entries, stable order
        self.assertEqual(names[0], "__main__.py")
        self.assertTrue(all(n == "__main__.py" or n.startswith("enclave/") for n in names))
        self.assertFalse(any("__pycache__" in n or "/tests/" in n for n in names))

    def test_zipapp_runs_help_and_check_config(self):
        out = self.dir / "enclave.pyz"
        build(out)
        help_run = subprocess.run([sys.executable, str(out), "--help"], capture_output=True,
                                  text=True, timeout=60)
        self.assertEqual(help_run.returncode, 0, help_run.stderr)
        for command in ("serve", "check-config", "verify", "probe", "sign", "send-secrets"):
            self.assertIn(command, help_run.stdout)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ALFRED_", "ENCLAVE_", "TEE_"))}
        check = subprocess.run([sys.executable, str(out), "check-config"], capture_output=True,
                               text=True, timeout=60, env={**env, "ALFRED_ENV": "staging"}, cwd=self.dir)
        self.assertEqual(check.returncode, 2)
        self.assertIn("ENCLAVE_RUNTIME_MODE", check.stderr)


if __name__ == "__main__":
    unittest.main()
