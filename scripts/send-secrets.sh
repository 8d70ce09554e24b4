#!/usr/bin/env bash
# Deliver a secrets JSON file to the enclave's secrets listener with socat and print the ack.
#
# Usage: send-secrets.sh --cid CID [--port PORT] FILE     (parent instance -> enclave, VSOCK)
#        send-secrets.sh --tcp HOST:PORT FILE              (local development)
#
# Tries SEND_SECRETS_TRIES times (default 5), SEND_SECRETS_SLEEP seconds apart (default 2),
# while the listener cannot be reached or answers "busy". Exit 0 only when the ack says
# "ok": true; 1 when the delivery is refused or the listener is unreachable; 2 on usage errors.
set -euo pipefail

readonly PROG="${0##*/}"
usage() {
  echo "usage: $PROG --cid CID [--port PORT] FILE | $PROG --tcp HOST:PORT FILE" >&2
  exit 2
}

cid="" port="7777" tcp="" file=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --cid) [ "$#" -ge 2 ] || usage; cid="$2"; shift 2 ;;
    --port) [ "$#" -ge 2 ] || usage; port="$2"; shift 2 ;;
    --tcp) [ "$#" -ge 2 ] || usage; tcp="$2"; shift 2 ;;
    -h|--help) echo "usage: $PROG --cid CID [--port PORT] FILE | $PROG --tcp HOST:PORT FILE"; exit 0 ;;
    -*) echo "$PROG: unknown option $1" >&2; usage ;;
    *) [ -z "$file" ] || usage; file="$1"; shift ;;
  esac
done

[ -n "$file" ] || usage
if [ -n "$cid" ] && [ -n "$tcp" ]; then usage; fi
if [ -n "$cid" ]; then
  [[ "$cid" =~ ^[0-9]+$ ]] || { echo "$PROG: --cid must be a number" >&2; exit 2; }
  [[ "$port" =~ ^[0-9]+$ ]] || { echo "$PROG: --port must be a number" >&2; exit 2; }
  target="VSOCK-CONNECT:${cid}:${port}"
elif [ -n "$tcp" ]; then
  [[ "$tcp" =~ ^.+:[0-9]+$ ]] || { echo "$PROG: --tcp must be HOST:PORT" >&2; exit 2; }
  target="TCP:${tcp}"
else
  usage
fi
[ -r "$file" ] || { echo "$PROG: cannot read $file" >&2; exit 2; }
command -v socat >/dev/null 2>&1 || { echo "$PROG: socat is required" >&2; exit 2; }

tries="${SEND_SECRETS_TRIES:-5}"
pause="${SEND_SECRETS_SLEEP:-2}"
timeout="${SEND_SECRETS_TIMEOUT:-35}"  # the listener answers within its 30 s connection limit
[[ "$tries" =~ ^[1-9][0-9]*$ ]] || { echo "$PROG: SEND_SECRETS_TRIES must be >= 1" >&2; exit 2; }

errors="$(mktemp)"
trap 'rm -f "$errors"' EXIT

ack=""
for ((attempt = 1; attempt <= tries; attempt++)); do
  [ "$attempt" -eq 1 ] || sleep "$pause"
  # -t: after our EOF, wait this long for the ack; -T: give up on a silent connection.
  if ack="$(socat -t "$timeout" -T "$timeout" - "$target" <"$file" 2>"$errors")" && [ -n "$ack" ]; then
    if printf '%s\n' "$ack" | grep -Eq '"code"[[:space:]]*:[[:space:]]*"busy"' \
        && [ "$attempt" -lt "$tries" ]; then
      echo "$PROG: try $attempt/$tries: listener busy" >&2
      continue
    fi
    break
  fi
  echo "$PROG: try $attempt/$tries: no ack from $target: $(tr '\n' ' ' <"$errors")" >&2
  ack=""
done

if [ -z "$ack" ]; then
  echo "$PROG: giving up after $tries tries" >&2
  exit 1
fi
printf '%s\n' "$ack"
if printf '%s\n' "$ack" | grep -Eq '"ok"[[:space:]]*:[[:space:]]*true'; then
  exit 0
fi
exit 1
