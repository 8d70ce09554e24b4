"""The zipapps: two builds are byte-identical; the enclave image's holds the runtime but not the
host tools, the host one runs every command as enclave.py does."""

import os
import subprocess
import sys
import tempfile
import unittest
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build_zipapp.py"


HOST_ONLY_COMMANDS = ("verify", "probe", "sign", "send-secrets", "seal-secrets")


def build(out: Path, epoch: str | None = None, host: bool = False) -> bytes:
    env = dict(os.environ)
    env.pop("SOURCE_DATE_EPOCH", None)
    if epoch is not None:
        env["SOURCE_DATE_EPOCH"] = epoch
    flags = ["--host"] if host else []
    subprocess.run([sys.executable, str(BUILD), *flags, str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL, timeout=60)
    return out.read_bytes()


class Zipapp(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: [p.unlink() for p in self.dir.iterdir()] and self.dir.rmdir())

    def test_two_builds_are_byte_identical(self):
        self.assertEqual(build(self.dir / "a.pyz"), build(self.dir / "b.pyz"))
        self.assertEqual(build(self.dir / "c.pyz", host=True), build(self.dir / "d.pyz", host=True))

    def test_the_enclave_image_zipapp_carries_no_host_tool(self):
        build(self.dir / "enclave.pyz")
        build(self.dir / "host.pyz", host=True)
        with zipfile.ZipFile(self.dir / "enclave.pyz") as zf:
            image = set(zf.namelist())
        with zipfile.ZipFile(self.dir / "host.pyz") as zf:
            everything = set(zf.namelist())
        host_files = {n for n in everything if n.startswith("enclave/host/")}
        self.assertEqual({n for n in image if n.startswith("enclave/host/")},
                         {"enclave/host/__init__.py", "enclave/host/check_config.py"})
        self.assertIn("enclave/host/verify.py", host_files)
        self.assertEqual(everything - image, host_files - {"enclave/host/__init__.py",
                                                           "enclave/host/check_config.py"})
        for kept in ("enclave/service.py", "enclave/nitro/verifier.py", "enclave/devpki.py",
                     "enclave/nitro/data/aws_nitro_root_g1.pem", "enclave/data/amazon_roots.pem"):
            self.assertIn(kept, image)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ALFRED_", "ENCLAVE_"))}
        for command in HOST_ONLY_COMMANDS:
            with self.subTest(command):
                run = subprocess.run([sys.executable, str(self.dir / "enclave.pyz"), command,
                                      "--help"], capture_output=True, text=True, timeout=60,
                                     env=env, cwd=self.dir)
                self.assertEqual(run.returncode, 2)
                self.assertIn("enclave-host.pyz", run.stderr)
                self.assertNotIn("Traceback", run.stderr)
                self.assertEqual(len(run.stderr.strip().splitlines()), 1)

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
        build(out)  # the image's: check-config is in it, to check the image's configuration
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



class OnlyCommittedFiles(unittest.TestCase):
    """A file git does not track (an ignored key, a scratch module) never reaches the archive."""

    def test_untracked_files_refuse_the_build(self):
        import importlib.util
        spec = importlib.util.spec_from_file_location("build_zipapp_under_test", BUILD)
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        tracked = builder.tracked_files()
        self.assertIsNotNone(tracked, "the suite runs in a git checkout")
        self.assertIn("enclave/service.py", tracked)
        self.assertTrue(builder.source_files())  # the committed tree packs
        without = [name for name in tracked if name != "enclave/devpki.py"]
        builder.tracked_files = lambda: without  # as if devpki.py were not committed
        with self.assertRaises(builder.BuildError) as ctx:
            builder.source_files()
        self.assertIn("enclave/devpki.py", str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
