"""Host tools on a parent or a laptop: a missing `cryptography` or `cbor2` is one line and exit 2
(never a traceback), `sign` needs neither, and the forwarder's pid file is where the docs say,
whatever XDG_RUNTIME_DIR is.

The commands run as shipped (`enclave.py` in a subprocess). A package is made "not installed"
with `sys.modules[name] = None` (what `import` then raises is what a missing package raises) and
"broken" with a package of that name earlier on PYTHONPATH whose import fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from enclave import cli

REPO = Path(__file__).resolve().parent.parent
EXPOSE = REPO / "scripts" / "expose-enclave.sh"
TIMEOUT_S = 30
SECRET = "host-tools-test-secret-0123456789abcdef"
HOST_COMMANDS = {
    "verify": ["verify", "document.b64"],
    "probe": ["probe", "http://127.0.0.1:1"],
}
SIGN = ["sign", "POST", "/v1/rpc/watermark", "--secret", SECRET]
# enclave.py run with some packages made unimportable (None in sys.modules).
WRAPPER = ("import runpy, sys\n"
           "for name in sys.argv[1].split(','):\n"
           "    sys.modules[name] = None\n"
           "sys.argv = ['enclave.py'] + sys.argv[2:]\n"
           "runpy.run_path('enclave.py', run_name='__main__')\n")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ENCLAVE_", "TEE_", "ALFRED_", "PYTHON"))}
    env.update(extra)
    return env


class MissingPackageTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        broken = Path(cls._tmp.name) / "cryptography"
        broken.mkdir()
        (broken / "__init__.py").write_text(
            'raise ImportError("simulated: cryptography\'s native module failed to load")\n')

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def run_without(self, packages: tuple, argv: list) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", WRAPPER, ",".join(packages), *argv],
                              cwd=REPO, env=clean_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S)

    def run_broken(self, argv: list) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "enclave.py", *argv], cwd=REPO,
                              env=clean_env(PYTHONPATH=self._tmp.name), capture_output=True,
                              text=True, timeout=TIMEOUT_S)

    def assertOneLine(self, proc, package: str):
        self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
        self.assertEqual(proc.stdout, "")
        self.assertNotIn("Traceback", proc.stderr)
        lines = proc.stderr.splitlines()
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertTrue(lines[0].startswith(f"enclave: missing Python package '{package}' ("),
                        lines[0])
        self.assertIn("pip install -r requirements.txt", lines[0])
        self.assertIn('README "Host tools"', lines[0])

    def test_not_installed(self):
        for command, argv in HOST_COMMANDS.items():
            for package in ("cryptography", "cbor2"):
                with self.subTest(command=command, missing=package):
                    # cbor2 alone missing: what cryptography loads first must not hide it
                    packages = (package,) if package == "cbor2" else ("cryptography", "cbor2")
                    self.assertOneLine(self.run_without(packages, argv), package)

    def test_broken_install(self):
        for command, argv in HOST_COMMANDS.items():
            with self.subTest(command=command):
                proc = self.run_broken(argv)
                self.assertOneLine(proc, "cryptography")
                self.assertIn("native module failed to load", proc.stderr)

    def test_sign_needs_neither_package(self):
        # HMAC-SHA256 is the standard library: a host without the enclave's packages can sign.
        for run in (lambda: self.run_without(("cryptography", "cbor2"), SIGN),
                    lambda: self.run_broken(SIGN)):
            proc = run()
            self.assertEqual(proc.returncode, 0, proc.stderr)
            names = [line.split(":")[0] for line in proc.stdout.splitlines()]
            self.assertEqual(names, ["X-Enclave-Timestamp", "X-Enclave-Nonce",
                                     "X-Enclave-Signature"])

    def test_help_of_every_host_command_still_works_with_the_packages(self):
        for command in ("verify", "probe", "sign"):
            with self.subTest(command):
                proc = subprocess.run([sys.executable, "enclave.py", command, "--help"],
                                      cwd=REPO, env=clean_env(), capture_output=True, text=True,
                                      timeout=TIMEOUT_S)
                self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_which_import_errors_are_about_a_required_package(self):
        def raised_in(path: str) -> ImportError:
            code = compile("raise ImportError('x')", path, "exec")
            try:
                exec(code, {})
            except ImportError as exc:
                return exc
            raise AssertionError("no ImportError")

        cases = [
            (ModuleNotFoundError("No module named 'cbor2'", name="cbor2"), "cbor2"),
            (ImportError("native", name="cryptography.hazmat.bindings._rust"), "cryptography"),
            (ImportError("cannot import name 'Foo'", name="cryptography.x509"), "cryptography"),
            (raised_in("/site-packages/cryptography/__init__.py"), "cryptography"),
            (raised_in("/site-packages/cbor2/_decoder.py"), "cbor2"),
            (ModuleNotFoundError("No module named 'enclave.gone'", name="enclave.gone"), None),
            (ModuleNotFoundError("No module named 'cryptographyx'", name="cryptographyx"), None),
            (raised_in(str(REPO / "enclave" / "host" / "verify.py")), None),
            (ImportError("no name at all"), None),
        ]
        for exc, expected in cases:
            with self.subTest(exc=str(exc), name=exc.name):
                self.assertEqual(cli.missing_package(exc), expected)

    def test_other_import_errors_are_not_hidden(self):
        proc = subprocess.run([sys.executable, "-c", WRAPPER, "enclave.host.verify",
                               *HOST_COMMANDS["verify"]], cwd=REPO, env=clean_env(),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("Traceback", proc.stderr)  # a bug in the package: shown, not disguised


class HostToolsReadmeTest(unittest.TestCase):
    def test_the_message_points_at_a_readme_section_that_says_what_to_install(self):
        readme = (REPO / "README.md").read_text(encoding="utf-8")
        section = readme.split("\n## Host tools\n", 1)[1].split("\n## ", 1)[0]
        self.assertIn("requirements.txt", section)
        for package in cli.REQUIRED_PACKAGES:
            self.assertIn(f"`{package}`", section)

    def test_every_script_variable_is_documented(self):
        readme = (REPO / "README.md").read_text(encoding="utf-8")
        for script in ("send-secrets.sh", "expose-enclave.sh"):
            text = (REPO / "scripts" / script).read_text(encoding="utf-8")
            names = set(re.findall(r"\$\{((?:SEND_SECRETS|EXPOSE)_[A-Z_]+):-", text))
            self.assertTrue(names or script != "send-secrets.sh", script)
            for name in sorted(names):
                with self.subTest(script=script, variable=name):
                    self.assertIn(f"`{name}`", readme)


class ForwarderPidFileTest(unittest.TestCase):
    """expose-enclave.sh writes its pid file to /tmp/enclave-forwarder-PORT.pid whatever
    XDG_RUNTIME_DIR is, as docs/ENCLAVE.md says. The real runs use a fake `socat` (a sleeping
    "forwarder" and an "ok" ack) and a fake `curl`, so nothing connects anywhere."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        root = Path(self.tmp.name)
        self.xdg = root / "xdg"
        self.xdg.mkdir()
        self.bin = root / "bin"
        self.bin.mkdir()
        self.fake("socat", '''case "$*" in
  *TCP-LISTEN:*) exec sleep 300 ;;
  *) cat >/dev/null; printf '{"ok": true, "version": 1}\\n' ;;
esac''')
        self.fake("curl", "exit 0")
        self.secrets = root / "secrets.json"
        self.secrets.write_text("{}\n")
        with socket.socket() as sock:  # a port number of our own: the pid file name is shared
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.default = Path(f"/tmp/enclave-forwarder-{self.port}.pid")
        self.addCleanup(self.stop_forwarder, self.default)

    def fake(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def stop_forwarder(self, pid_file: Path) -> None:
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)  # the fake forwarder this test started
        except ProcessLookupError:
            pass
        pid_file.unlink(missing_ok=True)

    def expose(self, *args: str, xdg: bool) -> subprocess.CompletedProcess:
        env = clean_env(PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("XDG_RUNTIME_DIR", None)
        if xdg:
            env["XDG_RUNTIME_DIR"] = str(self.xdg)
        return subprocess.run([shutil.which("bash"), str(EXPOSE), "--cid", "16",
                               "--listen-port", str(self.port), *args, str(self.secrets)],
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)

    def test_dry_run_names_the_documented_path(self):
        for xdg in (False, True):
            with self.subTest(xdg=xdg):
                proc = self.expose("--dry-run", xdg=xdg)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertIn(f"pid written to {self.default})", proc.stdout)
        proc = self.expose("--dry-run", "--pid-file", str(self.xdg / "f.pid"), xdg=True)
        self.assertIn(f"pid written to {self.xdg / 'f.pid'})", proc.stdout)

    def test_real_run_writes_the_documented_path(self):
        for xdg in (True, False):
            with self.subTest(xdg=xdg):
                proc = self.expose(xdg=xdg)
                self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
                self.assertIn(f"pid file {self.default}", proc.stderr)
                pid = int(self.default.read_text())
                os.kill(pid, 0)  # the forwarder is running
                self.assertEqual(list(self.xdg.iterdir()), [])
                self.assertEqual(sorted(p.name for p in Path("/tmp").glob(
                    f"enclave-forwarder-{self.port}.pid*")), [self.default.name])
                # a second run finds it there and refuses to start another one
                again = self.expose(xdg=not xdg)
                self.assertEqual(again.returncode, 1, again.stderr)
                self.assertIn("already running", again.stderr)
                self.stop_forwarder(self.default)

    def test_a_planted_symlink_is_refused(self):
        target = Path(self.tmp.name) / "victim"
        target.write_text("keep me\n")
        os.symlink(target, self.default)
        self.addCleanup(lambda: self.default.unlink(missing_ok=True))
        proc = self.expose(xdg=False)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("symbolic link", proc.stderr)
        self.assertEqual(target.read_text(), "keep me\n")
        self.assertTrue(self.default.is_symlink())

    def test_the_docs_name_only_that_path(self):
        for doc in (REPO / "README.md", REPO / "docs" / "ENCLAVE.md"):
            text = doc.read_text(encoding="utf-8")
            with self.subTest(doc.name):
                paths = re.findall(r"(\S*)enclave-forwarder-", text)
                self.assertTrue(all(p.endswith("/tmp/") for p in paths), paths)
                self.assertNotIn("XDG_RUNTIME_DIR:-", text)


if __name__ == "__main__":
    unittest.main()
