"""`--help` on every script and every enclave.py command: usage and options, exit 0, and
nothing else: no file created, no tool run, nothing started (docs/DESIGN.md §11).

Each run happens in an empty temporary directory with stub `apt-get`, `socat`, `curl`,
`openssl`, `nitro-cli` and `sudo` first on PATH; a stub that runs leaves a mark, which fails
the test (so a broken script cannot reach the real tools either).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from enclave.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "scripts").iterdir()
                 if p.is_file() and p.suffix in (".sh", ".py"))
STUBBED_TOOLS = ("apt-get", "socat", "curl", "openssl", "nitro-cli", "sudo", "wrk")
TIMEOUT_S = 30  # printing usage takes milliseconds; a hang is a failure, not a wait


def _snapshot(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


@unittest.skipUnless(shutil.which("bash"), "needs bash")
class HelpDoesNothingElse(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.base = Path(tmp.name)
        self.stubs = self.base / "stubs"
        self.stubs.mkdir()
        self.marks = self.base / "marks"
        self.marks.mkdir()
        for tool in STUBBED_TOOLS:
            stub = self.stubs / tool
            stub.write_text(f'#!/bin/sh\ntouch "{self.marks}/{tool}"\nexit 1\n')
            stub.chmod(0o755)
        self.repo_before = {name: (ROOT / name).exists() for name in (".local", "dist", "--help")}

    def run_help(self, argv: list[str], flag: str) -> subprocess.CompletedProcess:
        cwd = Path(tempfile.mkdtemp(dir=self.base))
        for mark in self.marks.iterdir():  # each run is judged on its own
            mark.unlink()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ALFRED_", "ENCLAVE_", "TEE_", "LOCAL_", "SEND_SECRETS_"))}
        env["PATH"] = f"{self.stubs}{os.pathsep}{env.get('PATH', '')}"
        before = _snapshot(cwd)
        result = subprocess.run([*argv, flag], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertRegex(result.stdout.lower(), r"usage:", result.stdout + result.stderr)
        self.assertEqual(_snapshot(cwd), before, "--help created files")
        self.assertEqual(sorted(p.name for p in self.marks.iterdir()), [],
                         "--help ran a tool")
        now = {name: (ROOT / name).exists() for name in self.repo_before}
        self.assertEqual(now, self.repo_before, "--help changed the repository")
        return result

    def test_every_script(self):
        self.assertTrue(SCRIPTS)
        for script in SCRIPTS:
            runner = [sys.executable] if script.suffix == ".py" else ["bash"]
            for flag in ("--help", "-h"):
                with self.subTest(script=script.name, flag=flag):
                    self.run_help([*runner, str(script)], flag)

    def test_every_command(self):
        enclave_py = [sys.executable, str(ROOT / "enclave.py")]
        top = self.run_help(enclave_py, "--help")
        for command in COMMANDS:
            self.assertIn(command, top.stdout)
            with self.subTest(command=command):
                result = self.run_help([*enclave_py, command], "--help")
                self.assertIn("options:", result.stdout)


if __name__ == "__main__":
    unittest.main()
