"""`seal-secrets --kms-key-arn ARN [--region R] [--bundle-version N] FILE`: seal a secrets payload.

Run by the operator (not the parent instance), docs/DESIGN.md §15: reads a section 4 payload
(a strict JSON object: no duplicate keys, no NaN), checks it with the runtime's own validator
(a dry run of what the enclave will do with it, so that nothing the enclave refuses is sealed),
asks KMS GenerateDataKey (AES_256, no Recipient) for a data key bound to the envelope's
encryption context, seals the payload with AES-256-GCM and prints the envelope JSON on stdout.

The standard AWS environment, so that the AWS CLI recipe in docs/ENCLAVE.md §6 makes the same
file: credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN; the region
from --region, else AWS_REGION or AWS_DEFAULT_REGION, else the key ARN; the endpoint from
--endpoint, else AWS_ENDPOINT_URL_KMS, else AWS_ENDPOINT_URL, else kms.REGION.amazonaws.com; the
only CA trusted for it from --ca-file, else AWS_CA_BUNDLE, else the bundled Amazon roots.
Exit 0 sealed, 1 KMS refused or unreachable, 2 usage (a payload the enclave would refuse too:
its error code and message, never a value).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time

from .. import envelope, kms, strictjson
from ..outbound import OutboundClient
from ..secrets import SecretsError, apply_update, initial_state
from .args import UsageError, read_bounded

HELP = "seal a secrets payload under a KMS key; print the envelope (exit 0 ok, 1 KMS, 2 usage)"

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
# A delivery is at most 256 KiB (section 4); the envelope's base64 costs 4/3 of the payload.
MAX_PAYLOAD_BYTES = 160 * 1024
# Where the endpoint and its CA come from when the flag is not given, first one set wins (the
# AWS CLI and SDKs read the same variables).
ENDPOINT_SOURCES = ("AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL")
CA_BUNDLE_SOURCE = "AWS_CA_BUNDLE"


def add_arguments(parser) -> None:
    parser.add_argument("file", metavar="FILE", help="the plaintext payload JSON, or - for stdin")
    parser.add_argument("--kms-key-arn", required=True, metavar="ARN",
                        help="the KMS key ARN (the one ENCLAVE_KMS_KEY_ARN pins)")
    parser.add_argument("--region", help="AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, "
                                         "else the key ARN's)")
    parser.add_argument("--bundle-version", type=int, default=None, metavar="N",
                        help="bundle version, never lower than the last one delivered "
                             "(default: the current Unix time in seconds)")
    parser.add_argument("--endpoint", metavar="URL",
                        help="KMS endpoint override (https://; default: AWS_ENDPOINT_URL_KMS, "
                             "else AWS_ENDPOINT_URL, else kms.REGION.amazonaws.com)")
    parser.add_argument("--ca-file", metavar="PEM",
                        help="trust only this CA for the endpoint instead of the bundled Amazon "
                             "roots (default: AWS_CA_BUNDLE when set)")


def _fail(code: int, message: str) -> int:
    print(f"seal-secrets: {message}", file=sys.stderr)
    return code


def _from_flag_or_environ(value, flag: str, environ, names) -> tuple[str | None, str]:
    """(value, where it came from): the flag when given, else the first variable set."""
    if value is not None:
        return value, flag
    for name in names:
        if environ.get(name):
            return environ[name], name
    return None, flag


def _load_payload(path: str, now: float) -> dict:
    """The payload as the enclave will read it, checked by the runtime's validator, or
    UsageError (whose message names keys and codes, never a value). `now`: Unix seconds."""
    raw = read_bounded(path, MAX_PAYLOAD_BYTES, "the payload file")
    try:
        payload = strictjson.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError("the payload file is not UTF-8 text") from None
    except RecursionError:
        raise UsageError("the payload file is nested too deeply") from None
    except json.JSONDecodeError as exc:  # names a position, never the content
        raise UsageError(f"the payload file is not valid JSON ({exc.msg} at line {exc.lineno} "
                         f"column {exc.colno})") from None
    except ValueError as exc:  # strictjson's hooks: a duplicate key, NaN or Infinity
        raise UsageError(f"the payload file is not strict JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise UsageError("the payload must be a JSON object of secrets-channel keys "
                         "(docs/DESIGN.md §4)")
    if envelope.BUNDLE_VERSION_FIELD in payload:
        raise UsageError("the payload must not carry bundle_version: seal-secrets adds it "
                         "(use --bundle-version)")
    try:  # a dry run of the enclave's own check (section 15 step 6 hands it the payload)
        apply_update(initial_state({}), payload, now)
    except SecretsError as exc:
        raise UsageError(f"the enclave would refuse this payload: {exc.code}: "
                         f"{exc.message}") from None
    return payload


def run(args, environ=None, now: float | None = None) -> int:
    environ = os.environ if environ is None else environ
    now = time.time() if now is None else now
    try:
        arn, arn_region = envelope.parse_key_arn(args.kms_key_arn)
        region = args.region or environ.get("AWS_REGION") or \
            environ.get("AWS_DEFAULT_REGION") or arn_region
        kms.check_region(region)
        if region != arn_region:
            raise UsageError(f"region {region} is not the key's region {arn_region}")
        bundle_version = (args.bundle_version if args.bundle_version is not None
                          else int(now))
        if not 0 <= bundle_version < 10 ** envelope.MAX_BUNDLE_VERSION_DIGITS:
            raise UsageError("--bundle-version must be a non-negative integer of at most "
                             f"{envelope.MAX_BUNDLE_VERSION_DIGITS} digits")
        endpoint, endpoint_source = _from_flag_or_environ(args.endpoint, "--endpoint", environ,
                                                          ENDPOINT_SOURCES)
        if endpoint is not None and not endpoint.startswith("https://"):
            raise UsageError(f"{endpoint_source} must be an https:// URL")
        ca_file, ca_source = _from_flag_or_environ(args.ca_file, "--ca-file", environ,
                                                   (CA_BUNDLE_SOURCE,))
        payload = _load_payload(args.file, now)
        credentials = kms.AwsCredentials.from_environ(environ, now=now)
    except (UsageError, envelope.EnvelopeError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    except kms.KmsError as exc:
        if exc.code == kms.CODE_CREDENTIALS_INVALID:
            return _fail(EXIT_USAGE, "AWS credentials: set AWS_ACCESS_KEY_ID and "
                                     f"AWS_SECRET_ACCESS_KEY ({exc})")
        return _fail(EXIT_USAGE, f"{exc.code}: {exc}")

    context = {"purpose": envelope.PURPOSE,
               envelope.BUNDLE_VERSION_FIELD: str(bundle_version)}
    try:
        transport = OutboundClient(context=kms.create_kms_context(ca_file), reuse=False)
    except (OSError, ValueError) as exc:
        return _fail(EXIT_USAGE, f"{ca_source}: cannot load {ca_file} ({exc})")
    try:
        data_key = kms.generate_data_key(arn, context, credentials=credentials, region=region,
                                         transport=transport, endpoint=endpoint, now=now)
    except kms.KmsError as exc:
        where = f" (endpoint {endpoint} from {endpoint_source})" \
            if endpoint_source in ENDPOINT_SOURCES else ""
        return _fail(EXIT_REFUSED, f"{exc.code}: {exc}{where}")
    finally:
        transport.close()
    try:
        sealed = envelope.seal(payload, kms_key_arn=arn, bundle_version=bundle_version,
                               data_key=data_key.plaintext,
                               encrypted_data_key=data_key.ciphertext_blob,
                               nonce=secrets.token_bytes(envelope.NONCE_BYTES))
    except envelope.EnvelopeError as exc:
        return _fail(EXIT_USAGE, str(exc))
    print(json.dumps(sealed, indent=2))
    return EXIT_OK
