#!/usr/bin/env bash
# Sign one host -> enclave RPC with openssl and send it with curl (docs/DESIGN.md §7 and §11).
#
#   scripts/rpc.sh POST /v1/rpc/google/token/refresh '{"sealed_refresh_token": "v1...."}'
#   scripts/rpc.sh POST /v1/rpc/watermark @request.json
#
# BODY is sent byte for byte (a leading @ names a file); the signature covers exactly those bytes.
# PATH is sent as given and must be what the server accepts (else it answers 400 invalid_target):
# ASCII (percent-encode anything else), no spaces, control characters or '#', not starting //.
# Environment: ENCLAVE_RUNTIME_BASE_URL (default http://127.0.0.1:8181),
#              ENCLAVE_RPC_SHARED_SECRET (default: the local development secret).
# Prints the answer body; exits non-zero when the request fails or the answer is HTTP >= 400.
# Note: openssl takes the HMAC key as an argument, so it is visible to `ps` on this host while
# openssl runs; use this on a host you control.
set -euo pipefail

usage() {
    echo "usage: $(basename "$0") METHOD PATH [BODY|@FILE]" >&2
    exit 2
}

if [[ "${1-}" == "-h" || "${1-}" == "--help" ]]; then
    echo "usage: $(basename "$0") METHOD PATH [BODY|@FILE]"
    echo "Sign one RPC with openssl (ENCLAVE_RPC_SHARED_SECRET) and send it with curl to"
    echo "\$ENCLAVE_RUNTIME_BASE_URL (default http://127.0.0.1:8181); a leading @ names a body file."
    echo "  -h, --help  show this help and exit"
    exit 0
fi
[[ $# -ge 2 && $# -le 3 ]] || usage
method=$1
target=$2
[[ "$method" =~ ^[A-Z]{1,16}$ ]] || { echo "rpc.sh: METHOD must be upper case, e.g. POST" >&2; exit 2; }
[[ "$target" == /* ]] || { echo "rpc.sh: PATH must start with / (path and query as sent)" >&2; exit 2; }

target_ok() {
    local LC_ALL=C  # byte-wise classes: any byte >= 0x80 is outside [:graph:]
    [[ "$1" != //* && "$1" != *[![:graph:]]* && "$1" != *'#'* ]]
}
target_ok "$target" || {
    echo "rpc.sh: PATH must be ASCII (percent-encode anything else), without spaces, control" \
         "characters or '#', and must not start with //" >&2
    exit 2
}

base_url=${ENCLAVE_RUNTIME_BASE_URL:-http://127.0.0.1:8181}
base_url=${base_url%/}
secret=${ENCLAVE_RPC_SHARED_SECRET:-local-dev-enclave-rpc-secret}

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

body_file=$tmp
if [[ $# -eq 3 && ( "$method" == "GET" || "$method" == "HEAD" ) ]]; then
    echo "rpc.sh: $method requests carry no body" >&2
    exit 2
fi
if [[ $# -eq 3 ]]; then
    if [[ "$3" == @* ]]; then
        body_file=${3#@}
        [[ -r "$body_file" ]] || { echo "rpc.sh: cannot read $body_file" >&2; exit 2; }
    else
        printf '%s' "$3" >"$tmp"
    fi
fi

timestamp=$(date +%s)
# 24 random bytes -> 32 base64url characters (192 bits).
nonce=$(openssl rand -base64 24 | tr '+/' '-_' | tr -d '=\n')
body_sha256=$(openssl dgst -sha256 -r <"$body_file" | cut -d' ' -f1)
signature=$(printf '%s\n%s\n%s\n%s\n%s\n%s' \
    "ENCLAVE-HMAC-SHA256" "$method" "$target" "$timestamp" "$nonce" "$body_sha256" \
    | openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)

args=(
    --silent --show-error --fail-with-body
    --max-time 30
    --globoff --path-as-is
    -H "X-Enclave-Timestamp: $timestamp"
    -H "X-Enclave-Nonce: $nonce"
    -H "X-Enclave-Signature: v1=$signature"
)
if [[ "$method" == "HEAD" ]]; then
    args+=(--head)  # -X HEAD would make curl wait for a body that HEAD answers never carry
else
    args+=(-X "$method")
fi
if [[ "$method" != "GET" && "$method" != "HEAD" ]]; then
    args+=(-H "Content-Type: application/json" --data-binary "@$body_file")
fi
curl "${args[@]}" "$base_url$target"
echo
