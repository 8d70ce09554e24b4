"""What the host commands share: usage errors, bounded reads, the RPC secret and option values.

Standard library only, so that `sign` runs on a host without `cryptography` or `cbor2`; what
the verifiers trust (roots, PCR pins) is enclave.host.trust."""

from __future__ import annotations

import re
import sys

from ..rpcauth import LOCAL_DEFAULT_RPC_SECRET


class UsageError(Exception):
    """Bad arguments or unreadable files: exit 2."""


def read_bounded(path: str, limit: int, what: str | None = None) -> bytes:
    """The bytes of `path` ('-' is stdin), at most `limit` of them, or UsageError."""
    name = what or path
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{name} is larger than {limit} bytes")
    return data


def resolve_secret(args, environ) -> str | None:
    """--secret, else ENCLAVE_RPC_SHARED_SECRET, else the published local default, which only
    an explicit ALFRED_ENV=local enables (an unset ALFRED_ENV never does). None when there is
    no secret; UsageError when the secret is not valid UTF-8 (undecodable bytes in argv or the
    environment reach Python as lone surrogates, which HMAC cannot encode)."""
    for source, value in (("--secret", args.secret),
                          ("ENCLAVE_RPC_SHARED_SECRET", environ.get("ENCLAVE_RPC_SHARED_SECRET"))):
        if value:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"{source} is not valid UTF-8") from None
            return value
    if environ.get("ALFRED_ENV") == "local":
        return LOCAL_DEFAULT_RPC_SECRET
    return None


def attach_option_values(argv: list[str], options: dict[str, re.Pattern]) -> list[str]:
    """`--opt VALUE` -> `--opt=VALUE` when VALUE matches the option's pattern, so a value that
    starts with `-` (an RPC nonce, 1 time in 64) is not taken for an option by argparse."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        pattern = options.get(arg)
        if arg == "--":
            out.extend(argv[i:])
            break
        if pattern is not None and i + 1 < len(argv) and pattern.fullmatch(argv[i + 1]):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out
