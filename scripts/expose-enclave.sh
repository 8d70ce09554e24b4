#!/usr/bin/env bash
# On the parent instance: expose the enclave's HTTP API on TCP, THEN deliver its secrets
# (docs/DESIGN.md §4, §6 and §11; docs/ENCLAVE.md has the whole procedure).
#
# Usage: expose-enclave.sh [--cid CID] [--port 8181] [--listen-port 8181] [--bind 127.0.0.1]
#                          [--secrets-port 7777] [--pid-file FILE] [--replace] [--dry-run]
#                          [--kms] SECRETS_FILE
#
# With --kms, SECRETS_FILE is a sealed envelope (seal-secrets) and the delivery is
# send-secrets.sh --kms: the image's ENCLAVE_SECRETS_SOURCE=kms refuses plaintext.
#
#   1. the CID: --cid, or the one RUNNING enclave in `nitro-cli describe-enclaves`
#   2. socat TCP-LISTEN:<listen-port>,fork,reuseaddr,bind=<bind> VSOCK-CONNECT:<cid>:<port>,
#      in the background, its pid written to --pid-file (default
#      /tmp/enclave-forwarder-<listen-port>.pid); it is started FIRST so that the API is
#      reachable as soon as the enclave serves (HTTP serves from boot: /healthz answers, RPCs
#      answer 503 not_ready until the secrets arrive, see docs/DESIGN.md §2)
#   3. scripts/send-secrets.sh --cid CID --port <secrets-port> SECRETS_FILE (it retries)
#   4. waits (bounded, EXPOSE_READY_TIMEOUT seconds, default 30) for /healthz?ready=1
#
# --bind defaults to 127.0.0.1: only processes on this instance reach the API. Use
# --bind 0.0.0.0 only when host services run elsewhere AND a security group restricts the port.
# --dry-run prints the commands in order and runs nothing. Exit 0 when the API answers ready,
# 1 when a step fails, 2 on usage errors. The forwarder keeps running after this script exits;
# stop it with: kill "$(cat PID_FILE)".
set -euo pipefail

readonly PROG="${0##*/}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly FORWARDER_SETTLE_S=0.5  # socat fails within this when it cannot bind its port
# The documented pid file lives here whatever XDG_RUNTIME_DIR says: that variable differs
# between a login shell, sudo and a systemd unit, and the stop command must find the file.
readonly PID_DIR=/tmp

usage_line() {
  echo "usage: $PROG [--cid CID] [--port PORT] [--listen-port PORT] [--bind ADDR]" \
       "[--secrets-port PORT] [--pid-file FILE] [--replace] [--dry-run] [--kms] SECRETS_FILE"
}
usage() { usage_line >&2; exit 2; }
help() {
  usage_line
  cat <<'EOF'
On the parent instance: start the TCP -> VSOCK forwarder for the enclave's HTTP API, then
deliver SECRETS_FILE, then wait for /healthz?ready=1.
  --cid CID            the enclave's CID (default: the one RUNNING enclave from nitro-cli)
  --port PORT          the enclave's HTTP vsock port (default 8181)
  --listen-port PORT   the TCP port to listen on (default: --port)
  --bind ADDR          the address to listen on (default 127.0.0.1)
  --secrets-port PORT  the enclave's secrets vsock port (default 7777)
  --pid-file FILE      where the forwarder's pid goes
                       (default /tmp/enclave-forwarder-<listen-port>.pid)
  --kms                SECRETS_FILE is a sealed envelope: deliver it with send-secrets.sh --kms
                       (the instance role's credentials from IMDSv2; the production image
                       takes sealed secrets only)
  --replace            restart a forwarder that is already running
  --dry-run            print the commands in order and run nothing
  -h, --help           show this help and exit
EOF
  exit 0
}

cid="" port="8181" listen_port="" bind="127.0.0.1" secrets_port="7777" pid_file=""
replace=0 dry_run=0 file="" kms=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --cid) [ "$#" -ge 2 ] || usage; cid="$2"; shift 2 ;;
    --port) [ "$#" -ge 2 ] || usage; port="$2"; shift 2 ;;
    --listen-port) [ "$#" -ge 2 ] || usage; listen_port="$2"; shift 2 ;;
    --bind) [ "$#" -ge 2 ] || usage; bind="$2"; shift 2 ;;
    --secrets-port) [ "$#" -ge 2 ] || usage; secrets_port="$2"; shift 2 ;;
    --pid-file) [ "$#" -ge 2 ] || usage; pid_file="$2"; shift 2 ;;
    --replace) replace=1; shift ;;
    --kms) kms=(--kms); shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) help ;;
    -*) echo "$PROG: unknown option $1" >&2; usage ;;
    *) [ -z "$file" ] || usage; file="$1"; shift ;;
  esac
done
[ -n "$file" ] || usage
listen_port="${listen_port:-$port}"
for value in "$port" "$listen_port" "$secrets_port"; do
  if ! [[ "$value" =~ ^[0-9]{1,5}$ ]] || [ "$value" -lt 1 ] || [ "$value" -gt 65535 ]; then
    echo "$PROG: ports must be numbers in 1..65535, got '$value'" >&2
    exit 2
  fi
done
[[ "$bind" =~ ^[0-9A-Za-z.:-]+$ ]] || { echo "$PROG: --bind must be an address" >&2; exit 2; }
if [ -n "$cid" ]; then
  [[ "$cid" =~ ^[0-9]+$ ]] || { echo "$PROG: --cid must be a number" >&2; exit 2; }
  # 0-2 are the hypervisor, local and host; an enclave's CID is at least 4.
  [ "$cid" -ge 4 ] || { echo "$PROG: --cid $cid is not an enclave CID (expected >= 4)" >&2; exit 2; }
fi
pid_file="${pid_file:-${PID_DIR}/enclave-forwarder-${listen_port}.pid}"
base_url="http://127.0.0.1:${listen_port}"
[ "$bind" = "127.0.0.1" ] || [ "$bind" = "0.0.0.0" ] || base_url="http://${bind}:${listen_port}"
ready_timeout="${EXPOSE_READY_TIMEOUT:-30}"
[[ "$ready_timeout" =~ ^[0-9]+$ ]] || { echo "$PROG: EXPOSE_READY_TIMEOUT must be seconds" >&2; exit 2; }

show() {  # print one command, shell-quoted where needed, the way it runs
  local out="+" arg
  for arg in "$@"; do
    if [[ "${arg//\$CID/CID}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then  # $CID: a placeholder
      out+=" $arg"
    else
      out+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "$out"
}

find_cid() {
  # The CID of the single RUNNING enclave; refuse to guess between several.
  local described
  command -v nitro-cli >/dev/null 2>&1 || { echo "$PROG: nitro-cli not found; pass --cid" >&2; return 1; }
  described="$(nitro-cli describe-enclaves)" || { echo "$PROG: nitro-cli describe-enclaves failed" >&2; return 1; }
  if command -v jq >/dev/null 2>&1; then
    printf '%s' "$described" | jq -r '[.[] | select(.State == "RUNNING") | .EnclaveCID] |
      if length == 1 then .[0] else error("expected exactly one RUNNING enclave, found \(length)") end'
  else
    printf '%s' "$described" | python3 -c '
import json, sys
running = [e.get("EnclaveCID") for e in json.load(sys.stdin) if e.get("State") == "RUNNING"]
if len(running) != 1:
    sys.exit(f"expected exactly one RUNNING enclave, found {len(running)}; pass --cid")
print(running[0])'
  fi
}

forwarder=(socat "TCP-LISTEN:${listen_port},fork,reuseaddr,bind=${bind}" "VSOCK-CONNECT:${cid:-\$CID}:${port}")
sender=("$SCRIPT_DIR/send-secrets.sh" --cid "${cid:-\$CID}" --port "$secrets_port"
  ${kms[@]+"${kms[@]}"} "$file")

if [ "$dry_run" -eq 1 ]; then
  [ -n "$cid" ] || echo "+ CID=\$(nitro-cli describe-enclaves | <the EnclaveCID of the one RUNNING enclave>)"
  show "${forwarder[@]}"
  echo "  (in the background; pid written to $pid_file)"
  show "${sender[@]}"
  show curl --silent --max-time 5 "$base_url/healthz?ready=1"
  exit 0
fi

[ -r "$file" ] || { echo "$PROG: cannot read $file" >&2; exit 2; }
command -v socat >/dev/null 2>&1 || { echo "$PROG: socat is required" >&2; exit 2; }
if [ -z "$cid" ]; then
  cid="$(find_cid)" || exit 1
  [[ "$cid" =~ ^[0-9]+$ ]] || { echo "$PROG: nitro-cli reported an unexpected CID '$cid'" >&2; exit 1; }
  echo "$PROG: enclave CID $cid (from nitro-cli describe-enclaves)" >&2
fi
forwarder=(socat "TCP-LISTEN:${listen_port},fork,reuseaddr,bind=${bind}" "VSOCK-CONNECT:${cid}:${port}")
sender=("$SCRIPT_DIR/send-secrets.sh" --cid "$cid" --port "$secrets_port" ${kms[@]+"${kms[@]}"}
  "$file")

# 1. the forwarder, first. The pid file is in a shared directory: never follow a link planted
# there, never trust (or kill) a pid from a file someone else wrote.
if [ -L "$pid_file" ] || { [ -e "$pid_file" ] && [ ! -O "$pid_file" ]; }; then
  echo "$PROG: $pid_file is a symbolic link or not owned by this user; remove it or pass" \
       "--pid-file" >&2
  exit 1
fi
if [ -s "$pid_file" ]; then
  old_pid="$(cat "$pid_file")"
  if [[ "$old_pid" =~ ^[0-9]+$ ]] && kill -0 "$old_pid" 2>/dev/null; then
    if [ "$replace" -eq 0 ]; then
      echo "$PROG: a forwarder is already running (pid $old_pid, $pid_file);" \
           "pass --replace to restart it (e.g. after the enclave restarted with a new CID)" >&2
      exit 1
    fi
    echo "$PROG: stopping the previous forwarder (pid $old_pid)" >&2
    kill "$old_pid"
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$old_pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$pid_file"
fi
pid_tmp="$(mktemp "${pid_file}.XXXXXX")"  # written whole, then renamed into place
show "${forwarder[@]}" >&2
nohup "${forwarder[@]}" </dev/null >/dev/null 2>&1 &
forwarder_pid=$!
sleep "$FORWARDER_SETTLE_S"
if ! kill -0 "$forwarder_pid" 2>/dev/null; then
  rm -f "$pid_tmp"
  echo "$PROG: the forwarder exited at once (port $listen_port in use?)" >&2
  exit 1
fi
printf '%s\n' "$forwarder_pid" >"$pid_tmp"
chmod 644 "$pid_tmp"
mv -f "$pid_tmp" "$pid_file"
echo "$PROG: forwarder pid $forwarder_pid: $bind:$listen_port -> vsock $cid:$port (pid file $pid_file)" >&2

# 2. the secrets (send-secrets.sh retries; it prints the listener's ack)
show "${sender[@]}" >&2
if ! "${sender[@]}"; then
  echo "$PROG: secrets were not accepted; the forwarder keeps running (pid $forwarder_pid)" >&2
  exit 1
fi

# 3. the API answers ready through the forwarder
command -v curl >/dev/null 2>&1 || { echo "$PROG: curl not found; skipping the readiness check" >&2; exit 0; }
deadline=$((SECONDS + ready_timeout))
while :; do
  if curl --silent --fail --max-time 5 --output /dev/null "$base_url/healthz?ready=1"; then
    echo "$PROG: ready: $base_url (stop the forwarder with: kill $forwarder_pid)" >&2
    exit 0
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "$PROG: $base_url/healthz?ready=1 did not answer 200 within ${ready_timeout}s" >&2
    exit 1
  fi
  sleep 1
done
