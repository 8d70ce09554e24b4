"""The parent automation in deploy/: no drift between the one route list, the generated files
and the Containerfile; the structural checks of `make check-deploy`; fetch-envelope.sh refusing
plaintext. Nothing here touches systemd, nitro-cli, AWS or the network."""

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
TIMEOUT_S = 60


def run(*argv, env=None):
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, stdin=subprocess.DEVNULL)


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
                     ["bash", str(FETCH)], ["bash", str(DEPLOY / "user-data.sh")]):
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


if __name__ == "__main__":
    unittest.main()
