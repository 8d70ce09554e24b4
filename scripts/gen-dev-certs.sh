#!/usr/bin/env bash
# Development PKI (openssl): a dev CA, the enclave's mTLS client certificate, a server
# certificate for 127.0.0.1/localhost (fake watermark service, fake Google), and secrets.json,
# ready for send-secrets, carrying MTLS_CLIENT_CERT_JSON (and ECS_WATERMARK_ENDPOINT).
#
# Usage: gen-dev-certs.sh [--force] [--endpoint URL] DIR
#   DIR gets ca.crt ca.key client.crt client.key server.crt server.key secrets.json (keys 0600).
#   An existing set that verifies and stays valid for another day is kept unless --force;
#   secrets.json is always rebuilt from the certificates in DIR (same input, same output).
#   --endpoint URL goes into secrets.json (default https://127.0.0.1:8443; "" to leave it out).
# Dev only: these keys are unprotected and the CA is not trusted by anything but this stack.
set -euo pipefail

readonly PROG="${0##*/}"
readonly CA_DAYS=825 LEAF_DAYS=365 MIN_REMAINING_S=86400
usage() { echo "usage: $PROG [--force] [--endpoint URL] DIR" >&2; exit 2; }

force=0 endpoint="https://127.0.0.1:8443" dir=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --force) force=1; shift ;;
    --endpoint) [ "$#" -ge 2 ] || usage; endpoint="$2"; shift 2 ;;
    -h|--help) echo "usage: $PROG [--force] [--endpoint URL] DIR"; exit 0 ;;
    -*) echo "$PROG: unknown option $1" >&2; usage ;;
    *) [ -z "$dir" ] || usage; dir="$1"; shift ;;
  esac
done
[ -n "$dir" ] || usage
command -v openssl >/dev/null 2>&1 || { echo "$PROG: openssl is required" >&2; exit 2; }

umask 077
mkdir -p "$dir"
chmod 700 "$dir"

set_is_valid() {
  local f
  for f in ca.crt ca.key client.crt client.key server.crt server.key; do
    [ -s "$dir/$f" ] || return 1
  done
  for f in ca.crt client.crt server.crt; do
    openssl x509 -noout -checkend "$MIN_REMAINING_S" -in "$dir/$f" >/dev/null 2>&1 || return 1
  done
  openssl verify -CAfile "$dir/ca.crt" "$dir/client.crt" "$dir/server.crt" >/dev/null 2>&1
}

tmp=""
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT

generate() {
  tmp="$(mktemp -d "$dir/.gen.XXXXXX")"
  cat >"$tmp/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1, DNS:localhost
EOF
  local name
  for name in ca client server; do
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/$name.key" 2>/dev/null
  done
  openssl req -x509 -new -sha256 -days "$CA_DAYS" -key "$tmp/ca.key" \
    -subj "/CN=Enclave Dev mTLS CA (local only)" \
    -config "$tmp/openssl.cnf" -extensions v3_ca -out "$tmp/ca.crt"
  for name in client server; do
    openssl req -new -key "$tmp/$name.key" -subj "/CN=enclave-dev-$name" \
      -config "$tmp/openssl.cnf" -out "$tmp/$name.csr"
    openssl x509 -req -sha256 -days "$LEAF_DAYS" -in "$tmp/$name.csr" \
      -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
      -extfile "$tmp/openssl.cnf" -extensions "$name" -out "$tmp/$name.crt" 2>/dev/null
  done
  chmod 600 "$tmp"/*.key
  for name in ca.key client.key server.key ca.crt client.crt server.crt; do
    mv -f "$tmp/$name" "$dir/$name"
  done
}

if [ "$force" -eq 0 ] && set_is_valid; then
  echo "$PROG: dev PKI in $dir is present and valid (use --force to regenerate)" >&2
else
  generate
  set_is_valid || { echo "$PROG: the generated set does not verify" >&2; exit 1; }
  echo "$PROG: wrote a new dev PKI to $dir" >&2
fi

if ! command -v python3 >/dev/null 2>&1; then
  echo "$PROG: python3 not found; secrets.json not written" >&2
  exit 0
fi
python3 - "$dir" "$endpoint" <<'PY'
import json, os, sys
from pathlib import Path

directory, endpoint = Path(sys.argv[1]), sys.argv[2]
payload = {"MTLS_CLIENT_CERT_JSON": {
    "client_cert": (directory / "client.crt").read_text(),
    "client_key": (directory / "client.key").read_text(),
    "ca_cert": (directory / "ca.crt").read_text(),
}}
if endpoint:
    payload["ECS_WATERMARK_ENDPOINT"] = endpoint
temp = directory / ".secrets.json.tmp"
fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as handle:
    json.dump(payload, handle, indent=2, sort_keys=True)
    handle.write("\n")
os.replace(temp, directory / "secrets.json")
PY
echo "$PROG: wrote $dir/secrets.json" >&2
