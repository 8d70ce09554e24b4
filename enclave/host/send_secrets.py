"""`send-secrets ADDRESS FILE`: deliver a secrets JSON file to the secrets listener.

The Python twin of scripts/send-secrets.sh: ADDRESS is `tcp:HOST:PORT` or `vsock:CID:PORT`;
5 tries 2 s apart while the listener cannot be reached or answers `busy`; prints the ack line.
Exit 0 only if the ack says `"ok": true`, 1 if refused or unreachable, 2 on usage errors.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from ..addresses import VSOCK_CID_ANY, AddressError, parse_address
from ..secrets import MAX_DELIVERY_BYTES

HELP = "deliver a secrets JSON file to the secrets listener (exit 0 ok, 1 refused, 2 usage)"

DEFAULT_TRIES = 5
DEFAULT_INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 5.0
ACK_TIMEOUT_S = 35.0  # the listener answers within its 30 s per-connection limit
MAX_ACK_BYTES = 64 * 1024
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

_sleep = time.sleep  # replaced by tests


class _Unreachable(Exception):
    """No ack this try (connection refused, reset, timeout, empty answer)."""


def add_arguments(parser) -> None:
    parser.add_argument("address", metavar="ADDRESS", help="tcp:HOST:PORT or vsock:CID:PORT")
    parser.add_argument("file", metavar="FILE", help="secrets JSON file, or - for stdin")
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


def run(args) -> int:
    try:
        address = parse_address(args.address, "ADDRESS")
    except AddressError as exc:
        print(f"send-secrets: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if address.family == "vsock" and address.cid == VSOCK_CID_ANY:
        print("send-secrets: ADDRESS: a vsock CID is required to connect (not ANY)",
              file=sys.stderr)
        return EXIT_USAGE
    if args.tries < 1 or args.interval < 0:
        print("send-secrets: --tries must be >= 1 and --interval >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        payload = _read_payload(args.file)
    except OSError as exc:
        print(f"send-secrets: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if len(payload) > MAX_DELIVERY_BYTES:
        print(f"send-secrets: {args.file} is larger than {MAX_DELIVERY_BYTES} bytes",
              file=sys.stderr)
        return EXIT_USAGE

    reason = "no attempt"
    for attempt in range(1, args.tries + 1):
        if attempt > 1:
            _sleep(args.interval)
        try:
            line = exchange(address, payload)
        except _Unreachable as exc:
            reason = str(exc)
            print(f"send-secrets: try {attempt}/{args.tries}: {address}: {reason}", file=sys.stderr)
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
        if code == "busy" and attempt < args.tries:
            continue
        return EXIT_REFUSED
    print(f"send-secrets: giving up after {args.tries} tries ({reason})", file=sys.stderr)
    return EXIT_REFUSED
