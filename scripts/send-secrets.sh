#!/usr/bin/env bash
# Deliver secrets to the enclave's secrets listener with socat and print the ack.
#
# Usage: send-secrets.sh --cid CID [--port PORT] FILE               (parent -> enclave, VSOCK)
#        send-secrets.sh --tcp HOST:PORT FILE                        (local development)
#        send-secrets.sh (--cid CID [--port PORT] | --tcp HOST:PORT) --kms ENVELOPE_FILE
#
# FILE is a plaintext secrets JSON object, sent as it is (ENCLAVE_SECRETS_SOURCE=channel).
# --kms ENVELOPE_FILE sends the sealed delivery of ENCLAVE_SECRETS_SOURCE=kms instead:
#   {"SEALED_SECRETS": <the envelope from `enclave.py seal-secrets`>,
#    "AWS_CREDENTIALS": {"AccessKeyId", "SecretAccessKey", "SessionToken"?, "Expiration"?},
#    "AWS_REGION": <the region of the envelope's kms_key_arn>}
# The enclave uses the credentials for one KMS Decrypt and never stores them. Where they come
# from (SEND_SECRETS_CREDENTIALS):
#   imds  the instance role's, from IMDSv2 on the parent (PUT /latest/api/token, then
#         GET /latest/meta-data/iam/security-credentials/ROLE). The default unless
#         AWS_ACCESS_KEY_ID is set.
#   env   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (optional): local
#         development and tests. The default when AWS_ACCESS_KEY_ID is set.
# AWS_REGION (or AWS_DEFAULT_REGION), when set, must be the envelope key's region.
# Credentials never appear on a command line (ps shows those), in the output or in a file.
#
# Environment: SEND_SECRETS_TRIES (5), SEND_SECRETS_SLEEP (2 s) and SEND_SECRETS_TIMEOUT (35 s);
# SEND_SECRETS_CREDENTIALS (see above); SEND_SECRETS_PYTHON (python3; --kms builds the JSON with
# it); SEND_SECRETS_IMDS_URL (http://169.254.169.254) and SEND_SECRETS_IMDS_ROLE (default: the
# instance profile's only role).
# Tries SEND_SECRETS_TRIES times, SEND_SECRETS_SLEEP seconds apart, while the listener cannot be
# reached or answers "busy". Exit 0 only when the ack says "ok": true; 1 when the delivery is
# refused, the listener is unreachable or IMDS gives no credentials; 2 on usage errors (and
# missing or malformed env credentials, or an unreadable envelope).
set -euo pipefail

readonly PROG="${0##*/}"
readonly IMDS_TOKEN_TTL_S=60     # the IMDSv2 session token is only needed for two requests
readonly IMDS_TIMEOUT_S=5        # per IMDS request; IMDS answers in milliseconds on EC2
readonly MAX_DELIVERY_BYTES=262144  # the listener's limit (256 KiB)
readonly USAGE="usage: $PROG --cid CID [--port PORT] FILE | $PROG --tcp HOST:PORT FILE
       $PROG (--cid CID [--port PORT] | --tcp HOST:PORT) --kms ENVELOPE_FILE"
usage() {
  echo "$USAGE" >&2
  exit 2
}
fail() {  # code message
  echo "$PROG: $2" >&2
  exit "$1"
}

# Builds the sealed delivery on stdout. argv: MODE (env|imds) ENVELOPE_FILE; in imds mode the
# IMDS credentials document arrives on stdin. Reads credentials from the environment or stdin,
# never from argv; its messages name fields, never values. Exit 2 usage, 1 IMDS answer refused.
# shellcheck disable=SC2016  # Python source, not shell
readonly BUILD_DELIVERY_PY='
import json, os, re, sys
MAX = int(os.environ["SEND_SECRETS_MAX_BYTES"])
def die(code, message):
    print("send-secrets.sh: " + message, file=sys.stderr)
    sys.exit(code)
mode, path = sys.argv[1], sys.argv[2]
imds = None
if mode == "imds":
    try:
        imds = json.loads(sys.stdin.read(65536))
    except ValueError:
        die(1, "IMDS answered credentials that are not JSON")
try:
    with open(path, "rb") as fh:
        raw = fh.read(MAX + 1)
except OSError as exc:
    die(2, "cannot read " + path + ": " + (exc.strerror or type(exc).__name__))
if len(raw) > MAX:
    die(2, path + " is larger than " + str(MAX) + " bytes")
try:
    envelope = json.loads(raw.decode("utf-8"))
except ValueError:
    die(2, path + " is not UTF-8 JSON")
arn = envelope.get("kms_key_arn") if isinstance(envelope, dict) else None
match = re.fullmatch(r"arn:aws[a-z-]*:kms:([a-z0-9-]+):[0-9]{12}:key/[A-Za-z0-9-]+",
                     arn if isinstance(arn, str) else "")
if match is None or "ciphertext" not in envelope or "encrypted_data_key" not in envelope:
    die(2, path + " is not a sealed envelope (the output of enclave.py seal-secrets)")
region = match.group(1)
given = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
if given and given != region:
    die(2, "AWS_REGION " + given + " is not the region of the envelope key (" + region + ")")
if mode == "env":
    creds = {"AccessKeyId": os.environ.get("AWS_ACCESS_KEY_ID", ""),
             "SecretAccessKey": os.environ.get("AWS_SECRET_ACCESS_KEY", "")}
    if not creds["AccessKeyId"] or not creds["SecretAccessKey"]:
        die(2, "SEND_SECRETS_CREDENTIALS=env needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if os.environ.get("AWS_SESSION_TOKEN"):
        creds["SessionToken"] = os.environ["AWS_SESSION_TOKEN"]
else:
    if not isinstance(imds, dict) or imds.get("Code", "Success") != "Success":
        code = imds.get("Code") if isinstance(imds, dict) else None
        die(1, "IMDS credentials are not usable (Code " + repr(code)[:40] + ")")
    creds = {k: imds.get(k) for k in ("AccessKeyId", "SecretAccessKey")}
    if not all(isinstance(v, str) and v for v in creds.values()):
        die(1, "IMDS credentials lack AccessKeyId or SecretAccessKey")
    for source, target in (("Token", "SessionToken"), ("Expiration", "Expiration")):
        if isinstance(imds.get(source), str) and imds[source]:
            creds[target] = imds[source]
out = json.dumps({"SEALED_SECRETS": envelope, "AWS_CREDENTIALS": creds, "AWS_REGION": region},
                 separators=(",", ":"))
if len(out.encode()) > MAX:
    die(2, "the sealed delivery would be larger than " + str(MAX) + " bytes")
sys.stdout.write(out)
'

cid="" port="7777" tcp="" file="" envelope=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --cid) [ "$#" -ge 2 ] || usage; cid="$2"; shift 2 ;;
    --port) [ "$#" -ge 2 ] || usage; port="$2"; shift 2 ;;
    --tcp) [ "$#" -ge 2 ] || usage; tcp="$2"; shift 2 ;;
    --kms) [ "$#" -ge 2 ] || usage; envelope="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    -*) echo "$PROG: unknown option $1" >&2; usage ;;
    *) [ -z "$file" ] || usage; file="$1"; shift ;;
  esac
done

if [ -n "$envelope" ] && [ -n "$file" ]; then
  fail 2 "give FILE (plaintext) or --kms ENVELOPE_FILE (sealed), not both"
fi
[ -n "$file" ] || [ -n "$envelope" ] || usage
if [ -n "$cid" ] && [ -n "$tcp" ]; then usage; fi
if [ -n "$cid" ]; then
  [[ "$cid" =~ ^[0-9]+$ ]] || fail 2 "--cid must be a number"
  [[ "$port" =~ ^[0-9]+$ ]] || fail 2 "--port must be a number"
  target="VSOCK-CONNECT:${cid}:${port}"
elif [ -n "$tcp" ]; then
  [[ "$tcp" =~ ^.+:[0-9]+$ ]] || fail 2 "--tcp must be HOST:PORT"
  target="TCP:${tcp}"
else
  usage
fi
[ -r "${file:-$envelope}" ] || fail 2 "cannot read ${file:-$envelope}"
command -v socat >/dev/null 2>&1 || fail 2 "socat is required"

tries="${SEND_SECRETS_TRIES:-5}"
pause="${SEND_SECRETS_SLEEP:-2}"
timeout="${SEND_SECRETS_TIMEOUT:-35}"  # the listener answers within its 30 s connection limit
[[ "$tries" =~ ^[1-9][0-9]*$ ]] || fail 2 "SEND_SECRETS_TRIES must be >= 1"

# --- the sealed delivery (--kms) --------------------------------------------------------
imds_header() {  # the IMDSv2 token as a header line, for curl -H @- (never on a command line)
  printf 'X-aws-ec2-metadata-token: %s\n' "$1"
}

# Production only: the parent instance's role credentials from IMDSv2. Cannot run off EC2.
imds_credentials() {
  local base="${SEND_SECRETS_IMDS_URL:-http://169.254.169.254}" token role
  local curl_opts=(--silent --show-error --fail --max-time "$IMDS_TIMEOUT_S" --noproxy '*')
  command -v curl >/dev/null 2>&1 || fail 2 "curl is required for SEND_SECRETS_CREDENTIALS=imds"
  token="$(curl "${curl_opts[@]}" -X PUT \
      -H "X-aws-ec2-metadata-token-ttl-seconds: $IMDS_TOKEN_TTL_S" "$base/latest/api/token")" \
    || fail 1 "IMDSv2 at $base gave no session token (not on EC2, or IMDSv2 disabled? locally set SEND_SECRETS_CREDENTIALS=env and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
  role="${SEND_SECRETS_IMDS_ROLE:-}"
  if [ -z "$role" ]; then
    role="$(imds_header "$token" | curl "${curl_opts[@]}" -H @- \
        "$base/latest/meta-data/iam/security-credentials/")" \
      || fail 1 "IMDSv2 lists no instance role (attach an instance profile)"
    role="${role%%$'\n'*}"
  fi
  [[ "$role" =~ ^[A-Za-z0-9+=,.@_-]{1,128}$ ]] || fail 1 "IMDSv2 answered no usable role name"
  imds_header "$token" | curl "${curl_opts[@]}" -H @- \
      "$base/latest/meta-data/iam/security-credentials/$role" \
    || fail 1 "IMDSv2 gave no credentials for role $role"
}

payload=""
if [ -n "$envelope" ]; then
  python="${SEND_SECRETS_PYTHON:-python3}"
  command -v "$python" >/dev/null 2>&1 || fail 2 "$python is required for --kms (SEND_SECRETS_PYTHON)"
  credentials="${SEND_SECRETS_CREDENTIALS:-}"
  if [ -z "$credentials" ]; then
    if [ -n "${AWS_ACCESS_KEY_ID:-}" ]; then credentials="env"; else credentials="imds"; fi
  fi
  export SEND_SECRETS_MAX_BYTES="$MAX_DELIVERY_BYTES"
  case "$credentials" in
    env)
      payload="$("$python" -c "$BUILD_DELIVERY_PY" env "$envelope" </dev/null)" || exit "$?" ;;
    imds)
      document="$(imds_credentials)" || exit "$?"
      # printf is a builtin: the document reaches python through a pipe, not an argument.
      payload="$(printf '%s' "$document" | "$python" -c "$BUILD_DELIVERY_PY" imds "$envelope")" \
        || exit "$?"
      document="" ;;
    *) fail 2 "SEND_SECRETS_CREDENTIALS must be env or imds, got '$credentials'" ;;
  esac
fi

send_once() {  # the delivery to socat; its stdout is the ack
  # -t: after our EOF, wait this long for the ack; -T: give up on a silent connection.
  if [ -n "$payload" ]; then
    # Not a pipeline status: a listener that answers early may close before printf ends.
    (set +o pipefail; printf '%s' "$payload" | socat -t "$timeout" -T "$timeout" - "$target")
  else
    socat -t "$timeout" -T "$timeout" - "$target" <"$file"
  fi
}

errors="$(mktemp)"
trap 'rm -f "$errors"' EXIT

ack=""
for ((attempt = 1; attempt <= tries; attempt++)); do
  [ "$attempt" -eq 1 ] || sleep "$pause"
  if ack="$(send_once 2>"$errors")" && [ -n "$ack" ]; then
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
