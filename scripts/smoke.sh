#!/usr/bin/env bash
# The verification checklist against a running runtime, with curl (docs/DESIGN.md §11).
#
# Usage: scripts/smoke.sh [BASE_URL]      (default $ENCLAVE_RUNTIME_BASE_URL or http://127.0.0.1:8181)
#
# One line per check, `PASS name` or `FAIL name: reason`; exit 0 only when every check passes.
# Made for the local stack (scripts/start-local.sh): the signed RPC checks need the secrets it
# delivers (fake Google credentials, mTLS certificates and the watermark endpoint).
# The start-up probe against the same local dev-shim stack needs the dev-root opt-in too:
#   ALFRED_ENV=local $PYTHON enclave.py probe --allow-insecure-dev [--state-dir DIR] BASE_URL
# Environment: ENCLAVE_RPC_SHARED_SECRET (default: the local development secret);
#   PYTHON (default .venv/bin/python, else python3) runs `enclave.py verify`;
#   ENCLAVE_STATE_DIR (default .local) holds the INSECURE dev root that verify trusts;
#   SMOKE_REQUIRE_ATTESTATION=1 verifies strictly (no --allow-insecure-dev: dev-shim fails).
# Note: openssl takes the HMAC key as an argument (visible to `ps` while it runs), like rpc.sh.
set -euo pipefail

readonly PROG="${0##*/}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly MAX_TIME_S=15     # per request; the runtime's own upstream timeout is 10 s
readonly STALE_S=600       # 10 minutes: far outside the allowed skew (at most 300 s)
readonly RPC_PATHS=(/v1/rpc/google/token/exchange /v1/rpc/google/token/refresh
                    /v1/rpc/google/token/revoke /v1/rpc/watermark)

usage() { echo "usage: $PROG [BASE_URL]" >&2; exit 2; }
help() {
  echo "usage: $PROG [BASE_URL]"
  echo "Run the verification checklist with curl against BASE_URL (default"
  echo "\$ENCLAVE_RUNTIME_BASE_URL or http://127.0.0.1:8181); exit 0 only if every check passes."
  echo "  -h, --help  show this help and exit"
  exit 0
}
case "${1-}" in -h|--help) help ;; -*) usage ;; esac
[ "$#" -le 1 ] || usage

base_url="${1:-${ENCLAVE_RUNTIME_BASE_URL:-http://127.0.0.1:8181}}"
base_url="${base_url%/}"
[[ "$base_url" =~ ^https?://[^/]+$ ]] || { echo "$PROG: BASE_URL must be http(s)://HOST[:PORT]" >&2; exit 2; }
secret="${ENCLAVE_RPC_SHARED_SECRET:-local-dev-enclave-rpc-secret}"
if [ -z "${PYTHON-}" ]; then
  PYTHON=python3
  [ ! -x "$REPO/.venv/bin/python" ] || PYTHON="$REPO/.venv/bin/python"
fi
for tool in curl openssl od; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$PROG: $tool is required" >&2; exit 2; }
done
cd "$REPO"  # enclave.py verify finds the dev root under .local by default
insecure_flag=(--allow-insecure-dev)
[ "${SMOKE_REQUIRE_ATTESTATION:-0}" != 1 ] || insecure_flag=()

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

# --- helpers -----------------------------------------------------------------------------
# call METHOD PATH [BODY_FILE] [extra curl args...]: the status code on stdout, body in $tmp/body
call() {
  local method="$1" path="$2" body="${3-}"
  shift 2; [ "$#" -eq 0 ] || shift
  local args=(--silent --show-error --globoff --path-as-is --max-time "$MAX_TIME_S"
              --connect-timeout 5 -o "$tmp/body" -w '%{http_code}' -X "$method")
  if [ -n "$body" ]; then args+=(-H "Content-Type: application/json" --data-binary "@$body"); fi
  local code
  if ! code="$(curl "${args[@]}" "$@" "$base_url$path" 2>"$tmp/curl.err")"; then
    tr '\n' ' ' <"$tmp/curl.err" >"$tmp/reason"
    code="000"
  fi
  echo "${code:-000}"
}

# sign METHOD TARGET BODY_FILE TIMESTAMP: sets the array `signed` to curl -H arguments
sign() {
  local nonce sha sig
  nonce="$(openssl rand -base64 24 | tr '+/' '-_' | tr -d '=\n')"
  sha="$(openssl dgst -sha256 -r <"$3" | cut -d' ' -f1)"
  sig="$(printf '%s\n%s\n%s\n%s\n%s\n%s' "ENCLAVE-HMAC-SHA256" "$1" "$2" "$4" "$nonce" "$sha" \
    | openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)"
  signed=(-H "X-Enclave-Timestamp: $4" -H "X-Enclave-Nonce: $nonce" -H "X-Enclave-Signature: v1=$sig")
}

# json_check FILE PYTHON_EXPR: the expression over `d` (the parsed JSON) must be true
json_check() {
  "$PYTHON" - "$1" "$2" <<'PY'
import json, sys
try:
    with open(sys.argv[1], "rb") as fh:
        d = json.load(fh)
except ValueError:
    sys.exit("the answer is not JSON")
if not eval(sys.argv[2], {"d": d}):
    sys.exit(f"expected {sys.argv[2]}")
PY
}

expect_status() {  # WANT GOT
  [ "$2" = "$1" ] && return 0
  if [ "$2" = "000" ]; then cat "$tmp/reason"; else
    echo "expected HTTP $1, got $2: $(head -c 200 "$tmp/body" 2>/dev/null | tr '\n' ' ')"; fi
  return 1
}

check() {  # NAME FUNCTION [ARGS...]
  local name="$1"; shift
  if "$@" >"$tmp/out" 2>&1; then
    echo "PASS $name"; passed=$((passed + 1))
  else
    echo "FAIL $name: $(tail -n 3 "$tmp/out" | tr '\n' ' ' | sed 's/ *$//')"; failed=$((failed + 1))
  fi
}

# --- the checks ----------------------------------------------------------------------------
c_healthz() {
  expect_status 200 "$(call GET /healthz)" || return 1
  json_check "$tmp/body" 'd["status"] in ("ok", "degraded") and all(k in d for k in
    ("mode", "env", "secrets", "mtls", "attestation", "uptime_s"))'
}
c_ready() { expect_status 200 "$(call GET '/healthz?ready=1')"; }
c_metrics() {
  expect_status 200 "$(call GET /metrics)" || return 1
  grep -q '^# TYPE ' "$tmp/body" || { echo "not the Prometheus text format"; return 1; }
}
c_document() {
  expect_status 200 "$(call GET /v1/attestation/document)" || return 1
  cp "$tmp/body" "$tmp/document.json"
  json_check "$tmp/document.json" 'd["format"] in ("aws-nitro", "dev-shim") and all(k in d for k in
    ("document", "public_key", "module_id", "timestamp_ms", "pcrs", "insecure"))'
}
c_document_verifies() {
  [ -s "$tmp/document.json" ] || { echo "no document"; return 1; }
  "$PYTHON" enclave.py verify "${insecure_flag[@]}" "$tmp/document.json"
}
c_challenge() {
  openssl rand 32 >"$tmp/nonce.bin"
  nonce_hex="$(od -An -v -tx1 <"$tmp/nonce.bin" | tr -d ' \n')"
  nonce_b64="$(openssl base64 -A <"$tmp/nonce.bin")"
  printf '{"nonce": "%s"}' "$nonce_b64" >"$tmp/challenge.req"
  expect_status 200 "$(call POST /v1/attestation/challenge "$tmp/challenge.req")" || return 1
  cp "$tmp/body" "$tmp/challenge.json"
  json_check "$tmp/challenge.json" "d['nonce'] == '$nonce_b64' and all(k in d for k in
    ('document', 'nonce_bound_document', 'evidence', 'public_key'))"
}
c_challenge_verifies() {
  [ -s "$tmp/challenge.json" ] || { echo "no challenge answer"; return 1; }
  # The document and the evidence (in the JSON answer) must both be bound to our nonce.
  "$PYTHON" enclave.py verify "${insecure_flag[@]}" --nonce "$nonce_hex" --max-age 300 \
    "$tmp/challenge.json"
}
c_bad_nonce() {
  printf '{"nonce": "AAAA"}' >"$tmp/bad.req"
  expect_status 400 "$(call POST /v1/attestation/challenge "$tmp/bad.req")"
}
c_unsigned() {
  printf '{}' >"$tmp/empty.json"
  expect_status 401 "$(call POST "$1" "$tmp/empty.json")"
}
c_tampered() {
  printf '{"token": "signed"}' >"$tmp/signed.json"
  printf '{"token": "tampered"}' >"$tmp/tampered.json"
  sign POST "$1" "$tmp/signed.json" "$(date +%s)"
  expect_status 401 "$(call POST "$1" "$tmp/tampered.json" "${signed[@]}")"
}
c_stale() {
  printf '{}' >"$tmp/empty.json"
  sign POST "$1" "$tmp/empty.json" "$(($(date +%s) - STALE_S))"
  expect_status 401 "$(call POST "$1" "$tmp/empty.json" "${signed[@]}")"
}
c_replay() {
  # A valid signed request (refused as invalid before any upstream call), then the same bytes.
  printf '{}' >"$tmp/empty.json"
  sign POST /v1/rpc/google/token/refresh "$tmp/empty.json" "$(date +%s)"
  local first
  first="$(call POST /v1/rpc/google/token/refresh "$tmp/empty.json" "${signed[@]}")"
  expect_status 400 "$first" || { echo "(the first, valid, request)"; return 1; }
  expect_status 401 "$(call POST /v1/rpc/google/token/refresh "$tmp/empty.json" "${signed[@]}")"
}
c_signed_revoke() {
  ENCLAVE_RUNTIME_BASE_URL="$base_url" ENCLAVE_RPC_SHARED_SECRET="$secret" \
    scripts/rpc.sh POST /v1/rpc/google/token/revoke '{"token": "smoke-test-bogus-token"}' \
    >"$tmp/revoke.json" || { cat "$tmp/revoke.json"; return 1; }
  json_check "$tmp/revoke.json" 'd.get("revoked") is True'
}
c_signed_watermark() {
  printf '{"content_id": "smoke-%s", "text": "hello from smoke.sh"}' "$(date +%s)" >"$tmp/wm.req"
  ENCLAVE_RUNTIME_BASE_URL="$base_url" ENCLAVE_RPC_SHARED_SECRET="$secret" \
    scripts/rpc.sh POST /v1/rpc/watermark "@$tmp/wm.req" >"$tmp/wm.json" \
    || { cat "$tmp/wm.json"; return 1; }
  [ -s "$tmp/document.json" ] || { echo "no document to check the signature with"; return 1; }
  # The result is signed by the attested identity, over this exact request and response.
  "$PYTHON" enclave.py verify "${insecure_flag[@]}" "$tmp/document.json" \
    --response "$tmp/wm.json" --request "$tmp/wm.req"
}

echo "smoke: $base_url"
check "healthz" c_healthz
check "healthz ready" c_ready
check "metrics" c_metrics
check "attestation document" c_document
check "attestation document verifies" c_document_verifies
check "attestation challenge" c_challenge
check "attestation challenge verifies (nonce-bound document and evidence)" c_challenge_verifies
check "attestation challenge refuses a bad nonce (400)" c_bad_nonce
for path in "${RPC_PATHS[@]}"; do check "rpc $path refuses unsigned (401)" c_unsigned "$path"; done
for path in "${RPC_PATHS[@]}"; do check "rpc $path refuses tampered body (401)" c_tampered "$path"; done
for path in "${RPC_PATHS[@]}"; do check "rpc $path refuses stale timestamp (401)" c_stale "$path"; done
check "rpc refuses a replayed request (401)" c_replay
check "rpc signed google revoke (bogus token) answers revoked" c_signed_revoke
check "rpc signed watermark answers, signature verifies" c_signed_watermark

echo "smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
