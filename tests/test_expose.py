"""scripts/expose-enclave.sh: the forwarder first, then the secrets; refusals before any action.

Only --dry-run and paths that stop before starting anything run here: a real run would connect
AF_VSOCK, which these machines must never do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "expose-enclave.sh"
TIMEOUT_S = 20


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=env)


class ExposeDryRunTest(unittest.TestCase):
    def test_forwarder_before_secrets(self):
        proc = run("--dry-run", "--cid", "16", "secrets.json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
        socat = [i for i, line in enumerate(lines) if line.startswith("+ socat ")]
        send = [i for i, line in enumerate(lines) if "send-secrets.sh" in line]
        self.assertEqual(len(socat), 1, proc.stdout)
        self.assertEqual(len(send), 1, proc.stdout)
        self.assertLess(socat[0], send[0], "the forwarder must start before secrets are sent")
        self.assertIn("TCP-LISTEN:8181,fork,reuseaddr", lines[socat[0]])
        self.assertIn("VSOCK-CONNECT:16:8181", lines[socat[0]])
        self.assertIn("--cid 16", lines[send[0]])
        self.assertIn("--port 7777", lines[send[0]])
        self.assertTrue(lines[send[0]].endswith(" secrets.json"), lines[send[0]])

    def test_kms_delivers_the_sealed_envelope(self):
        proc = run("--dry-run", "--cid", "16", "--kms", "sealed.json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        send = [line for line in proc.stdout.splitlines() if "send-secrets.sh" in line]
        self.assertEqual(len(send), 1, proc.stdout)
        self.assertTrue(send[0].endswith("--cid 16 --port 7777 --kms sealed.json"), send[0])

    def test_ports_and_bind(self):
        proc = run("--dry-run", "--cid", "21", "--port", "9000", "--listen-port", "18181",
                   "--secrets-port", "9001", "--bind", "0.0.0.0", "s.json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("socat TCP-LISTEN:18181,fork,reuseaddr,bind=0.0.0.0 VSOCK-CONNECT:21:9000",
                      proc.stdout)
        self.assertIn("--cid 21 --port 9001 s.json", proc.stdout)

    def test_without_cid_asks_nitro_cli_first(self):
        proc = run("--dry-run", "secrets.json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
        self.assertIn("nitro-cli describe-enclaves", lines[0])
        self.assertTrue(lines[1].startswith("+ socat "), lines)
        self.assertIn("VSOCK-CONNECT:$CID:8181", lines[1])

    def test_a_file_name_with_spaces_is_quoted(self):
        proc = run("--dry-run", "--cid", "16", "my secrets.json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("'my secrets.json'", proc.stdout)

    def test_usage_errors(self):
        for args in ((), ("--cid", "abc", "s.json"), ("--cid", "2", "s.json"),
                     ("--port", "70000", "--cid", "16", "s.json"), ("--bogus", "s.json"),
                     ("a.json", "b.json")):
            with self.subTest(args=args):
                proc = run("--dry-run", *args)
                self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
                self.assertNotIn("+ socat", proc.stdout)


class ExposeCidDiscoveryTest(unittest.TestCase):
    """Without --cid, an unclear `nitro-cli describe-enclaves` stops everything (exit 1)."""

    def setUp(self):
        if shutil.which("socat") is None:
            self.skipTest("socat is not installed (make tools)")
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.bin = Path(self.tmp.name) / "bin"
        self.bin.mkdir()
        for tool in ("dirname", "socat", "jq", "cat", "sleep"):
            found = shutil.which(tool)
            if found:
                os.symlink(found, self.bin / tool)
        # The interpreter itself (a `python3` on PATH may be a shell shim, e.g. pyenv's).
        os.symlink(os.path.realpath(sys.executable), self.bin / "python3")
        self.secrets = Path(self.tmp.name) / "secrets.json"
        self.secrets.write_text("{}\n")
        self.pid_file = Path(self.tmp.name) / "forwarder.pid"

    def expose(self, described: str | None, *, jq: bool):
        if described is not None:
            fake = self.bin / "nitro-cli"
            fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{described}\nEOF\n")
            fake.chmod(0o755)
        if not jq and (self.bin / "jq").exists():
            (self.bin / "jq").unlink()
        env = {"PATH": str(self.bin), "HOME": self.tmp.name}
        return subprocess.run([shutil.which("bash"), str(SCRIPT), "--pid-file", str(self.pid_file),
                               str(self.secrets)], cwd=REPO, capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=env)

    def assertStoppedBeforeForwarding(self, proc, message: str):
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn(message, proc.stderr)
        self.assertFalse(self.pid_file.exists(), "no forwarder may have been started")

    def test_no_nitro_cli(self):
        proc = self.expose(None, jq=False)
        self.assertStoppedBeforeForwarding(proc, "nitro-cli not found; pass --cid")

    def test_several_running_enclaves(self):
        described = ('[{"EnclaveCID": 16, "State": "RUNNING"}, '
                     '{"EnclaveCID": 17, "State": "RUNNING"}]')
        for jq in (True, False):  # jq first: the second run removes it
            if jq and not shutil.which("jq"):
                continue
            with self.subTest(jq=jq):
                proc = self.expose(described, jq=jq)
                self.assertStoppedBeforeForwarding(proc, "exactly one RUNNING enclave")

    def test_no_running_enclave(self):
        proc = self.expose('[{"EnclaveCID": 16, "State": "TERMINATING"}]', jq=False)
        self.assertStoppedBeforeForwarding(proc, "exactly one RUNNING enclave")


if __name__ == "__main__":
    unittest.main()
