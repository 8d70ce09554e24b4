"""The README's commands match the scripts: the parent's forwarder binds loopback like
scripts/expose-enclave.sh, and the files the walkthrough writes are ignored by git."""

import re
import shutil
import subprocess
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


class ReadmeTest(unittest.TestCase):
    def test_socat_forwarder_binds_loopback_like_the_expose_script(self):
        expose = (ROOT / "scripts" / "expose-enclave.sh").read_text()
        self.assertIn('bind="127.0.0.1"', expose)
        lines = [line for line in README.splitlines() if "socat TCP-LISTEN" in line]
        self.assertTrue(lines)
        for line in lines:
            with self.subTest(line=line):
                self.assertIn("bind=127.0.0.1", line)

    @unittest.skipUnless(shutil.which("git") and (ROOT / ".git").exists(), "needs a git checkout")
    def test_walkthrough_output_files_are_ignored(self):
        written = sorted(set(re.findall(r">\s*([\w.-]+\.json)\b", README)))
        self.assertTrue(written)
        for name in written:
            with self.subTest(name):
                result = subprocess.run(["git", "check-ignore", "-q", "--no-index", name],
                                        cwd=ROOT, capture_output=True, timeout=30)
                self.assertEqual(result.returncode, 0, f"{name} is not in .gitignore")


if __name__ == "__main__":
    unittest.main()
