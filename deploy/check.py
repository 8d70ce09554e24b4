#!/usr/bin/env python3
"""Structural checks of the parent automation in deploy/ (run by `make check-deploy`).

- allocator.yaml: the two keys nitro-enclaves-allocator reads, sane values, and room for the
  enclave.env sizes (nitro-cli run-enclave --memory/--cpu-count);
- vsock-proxy.yaml: an `allowlist` of `{address: HOST, port: N}` entries (read with a tiny
  parser for exactly this shape: the file is generated, see generate.py);
- systemd units: sections and keys we rely on, every `${VAR}` defined in enclave.env, every
  project script they run present and executable in the repository, every enclave-* unit they
  name present, no --debug-mode, the timer's service re-startable (oneshot without
  RemainAfterExit, systemd.timer(5));
- user-data.sh and fetch-envelope.sh never handle the plaintext secrets file;
- with --systemd: `systemd-analyze verify` on the units (skipped when it is not installed),
  with a stub for nitro-enclaves-allocator.service; commands that exist only on a parent
  instance (nitro-cli, vsock-proxy, the installed project) are reported, not failed.

Exit 0 when everything holds, 1 listing every problem. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
ROOT = DEPLOY_DIR.parent
INSTALL_DIR = "/opt/enclave-runtime"  # where user-data.sh unpacks this repository
PARENT_ONLY_COMMANDS = ("/usr/bin/nitro-cli", "/usr/bin/vsock-proxy", "/usr/bin/socat")
EXTERNAL_UNITS = {"nitro-enclaves-allocator.service", "network-online.target", "network.target",
                  "multi-user.target", "timers.target"}
MIN_ENCLAVE_MEMORY_MIB = 64
PLAINTEXT_KEYS = ("ENCLAVE_RPC_SHARED_SECRET", "ENCLAVE_TOKEN_SEALING_KEY",
                  "GOOGLE_OAUTH_CLIENT_SECRET", "MTLS_CLIENT_CERT_JSON")
VAR_RE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
SYSTEMD_VERIFY_TIMEOUT_S = 60


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} keeping repeated keys (configparser would merge them)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None or "=" not in line:
            raise ValueError(f"unexpected line {raw!r}")
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def parse_simple_yaml(text: str) -> dict[str, str]:
    """Top-level `key: value` pairs (the allocator's shape); ValueError on anything else."""
    out = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip() or line.strip() == "---":
            continue
        if line[0].isspace() or ":" not in line:
            raise ValueError(f"unexpected line {raw!r}")
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


ALLOW_ENTRY_RE = re.compile(r"^- \{address: ([A-Za-z0-9.:-]+), port: ([0-9]{1,5})\}$")


def parse_allowlist(text: str) -> list[tuple[str, int]]:
    entries, seen_key = [], False
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        if line == "allowlist:":
            seen_key = True
            continue
        match = ALLOW_ENTRY_RE.match(line)
        if not seen_key or not match:
            raise ValueError(f"unexpected line {raw!r}")
        entries.append((match.group(1), int(match.group(2))))
    if not seen_key or not entries:
        raise ValueError("no allowlist entries")
    return entries


def env_values(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def check_allocator(deploy: Path, env: dict, problems: list) -> None:
    try:
        alloc = parse_simple_yaml((deploy / "allocator.yaml").read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"allocator.yaml: {exc}")
        return
    if set(alloc) != {"memory_mib", "cpu_count"}:
        problems.append(f"allocator.yaml: expected memory_mib and cpu_count, got {sorted(alloc)}")
        return
    memory, cpus = alloc["memory_mib"], alloc["cpu_count"]
    if not memory.isdigit() or int(memory) < MIN_ENCLAVE_MEMORY_MIB:
        problems.append(f"allocator.yaml: memory_mib must be a number >= {MIN_ENCLAVE_MEMORY_MIB}")
        return
    if not cpus.isdigit() or int(cpus) < 2 or int(cpus) % 2:
        problems.append("allocator.yaml: cpu_count must be an even number >= 2 (whole cores)")
        return
    for key, limit, name in (("ENCLAVE_MEMORY_MIB", int(memory), "memory_mib"),
                             ("ENCLAVE_CPU_COUNT", int(cpus), "cpu_count")):
        value = env.get(key, "")
        if not value.isdigit() or not 0 < int(value) <= limit:
            problems.append(f"enclave.env: {key}={value} must be 1..{limit} "
                            f"(allocator.yaml {name})")


def check_allowlist(deploy: Path, problems: list) -> None:
    try:
        entries = parse_allowlist((deploy / "vsock-proxy.yaml").read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"vsock-proxy.yaml: {exc}")
        return
    if len(set(entries)) != len(entries):
        problems.append("vsock-proxy.yaml: duplicate entries")


def check_units(deploy: Path, env: dict, problems: list) -> None:
    unit_dir = deploy / "systemd"
    names = {p.name for p in unit_dir.iterdir() if p.is_file()}
    for path in sorted(unit_dir.iterdir()):
        where = f"systemd/{path.name}"
        text = path.read_text()
        try:
            unit = parse_unit(text)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if "Unit" not in unit or not values(unit, "Unit", "Description"):
            problems.append(f"{where}: needs a [Unit] Description=")
        kind = path.suffix[1:]
        body = {"service": "Service", "timer": "Timer", "target": None}.get(kind, "?")
        if body == "?":
            problems.append(f"{where}: unexpected unit type")
            continue
        if body and body not in unit:
            problems.append(f"{where}: missing [{body}]")
        code = "\n".join(v for section in unit.values() for _, v in section)
        if "--debug-mode" in code:
            problems.append(f"{where}: --debug-mode (a debug enclave attests all-zero PCRs)")
        for key in ("Wants", "Requires", "Requisite", "After", "Before", "PartOf", "Unit"):
            for section in ("Unit", "Timer"):
                for value in values(unit, section, key):
                    for other in value.split():
                        if other not in names and other not in EXTERNAL_UNITS:
                            problems.append(f"{where}: {key}={other}: no such unit in deploy/")
        service = unit.get("Service", [])
        uses_env = any(k == "EnvironmentFile" for k, _ in service)
        for key, value in service:
            if not key.startswith("Exec"):
                continue
            for var in VAR_RE.findall(value):
                if not uses_env:
                    problems.append(f"{where}: {key} uses ${var} without EnvironmentFile=")
                elif var not in env:
                    problems.append(f"{where}: {key} uses ${var}, not defined in enclave.env")
            command = value.lstrip("-@:+!").split()[0]
            if command.startswith(INSTALL_DIR + "/"):
                local = ROOT / command[len(INSTALL_DIR) + 1:]
                if not local.is_file() or not os.access(local, os.X_OK):
                    problems.append(f"{where}: {command}: {local.relative_to(ROOT)} is not an "
                                    "executable file in this repository")
            elif not command.startswith("/"):
                problems.append(f"{where}: {key} must name its command by absolute path")
        if kind == "timer":
            target = (values(unit, "Timer", "Unit") or [path.stem + ".service"])[0]
            if target in names:
                service_unit = parse_unit((unit_dir / target).read_text())
                if (values(service_unit, "Service", "Type") != ["oneshot"]
                        or "yes" in values(service_unit, "Service", "RemainAfterExit")):
                    problems.append(f"{where}: {target} must be Type=oneshot without "
                                    "RemainAfterExit=yes, or the timer starts it only once")
            if not values(unit, "Install", "WantedBy"):
                problems.append(f"{where}: needs [Install] WantedBy=timers.target")


def check_no_plaintext(deploy: Path, problems: list) -> None:
    for name in ("user-data.sh", "fetch-envelope.sh"):
        text = (deploy / name).read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        if "send-secrets.sh" in code and "--kms" not in code:
            problems.append(f"{name}: delivers secrets without --kms (plaintext)")
        if name == "user-data.sh":
            for key in PLAINTEXT_KEYS:
                if key in code:
                    problems.append(f"{name}: handles {key} (the parent must only hold the "
                                    "sealed envelope)")
            if "fetch-envelope.sh" not in code:
                problems.append(f"{name}: does not fetch the sealed envelope")


def systemd_verify(deploy: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) from systemd-analyze verify; notes for parent-only commands."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return [], ["systemd-analyze verify: skipped (systemd-analyze is not installed)"]
    problems, notes = [], []
    with tempfile.TemporaryDirectory(prefix="check-deploy-") as tmp:
        units = []
        for path in sorted((deploy / "systemd").iterdir()):
            shutil.copy(path, Path(tmp) / path.name)
            units.append(str(Path(tmp) / path.name))
        (Path(tmp) / "nitro-enclaves-allocator.service").write_text(
            "[Unit]\nDescription=stub of the Nitro CLI's allocator for the check\n"
            "[Service]\nType=oneshot\nExecStart=/bin/true\n")
        env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp}:", SYSTEMD_LOG_COLOR="0")
        try:
            proc = subprocess.run([tool, "verify", "--man=no", *units], capture_output=True,
                                  text=True, env=env, timeout=SYSTEMD_VERIFY_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [], [f"systemd-analyze verify: skipped ({exc})"]
    for line in (proc.stdout + proc.stderr).splitlines():
        line = line.replace(tmp + "/", "")
        match = re.search(r"Command (\S+) is not executable", line)
        if match and (match.group(1) in PARENT_ONLY_COMMANDS
                      or match.group(1).startswith(INSTALL_DIR + "/")):
            notes.append(f"systemd-analyze: {line} (installed on the parent by user-data.sh)")
        elif line.strip():
            problems.append(f"systemd-analyze: {line}")
    if proc.returncode != 0 and not problems and not notes:
        problems.append(f"systemd-analyze verify exited {proc.returncode}")
    return problems, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR)
    parser.add_argument("--systemd", action="store_true",
                        help="also run systemd-analyze verify (when installed)")
    args = parser.parse_args(argv)
    deploy = args.deploy_dir
    problems, notes = [], []
    try:
        env = env_values((deploy / "enclave.env").read_text())
    except OSError as exc:
        print(f"check.py: enclave.env: {exc.strerror}", file=sys.stderr)
        return 1
    check_allocator(deploy, env, problems)
    check_allowlist(deploy, problems)
    check_units(deploy, env, problems)
    check_no_plaintext(deploy, problems)
    if args.systemd:
        more, notes = systemd_verify(deploy)
        problems += more
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("check.py: deploy/ is consistent (allocator, allow-list, units, user-data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
