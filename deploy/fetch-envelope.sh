#!/usr/bin/env bash
# Fetch the newest SEALED secrets envelope for the enclave (docs/OPERATIONS.md, "Secrets").
#
# Usage: fetch-envelope.sh [SOURCE [PATH]]
#   SOURCE  s3://BUCKET/KEY | secretsmanager:SECRET_ID | file:/PATH
#           (default $ENCLAVE_ENVELOPE_SOURCE; empty: nothing to fetch, exit 0)
#   PATH    where the envelope goes, mode 0600 (default $ENCLAVE_ENVELOPE_PATH)
#
# Only a sealed envelope is accepted: a JSON object with "v", "kms_key_arn",
# "encryption_context", "encrypted_data_key", "nonce" and "ciphertext", and none of the
# plaintext secret keys. Anything else (the seed's plaintext secrets JSON above all) is refused
# and the previous envelope stays. When the source cannot be reached and an envelope is already
# in place, that one stays and the exit is 0 (the delivery goes on with it); exit 1 when there is
# no usable envelope or the fetched one is refused, 2 on usage errors.
set -euo pipefail

readonly PROG="${0##*/}"
usage_line() {
  echo "usage: $PROG [SOURCE [PATH]]   (SOURCE: s3://BUCKET/KEY | secretsmanager:ID | file:/PATH)"
}
case "${1:-}" in
  -h|--help)
    usage_line
    echo "Fetch the newest sealed secrets envelope to PATH (mode 0600); refuses plaintext secrets."
    echo "Defaults: SOURCE=\$ENCLAVE_ENVELOPE_SOURCE (empty: nothing to do),"
    echo "          PATH=\$ENCLAVE_ENVELOPE_PATH."
    exit 0 ;;
  -*) usage_line >&2; exit 2 ;;
esac
[ "$#" -le 2 ] || { usage_line >&2; exit 2; }
source_uri="${1:-${ENCLAVE_ENVELOPE_SOURCE:-}}"
target="${2:-${ENCLAVE_ENVELOPE_PATH:-}}"
if [ -z "$source_uri" ]; then
  echo "$PROG: no envelope source configured (ENCLAVE_ENVELOPE_SOURCE): nothing to fetch" >&2
  exit 0
fi
[ -n "$target" ] || { echo "$PROG: no target path (ENCLAVE_ENVELOPE_PATH)" >&2; exit 2; }

umask 077
directory="$(dirname "$target")"
mkdir -p "$directory"
partial="$(mktemp "$directory/.envelope.XXXXXX")"
trap 'rm -f "$partial"' EXIT

fetched=1
case "$source_uri" in
  s3://*)
    aws s3 cp --only-show-errors "$source_uri" "$partial" || fetched=0 ;;
  secretsmanager:*)
    aws secretsmanager get-secret-value --secret-id "${source_uri#secretsmanager:}" \
        --query SecretString --output text >"$partial" || fetched=0 ;;
  file:*)
    cp "${source_uri#file:}" "$partial" || fetched=0 ;;
  *)
    echo "$PROG: unknown source '$source_uri' (s3://, secretsmanager: or file:)" >&2
    exit 2 ;;
esac
if [ "$fetched" -eq 0 ]; then
  if [ -s "$target" ]; then
    echo "$PROG: could not fetch $source_uri; delivering the envelope already in $target" >&2
    exit 0
  fi
  echo "$PROG: could not fetch $source_uri and there is no envelope yet" >&2
  exit 1
fi

# A sealed envelope, never plaintext: the check reads the file and prints only key names.
if ! problem="$(python3 - "$partial" <<'PY'
import json, sys
SEALED = {"v", "kms_key_arn", "encryption_context", "encrypted_data_key", "nonce", "ciphertext"}
def fail(message):
    print(message)
    sys.exit(1)
PLAINTEXT = {"ENCLAVE_RPC_SHARED_SECRET", "ENCLAVE_TOKEN_SEALING_KEY",
             "GOOGLE_OAUTH_CLIENT_SECRET", "GOOGLE_OAUTH_CLIENT_ID", "MTLS_CLIENT_CERT_JSON",
             "ECS_WATERMARK_ENDPOINT"}
try:
    with open(sys.argv[1], encoding="utf-8") as fh:
        value = json.load(fh)
except (OSError, ValueError):
    fail("not JSON")
if not isinstance(value, dict):
    fail("not a JSON object")
plain = sorted(PLAINTEXT & set(value))
if plain:
    fail("plaintext secrets (" + ", ".join(plain) + "), not a sealed envelope")
missing = sorted(SEALED - set(value))
if missing:
    fail("not a sealed envelope: missing " + ", ".join(missing))
if value.get("v") != 1:
    fail("unsupported envelope version")
PY
)"; then
  echo "$PROG: refused $source_uri: ${problem:-invalid}; the previous envelope stays" >&2
  exit 1
fi
chmod 0600 "$partial"
mv -f "$partial" "$target"
trap - EXIT
echo "$PROG: sealed envelope from $source_uri -> $target" >&2
