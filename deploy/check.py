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
- supervision: the enclave unit (nitro-cli run-enclave, RemainAfterExit=yes) is watched by a
  timer-started oneshot running enclave-watchdog.sh (After= the enclave unit, a longer start
  timeout), and it Wants= the secrets delivery, which is After= and PartOf= it (re-delivered on
  every restart) and has a timer of its own (fresh credentials); user-data.sh enables every
  timer;
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
WATCHDOG_SCRIPT = "enclave-watchdog.sh"
DELIVERY_SCRIPT = "send-secrets.sh"
TIME_UNITS_S = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60,
                "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}
TIME_RE = re.compile(r"(\d+)\s*([a-z]*)")


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


def seconds(value: str) -> float | None:
    """A systemd time span ("300", "5min", "1min 30s") in seconds; None if not one."""
    total, rest = 0, value.strip().lower()
    if not rest or rest == "infinity":
        return None
    for match in TIME_RE.finditer(rest):
        if match.group(2) not in TIME_UNITS_S:
            return None
        total += int(match.group(1)) * TIME_UNITS_S[match.group(2)]
    if TIME_RE.sub("", rest).strip():
        return None
    return total


def check_supervision(deploy: Path, problems: list) -> None:
    """The enclave is watched and every (re)start re-delivers (the reviewer's finding: a oneshot
    with RemainAfterExit stays "active" after its enclave exits)."""
    unit_dir = deploy / "systemd"
    units = {}
    for path in sorted(unit_dir.iterdir()):
        try:
            units[path.name] = parse_unit(path.read_text())
        except ValueError:
            continue  # reported by check_units

    def runs(unit, needle):
        return any(needle in v for v in values(unit, "Service", "ExecStart"))

    def named(value_lists):
        return {name for value in value_lists for name in value.split()}

    enclaves = [n for n, u in units.items() if runs(u, "nitro-cli run-enclave")]
    if len(enclaves) != 1:
        problems.append(f"systemd: expected one unit running nitro-cli run-enclave, got {enclaves}")
        return
    enclave = enclaves[0]
    timers = {values(u, "Timer", "Unit")[0] if values(u, "Timer", "Unit")
              else n.rsplit(".", 1)[0] + ".service": n
              for n, u in units.items() if n.endswith(".timer")}

    watchdogs = [n for n, u in units.items() if runs(u, WATCHDOG_SCRIPT)]
    if "yes" in values(units[enclave], "Service", "RemainAfterExit"):
        if not watchdogs:
            problems.append(f"systemd/{enclave}: stays active after its enclave exits "
                            f"(RemainAfterExit=yes) and no unit runs {WATCHDOG_SCRIPT}: nothing "
                            "would restart it")
        elif not any(w in timers for w in watchdogs):
            problems.append(f"systemd: no timer starts {' '.join(watchdogs)}")
        if not (deploy / WATCHDOG_SCRIPT).is_file():
            problems.append(f"{WATCHDOG_SCRIPT} is missing")
    enclave_timeout = seconds((values(units[enclave], "Service", "TimeoutStartSec") or ["90"])[0])
    for name in watchdogs:
        unit = units[name]
        if enclave not in named(values(unit, "Unit", "After")):
            problems.append(f"systemd/{name}: needs After={enclave} (never judge an enclave "
                            "that is still starting)")
        timeout = seconds((values(unit, "Service", "TimeoutStartSec") or ["90"])[0])
        if timeout is None or enclave_timeout is None or timeout <= enclave_timeout:
            problems.append(f"systemd/{name}: TimeoutStartSec= must exceed {enclave}'s "
                            f"({enclave_timeout} s): its restart waits for nitro-cli run-enclave")

    deliveries = [n for n, u in units.items() if runs(u, DELIVERY_SCRIPT)]
    if not deliveries:
        problems.append(f"systemd: no unit runs {DELIVERY_SCRIPT}")
    for name in deliveries:
        unit = units[name]
        if name not in named(values(units[enclave], "Unit", "Wants")
                             + values(units[enclave], "Unit", "Requires")):
            problems.append(f"systemd/{enclave}: needs Wants={name} (a restarted enclave "
                            "gets its secrets again)")
        if enclave not in named(values(unit, "Unit", "After")):
            problems.append(f"systemd/{name}: needs After={enclave} (deliver once the enclave "
                            "runs)")
        if enclave not in named(values(unit, "Unit", "PartOf")):
            problems.append(f"systemd/{name}: needs PartOf={enclave} (a restart of the enclave "
                            "restarts a delivery under way)")
        if name not in timers:
            problems.append(f"systemd: no timer starts {name} (each delivery carries fresh "
                            "instance credentials)")

    try:
        user_data = (deploy / "user-data.sh").read_text()
    except OSError:
        return
    enabled = " ".join(line for line in user_data.splitlines()
                       if not line.lstrip().startswith("#") and "systemctl enable" in line)
    for timer in sorted(timers.values()):
        if timer not in enabled.split():
            problems.append(f"user-data.sh: does not enable {timer} (systemctl enable --now)")


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
    check_supervision(deploy, problems)
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
