#!/usr/bin/env bash
# The whole local stack in one command (docs/DESIGN.md §11), what `make run` calls:
# dev PKI, the fake Google (HTTPS), the fake ECS watermark service (mTLS), the fake KMS, the
# runtime in INSECURE dev-shim mode, and the secrets delivered through the secrets listener.
#
# Usage: scripts/start-local.sh [--secrets kms|channel]   start in the foreground; Ctrl-C (or
#                                                         SIGTERM) stops all
#        scripts/start-local.sh --stop    stop a stack started from another terminal
#
# --secrets kms (the default) is the production path except the NSM: the local secrets are
# sealed under the fake KMS's key (`enclave.py seal-secrets`), the runtime runs with
# ENCLAVE_SECRETS_SOURCE=kms and gets the sealed delivery (`send-secrets.sh --kms`, the fake's
# test credentials), and opens it with a KMS Decrypt whose recipient is a dev-shim document;
# the fake KMS's key policy allows exactly this checkout's dev-shim PCR0.
# --secrets channel delivers the plaintext secrets JSON (ENCLAVE_SECRETS_SOURCE=channel).
#
# Environment (defaults in brackets; the README examples use the defaults):
#   LOCAL_STATE_DIR [.local]       dev PKI, dev attestation root, fake KMS key, logs, pid files
#                                  (relative paths are relative to the repository)
#   LOCAL_RUNTIME_PORT [8181]  LOCAL_SECRETS_PORT [7777]
#   LOCAL_GOOGLE_PORT [9443]   LOCAL_WATERMARK_PORT [9444]   LOCAL_KMS_PORT [9445]
#   LOCAL_READY_TIMEOUT [60]       seconds to wait for /healthz?ready=1
#   ENCLAVE_RPC_SHARED_SECRET      [the local development secret]
#   ENCLAVE_LOG_FORMAT, ENCLAVE_LOG_LEVEL, TEE_ATTESTATION_SIGNING_PRIVATE_KEY,
#   ENCLAVE_TOKEN_SEALING_KEY      passed to the runtime when set
# Exit: 0 after a clean stop, 1 when something fails or a stack is already running, 2 on usage.
set -euo pipefail

readonly PROG="${0##*/}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly STOP_GRACE_S=10       # the runtime drains for up to 5 s, then joins its threads
readonly CHILD_START_S=20      # a fake service or the secrets listener must be up by then
readonly POLL_S=0.2
readonly FAKE_CLIENT_ID="local-dev-client.apps.googleusercontent.com"
readonly FAKE_CLIENT_SECRET="local-dev-client-secret"  # the fake's: not a real credential
readonly DEFAULT_RPC_SECRET="local-dev-enclave-rpc-secret"
# The runtime's variable for the CA that KMS TLS trusts instead of the bundled Amazon roots (the
# fake's: the dev PKI CA, which also signs the fake Google's certificate).
readonly KMS_CA_ENV=ENCLAVE_OUTBOUND_CA_FILE
readonly KMS_REGION="us-east-1"  # the fake KMS's default region

readonly USAGE="usage: $PROG [--secrets kms|channel] | $PROG --stop   (Ctrl-C stops a foreground stack)"
usage() { echo "$USAGE" >&2; exit 2; }

mode=start secrets_source=kms
while [ "$#" -gt 0 ]; do
  case "$1" in
    --stop) mode=stop; shift ;;
    --secrets) [ "$#" -ge 2 ] || usage; secrets_source="$2"; shift 2 ;;
    -h|--help)
      echo "$USAGE"
      echo "  --secrets kms      (default) seal the secrets under the fake KMS and deliver the envelope"
      echo "  --secrets channel  deliver the plaintext secrets JSON"
      echo "  ports: LOCAL_RUNTIME_PORT LOCAL_SECRETS_PORT LOCAL_GOOGLE_PORT LOCAL_WATERMARK_PORT LOCAL_KMS_PORT"
      exit 0 ;;
    *) usage ;;
  esac
done
case "$secrets_source" in
  kms|channel) ;;
  *) echo "$PROG: --secrets must be kms or channel, got '$secrets_source'" >&2; exit 2 ;;
esac

cd "$REPO"
state="${LOCAL_STATE_DIR:-.local}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"
runtime_port="${LOCAL_RUNTIME_PORT:-8181}"
secrets_port="${LOCAL_SECRETS_PORT:-7777}"
google_port="${LOCAL_GOOGLE_PORT:-9443}"
watermark_port="${LOCAL_WATERMARK_PORT:-9444}"
kms_port="${LOCAL_KMS_PORT:-9445}"
ready_timeout="${LOCAL_READY_TIMEOUT:-60}"
for value in "$runtime_port" "$secrets_port" "$google_port" "$watermark_port" "$kms_port"; do
  if ! [[ "$value" =~ ^[0-9]{1,5}$ ]] || [ "$value" -lt 1 ] || [ "$value" -gt 65535 ]; then
    echo "$PROG: ports must be numbers in 1..65535, got '$value'" >&2
    exit 2
  fi
done
[[ "$ready_timeout" =~ ^[0-9]+$ ]] || { echo "$PROG: LOCAL_READY_TIMEOUT must be seconds" >&2; exit 2; }

stop_hint="$0 --stop"
[ "$state" = "$REPO/.local" ] || stop_hint="LOCAL_STATE_DIR=$state $0 --stop"
readonly RUN_PID="$state/run.pid" PIDS="$state/pids" LOGS="$state/logs" PKI="$state/pki"
readonly SECRETS_FILE="$state/secrets.local.json"
readonly KMS_DIR="$state/kms"  # the fake KMS's key (kept: envelopes survive restarts)
readonly SEALED_FILE="$state/secrets.sealed.json" KMS_CREDENTIALS="$state/kms/credentials.env"
ALL_CHILDREN=(runtime fake-watermark fake-google fake-kms)  # stop order: the runtime drains first
CHILDREN=(runtime fake-watermark fake-google)  # what this start runs (and supervises)
[ "$secrets_source" = channel ] || CHILDREN+=(fake-kms)
killed=0  # set when a child had to be killed (exit 1)

pattern_of() {
  case "$1" in
    runtime) echo "enclave.py serve" ;;
    fake-watermark) echo "tests.fakes.fake_watermark" ;;
    fake-google) echo "tests.fakes.fake_google" ;;
    fake-kms) echo "tests.fakes.fake_kms" ;;
    script) echo "start-local.sh" ;;
  esac
}
alive() { [[ "${1-}" =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null; }
ours() {  # pid name: alive AND still the program we started (pid files can outlive pids)
  alive "$1" || return 1
  command -v ps >/dev/null 2>&1 || return 0
  ps -p "$1" -o args= 2>/dev/null | grep -qF -- "$(pattern_of "$2")"
}
pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }
rel() { case "$1" in "$REPO"/*) printf '%s' "${1#"$REPO"/}" ;; *) printf '%s' "$1" ;; esac; }

stop_children() {
  # TERM every recorded child, wait (bounded) for them to exit, KILL what is left.
  local name pid deadline pending
  for name in "${ALL_CHILDREN[@]}"; do
    pid="$(pid_of "$name")"
    if ours "$pid" "$name"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  deadline=$((SECONDS + STOP_GRACE_S))
  while :; do
    pending=()
    for name in "${ALL_CHILDREN[@]}"; do
      pid="$(pid_of "$name")"
      if ours "$pid" "$name"; then pending+=("$name"); fi
    done
    [ "${#pending[@]}" -gt 0 ] || break
    if [ "$SECONDS" -ge "$deadline" ]; then
      for name in "${pending[@]}"; do
        echo "$PROG: $name did not stop within ${STOP_GRACE_S}s; killing it" >&2
        kill -KILL "$(pid_of "$name")" 2>/dev/null || true
        killed=1
      done
      break
    fi
    sleep "$POLL_S"
  done
  wait 2>/dev/null || true  # reap our own children
  for name in "${ALL_CHILDREN[@]}"; do rm -f "$PIDS/$name.pid"; done
}

if [ "$mode" = stop ]; then
  pid="$(cat "$RUN_PID" 2>/dev/null || true)"
  if ours "$pid" script; then
    kill -TERM "$pid"
    for ((i = 0; i < (STOP_GRACE_S + 5) * 5; i++)); do alive "$pid" || break; sleep "$POLL_S"; done
    if alive "$pid"; then echo "$PROG: the stack (pid $pid) did not stop" >&2; exit 1; fi
    echo "$PROG: stopped the local stack (pid $pid)"
  else
    echo "$PROG: no local stack is running (no live pid in $(rel "$RUN_PID"))"
  fi
  stop_children  # leftovers of a stack whose script was killed with -9
  rm -f "$RUN_PID"
  exit 0
fi

# --- preconditions --------------------------------------------------------------------
py="$REPO/.venv/bin/python"
if [ ! -x "$py" ]; then
  echo "$PROG: $py not found: run \`make run\` (it creates the venv first)" >&2
  exit 1
fi
for tool in curl openssl socat; do
  command -v "$tool" >/dev/null 2>&1 \
    || { echo "$PROG: $tool is required (make tools installs it)" >&2; exit 1; }
done
if [ ! -x "$REPO/scripts/gen-dev-certs.sh" ] || [ ! -x "$REPO/scripts/send-secrets.sh" ]; then
  echo "$PROG: scripts/gen-dev-certs.sh and scripts/send-secrets.sh are required" >&2
  exit 1
fi

old="$(cat "$RUN_PID" 2>/dev/null || true)"
if ours "$old" script; then
  running_url="$(cat "$state/base_url" 2>/dev/null || echo "http://127.0.0.1:$runtime_port")"
  echo "$PROG: a local stack is already running (pid $old, $(rel "$RUN_PID"))." >&2
  echo "$PROG: use it (curl -s $running_url/healthz), or stop it first:" \
       "Ctrl-C in its terminal, or ${stop_hint}" >&2
  exit 1
fi
leftovers=()
for name in "${ALL_CHILDREN[@]}"; do
  pid="$(pid_of "$name")"
  if ours "$pid" "$name"; then leftovers+=("$name=$pid"); fi
done
if [ "${#leftovers[@]}" -gt 0 ]; then
  echo "$PROG: processes of an earlier stack are still running (${leftovers[*]});" \
       "stop them with: $stop_hint" >&2
  exit 1
fi
# A port taken by anything else would fail later and obscurely: say which one now.
ports=("runtime=$runtime_port" "secrets=$secrets_port" "fake-google=$google_port"
       "fake-watermark=$watermark_port")
[ "$secrets_source" = channel ] || ports+=("fake-kms=$kms_port")
if ! busy="$("$py" - "${ports[@]}" <<'PY'
import socket, sys
busy = []
for item in sys.argv[1:]:
    name, port = item.split("=")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            busy.append(f"{port} ({name})")
if len(set(p.split("=")[1] for p in sys.argv[1:])) != len(sys.argv) - 1:
    busy.append("the ports must differ")
print(", ".join(busy))
PY
)"; then
  echo "$PROG: cannot check the ports" >&2
  exit 1
fi
if [ -n "$busy" ]; then
  echo "$PROG: in use on 127.0.0.1: $busy. Another stack or service holds it; stop it or" \
       "choose other ports (LOCAL_RUNTIME_PORT, LOCAL_SECRETS_PORT, LOCAL_GOOGLE_PORT," \
       "LOCAL_WATERMARK_PORT, LOCAL_KMS_PORT)" >&2
  exit 1
fi

# --- from here on, everything started is stopped on exit -------------------------------
mkdir -p "$PIDS" "$LOGS"
rm -f "$RUN_PID"  # stale: its process is gone (checked above)
if ! (set -o noclobber; printf '%s\n' "$$" >"$RUN_PID") 2>/dev/null; then
  echo "$PROG: another local stack is starting right now ($(rel "$RUN_PID") appeared)" >&2
  exit 1
fi
printf '%s\n' "http://127.0.0.1:$runtime_port" >"$state/base_url"
stopping=0
on_exit() {
  local code=$?
  trap - EXIT INT TERM
  [ "$stopping" -eq 1 ] || echo "$PROG: stopping the local stack" >&2
  stopping=1
  stop_children
  [ "$(cat "$RUN_PID" 2>/dev/null || true)" != "$$" ] || rm -f "$RUN_PID" "$state/base_url"
  echo "$PROG: stopped" >&2
  [ "$killed" -eq 0 ] || code=1
  exit "$code"
}
# Ctrl-C and SIGTERM are the normal way to stop: exit 0 when everything stopped in time (like
# `serve`, docs/DESIGN.md §2), 1 when something had to be killed.
on_signal() { stopping=1; echo; echo "$PROG: $1: stopping the local stack" >&2; exit 0; }
trap on_exit EXIT
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM

die() {
  echo "$PROG: $*" >&2
  exit 1
}

child_failed() {  # name: say it died, show the end of its log
  echo "$PROG: $1 exited; the end of $(rel "$LOGS/$1.log"):" >&2
  tail -n 15 "$LOGS/$1.log" >&2 || true
  exit 1
}

wait_listening() {  # name port: bounded wait until a child accepts TCP connections
  local deadline=$((SECONDS + CHILD_START_S))
  while ! (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; do
    alive "$(pid_of "$1")" || child_failed "$1"
    [ "$SECONDS" -lt "$deadline" ] || die "$1 is not listening on port $2 after ${CHILD_START_S}s"
    sleep "$POLL_S"
  done
}

# 1. the runtime's environment (dev-shim; secrets come through the listener, not the
# environment)
runtime_env=(
  ALFRED_ENV=local
  ENCLAVE_RUNTIME_MODE=dev-shim
  ENCLAVE_RUNTIME_BASE_URL="http://127.0.0.1:$runtime_port"
  ENCLAVE_HTTP_LISTEN="tcp:127.0.0.1:$runtime_port"
  ENCLAVE_SECRETS_LISTEN="tcp:127.0.0.1:$secrets_port"
  ENCLAVE_SECRETS_ALLOWED_PEERS=127.0.0.1
  ENCLAVE_STATE_DIR="$state"
  ENCLAVE_CERTS_DIR="$state/certs"
  TEE_ATTESTATION_REQUIRED=false
  TEE_ALLOW_INSECURE_DEV_ATTESTATION=true
  ENCLAVE_RPC_SHARED_SECRET="${ENCLAVE_RPC_SHARED_SECRET:-$DEFAULT_RPC_SECRET}"
  GOOGLE_OAUTH_TOKEN_URL="https://127.0.0.1:$google_port/token"
  GOOGLE_OAUTH_REVOKE_URL="https://127.0.0.1:$google_port/revoke"
  ENCLAVE_OUTBOUND_CA_FILE="$PKI/ca.crt"
)
unset_env=(-u MTLS_CLIENT_CERT_JSON -u ECS_WATERMARK_ENDPOINT -u ECS_WATERMARK_PATH
  -u GOOGLE_OAUTH_CLIENT_ID -u GOOGLE_OAUTH_CLIENT_SECRET -u TEE_ATTESTATION_DOCUMENT
  -u TEE_ATTESTATION_DOCUMENT_PATH -u ENCLAVE_EGRESS_ROUTES
  -u ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS -u ENCLAVE_SECRETS_SOURCE -u ENCLAVE_KMS_KEY_ARN
  -u ENCLAVE_KMS_ENDPOINT -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN)

# 2. dev PKI (kept across runs while valid) and the secrets to deliver
"$REPO/scripts/gen-dev-certs.sh" --endpoint "https://127.0.0.1:$watermark_port" "$PKI" \
  >"$LOGS/pki.log" 2>&1 || { cat "$LOGS/pki.log" >&2; die "scripts/gen-dev-certs.sh failed"; }
"$py" - "$PKI/secrets.json" "$SECRETS_FILE" "$FAKE_CLIENT_ID" "$FAKE_CLIENT_SECRET" <<'PY'
import json, os, sys
source, target, client_id, client_secret = sys.argv[1:]
with open(source) as fh:
    payload = json.load(fh)  # MTLS_CLIENT_CERT_JSON and ECS_WATERMARK_ENDPOINT
payload["GOOGLE_OAUTH_CLIENT_ID"] = client_id
payload["GOOGLE_OAUTH_CLIENT_SECRET"] = client_secret
tmp = target + ".tmp"
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as fh:
    json.dump(payload, fh, indent=2, sort_keys=True)
    fh.write("\n")
os.replace(tmp, target)
PY

# 3. the fakes
"$py" -m tests.fakes.fake_google --port "$google_port" --cert "$PKI/server.crt" \
  --key "$PKI/server.key" --client-id "$FAKE_CLIENT_ID" --client-secret "$FAKE_CLIENT_SECRET" \
  </dev/null >"$LOGS/fake-google.log" 2>&1 &
printf '%s\n' "$!" >"$PIDS/fake-google.pid"
"$py" -m tests.fakes.fake_watermark --port "$watermark_port" --cert "$PKI/server.crt" \
  --key "$PKI/server.key" --ca "$PKI/ca.crt" --ca-key "$PKI/ca.key" \
  </dev/null >"$LOGS/fake-watermark.log" 2>&1 &
printf '%s\n' "$!" >"$PIDS/fake-watermark.pid"

# 4. kms: the fake KMS, whose key policy allows this checkout's dev-shim PCR0 with documents
# from the dev attestation root; the secrets sealed under its key (kept in $KMS_DIR)
kms_url="https://127.0.0.1:$kms_port/"
if [ "$secrets_source" = kms ]; then
  : >"$LOGS/kms.log"
  attest_info="$("$py" - "$state" 2>>"$LOGS/kms.log" <<'PY'
import sys
from enclave import attestation, devpki
devpki.load_or_create_root(sys.argv[1])  # the runtime loads the same one
print(devpki.dev_dir(sys.argv[1]) / devpki.ROOT_CERT_FILE)
print(attestation.measure_code().hex())  # the dev-shim's PCR0: this checkout's sources
PY
)" || { tail -n 15 "$LOGS/kms.log" >&2; die "cannot prepare the dev attestation root"; }
  { read -r dev_root; read -r pcr0; } <<<"$attest_info"
  mkdir -p "$KMS_DIR"
  chmod 700 "$KMS_DIR"
  "$py" -m tests.fakes.fake_kms --port "$kms_port" --cert "$PKI/server.crt" \
    --key "$PKI/server.key" --key-file "$KMS_DIR/key.json" --region "$KMS_REGION" \
    --attestation-root "$dev_root" --pcr0 "$pcr0" \
    </dev/null >"$LOGS/fake-kms.log" 2>&1 &
  printf '%s\n' "$!" >"$PIDS/fake-kms.pid"
  wait_listening fake-kms "$kms_port"
  deadline=$((SECONDS + CHILD_START_S))
  kms_arn=""
  while [ -z "$kms_arn" ]; do  # its first stdout line: {"url", "key_arn", ...}
    kms_arn="$("$py" - "$LOGS/fake-kms.log" <<'PY'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    if line.startswith('{"url"'):
        print(json.loads(line)["key_arn"])
        break
PY
)"
    [ -n "$kms_arn" ] || [ "$SECONDS" -lt "$deadline" ] || die "the fake KMS did not say its key"
    [ -n "$kms_arn" ] || sleep "$POLL_S"
  done
  # The fake's known test credentials (tests/fakes/fake_kms.py; valid nowhere else), in a 0600
  # file that seal-secrets and send-secrets.sh read through their environment.
  "$py" - "$KMS_CREDENTIALS" "$KMS_REGION" 2>>"$LOGS/kms.log" <<'PY'
import os, shlex, sys
from tests.fakes.fake_kms import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY
path, region = sys.argv[1:]
fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as fh:
    fh.write("# the fake KMS's test credentials (tests/fakes/fake_kms.py), valid nowhere else\n")
    for name, value in (("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID),
                        ("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY), ("AWS_REGION", region)):
        fh.write(f"{name}={shlex.quote(value)}\n")
os.replace(path + ".tmp", path)
PY
  (
    set -a
    # shellcheck source=/dev/null
    . "$KMS_CREDENTIALS"
    set +a
    umask 077
    "$py" enclave.py seal-secrets --kms-key-arn "$kms_arn" --endpoint "$kms_url" \
      --ca-file "$PKI/ca.crt" "$SECRETS_FILE" >"$SEALED_FILE.tmp"
  ) 2>>"$LOGS/kms.log" || { tail -n 15 "$LOGS/kms.log" >&2; die "enclave.py seal-secrets failed"; }
  mv -f "$SEALED_FILE.tmp" "$SEALED_FILE"
  echo "$PROG: secrets sealed under the fake KMS key $kms_arn"
  runtime_env+=(ENCLAVE_SECRETS_SOURCE=kms ENCLAVE_KMS_KEY_ARN="$kms_arn"
                ENCLAVE_KMS_ENDPOINT="$kms_url" "$KMS_CA_ENV=$PKI/ca.crt")
else
  runtime_env+=(ENCLAVE_SECRETS_SOURCE=channel)
fi

# 5. the runtime
env "${unset_env[@]}" "${runtime_env[@]}" \
  "$py" enclave.py serve </dev/null >"$LOGS/runtime.log" 2>&1 &
printf '%s\n' "$!" >"$PIDS/runtime.pid"

wait_listening fake-google "$google_port"
wait_listening fake-watermark "$watermark_port"

# 6. the secrets, as soon as the listener takes them (it binds before HTTP starts)
deliver() {
  if [ "$secrets_source" = kms ]; then
    (
      set -a
      # shellcheck source=/dev/null
      . "$KMS_CREDENTIALS"
      set +a
      SEND_SECRETS_TRIES=1 SEND_SECRETS_CREDENTIALS=env SEND_SECRETS_PYTHON="$py" \
        "$REPO/scripts/send-secrets.sh" --tcp "127.0.0.1:$secrets_port" --kms "$SEALED_FILE"
    )
  else
    SEND_SECRETS_TRIES=1 "$REPO/scripts/send-secrets.sh" --tcp "127.0.0.1:$secrets_port" \
      "$SECRETS_FILE"
  fi
}
deadline=$((SECONDS + CHILD_START_S))
: >"$LOGS/secrets.log"
while :; do
  alive "$(pid_of runtime)" || child_failed runtime
  sent=0
  ack="$(deliver 2>>"$LOGS/secrets.log")" || sent=$?
  if [ "$sent" -eq 0 ]; then
    echo "$PROG: secrets delivered ($secrets_source): $ack"
    break
  fi
  if [[ "$ack" == *'"ok"'* ]]; then
    die "the secrets listener refused the delivery: $ack"
  fi
  [ "$sent" -ne 2 ] || { tail -n 5 "$LOGS/secrets.log" >&2; die "send-secrets.sh: usage error"; }
  [ "$SECONDS" -lt "$deadline" ] || die "the secrets listener on port $secrets_port did not" \
    "take the delivery within ${CHILD_START_S}s (see $(rel "$LOGS/secrets.log"))"
  sleep "$POLL_S"
done

# 7. ready?
base_url="http://127.0.0.1:$runtime_port"
deadline=$((SECONDS + ready_timeout))
until curl --silent --fail --max-time 2 --output /dev/null "$base_url/healthz?ready=1"; do
  for name in "${CHILDREN[@]}"; do alive "$(pid_of "$name")" || child_failed "$name"; done
  [ "$SECONDS" -lt "$deadline" ] || die "$base_url/healthz?ready=1 did not answer 200 within" \
    "${ready_timeout}s (see $(rel "$LOGS/runtime.log"))"
  sleep "$POLL_S"
done

# The probe trusts the INSECURE dev root only when told to, and where it lives.
probe_flags="--allow-insecure-dev"
[ "$state" = "$REPO/.local" ] || probe_flags+=" --state-dir $(rel "$state")"
if [ "$secrets_source" = kms ]; then
  redeliver="(set -a; . $(rel "$KMS_CREDENTIALS"); scripts/send-secrets.sh --tcp 127.0.0.1:$secrets_port --kms $(rel "$SEALED_FILE"))"
  logs="runtime,fake-google,fake-watermark,fake-kms,kms,secrets,pki"
else
  redeliver="scripts/send-secrets.sh --tcp 127.0.0.1:$secrets_port $(rel "$SECRETS_FILE")"
  logs="runtime,fake-google,fake-watermark,secrets,pki"
fi
cat <<EOF
$PROG: ready. Local stack (INSECURE dev-shim attestation: development only; secrets: $secrets_source):
  runtime API       $base_url            curl -s $base_url/healthz
  secrets listener  tcp:127.0.0.1:$secrets_port           redeliver: $redeliver
  fake Google       https://127.0.0.1:$google_port/token and /revoke (client id $FAKE_CLIENT_ID)
  fake watermark    https://127.0.0.1:$watermark_port/v1/watermark (mTLS, client certificates from the dev CA)
EOF
if [ "$secrets_source" = kms ]; then
  cat <<EOF
  fake KMS          $kms_url (key $kms_arn; its policy allows PCR0 ${pcr0:0:16}..., this checkout's dev-shim)
  sealed secrets    $(rel "$SEALED_FILE") (plaintext source: $(rel "$SECRETS_FILE"))
EOF
fi
cat <<EOF
  dev PKI           $(rel "$PKI")/   dev attestation root: $(rel "$state")/dev-attestation/root.crt
  logs              $(rel "$LOGS")/{$logs}.log
  pids              $(rel "$RUN_PID") (this script), $(rel "$PIDS")/*.pid
Check it:  scripts/smoke.sh $base_url    ALFRED_ENV=local .venv/bin/python enclave.py probe $probe_flags $base_url
Stop it:   Ctrl-C here, or $stop_hint from another terminal
EOF

# 8. supervise: return on Ctrl-C/SIGTERM (the traps) or when a child exits on its own
# (a short sleep waited on in the background: a trapped signal interrupts `wait` at once, and
# this works with the bash 3.2 of macOS, which has no `wait -n`)
while :; do
  for name in "${CHILDREN[@]}"; do alive "$(pid_of "$name")" || child_failed "$name"; done
  sleep 1 &
  wait "$!" || true
done
