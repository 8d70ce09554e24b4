#!/usr/bin/env bash
# Restart enclave.service when its enclave is gone (run by enclave-watchdog.timer every 30 s).
#
# Usage: enclave-watchdog.sh [--dry-run]
#
# enclave.service is Type=oneshot with RemainAfterExit=yes: `nitro-cli run-enclave` returns once
# the enclave has booted, and systemd keeps showing the unit active whatever the enclave does
# afterwards. This script closes that gap:
#
#   enclave.service active   `nitro-cli describe-enclaves` must list an enclave named
#                            $ENCLAVE_NAME with EnclaveCID $ENCLAVE_CID in State "RUNNING"
#                            (an entry without "EnclaveName", from an older nitro-cli, matches
#                            on the CID); otherwise `systemctl restart enclave.service`, which
#                            terminates what is left and runs the enclave again, and restarting
#                            it starts enclave-secrets.service again (deploy/README.md)
#   enclave.service failed   restart it (a start that failed, e.g. resources not yet released
#                            after a crash); enclave.service's StartLimitBurst= bounds the tries
#   anything else            nothing: stopped on purpose (inactive), or a start or stop is under
#                            way (activating, deactivating)
#
# When `nitro-cli describe-enclaves` fails or prints no JSON list, nothing is restarted (a
# running enclave is never terminated because the CLI could not be asked) and the exit is 1.
#
# Environment (from /etc/enclave/enclave.env): ENCLAVE_NAME and ENCLAVE_CID (required);
# ENCLAVE_WATCHDOG_UNIT (default enclave.service). Needs nitro-cli, systemctl and python3 (to
# read the JSON; Amazon Linux 2023 has it) on PATH.
# Exit 0: the enclave runs, was restarted, or is not meant to run; 1: the restart failed or the
# enclave could not be described; 2: usage errors.
#
# Under systemd (stderr is the journal, $JOURNAL_STREAM) each line carries a syslog level prefix
# ("<4>" warning, "<3>" error, "<7>" debug), so the unit's LogLevelMax=notice drops the healthy
# runs and keeps every restart and failure: journalctl -u enclave-watchdog.
set -euo pipefail

readonly PROG="${0##*/}"
usage_line() { echo "usage: $PROG [--dry-run]   (ENCLAVE_NAME and ENCLAVE_CID in the environment)"; }

dry_run=0
case "${1:-}" in
  -h|--help)
    usage_line
    echo "Restart \$ENCLAVE_WATCHDOG_UNIT (enclave.service) when nitro-cli describe-enclaves lists"
    echo "no enclave named \$ENCLAVE_NAME with EnclaveCID \$ENCLAVE_CID in State RUNNING, or when"
    echo "the unit failed. Nothing happens while the unit is stopped or starting."
    echo "  --dry-run   say what would be done, restart nothing"
    echo "Exit 0 ok (running, restarted, or not meant to run); 1 restart or describe failed; 2 usage."
    exit 0 ;;
  --dry-run) dry_run=1; shift ;;
  "") ;;
  *) usage_line >&2; exit 2 ;;
esac
[ "$#" -eq 0 ] || { usage_line >&2; exit 2; }

# The syslog level prefix only when stderr is the journal stream systemd connected
# (systemd.exec(5), $JOURNAL_STREAM); a terminal sees plain lines. The shell's own fd 2
# (/proc/$$), not stat's, whose stderr is /dev/null here.
to_journal=0
if [ -n "${JOURNAL_STREAM:-}" ] \
    && [ "$(stat -L -c "%d:%i" "/proc/$$/fd/2" 2>/dev/null || true)" = "$JOURNAL_STREAM" ]; then
  to_journal=1
fi
say() {  # say LEVEL MESSAGE...
  local level="$1"
  shift
  if [ "$to_journal" -eq 1 ]; then
    echo "<$level>$PROG: $*" >&2
  else
    echo "$PROG: $*" >&2
  fi
}

name="${ENCLAVE_NAME:-}"
cid="${ENCLAVE_CID:-}"
unit="${ENCLAVE_WATCHDOG_UNIT:-enclave.service}"
if [ -z "$name" ] || ! [[ "$cid" =~ ^[0-9]+$ ]]; then
  say 3 "ENCLAVE_NAME and a numeric ENCLAVE_CID must be set (/etc/enclave/enclave.env)"
  exit 2
fi

restart() {  # restart REASON
  if [ "$dry_run" -eq 1 ]; then
    say 4 "$1: would run systemctl restart $unit (--dry-run)"
    return 0
  fi
  say 4 "$1: systemctl restart $unit (the secrets are delivered again once it runs)"
  # blocks until nitro-cli run-enclave returned (enclave.service TimeoutStartSec=)
  if ! systemctl restart "$unit"; then
    say 3 "systemctl restart $unit failed: journalctl -u $unit"
    return 1
  fi
  say 4 "$unit restarted"
}

# is-active prints the state and exits non-zero for every state but "active"
state="$(systemctl is-active "$unit" 2>/dev/null)" || true
case "$state" in
  active) ;;
  failed)
    restart "$unit is failed"
    exit ;;
  *)
    say 7 "$unit is ${state:-unknown}: nothing to watch"
    exit 0 ;;
esac

if ! described="$(nitro-cli describe-enclaves)"; then
  say 3 "nitro-cli describe-enclaves failed; restarting nothing"
  exit 1
fi

# One line: "running ENCLAVE_ID" (exit 0), "gone WHAT WAS LISTED" (exit 1), or "unreadable"
# (exit 2). Only names, IDs, CIDs and states are printed.
verdict_rc=0
verdict="$(python3 -c '
import json, sys
name, cid = sys.argv[1], int(sys.argv[2])
try:
    enclaves = json.loads(sys.stdin.read())
except ValueError:
    enclaves = None
if not isinstance(enclaves, list) or not all(isinstance(e, dict) for e in enclaves):
    print("unreadable")
    sys.exit(2)
for e in enclaves:
    if (e.get("State") == "RUNNING" and e.get("EnclaveCID") == cid
            and e.get("EnclaveName", name) == name):
        print("running", e.get("EnclaveID", "?"))
        sys.exit(0)
listed = ", ".join("%s (EnclaveCID %s, State %s)" % (e.get("EnclaveName", e.get("EnclaveID", "?")),
                                                   e.get("EnclaveCID", "?"), e.get("State", "?"))
                   for e in enclaves)
print("gone", listed or "no enclave at all")
sys.exit(1)
' "$name" "$cid" <<<"$described")" || verdict_rc=$?

case "$verdict_rc" in
  0)
    say 7 "$name (CID $cid) is RUNNING: ${verdict#running }"
    exit 0 ;;
  1)
    restart "no enclave $name with CID $cid is RUNNING; nitro-cli lists: ${verdict#gone }" ;;
  *)
    say 3 "nitro-cli describe-enclaves printed no JSON list of enclaves; restarting nothing"
    exit 1 ;;
esac
