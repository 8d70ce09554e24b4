"""The parent automation in deploy/: no drift between the one route list, the generated files
and the Containerfile; the structural checks of `make check-deploy`; fetch-envelope.sh refusing
plaintext; enclave-watchdog.sh's decisions (against stub nitro-cli and systemctl). Nothing here
touches systemd, nitro-cli, AWS or the network."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from urllib.parse import urlsplit

from enclave import config, kms
from enclave.egress import is_routed, parse_routes

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GENERATE = DEPLOY / "generate.py"
CHECK = DEPLOY / "check.py"
FETCH = DEPLOY / "fetch-envelope.sh"
WATCHDOG = DEPLOY / "enclave-watchdog.sh"
TIMEOUT_S = 60


def run(*argv, env=None):
    """Run a command; deploy/generate.py and deploy/check.py (stdlib scripts with a main(argv))
    run in this process, which saves a Python start-up per call."""
    if len(argv) >= 2 and argv[0] == sys.executable and Path(argv[1]) in (GENERATE, CHECK) \
            and env is None:
        return _run_script_here(Path(argv[1]), list(argv[2:]))
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, stdin=subprocess.DEVNULL)


def _run_script_here(path: Path, args: list[str]) -> subprocess.CompletedProcess:
    spec = importlib.util.spec_from_file_location(f"deploy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main(args)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess([sys.executable, str(path), *args], code,
                                       out.getvalue(), err.getvalue())


def generated(what: str, *extra) -> str:
    proc = run(sys.executable, str(GENERATE), "--print", what, *extra)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class DeployCopy(unittest.TestCase):
    """A throw-away copy of deploy/ to break on purpose."""

    def copy(self) -> Path:
        tmp = tempfile.TemporaryDirectory(prefix="deploy-")
        self.addCleanup(tmp.cleanup)
        target = Path(tmp.name) / "deploy"
        shutil.copytree(DEPLOY, target, ignore=shutil.ignore_patterns("__pycache__"))
        return target

    def generate(self, deploy: Path, *args):
        return run(sys.executable, str(GENERATE), "--deploy-dir", str(deploy), *args)


class GeneratedFilesTest(DeployCopy):
    def test_committed_files_agree_with_the_list(self):
        proc = run(sys.executable, str(GENERATE), "--check")
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_drift_is_named(self):
        def edit(rel, old, new):
            def apply(deploy):
                path = deploy / rel
                text = path.read_text()
                self.assertIn(old, text)
                path.write_text(text.replace(old, new))
            return apply

        def add_stale(deploy):
            (deploy / "systemd" / "enclave-proxy-old.service").write_text("[Unit]\n")

        def remove(rel):
            return lambda deploy: (deploy / rel).unlink()

        cases = [
            ("allow-list edited by hand",
             edit("vsock-proxy.yaml", "allowlist:\n",
                  "allowlist:\n- {address: evil.example, port: 443}\n"),
             ["deploy/vsock-proxy.yaml differs"]),
            ("proxy unit edited", edit("systemd/enclave-proxy-kms.service", " 8002 ", " 8009 "),
             ["deploy/systemd/enclave-proxy-kms.service differs"]),
            ("list changed, not regenerated", edit("egress-routes.json", '"vsock_port": 8001',
                                                   '"vsock_port": 8011'),
             ["enclave-proxy-google-oauth.service differs"]),
            ("stale unit", add_stale, ["enclave-proxy-old.service is not generated"]),
            ("missing unit", remove("systemd/enclave-egress.target"),
             ["enclave-egress.target is missing"]),
            ("log port", edit("enclave.env", "ENCLAVE_LOG_PORT=9000", "ENCLAVE_LOG_PORT=9001"),
             ["ENCLAVE_LOG_PORT=9001 but the image sends logs to port 9000"]),
        ]
        for name, mutate, expected in cases:
            with self.subTest(name):
                deploy = self.copy()
                mutate(deploy)
                proc = self.generate(deploy, "--check")
                self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
                for text in expected:
                    self.assertIn(text, proc.stderr)

    def test_write_repairs_drift(self):
        deploy = self.copy()
        (deploy / "vsock-proxy.yaml").write_text("allowlist: []\n")
        (deploy / "systemd" / "enclave-proxy-kms.service").unlink()
        self.assertEqual(self.generate(deploy, "--write").returncode, 0)
        proc = self.generate(deploy, "--check")
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_invalid_lists_are_refused(self):
        def change(mutator):
            def apply(deploy):
                path = deploy / "egress-routes.json"
                data = json.loads(path.read_text())
                mutator(data)
                path.write_text(json.dumps(data))
            return apply

        def route(index, **fields):
            return change(lambda data: data["routes"][index].update(fields))

        cases = [
            ("not the parent CID", change(lambda d: d.update(parent_cid=4)),
             "parent_cid must be 3"),
            ("vsock port reused", route(1, vsock_port=8001), "vsock_port 8001 is already used"),
            ("vsock port is the log port", route(0, vsock_port=9000),
             "already used by log_sink_port"),
            ("privileged vsock port", route(0, vsock_port=80), "vsock_port must be 1024..65535"),
            ("unknown placeholder", route(0, host="{nowhere}"), "unknown parameter {nowhere}"),
            ("bad host", route(0, host="not a host"), "host must be a DNS name"),
            ("port zero", route(0, port=0), "port must be 1..65535"),
            ("same target twice", route(1, host="oauth2.googleapis.com"), "already routed"),
            ("duplicate name", route(1, name="google-oauth"), "duplicate name"),
            ("no routes", change(lambda d: d.update(routes=[])), "non-empty list"),
        ]
        for name, mutate, expected in cases:
            with self.subTest(name):
                deploy = self.copy()
                mutate(deploy)
                proc = self.generate(deploy, "--check")
                self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
                self.assertIn(expected, proc.stderr)

    def test_parameters_can_be_set_per_run(self):
        routes = generated("routes", "--set", "region=eu-west-1", "--set",
                           "watermark_host=wm.prod.internal", "--set", "watermark_port=8443")
        self.assertIn("kms.eu-west-1.amazonaws.com:443=vsock:3:8002", routes)
        self.assertIn("wm.prod.internal:8443=vsock:3:8003", routes)
        proc = run(sys.executable, str(GENERATE), "--set", "nope=1", "--print", "routes")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("not a parameter", proc.stderr)

    def test_routes_cover_what_the_runtime_dials(self):
        """The generated value parses with the runtime's parser and routes Google's token and
        revoke hosts and the KMS endpoint of the list's region."""
        routes = parse_routes(generated("routes").strip())
        region = json.loads((DEPLOY / "egress-routes.json").read_text())["parameters"]["region"]
        for url in (config.GOOGLE_TOKEN_URL, config.GOOGLE_REVOKE_URL,
                    kms.default_endpoint(region)):
            with self.subTest(url):
                parts = urlsplit(url)
                self.assertTrue(is_routed(routes, parts.hostname, parts.port or 443))
        self.assertEqual({r.cid for r in routes.values()}, {3})

    def test_allow_list_matches_the_routes(self):
        sys.path.insert(0, str(DEPLOY))
        self.addCleanup(sys.path.remove, str(DEPLOY))
        import check
        entries = check.parse_allowlist((DEPLOY / "vsock-proxy.yaml").read_text())
        routes = parse_routes(generated("routes").strip())
        self.assertEqual(sorted(entries), sorted(routes))
        commands = generated("commands").splitlines()
        self.assertEqual(len(commands), len(routes))
        for line in commands:
            binary, vsock_port, host, port, flag, config_path = line.split()
            self.assertEqual((binary, flag, config_path),
                             ("/usr/bin/vsock-proxy", "--config",
                              "/etc/nitro_enclaves/vsock-proxy.yaml"))
            self.assertEqual(routes[(host, int(port))].vsock_port, int(vsock_port))


class ContainerfileTest(DeployCopy):
    def containerfile(self, lines: str | None) -> Path:
        """The real Containerfile with its generated ENV lines replaced by `lines` (None: none)."""
        kept = [line for line in (ROOT / "Containerfile").read_text().splitlines(keepends=True)
                if "ENCLAVE_EGRESS_ROUTES=" not in line and "ENCLAVE_LOG_SINK=" not in line]
        text = "".join(kept)
        if lines is not None:
            marker = "ENV ALFRED_ENV=production \\\n"
            self.assertIn(marker, text)
            text = text.replace(marker, marker + lines)
        path = Path(self.copy()) / "Containerfile"
        path.write_text(text)
        return path

    def check(self, path: Path):
        return run(sys.executable, str(GENERATE), "--check", "--containerfile", str(path))

    def test_generated_env_lines_pass(self):
        proc = self.check(self.containerfile(generated("env")))
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_missing_and_different_values_are_named(self):
        proc = self.check(self.containerfile(None))
        self.assertEqual(proc.returncode, 1)
        self.assertIn("ENCLAVE_EGRESS_ROUTES is not set; add to its ENV block: "
                      "ENCLAVE_EGRESS_ROUTES=oauth2.googleapis.com:443=vsock:3:8001", proc.stderr)
        self.assertIn("ENCLAVE_LOG_SINK is not set", proc.stderr)
        drifted = generated("env").replace("vsock:3:8002", "vsock:3:8012")
        proc = self.check(self.containerfile(drifted))
        self.assertEqual(proc.returncode, 1)
        self.assertIn("ENCLAVE_EGRESS_ROUTES is 'oauth2", proc.stderr)
        self.assertNotIn("ENCLAVE_LOG_SINK", proc.stderr)

    def test_the_real_containerfile_agrees(self):
        proc = self.check(ROOT / "Containerfile")
        self.assertEqual(proc.returncode, 0, proc.stderr)


class StructuralCheckTest(DeployCopy):
    def check(self, deploy: Path, *args):
        return run(sys.executable, str(CHECK), "--deploy-dir", str(deploy), *args)

    def test_committed_deploy_passes(self):
        proc = run(sys.executable, str(CHECK), "--systemd")
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)

    def test_problems_are_named(self):
        def edit(rel, old, new):
            def apply(deploy):
                path = deploy / rel
                text = path.read_text()
                self.assertIn(old, text)
                path.write_text(text.replace(old, new, 1))
            return apply

        def remove(*rels):
            def apply(deploy):
                for rel in rels:
                    (deploy / rel).unlink()
            return apply

        cases = [
            ("timer service stays active", edit("systemd/enclave-secrets.service",
                                                "Type=oneshot\n",
                                                "Type=oneshot\nRemainAfterExit=yes\n"),
             "the timer starts it only once"),
            ("debug mode", edit("systemd/enclave.service", "--enclave-cid ${ENCLAVE_CID}",
                                "--enclave-cid ${ENCLAVE_CID} --debug-mode"), "--debug-mode"),
            ("undefined variable", edit("systemd/enclave.service", "${ENCLAVE_EIF}",
                                        "${ENCLAVE_IMAGE}"), "uses $ENCLAVE_IMAGE, not defined"),
            ("memory beyond the allocator", edit("enclave.env", "ENCLAVE_MEMORY_MIB=1536",
                                                 "ENCLAVE_MEMORY_MIB=4096"),
             "ENCLAVE_MEMORY_MIB=4096 must be 1..2048"),
            ("odd CPU count", edit("allocator.yaml", "cpu_count: 2", "cpu_count: 3"),
             "cpu_count must be an even number"),
            ("unknown unit", edit("systemd/enclave.service", "Wants=enclave-logs.service",
                                  "Wants=enclave-log.service"),
             "enclave-log.service: no such unit"),
            ("missing script", edit("systemd/enclave-logs.service",
                                    "ExecStart=/opt/enclave-runtime/scripts/enclave-logs.sh",
                                    "ExecStart=/opt/enclave-runtime/scripts/enclave-log.sh"),
             "is not an executable file"),
            ("plaintext in user-data", edit("user-data.sh", "# 7. start",
                                            'jq -r .ENCLAVE_RPC_SHARED_SECRET secrets.json\n# 7.'),
             "handles ENCLAVE_RPC_SHARED_SECRET"),
            ("allow-list shape", edit("vsock-proxy.yaml", "- {address: ", "- address: "),
             "vsock-proxy.yaml: unexpected line"),
            ("nothing watches the enclave", remove("systemd/enclave-watchdog.service",
                                                   "systemd/enclave-watchdog.timer"),
             "no unit runs enclave-watchdog.sh: nothing would restart it"),
            ("watchdog without its timer", remove("systemd/enclave-watchdog.timer"),
             "no timer starts enclave-watchdog.service"),
            ("watchdog not ordered after the enclave",
             edit("systemd/enclave-watchdog.service", "After=enclave.service\n", ""),
             "enclave-watchdog.service: needs After=enclave.service"),
            ("watchdog gives up before run-enclave does",
             edit("systemd/enclave-watchdog.service", "TimeoutStartSec=300", "TimeoutStartSec=2min"),
             "TimeoutStartSec= must exceed enclave.service's (180 s)"),
            ("restart does not re-deliver",
             edit("systemd/enclave.service", " enclave-secrets.service\n", "\n"),
             "enclave.service: needs Wants=enclave-secrets.service"),
            ("in-flight delivery not restarted",
             edit("systemd/enclave-secrets.service", "PartOf=enclave.service\n", ""),
             "enclave-secrets.service: needs PartOf=enclave.service"),
            ("no credential refresh", remove("systemd/enclave-secrets.timer"),
             "no timer starts enclave-secrets.service"),
            ("user-data leaves the watchdog off", edit("user-data.sh", " enclave-watchdog.timer\n",
                                                       "\n"),
             "user-data.sh: does not enable enclave-watchdog.timer"),
        ]
        for name, mutate, expected in cases:
            with self.subTest(name):
                deploy = self.copy()
                mutate(deploy)
                proc = self.check(deploy)
                self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
                self.assertIn(expected, proc.stderr)

    @unittest.skipUnless(shutil.which("shellcheck"), "shellcheck is not installed")
    def test_shellcheck(self):
        scripts = sorted(str(p) for p in DEPLOY.glob("*.sh")) + [str(ROOT / "scripts" /
                                                                   "enclave-logs.sh")]
        proc = run("shellcheck", *scripts)
        self.assertEqual(proc.returncode, 0, proc.stdout)

    def test_help(self):
        for argv in ([sys.executable, str(GENERATE)], [sys.executable, str(CHECK)],
                     ["bash", str(FETCH)], ["bash", str(DEPLOY / "user-data.sh")],
                     ["bash", str(WATCHDOG)]):
            with self.subTest(argv[-1]):
                proc = run(*argv, "--help")
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertIn("usage:", proc.stdout)


class FetchEnvelopeTest(unittest.TestCase):
    SEALED = {"v": 1, "kms_key_arn": "arn:aws:kms:us-east-1:111122223333:key/test",
              "encryption_context": {"purpose": "enclave-secrets/v1", "bundle_version": "1"},
              "encrypted_data_key": "AQID", "nonce": "AAAAAAAAAAAAAAAA", "ciphertext": "BAUG"}

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="envelope-")
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)
        self.target = self.dir / "state" / "sealed-envelope.json"

    def fetch(self, *args, **env_extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
        env.update(env_extra)
        return run("bash", str(FETCH), *args, env=env)

    def source(self, value) -> str:
        path = self.dir / "source.json"
        path.write_text(json.dumps(value))
        return f"file:{path}"

    def test_sealed_envelope_is_installed_0600(self):
        proc = self.fetch(self.source(self.SEALED), str(self.target))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(json.loads(self.target.read_text()), self.SEALED)
        self.assertEqual(stat.S_IMODE(self.target.stat().st_mode), 0o600)

    def test_plaintext_and_junk_are_refused_and_the_old_one_stays(self):
        self.assertEqual(self.fetch(self.source(self.SEALED), str(self.target)).returncode, 0)
        cases = [("plaintext secrets", {"ENCLAVE_RPC_SHARED_SECRET": "s" * 40},
                  "plaintext secrets (ENCLAVE_RPC_SHARED_SECRET)"),
                 ("sealed plus plaintext", dict(self.SEALED, MTLS_CLIENT_CERT_JSON={}),
                  "plaintext secrets (MTLS_CLIENT_CERT_JSON)"),
                 ("half an envelope", {"v": 1, "ciphertext": "x"}, "missing"),
                 ("another version", dict(self.SEALED, v=2), "unsupported envelope version"),
                 ("a list", [1, 2], "not a JSON object")]
        for name, value, expected in cases:
            with self.subTest(name):
                proc = self.fetch(self.source(value), str(self.target))
                self.assertEqual(proc.returncode, 1, proc.stderr)
                self.assertIn(expected, proc.stderr)
                self.assertNotIn("s" * 40, proc.stderr)
                self.assertEqual(json.loads(self.target.read_text()), self.SEALED)
        self.assertEqual(sorted(p.name for p in self.target.parent.iterdir()),
                         ["sealed-envelope.json"])  # no partial files left behind

    def test_unreachable_source(self):
        missing = f"file:{self.dir / 'missing.json'}"
        proc = self.fetch(missing, str(self.target))
        self.assertEqual(proc.returncode, 1)
        self.assertIn("there is no envelope yet", proc.stderr)
        self.assertEqual(self.fetch(self.source(self.SEALED), str(self.target)).returncode, 0)
        proc = self.fetch(missing, str(self.target))
        self.assertEqual(proc.returncode, 0)  # the delivery goes on with the envelope in place
        self.assertIn("delivering the envelope already in", proc.stderr)

    def test_from_the_environment_and_nothing_configured(self):
        proc = self.fetch(ENCLAVE_ENVELOPE_SOURCE=self.source(self.SEALED),
                          ENCLAVE_ENVELOPE_PATH=str(self.target))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue(self.target.exists())
        proc = self.fetch(ENCLAVE_ENVELOPE_SOURCE="")
        self.assertEqual(proc.returncode, 0)
        self.assertIn("nothing to fetch", proc.stderr)


class WatchdogTest(unittest.TestCase):
    """enclave-watchdog.sh with a stub `nitro-cli` and a stub `systemctl` first on PATH: each
    records its arguments; the stub describe-enclaves prints $STUB_DESCRIBE (or fails), and the
    stub systemctl answers is-active with $STUB_STATE and restart with $STUB_RESTART_RC."""

    NAME, CID = "enclave-runtime", 16
    STUB = """#!/bin/sh
echo "$(basename "$0") $*" >>"$STUB_CALLS"
case "$(basename "$0") $1" in
  "nitro-cli describe-enclaves")
    [ -n "${STUB_NITRO_FAIL:-}" ] && { echo "E39 socket error" >&2; exit 1; }
    printf '%s\\n' "$STUB_DESCRIBE" ;;
  "systemctl is-active")
    echo "$STUB_STATE"; [ "$STUB_STATE" = active ] || exit 3 ;;
  "systemctl restart")
    exit "${STUB_RESTART_RC:-0}" ;;
  *) echo "unexpected call: $0 $*" >&2; exit 64 ;;
esac
"""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="watchdog-")
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)
        for name in ("nitro-cli", "systemctl"):
            path = self.dir / name
            path.write_text(self.STUB)
            path.chmod(0o755)
        self.calls = self.dir / "calls"

    def enclave(self, **fields):
        entry = {"EnclaveName": self.NAME, "EnclaveID": "i-0123456789abcdef0-enc0123456789abcdef",
                 "ProcessID": 4242, "EnclaveCID": self.CID, "NumberOfCPUs": 2,
                 "CPUIDs": [1, 3], "MemoryMiB": 1536, "State": "RUNNING", "Flags": "NONE"}
        entry.update(fields)
        return {k: v for k, v in entry.items() if v is not None}

    def watchdog(self, enclaves=(), *args, state="active", describe=None, **env_extra):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ENCLAVE_", "STUB_")) and k != "JOURNAL_STREAM"}
        env.update(PATH=f"{self.dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
                   ENCLAVE_NAME=self.NAME, ENCLAVE_CID=str(self.CID), STUB_CALLS=str(self.calls),
                   STUB_STATE=state,
                   STUB_DESCRIBE=json.dumps(list(enclaves)) if describe is None else describe)
        env.update(env_extra)
        self.calls.write_text("")
        return run("bash", str(WATCHDOG), *args, env=env)

    def called(self) -> list[str]:
        return self.calls.read_text().splitlines()

    def restarts(self) -> list[str]:
        return [c for c in self.called() if c.startswith("systemctl restart")]

    def test_running_enclave_is_left_alone(self):
        for name, enclaves in [("ours", [self.enclave()]),
                               ("ours among others", [self.enclave(EnclaveName="other",
                                                                   EnclaveCID=17),
                                                      self.enclave()]),
                               ("older nitro-cli without EnclaveName",
                                [self.enclave(EnclaveName=None)])]:
            with self.subTest(name):
                proc = self.watchdog(enclaves)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(self.called(), ["systemctl is-active enclave.service",
                                                 "nitro-cli describe-enclaves"])

    def test_gone_enclave_is_restarted_once(self):
        cases = [("empty list", [], "no enclave at all"),
                 ("terminating", [self.enclave(State="TERMINATING")], "State TERMINATING"),
                 ("another CID (started by hand)", [self.enclave(EnclaveCID=17)],
                  "EnclaveCID 17"),
                 ("another enclave on our CID", [self.enclave(EnclaveName="intruder")],
                  "intruder (EnclaveCID 16, State RUNNING)")]
        for name, enclaves, listed in cases:
            with self.subTest(name):
                proc = self.watchdog(enclaves)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(self.restarts(), ["systemctl restart enclave.service"])
                self.assertIn(f"no enclave {self.NAME} with CID {self.CID} is RUNNING", proc.stderr)
                self.assertIn(listed, proc.stderr)
                self.assertIn("enclave.service restarted", proc.stderr)

    def test_unit_state_decides_whether_to_look(self):
        for state, restarted in [("failed", True), ("inactive", False), ("activating", False),
                                 ("deactivating", False)]:
            with self.subTest(state):
                proc = self.watchdog([self.enclave()], state=state)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(self.restarts(),
                                 ["systemctl restart enclave.service"] if restarted else [])
                # a stopped or starting unit is never second-guessed with nitro-cli
                self.assertNotIn("nitro-cli describe-enclaves", self.called())

    def test_unreadable_answers_restart_nothing(self):
        for name, extra in [("nitro-cli fails", {"STUB_NITRO_FAIL": "1"}),
                            ("not JSON", {"describe": "Error: something"}),
                            ("not a list", {"describe": '{"State": "RUNNING"}'})]:
            with self.subTest(name):
                proc = self.watchdog([], **extra)
                self.assertEqual(proc.returncode, 1, proc.stderr)
                self.assertEqual(self.restarts(), [])
                self.assertIn("restarting nothing", proc.stderr)

    def test_failed_restart_and_dry_run(self):
        proc = self.watchdog([], STUB_RESTART_RC="1")
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(len(self.restarts()), 1)
        self.assertIn("systemctl restart enclave.service failed: journalctl -u enclave.service",
                      proc.stderr)
        proc = self.watchdog([], "--dry-run")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.restarts(), [])
        self.assertIn("would run systemctl restart enclave.service", proc.stderr)

    def test_settings_and_usage(self):
        proc = self.watchdog([], ENCLAVE_CID="sixteen")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("ENCLAVE_CID", proc.stderr)
        self.assertEqual(self.called(), [])
        self.assertEqual(self.watchdog([], "--now").returncode, 2)
        proc = self.watchdog([], ENCLAVE_WATCHDOG_UNIT="other.service")
        self.assertEqual(self.restarts(), ["systemctl restart other.service"])

    def test_journal_lines_carry_a_level_only_for_the_journal(self):
        proc = self.watchdog([])
        self.assertTrue(proc.stderr.startswith("enclave-watchdog.sh: "), proc.stderr)
        proc = self.watchdog([], JOURNAL_STREAM="1:2")  # not this stderr: no prefix either
        self.assertNotIn("<4>", proc.stderr)
        # stderr is the stream named by $JOURNAL_STREAM (as under systemd): syslog levels
        log = self.dir / "journal"
        with open(log, "w") as stream:
            info = os.fstat(stream.fileno())
            env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
            env.update(PATH=f"{self.dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
                       ENCLAVE_NAME=self.NAME, ENCLAVE_CID=str(self.CID), STUB_STATE="active",
                       STUB_DESCRIBE="[]", STUB_CALLS=str(self.calls),
                       JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
            subprocess.run(["bash", str(WATCHDOG)], stdout=subprocess.DEVNULL, stderr=stream,
                           env=env, timeout=TIMEOUT_S, check=True)
        lines = log.read_text().splitlines()
        self.assertTrue(lines and all(line.startswith("<4>enclave-watchdog.sh: ")
                                      for line in lines), lines)


if __name__ == "__main__":
    unittest.main()
