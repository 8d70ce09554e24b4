"""`send-secrets ADDRESS (FILE | --kms ENVELOPE_FILE)`: deliver secrets to the secrets listener.

The Python twin of scripts/send-secrets.sh: ADDRESS is `tcp:HOST:PORT` or `vsock:CID:PORT`;
5 tries 2 s apart while the listener cannot be reached or answers `busy`; prints the ack line.
Exit 0 only if the ack says `"ok": true`, 1 if refused or unreachable, 2 on usage errors.

FILE is a plaintext secrets JSON object, sent as it is (ENCLAVE_SECRETS_SOURCE=channel).
`--kms ENVELOPE_FILE` sends the sealed delivery of ENCLAVE_SECRETS_SOURCE=kms (docs/DESIGN.md
§15) instead, built exactly as the script builds it:
    {"SEALED_SECRETS": <the envelope from `seal-secrets`>,
     "AWS_CREDENTIALS": {"AccessKeyId", "SecretAccessKey", "SessionToken"?, "Expiration"?},
     "AWS_REGION": <the region of the envelope's kms_key_arn>}
Credentials come from SEND_SECRETS_CREDENTIALS: `imds` (the parent's instance role, IMDSv2:
PUT /latest/api/token, then token-authenticated GETs of the role list and the role's document;
SEND_SECRETS_IMDS_URL, SEND_SECRETS_IMDS_ROLE) or `env` (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN); the default is `env` when AWS_ACCESS_KEY_ID is set,
else `imds`. AWS_REGION or AWS_DEFAULT_REGION, when set, must be the key's region. Credentials
live in memory only: never written, logged or printed (messages name fields, never values).
Exit 1 also when IMDS gives no usable credentials; 2 for an unreadable or malformed envelope
and missing or malformed env credentials.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from .. import envelope, kms, strictjson
from ..addresses import VSOCK_CID_ANY, AddressError, parse_address
from ..secrets import MAX_DELIVERY_BYTES

HELP = ("deliver a secrets JSON file, or with --kms a sealed envelope and AWS credentials, to "
        "the secrets listener (exit 0 ok, 1 refused, 2 usage)")

DEFAULT_TRIES = 5
DEFAULT_INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 5.0
ACK_TIMEOUT_S = 35.0  # the listener answers within its 30 s per-connection limit
MAX_ACK_BYTES = 64 * 1024
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

# --kms: IMDSv2, as scripts/send-secrets.sh asks it.
DEFAULT_IMDS_URL = "http://169.254.169.254"
IMDS_TOKEN_PATH = "/latest/api/token"
IMDS_CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
IMDS_TOKEN_TTL_S = 60  # the session token is only needed for two requests
IMDS_TIMEOUT_S = 5.0  # per IMDS request; IMDS answers in milliseconds on EC2
MAX_IMDS_TOKEN_BYTES = 4096  # an IMDSv2 token is ~56 characters
MAX_IMDS_ROLES_BYTES = 4096  # the role list: one name of at most 128 characters per line
MAX_IMDS_DOCUMENT_BYTES = 64 * 1024  # a credentials document is ~1.5 KiB
CREDENTIAL_SOURCES = ("env", "imds")
_ROLE_NAME = re.compile(r"[A-Za-z0-9+=,.@_-]{1,128}")  # IAM role names
_IMDS_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # echoed only when it looks like a code

_sleep = time.sleep  # replaced by tests


class _Unreachable(Exception):
    """No ack this try (connection refused, reset, timeout, empty answer)."""


class _Refused(Exception):
    """--kms: no delivery to build; `exit_code` is 1 (IMDS refused) or 2 (usage)."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def add_arguments(parser) -> None:
    parser.add_argument("address", metavar="ADDRESS", help="tcp:HOST:PORT or vsock:CID:PORT")
    parser.add_argument("file", metavar="FILE", nargs="?",
                        help="plaintext secrets JSON file, or - for stdin")
    parser.add_argument("--kms", metavar="ENVELOPE_FILE", dest="envelope_file",
                        help="send the sealed delivery for this envelope (from seal-secrets) "
                             "with AWS credentials: SEND_SECRETS_CREDENTIALS=imds (the instance "
                             "role, IMDSv2; the default without AWS_ACCESS_KEY_ID) or env")
    parser.add_argument("--tries", type=int, default=DEFAULT_TRIES,
                        help=f"attempts while unreachable or busy (default {DEFAULT_TRIES})")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S,
                        help=f"seconds between attempts (default {DEFAULT_INTERVAL_S:g})")


def _read_payload(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(MAX_DELIVERY_BYTES + 1)
    with open(path, "rb") as handle:
        return handle.read(MAX_DELIVERY_BYTES + 1)


def exchange(address, payload: bytes) -> bytes:
    """One try: connect, send, half-close, read the ack line until EOF (the socat exchange)."""
    try:
        sock = socket.socket(address.socket_family, socket.SOCK_STREAM)
    except OSError as exc:
        raise _Unreachable(f"cannot create a {address.family} socket: {exc.strerror}") from None
    with sock:
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(address.sockaddr)
            sock.settimeout(ACK_TIMEOUT_S)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            chunks, size = [], 0
            while size <= MAX_ACK_BYTES:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if b"\n" in chunk:
                    break
        except OSError as exc:
            raise _Unreachable(exc.strerror or exc.__class__.__name__) from None
    answer = b"".join(chunks)
    if not answer.strip():
        raise _Unreachable("no answer")
    return answer.splitlines()[0]


# -- --kms: the sealed delivery -------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """IMDS never redirects: a redirect would carry the session token elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# No proxy (IMDS is link-local, like the script's `curl --noproxy '*'`) and no redirects.
_IMDS_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def _imds_base(environ) -> str:
    base = (environ.get("SEND_SECRETS_IMDS_URL") or DEFAULT_IMDS_URL).rstrip("/")
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc \
            or parts.query or parts.fragment:
        raise _Refused(EXIT_USAGE, "SEND_SECRETS_IMDS_URL must be http://HOST[:PORT]")
    return base


def _reason(reason) -> str:
    """A network failure in a few words: the OS's text, or the exception's class name."""
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    if isinstance(reason, BaseException):
        return type(reason).__name__
    return str(reason)[:80]


def _imds_request(method: str, url: str, headers: dict, limit: int, failure: str) -> bytes:
    """One IMDS request: the body of a 200 answer of at most `limit` bytes, or _Refused(1)
    whose message is `failure` plus the reason (a status or an OS error, never a header)."""
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=b"" if method == "PUT" else None)
    try:
        with _IMDS_OPENER.open(request, timeout=IMDS_TIMEOUT_S) as answer:
            status = answer.status
            body = answer.read(limit + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _Refused(EXIT_REFUSED, f"{failure} (HTTP {exc.code})") from None
    except urllib.error.URLError as exc:
        raise _Refused(EXIT_REFUSED, f"{failure} ({_reason(exc.reason)})") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, garbage
        raise _Refused(EXIT_REFUSED, f"{failure} ({_reason(exc)})") from None
    if status != 200:
        raise _Refused(EXIT_REFUSED, f"{failure} (HTTP {status})")
    if len(body) > limit:
        raise _Refused(EXIT_REFUSED, f"{failure} (an answer over {limit} bytes)")
    return body


def imds_credentials(environ) -> dict:
    """The instance role's credentials as a delivery's AWS_CREDENTIALS (IMDS's `Token` becomes
    `SessionToken`), or _Refused: 1 when IMDS gives none, 2 for a bad setting."""
    base = _imds_base(environ)
    role = environ.get("SEND_SECRETS_IMDS_ROLE") or None
    if role is not None and not _ROLE_NAME.fullmatch(role):
        raise _Refused(EXIT_USAGE, "SEND_SECRETS_IMDS_ROLE must be an IAM role name")
    token = _imds_request(
        "PUT", base + IMDS_TOKEN_PATH,
        {"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL_S)}, MAX_IMDS_TOKEN_BYTES,
        f"IMDSv2 at {base} gave no session token (not on EC2, or IMDSv2 disabled? locally set "
        "SEND_SECRETS_CREDENTIALS=env and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    try:
        token_text = token.decode("ascii").strip()
    except UnicodeDecodeError:
        token_text = ""
    if not token_text or any(not 0x21 <= ord(c) <= 0x7e for c in token_text):
        raise _Refused(EXIT_REFUSED, f"IMDSv2 at {base} answered an unusable session token")
    authorized = {"X-aws-ec2-metadata-token": token_text}
    if role is None:
        listing = _imds_request("GET", base + IMDS_CREDENTIALS_PATH, authorized,
                                MAX_IMDS_ROLES_BYTES,
                                "IMDSv2 lists no instance role (attach an instance profile)")
        roles = listing.decode("ascii", "replace").split()
        if not roles:
            raise _Refused(EXIT_REFUSED, "IMDSv2 lists no instance role (attach an instance "
                                         "profile)")
        if len(roles) > 1:
            raise _Refused(EXIT_REFUSED, f"IMDSv2 lists {len(roles)} roles: name one in "
                                         "SEND_SECRETS_IMDS_ROLE")
        role = roles[0]
        if not _ROLE_NAME.fullmatch(role):
            raise _Refused(EXIT_REFUSED, "IMDSv2 answered no usable role name")
    raw = _imds_request("GET", base + IMDS_CREDENTIALS_PATH + role, authorized,
                        MAX_IMDS_DOCUMENT_BYTES, f"IMDSv2 gave no credentials for role {role}")
    try:
        document = strictjson.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Refused(EXIT_REFUSED, "IMDS answered credentials that are not JSON") from None
    if not isinstance(document, dict) or document.get("Code", "Success") != "Success":
        code = document.get("Code") if isinstance(document, dict) else None
        shown = code if isinstance(code, str) and _IMDS_CODE.fullmatch(code) else "?"
        raise _Refused(EXIT_REFUSED, f"IMDS credentials are not usable (Code {shown})")
    creds = {name: document.get(name) for name in ("AccessKeyId", "SecretAccessKey")}
    if not all(isinstance(value, str) and value for value in creds.values()):
        raise _Refused(EXIT_REFUSED, "IMDS credentials lack AccessKeyId or SecretAccessKey")
    for source, target in (("Token", "SessionToken"), ("Expiration", "Expiration")):
        if isinstance(document.get(source), str) and document[source]:
            creds[target] = document[source]
    return creds


def env_credentials(environ) -> dict:
    """AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (optional), or _Refused(2)."""
    creds = {"AccessKeyId": environ.get("AWS_ACCESS_KEY_ID", ""),
             "SecretAccessKey": environ.get("AWS_SECRET_ACCESS_KEY", "")}
    if not creds["AccessKeyId"] or not creds["SecretAccessKey"]:
        raise _Refused(EXIT_USAGE, "SEND_SECRETS_CREDENTIALS=env needs AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY")
    if environ.get("AWS_SESSION_TOKEN"):
        creds["SessionToken"] = environ["AWS_SESSION_TOKEN"]
    return creds


def credentials_source(environ) -> str:
    """SEND_SECRETS_CREDENTIALS, else `env` when AWS_ACCESS_KEY_ID is set, else `imds`."""
    source = environ.get("SEND_SECRETS_CREDENTIALS") or \
        ("env" if environ.get("AWS_ACCESS_KEY_ID") else "imds")
    if source not in CREDENTIAL_SOURCES:
        raise _Refused(EXIT_USAGE, "SEND_SECRETS_CREDENTIALS must be env or imds, got "
                                   f"{source[:20]!r}")
    return source


def _read_envelope(path: str) -> tuple[dict, str]:
    """(the envelope object as it is in the file, its key's region), or _Refused(2)."""
    try:
        raw = _read_payload(path)
    except OSError as exc:
        raise _Refused(EXIT_USAGE, f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_DELIVERY_BYTES:
        raise _Refused(EXIT_USAGE, f"{path} is larger than {MAX_DELIVERY_BYTES} bytes")
    try:
        obj = strictjson.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Refused(EXIT_USAGE, f"{path} is not strict UTF-8 JSON") from None
    try:
        parsed = envelope.parse(obj)  # the key's region comes from envelope.parse_key_arn
    except envelope.EnvelopeError as exc:
        raise _Refused(EXIT_USAGE, f"{path} is not a sealed envelope (the output of enclave.py "
                                   f"seal-secrets): {exc.message}") from None
    return obj, parsed.region


def build_sealed_delivery(envelope_path: str, environ, now: float) -> bytes:
    """The section 15 delivery for the envelope in `envelope_path`, with credentials from the
    environment or IMDSv2, as compact JSON; or _Refused. The envelope is read and checked
    first, so a bad file costs no IMDS request. `now`: Unix seconds."""
    obj, region = _read_envelope(envelope_path)
    given = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if given and given != region:
        raise _Refused(EXIT_USAGE, f"AWS_REGION {given[:40]} is not the region of the envelope "
                                   f"key ({region})")
    source = credentials_source(environ)
    creds = env_credentials(environ) if source == "env" else imds_credentials(environ)
    try:  # what the enclave will check (kms.AwsCredentials.from_delivery), before sending
        kms.AwsCredentials.from_delivery(creds, now=now)
    except kms.KmsError as exc:
        exit_code = EXIT_USAGE if source == "env" else EXIT_REFUSED
        raise _Refused(exit_code, f"{source} credentials refused: {exc.code}: {exc.message}") \
            from None
    delivery = json.dumps({"SEALED_SECRETS": obj, "AWS_CREDENTIALS": creds,
                           "AWS_REGION": region}, separators=(",", ":")).encode("utf-8")
    if len(delivery) > MAX_DELIVERY_BYTES:
        raise _Refused(EXIT_USAGE, f"the sealed delivery would be larger than "
                                   f"{MAX_DELIVERY_BYTES} bytes")
    return delivery


# -- the command -------------------------------------------------------------------------------

def _usage(message: str) -> int:
    print(f"send-secrets: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args, environ=None, now: float | None = None) -> int:
    environ = os.environ if environ is None else environ
    envelope_file = getattr(args, "envelope_file", None)
    if envelope_file is not None and args.file is not None:
        return _usage("give FILE (plaintext) or --kms ENVELOPE_FILE (sealed), not both")
    if envelope_file is None and args.file is None:
        return _usage("FILE or --kms ENVELOPE_FILE is required")
    try:
        address = parse_address(args.address, "ADDRESS")
    except AddressError as exc:
        return _usage(str(exc))
    if address.family == "vsock" and address.cid == VSOCK_CID_ANY:
        return _usage("ADDRESS: a vsock CID is required to connect (not ANY)")
    if args.tries < 1 or args.interval < 0:
        return _usage("--tries must be >= 1 and --interval >= 0")
    if envelope_file is not None:
        try:
            payload = build_sealed_delivery(envelope_file, environ,
                                            time.time() if now is None else now)
        except _Refused as exc:
            print(f"send-secrets: {exc}", file=sys.stderr)
            return exc.exit_code
    else:
        try:
            payload = _read_payload(args.file)
        except OSError as exc:
            return _usage(f"cannot read {args.file}: {exc.strerror}")
        if len(payload) > MAX_DELIVERY_BYTES:
            return _usage(f"{args.file} is larger than {MAX_DELIVERY_BYTES} bytes")
    return deliver(address, payload, args.tries, args.interval)


def deliver(address, payload: bytes, tries: int, interval: float) -> int:
    """Send `payload` until an ack (retrying while unreachable or `busy`); print the ack line."""
    reason = "no attempt"
    for attempt in range(1, tries + 1):
        if attempt > 1:
            _sleep(interval)
        try:
            line = exchange(address, payload)
        except _Unreachable as exc:
            reason = str(exc)
            print(f"send-secrets: try {attempt}/{tries}: {address}: {reason}", file=sys.stderr)
            continue
        print(line.decode("utf-8", "replace"))
        try:
            ack = json.loads(line)
        except ValueError:
            print("send-secrets: the answer is not a JSON ack", file=sys.stderr)
            return EXIT_REFUSED
        if isinstance(ack, dict) and ack.get("ok") is True:
            return EXIT_OK
        error = ack.get("error") if isinstance(ack, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        if code == "busy" and attempt < tries:
            continue
        return EXIT_REFUSED
    print(f"send-secrets: giving up after {tries} tries ({reason})", file=sys.stderr)
    return EXIT_REFUSED
