"""What the host verifiers (`verify`, `probe`) trust, from their arguments: the root
certificates (the ONE place that decides them) and the PCR allow-lists.

PCR pins come from `--pcr N=HEX` (repeatable: a repeated index ADDS a value, never replaces
one) and `--pcrs FILE` (repeatable), a JSON file in the shape `nitro-cli build-enclave` prints,
`{"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": HEX, ...}}`, or the bare
`{"PCR0": HEX, ...}` map, or a non-empty JSON list of either (one entry per image of a
rollout). Values are merged per index: a document passes when each pinned index equals one of
that index's values. Anything malformed is a UsageError (exit 2), never skipped.
"""

from __future__ import annotations

import json
import os
import re

from .. import devpki, strictjson
from ..nitro import nitro_root_der, pem_to_der_certs
from ..nitro.verifier import MAX_PCRS, SHA384_BYTES
from .args import UsageError, read_bounded

DEFAULT_STATE_DIR = ".local"
MAX_ROOT_PEM_BYTES = 64 * 1024  # a root certificate PEM is ~1 KiB
MAX_PCRS_FILE_BYTES = 256 * 1024  # a build's measurements are ~400 bytes; a rollout lists a few
PCR_HEX_DIGITS = 2 * SHA384_BYTES  # every Nitro PCR is a SHA-384 value
HASH_ALGORITHM = "Sha384"  # nitro-cli prints "Sha384 { ... }" (Rust's Debug of the hasher)
MEASUREMENTS_KEY = "Measurements"
HASH_ALGORITHM_KEY = "HashAlgorithm"
_PCR_ARG = re.compile(r"(\d{1,2})=([0-9a-fA-F]+)")
_PCR_KEY = re.compile(r"PCR(0|[1-9][0-9]?)")
_HEX = re.compile(r"[0-9a-fA-F]*")


# -- PCR allow-lists ------------------------------------------------------------------------

def add_pcr_arguments(parser, checked: str = "") -> None:
    parser.add_argument("--pcr", action="append", default=[], metavar="N=HEX",
                        help="pin PCR N to this SHA-384 (96 hex digits); repeat an index to "
                             "allow several values (old and new image)" + checked)
    parser.add_argument("--pcrs", action="append", default=[], metavar="FILE",
                        help="pin the PCRs in this JSON file: `nitro-cli build-enclave` "
                             "output, a {\"PCR0\": HEX, ...} map, or a list of them; adds to "
                             "--pcr (repeatable)")


def pcr_allow_lists(pcr_args: list[str], pcr_files: list[str]) -> dict[int, tuple[bytes, ...]]:
    """{index: allowed values} from every --pcr and --pcrs, merged per index, in order, without
    duplicates. Empty when nothing is pinned."""
    allowed: dict[int, list[bytes]] = {}
    pins = [parse_pcr_arg(value) for value in pcr_args]
    for path in pcr_files:
        pins += read_pcrs_file(path)
    for index, value in pins:
        values = allowed.setdefault(index, [])
        if value not in values:
            values.append(value)
    return {index: tuple(values) for index, values in sorted(allowed.items())}


def parse_pcr_arg(value: str) -> tuple[int, bytes]:
    """One --pcr N=HEX: N in 0..31, HEX a SHA-384 (96 hex digits)."""
    expected = (f"expected N=HEX with N in 0..{MAX_PCRS - 1} and {PCR_HEX_DIGITS} hex digits "
                "(SHA-384)")
    match = _PCR_ARG.fullmatch(value)
    if not match or int(match[1]) >= MAX_PCRS:
        raise UsageError(f"--pcr {value!r}: {expected}")
    if len(match[2]) != PCR_HEX_DIGITS:
        raise UsageError(f"--pcr {match[1]}=: {expected}, got {len(match[2])} hex digits")
    return int(match[1]), bytes.fromhex(match[2])


def read_pcrs_file(path: str) -> list[tuple[int, bytes]]:
    """Every (index, value) of a --pcrs file, in file order; UsageError if anything in it is
    not a PCR pin (a typo must not silently pin less)."""
    name = f"--pcrs {path}"
    data = read_bounded(path, MAX_PCRS_FILE_BYTES, name)
    try:
        document = strictjson.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # syntax, not UTF-8, a duplicate, too deep
        raise UsageError(f"{name}: not a JSON PCR file ({exc})") from None
    if isinstance(document, dict):
        return _measurements(document, name)
    if isinstance(document, list):
        if not document:
            raise UsageError(f"{name}: the list is empty: expected at least one set of PCRs")
        pins = []
        for i, entry in enumerate(document):
            pins += _measurements(entry, f"{name}[{i}]")
        return pins
    raise UsageError(f"{name}: expected a JSON object or list, got {type(document).__name__}")


def _measurements(entry, where: str) -> list[tuple[int, bytes]]:
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if MEASUREMENTS_KEY in entry:  # nitro-cli build-enclave / measure-enclave output
        extra = sorted(k for k in entry if k != MEASUREMENTS_KEY)
        if extra:
            raise UsageError(f"{where}: unknown key {extra[0]!r} beside {MEASUREMENTS_KEY!r}")
        entry, where = entry[MEASUREMENTS_KEY], f"{where}.{MEASUREMENTS_KEY}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    pins = []
    for key, value in entry.items():
        if key == HASH_ALGORITHM_KEY:
            if not isinstance(value, str) or not value.startswith(HASH_ALGORITHM):
                raise UsageError(f"{where}: {HASH_ALGORITHM_KEY}: expected {HASH_ALGORITHM}, "
                                 f"got {str(value)[:40]!r}")
            continue
        match = _PCR_KEY.fullmatch(key)
        if not match or int(match[1]) >= MAX_PCRS:
            raise UsageError(f"{where}: unknown key {key[:40]!r}: expected PCR0..PCR"
                             f"{MAX_PCRS - 1}, {HASH_ALGORITHM_KEY} or {MEASUREMENTS_KEY}")
        if not isinstance(value, str) or not _HEX.fullmatch(value):
            raise UsageError(f"{where}: {key}: expected a string of {PCR_HEX_DIGITS} hex digits "
                             f"(SHA-384), got {json.dumps(value)[:40]}")
        if len(value) != PCR_HEX_DIGITS:
            raise UsageError(f"{where}: {key}: expected {PCR_HEX_DIGITS} hex digits (SHA-384), "
                             f"got {len(value)}")
        pins.append((int(match[1]), bytes.fromhex(value)))
    if not pins:
        raise UsageError(f"{where}: no PCR values: expected at least one of PCR0..PCR"
                         f"{MAX_PCRS - 1}")
    return pins


# -- trusted roots --------------------------------------------------------------------------

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
