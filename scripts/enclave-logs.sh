#!/usr/bin/env bash
# On the parent instance: receive the enclave's log lines (ENCLAVE_LOG_SINK=vsock:3:PORT) and
# append them to a file or the journal (docs/OPERATIONS.md, "Logs").
#
# Usage: enclave-logs.sh [--port PORT] [--tcp] (--file PATH | --journal | --stdout)
#
#   socat -u VSOCK-LISTEN:PORT,fork,reuseaddr STDOUT    (the enclave connects to the parent, CID 3)
#   socat -u TCP-LISTEN:PORT,bind=127.0.0.1,fork,reuseaddr STDOUT    (--tcp: local development)
#
# Each line is one JSON object, exactly as the runtime logged it (control characters escaped).
# --file PATH appends to PATH (created mode 0640); --journal pipes to `systemd-cat -t enclave`;
# --stdout writes to standard output (under systemd that is the journal as well). Runs until
# stopped. Exit 2 on usage errors, 1 when socat cannot listen.
set -euo pipefail

readonly PROG="${0##*/}"
readonly DEFAULT_PORT=9000
readonly JOURNAL_TAG="enclave"

usage_line() {
  echo "usage: $PROG [--port PORT] [--tcp] (--file PATH | --journal | --stdout)"
}
usage() { usage_line >&2; exit 2; }
help() {
  usage_line
  cat <<EOF
Receive the enclave's log lines (one JSON object per line) and append them somewhere.
  --port PORT   the port the runtime's ENCLAVE_LOG_SINK names (default $DEFAULT_PORT)
  --tcp         listen on TCP 127.0.0.1:PORT instead of VSOCK (local development)
  --file PATH   append to PATH (created mode 0640)
  --journal     send to the journal: systemd-cat -t $JOURNAL_TAG
  --stdout      write to standard output
  -h, --help    show this help and exit
EOF
  exit 0
}

port="$DEFAULT_PORT" tcp=0 file="" mode=""
set_mode() { [ -z "$mode" ] || usage; mode="$1"; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --port) [ "$#" -ge 2 ] || usage; port="$2"; shift 2 ;;
    --tcp) tcp=1; shift ;;
    --file) [ "$#" -ge 2 ] || usage; set_mode file; file="$2"; shift 2 ;;
    --journal) set_mode journal; shift ;;
    --stdout) set_mode stdout; shift ;;
    -h|--help) help ;;
    *) echo "$PROG: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$mode" ] || usage
if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
  echo "$PROG: --port must be a number in 1..65535, got '$port'" >&2
  usage
fi
[ "$mode" != file ] || [ -n "$file" ] || usage
command -v socat >/dev/null 2>&1 || { echo "$PROG: socat is required" >&2; exit 1; }

if [ "$tcp" -eq 1 ]; then
  listen="TCP-LISTEN:${port},bind=127.0.0.1,fork,reuseaddr"
else
  listen="VSOCK-LISTEN:${port},fork,reuseaddr"
fi
receiver=(socat -u "$listen" STDOUT)
echo "$PROG: receiving on ${listen%%,*} -> ${mode}${file:+ $file}" >&2

case "$mode" in
  file)
    umask 027
    exec "${receiver[@]}" >>"$file"
    ;;
  stdout)
    exec "${receiver[@]}"
    ;;
  journal)
    if ! command -v systemd-cat >/dev/null 2>&1; then
      echo "$PROG: systemd-cat is required for --journal" >&2
      exit 1
    fi
    "${receiver[@]}" | systemd-cat -t "$JOURNAL_TAG"
    ;;
esac
