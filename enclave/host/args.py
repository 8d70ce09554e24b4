"""What the host commands share: usage errors, bounded reads, PCR and secret arguments, and the
ONE place that decides which roots a host command trusts."""

from __future__ import annotations

import os
import re
import sys

from .. import devpki
from ..nitro import nitro_root_der, pem_to_der_certs
from ..nitro.verifier import MAX_PCRS, SHA384_BYTES
from ..rpcauth import LOCAL_DEFAULT_RPC_SECRET

DEFAULT_STATE_DIR = ".local"
MAX_ROOT_PEM_BYTES = 64 * 1024  # a root certificate PEM is ~1 KiB
_PCR = re.compile(r"(\d{1,2})=([0-9a-fA-F]+)")
PCR_HEX_DIGITS = 2 * SHA384_BYTES  # every Nitro PCR is a SHA-384 value

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

def parse_pcrs(values: list[str]) -> dict[int, bytes]:
    """--pcr N=HEX values as {index: bytes}: N in 0..31, HEX a SHA-384 (96 hex digits)."""
    out = {}
    expected = (f"expected N=HEX with N in 0..{MAX_PCRS - 1} and {PCR_HEX_DIGITS} hex digits "
                "(SHA-384)")
    for value in values:
        match = _PCR.fullmatch(value)
        if not match or int(match[1]) >= MAX_PCRS:
            raise UsageError(f"--pcr {value!r}: {expected}")
        if len(match[2]) != PCR_HEX_DIGITS:
            raise UsageError(f"--pcr {match[1]}=: {expected}, got {len(match[2])} hex digits")
        out[int(match[1])] = bytes.fromhex(match[2])
    return out

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

is_insecure_root = devpki.names_itself_insecure  # a dev-shim root: its subject says INSECURE

def _read_roots(paths: list[str], allow_insecure: bool, hint: str) -> list[bytes]:
    roots = []
    for path in paths:
        try:
            certs = pem_to_der_certs(read_bounded(path, MAX_ROOT_PEM_BYTES, f"--root {path}"))
        except ValueError:
            raise UsageError(f"--root {path}: no PEM certificate in it") from None
        for der in certs:
            if is_insecure_root(der) and not allow_insecure:
                raise UsageError(f"--root {path} is an INSECURE dev root: {hint}")
            roots.append(der)
    return roots

def _dev_roots(state_dir: str) -> list[bytes]:
    try:
        return pem_to_der_certs(devpki.read_root_pem(state_dir))
    except devpki.DevPkiError as exc:
        raise UsageError(str(exc)) from None
    except ValueError:
        raise UsageError(f"the dev root in {devpki.dev_dir(state_dir)} is not a PEM "
                         "certificate") from None

def trusted_roots(root_paths: list[str], *, allow_insecure_dev: bool, state_dir: str | None,
                  environ=None, strict: bool = False) -> tuple[list[bytes], str]:
    """(roots, note): the AWS Nitro root, every --root, and the INSECURE dev root only with
    --allow-insecure-dev. The note says what is trusted, for messages.

    The dev root is read from --state-dir, else $ENCLAVE_STATE_DIR, else .local. When --root
    names roots to trust, a missing dev root at the default location is not an error; an
    explicit --state-dir, or no --root at all, must hold one.
    """
    environ = os.environ if environ is None else environ
    if strict and allow_insecure_dev:
        raise UsageError("--require-attestation and --allow-insecure-dev contradict each other")
    hint = ("it cannot be trusted with --require-attestation" if strict
            else "add --allow-insecure-dev (development only)")
    roots = [nitro_root_der()] + _read_roots(root_paths, allow_insecure_dev, hint)
    if strict:
        return roots, "--require-attestation trusts only the AWS Nitro root and --root"
    if not allow_insecure_dev:
        return roots, "dev-shim runtime? add --allow-insecure-dev"
    explicit = state_dir or environ.get("ENCLAVE_STATE_DIR")
    try:
        roots += _dev_roots(explicit or DEFAULT_STATE_DIR)
    except UsageError:
        if explicit or not root_paths:
            raise
        return roots, "trusted: the AWS Nitro root and --root (no dev root found)"
    return roots, "trusted: the AWS Nitro root, --root and the INSECURE dev root"
