"""The one-command local stack end to end: start-local.sh, smoke.sh and probe against it, stop.

The stack runs from this repository with a temporary state directory and free ports, so it can
never collide with a developer's own stack (.local, 8181/7777/9443/9444/9445). Every wait is
bounded. `--secrets channel` delivers plaintext; the default `--secrets kms` seals the secrets
under the fake KMS and needs a runtime that knows ENCLAVE_SECRETS_SOURCE (detected with
check-config: its test is skipped, with the reason, until the runtime has it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
from pathlib import Path

from tests import support

REPO = Path(__file__).resolve().parent.parent
START = REPO / "scripts" / "start-local.sh"
SMOKE = REPO / "scripts" / "smoke.sh"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
READY_TIMEOUT_S = 45  # start-up is ~2 s here; generous for a loaded CI machine
STEP_TIMEOUT_S = 60  # smoke.sh, probe
STOP_TIMEOUT_S = 20  # the runtime drains for at most 5 s
CHILDREN = ("runtime", "fake-google", "fake-watermark")
KMS_CHILDREN = CHILDREN + ("fake-kms",)
ALL_CHILDREN = KMS_CHILDREN


def _missing_tools() -> list[str]:
    missing = [t for t in ("bash", "curl", "openssl", "socat") if shutil.which(t) is None]
    if not VENV_PYTHON.exists():
        missing.append(".venv/bin/python (make venv)")
    return missing


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes (its parent has not reaped it yet)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@unittest.skipIf(_missing_tools(), f"needs {', '.join(_missing_tools())}")
class LocalStackTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.state = Path(self.tmp.name) / "state"
        runtime, secrets, google, watermark, kms = _free_ports(5)
        self.base_url = f"http://127.0.0.1:{runtime}"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("ENCLAVE_", "TEE_", "ALFRED_", "LOCAL_", "GOOGLE_",
                                         "MTLS_", "ECS_", "AWS_", "SEND_SECRETS_"))}
        self.env.update(LOCAL_STATE_DIR=str(self.state), LOCAL_RUNTIME_PORT=str(runtime),
                        LOCAL_SECRETS_PORT=str(secrets), LOCAL_GOOGLE_PORT=str(google),
                        LOCAL_WATERMARK_PORT=str(watermark), LOCAL_KMS_PORT=str(kms),
                        LOCAL_READY_TIMEOUT="40")
        self.ports = (runtime, secrets, google, watermark, kms)

    def start(self, *args: str) -> subprocess.Popen:
        self.out = open(Path(self.tmp.name) / "start-local.out", "w+")
        self.addCleanup(self.out.close)
        proc = subprocess.Popen(["bash", str(START), *args], cwd=REPO, env=self.env,
                                stdout=self.out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(self._kill_everything, proc)
        return proc

    def output(self) -> str:
        self.out.flush()
        return (Path(self.tmp.name) / "start-local.out").read_text()

    def _kill_everything(self, proc: subprocess.Popen) -> None:
        """Last resort if an assertion failed mid-way: nothing may outlive the test."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for pid in self._recorded_pids().values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def _recorded_pids(self) -> dict[str, int]:
        pids = {}
        for name in ALL_CHILDREN:
            path = self.state / "pids" / f"{name}.pid"
            if path.exists():
                pids[name] = int(path.read_text().strip())
        return pids

    def wait_ready(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.fail(f"start-local.sh exited with {proc.returncode}:\n{self.output()}")
            if "start-local.sh: ready." in self.output() and "Stop it:" in self.output():
                return  # the whole banner is out (it is printed in several writes)
            time.sleep(0.2)
        self.fail(f"not ready within {READY_TIMEOUT_S}s:\n{self.output()}")

    def run_step(self, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), cwd=REPO, env=env or self.env, capture_output=True,
                              text=True, timeout=STEP_TIMEOUT_S)

    def test_start_smoke_probe_stop(self):
        """--secrets channel: the plaintext delivery."""
        proc = self.start("--secrets", "channel")
        self.wait_ready(proc)
        with urllib.request.urlopen(f"{self.base_url}/healthz?ready=1", timeout=5) as resp:
            self.assertEqual(resp.status, 200)
        self.assertIn("secrets: channel", self.output())

        children = self._recorded_pids()
        self.assertEqual(sorted(children), sorted(CHILDREN), self.output())
        for name, pid in children.items():
            self.assertTrue(_alive(pid), f"{name} ({pid}) is not running")
        self.assertEqual(int((self.state / "run.pid").read_text()), proc.pid)
        self.assertIn(f"enclave.py probe --allow-insecure-dev --state-dir {self.state} "
                      f"{self.base_url}", self.output())  # the printed "Check it:" hint

        tools_env = {**self.env, "ALFRED_ENV": "local", "ENCLAVE_STATE_DIR": str(self.state),
                     "PYTHON": sys.executable}
        smoke = self.run_step("bash", str(SMOKE), self.base_url, env=tools_env)
        self.assertEqual(smoke.returncode, 0, smoke.stdout + smoke.stderr)
        self.assertNotIn("FAIL", smoke.stdout)
        self.assertIn("PASS rpc signed watermark answers, signature verifies", smoke.stdout)
        self.assertRegex(smoke.stdout, r"smoke: \d+ passed, 0 failed")

        # The probe trusts the stack's INSECURE dev root only when told to ...
        default = self.run_step(sys.executable, "enclave.py", "probe", self.base_url,
                                "--state-dir", str(self.state), env=tools_env)
        self.assertEqual(default.returncode, 1, default.stdout + default.stderr)
        self.assertRegex(default.stdout, r"FAIL document verifies: step 3 .*--allow-insecure-dev")
        # ... and then every check holds.
        probe = self.run_step(sys.executable, "enclave.py", "probe", self.base_url,
                              "--allow-insecure-dev", "--state-dir", str(self.state),
                              env=tools_env)
        self.assertEqual(probe.returncode, 0, probe.stdout + probe.stderr)
        self.assertIn("all checks hold", probe.stdout)

        second = self.run_step("bash", str(START))
        self.assertEqual(second.returncode, 1, second.stdout + second.stderr)
        self.assertIn("already running", second.stderr)
        self.assertEqual(self._recorded_pids(), children, "the second start changed the pids")

        for name in ("runtime", "fake-google", "fake-watermark", "secrets", "pki"):
            self.assertTrue((self.state / "logs" / f"{name}.log").exists(), name)

        self.stop_and_check(proc, children)

    def stop_and_check(self, proc: subprocess.Popen, children: dict[str, int],
                       *secrets: str) -> None:
        """Ctrl-C: SIGINT to the script stops everything it started, frees every port and
        leaves no secret (nor any of `secrets`) in a log."""
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.fail(f"start-local.sh did not stop within {STOP_TIMEOUT_S}s:\n{self.output()}")
        self.assertEqual(proc.returncode, 0, self.output())  # a requested, clean stop
        self.assertIn("stopped", self.output())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in children.values()):
            time.sleep(0.1)
        left = {name: pid for name, pid in children.items() if _alive(pid)}
        self.assertEqual(left, {}, f"processes left behind:\n{self.output()}")
        self.assertEqual(list((self.state / "pids").iterdir()), [])
        self.assertFalse((self.state / "run.pid").exists())
        self.assertIn("stopped", (self.state / "logs" / "runtime.log").read_text())
        # every secret the stack used (dev keys, the delivered secrets) is kept out of its logs
        support.remember_key_files(self.state)
        delivered = json.loads((self.state / "secrets.local.json").read_text())
        support.remember_secret(delivered.get("GOOGLE_OAUTH_CLIENT_SECRET"), kind="google client secret")
        support.remember_secret(*secrets, kind="local stack secret")
        for log_file in sorted((self.state / "logs").glob("*.log")):
            support.scan_later(log_file.read_text(), f"local stack {log_file.name}")
        support.scan_later(self.output(), "start-local.sh output")
        for port in self.ports:  # every port is free again
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))

    def test_kms_sealed_delivery_by_default(self):
        """The default --secrets kms: sealed under the fake KMS, opened in the runtime with a
        dev-shim recipient document, the plaintext never on the secrets channel."""
        from tests.fakes.fake_kms import TEST_SECRET_ACCESS_KEY
        proc = self.start()
        self.wait_ready(proc)
        with urllib.request.urlopen(f"{self.base_url}/healthz?ready=1", timeout=5) as resp:
            self.assertEqual(resp.status, 200)
        output = self.output()
        self.assertIn("secrets: kms", output)
        self.assertIn("secrets delivered (kms)", output)
        children = self._recorded_pids()
        self.assertEqual(sorted(children), sorted(KMS_CHILDREN), output)

        sealed = json.loads((self.state / "secrets.sealed.json").read_text())
        plain = json.loads((self.state / "secrets.local.json").read_text())
        self.assertEqual(sealed["kms_key_arn"].rsplit(":", 2)[0], "arn:aws:kms:us-east-1")
        self.assertIn(f"key {sealed['kms_key_arn']}", output)
        sealed_text = json.dumps(sealed)
        for name in ("GOOGLE_OAUTH_CLIENT_SECRET", "GOOGLE_OAUTH_CLIENT_ID"):
            self.assertNotIn(plain[name], sealed_text)  # only ciphertext in the envelope
        self.assertEqual(os.stat(self.state / "kms" / "credentials.env").st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(self.state / "kms" / "key.json").st_mode & 0o777, 0o600)

        # every secret the runtime needs came out of the envelope: the smoke checklist holds
        tools_env = {**self.env, "ALFRED_ENV": "local", "ENCLAVE_STATE_DIR": str(self.state),
                     "PYTHON": sys.executable}
        smoke = self.run_step("bash", str(SMOKE), self.base_url, env=tools_env)
        self.assertEqual(smoke.returncode, 0, smoke.stdout + smoke.stderr)
        self.assertRegex(smoke.stdout, r"smoke: \d+ passed, 0 failed")

        # the printed redelivery command works (the same bundle again: nothing changes)
        redeliver = next(line for line in output.splitlines() if "redeliver:" in line)
        command = redeliver.split("redeliver:", 1)[1].strip()
        again = self.run_step("bash", "-c", command)
        self.assertEqual(again.returncode, 0, again.stdout + again.stderr)
        self.assertTrue(json.loads(again.stdout)["ok"])
        material = json.loads((self.state / "kms" / "key.json").read_text())["material"]
        self.stop_and_check(proc, children, TEST_SECRET_ACCESS_KEY, material)

    def test_unknown_secrets_source_is_a_usage_error(self):
        result = self.run_step("bash", str(START), "--secrets", "plaintext")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("--secrets must be kms or channel", result.stderr)
        self.assertFalse(self.state.exists() and any(self.state.iterdir()))

    def test_busy_port_is_reported_before_anything_starts(self):
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", self.ports[2]))
            blocker.listen(1)
            result = self.run_step("bash", str(START), "--secrets", "channel")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"{self.ports[2]} (fake-google)", result.stderr)
        self.assertEqual(self._recorded_pids(), {})
        self.assertFalse((self.state / "run.pid").exists())


if __name__ == "__main__":
    unittest.main()
