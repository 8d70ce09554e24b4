"""`sign METHOD TARGET [BODY_FILE] [--secret S]`: print the X-Enclave-* headers for one RPC.

Output is one `Name: value` line per header, ready for `curl -H`. The secret comes from
--secret, else ENCLAVE_RPC_SHARED_SECRET, else the local default secret, which is used only when
ALFRED_ENV=local is set. `--nonce VALUE` accepts values that start with `-`. TARGET must be
what the server accepts: ASCII (percent-encode anything else), no spaces, control characters or
fragment, not starting with `//`.
Exit codes: 0 printed, 2 usage or configuration error.
"""

from __future__ import annotations

import os
import re
import sys
import time

from ..request import target_problem
from ..rpcauth import NONCE_RE, new_nonce, sign_request
from .args import UsageError, attach_option_values, resolve_secret

HELP = "print the X-Enclave-* headers that sign one host RPC request"
MAX_BODY_BYTES = 1024 * 1024  # the largest RPC body the server accepts (watermark)
_METHOD_RE = re.compile(r"[A-Z]{1,16}")


def add_arguments(parser) -> None:
    parser.add_argument("method", metavar="METHOD", help="HTTP method, e.g. POST")
    parser.add_argument("target", metavar="TARGET",
                        help="request target exactly as it will be sent: path and query, "
                             "ASCII (percent-encode anything else)")
    parser.add_argument("body_file", metavar="BODY_FILE", nargs="?",
                        help="file holding the exact body bytes ('-' for standard input); "
                             "none means an empty body")
    parser.add_argument("--secret", help="shared secret (default: ENCLAVE_RPC_SHARED_SECRET, "
                                         "or the local default when ALFRED_ENV is local)")
    parser.add_argument("--timestamp", type=int, help="unix seconds (default: now)")
    parser.add_argument("--nonce", help="nonce (default: 128 random bits, base64url)")


def _body(path: str | None) -> bytes:
    if path is None:
        return b""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_BODY_BYTES + 1)
    else:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise ValueError(f"body is larger than {MAX_BODY_BYTES} bytes")
    return data


def run(args, environ=None) -> int:
    environ = os.environ if environ is None else environ
    if not _METHOD_RE.fullmatch(args.method):
        print(f"sign: METHOD must be an upper-case HTTP method, got {args.method!r}",
              file=sys.stderr)
        return 2
    if not args.target.startswith("/"):
        print("sign: TARGET must start with / (path and query as sent)", file=sys.stderr)
        return 2
    problem = target_problem(args.target)
    if problem is not None:  # the server would answer 400 invalid_target
        print(f"sign: TARGET refused: {problem}", file=sys.stderr)
        return 2
    if args.nonce is not None and not NONCE_RE.fullmatch(args.nonce):
        print("sign: --nonce must be 22-64 characters of A-Z a-z 0-9 _ -", file=sys.stderr)
        return 2
    if args.timestamp is not None and not 0 <= args.timestamp < 10**12:
        print("sign: --timestamp must be unix seconds (at most 12 digits)", file=sys.stderr)
        return 2
    try:
        secret = resolve_secret(args, environ)
    except UsageError as exc:
        print(f"sign: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print("sign: no secret: pass --secret or set ENCLAVE_RPC_SHARED_SECRET (the local "
              "default is used only when ALFRED_ENV=local is set)", file=sys.stderr)
        return 2
    try:
        body = _body(args.body_file)
    except (OSError, ValueError) as exc:
        print(f"sign: cannot read BODY_FILE: {exc}", file=sys.stderr)
        return 2
    timestamp = int(time.time()) if args.timestamp is None else args.timestamp
    nonce = args.nonce or new_nonce()
    for name, value in sign_request(secret, args.method, args.target, body, timestamp,
                                    nonce).items():
        print(f"{name}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="enclave.py sign", description=HELP)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(parser.parse_args(attach_option_values(argv, {"--nonce": NONCE_RE})))


if __name__ == "__main__":
    sys.exit(main())
