"""`verify` command: check an attestation document (and evidence, a watermark answer) offline.

Exit codes: 0 verified, 1 rejected (the JSON names the failed step), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from .. import nitro
from .args import UsageError, read_bounded
from .trust import add_pcr_arguments, is_insecure_root, pcr_allow_lists, trusted_roots

HELP = "verify an attestation document offline and print a JSON summary"
MAX_INPUT_BYTES = 1024 * 1024  # a document is < 16 KiB; a watermark answer may approach 1 MiB
_HEX = re.compile(r"[0-9a-fA-F]*")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT",
                        help="file or '-': raw CBOR, base64 or hex document, or the JSON answer "
                             "of /v1/attestation/document or /v1/attestation/challenge")
    parser.add_argument("--root", action="append", default=[], metavar="PEM",
                        help="also trust this root certificate file (repeatable); the AWS Nitro "
                             "Root-G1 is always trusted")
    parser.add_argument("--allow-debug", action="store_true",
                        help="accept debug enclaves (PCR0 all zero)")
    parser.add_argument("--allow-insecure-dev", action="store_true",
                        help="accept INSECURE dev-shim documents: trust the dev root from "
                             "--state-dir (or given with --root)")
    parser.add_argument("--state-dir", metavar="DIR", default=None,
                        help="where the dev root lives (default $ENCLAVE_STATE_DIR or .local)")
    add_pcr_arguments(parser)
    parser.add_argument("--nonce", metavar="HEX", help="expected nonce (hex)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--at", type=int, metavar="MS",
                      help="verification time in Unix milliseconds (default: now)")
    when.add_argument("--at-document-time", action="store_true",
                      help="verify at the document's own timestamp (old documents)")
    parser.add_argument("--max-age", type=float, metavar="SECONDS",
                        help="reject documents (and evidence) older than this")
    parser.add_argument("--evidence", metavar="B64",
                        help="challenge evidence (base64 COSE_Sign1) to check; needs --nonce")
    parser.add_argument("--response", metavar="FILE",
                        help="a watermark answer JSON {\"result\", \"signature\"} to check under "
                             "the document's public_key")
    parser.add_argument("--request", metavar="FILE",
                        help="with --response: the raw request body that was sent")


def _read(path: str) -> bytes:
    return read_bounded(path, MAX_INPUT_BYTES)


def _hex_arg(name: str, value: str | None) -> bytes | None:
    if value is None:
        return None
    if not _HEX.fullmatch(value) or len(value) % 2 or not value:
        raise UsageError(f"{name}: expected an even number of hex digits")
    return bytes.fromhex(value)


def _parse_input(data: bytes):
    """(document bytes, evidence bytes | None) from a raw/base64/hex document or a JSON answer.

    Content that cannot be decoded is handed on as-is so the verifier rejects it at step 1.
    """
    text = data.strip()
    if text.startswith(b"{"):
        try:
            answer = json.loads(text)
            document = nitro.decode_b64(answer["document"])
            evidence = answer.get("evidence")
            return document, (nitro.decode_b64(evidence) if isinstance(evidence, str) else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError("INPUT is JSON but not a document/challenge answer with a base64 "
                             "\"document\"") from None
    try:
        return nitro.read_document_bytes(data), None
    except ValueError:
        return bytes(data), None


def _response(path: str):
    try:
        answer = json.loads(_read(path))
        return answer["result"], nitro.decode_b64(answer["signature"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"--response {path}: expected JSON {{\"result\", \"signature\": "
                         "base64}") from None


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def run(args) -> int:
    try:
        roots, _ = trusted_roots(args.root, allow_insecure_dev=args.allow_insecure_dev,
                                 state_dir=args.state_dir)
        if args.input == "-" and "-" in args.pcrs:
            raise UsageError("INPUT and --pcrs cannot both be standard input")
        expected_pcrs = pcr_allow_lists(args.pcr, args.pcrs)
        nonce = _hex_arg("--nonce", args.nonce)
        document, json_evidence = _parse_input(_read(args.input))
        evidence = json_evidence
        if args.evidence is not None:
            if nonce is None:
                raise UsageError("--evidence needs --nonce")
            try:
                evidence = nitro.decode_b64(args.evidence)
            except ValueError:
                raise UsageError("--evidence: not base64") from None
        elif nonce is None:
            evidence = None  # evidence in a JSON answer is only checked against --nonce
        if args.at_document_time:
            if args.max_age is not None:
                raise UsageError("--max-age makes no sense with --at-document-time")
            at_ms = nitro.AT_DOCUMENT_TIME
        elif args.at is not None:
            if args.at < 0:
                raise UsageError("--at must be Unix milliseconds (>= 0)")
            at_ms = args.at
        else:
            at_ms = int(time.time() * 1000)  # the only clock read; the verifier takes it in
        max_age_ms = None
        if args.max_age is not None:
            if args.max_age < 0:
                raise UsageError("--max-age must be >= 0")
            max_age_ms = int(args.max_age * 1000)
        if args.request and not args.response:
            raise UsageError("--request needs --response")
        response = _response(args.response) if args.response else None
        request_body = _read(args.request) if args.request else None
    except UsageError as exc:
        sys.stderr.write(f"verify: {exc}\n")
        return 2
    except nitro.TrustAnchorError as exc:
        sys.stderr.write(f"verify: {exc}\n")
        return 2

    try:
        verified = nitro.Verifier(roots).verify(
            document, at_ms=at_ms, allow_debug=args.allow_debug,
            expected_pcrs=expected_pcrs or None, expected_nonce=nonce, max_age_ms=max_age_ms,
            evidence=evidence)
        summary = {"verified": True, **verified.summary()}
        summary["insecure"] = is_insecure_root(verified.root_der)  # a dev-shim (INSECURE) root
        if json_evidence is not None and evidence is None:
            summary["evidence"] = "present but not checked (give --nonce)"
        if response is not None:
            claims = nitro.verify_response(verified, response[0], response[1],
                                            request_body=request_body)
            summary["response"] = {
                "intent": claims.get("intent"), "timestamp_ms": claims.get("timestamp_ms"),
                "request_checked": request_body is not None,
                "response_sha256": nitro.claims.sha256(nitro.canonical_json(response[0])).hex()}
    except nitro.VerificationError as exc:
        _emit({"verified": False, "step": exc.step, "step_name": exc.step_name,
               "error": exc.message})
        return 1
    _emit(summary)
    return 0
