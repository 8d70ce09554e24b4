"""`seal-secrets --kms-key-arn ARN [--region R] [--bundle-version N] FILE`: seal a secrets payload.

Run by the operator (not the parent instance), docs/DESIGN.md §15: reads a section 4 payload
(a JSON object), asks KMS GenerateDataKey (AES_256) for a data key bound to the envelope's
encryption context, seals the payload with AES-256-GCM and prints the envelope JSON on stdout.
Credentials come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN; the region
from --region, else AWS_REGION or AWS_DEFAULT_REGION, else the key ARN. Exit 0 sealed, 1 KMS
refused or unreachable, 2 usage.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import sys

from .. import envelope, kms
from ..outbound import OutboundClient
from .args import UsageError, read_bounded

HELP = "seal a secrets payload under a KMS key; print the envelope (exit 0 ok, 1 KMS, 2 usage)"

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
# A delivery is at most 256 KiB (section 4); the envelope's base64 costs 4/3 of the payload.
MAX_PAYLOAD_BYTES = 160 * 1024


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
                        help="KMS endpoint override (https://; for a fake KMS)")
    parser.add_argument("--ca-file", metavar="PEM",
                        help="trust only this CA for the endpoint (a fake KMS) instead of the "
                             "bundled Amazon roots")


def _fail(code: int, message: str) -> int:
    print(f"seal-secrets: {message}", file=sys.stderr)
    return code


def run(args, environ=None, now=None) -> int:
    environ = os.environ if environ is None else environ
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        arn, arn_region = envelope.parse_key_arn(args.kms_key_arn)
        region = args.region or environ.get("AWS_REGION") or \
            environ.get("AWS_DEFAULT_REGION") or arn_region
        kms.check_region(region)
        if region != arn_region:
            raise UsageError(f"region {region} is not the key's region {arn_region}")
        bundle_version = (args.bundle_version if args.bundle_version is not None
                          else int(now.timestamp()))
        if not 0 <= bundle_version < 10 ** envelope.MAX_BUNDLE_VERSION_DIGITS:
            raise UsageError("--bundle-version must be a non-negative integer of at most "
                             f"{envelope.MAX_BUNDLE_VERSION_DIGITS} digits")
        if args.endpoint is not None and not args.endpoint.startswith("https://"):
            raise UsageError("--endpoint must be an https:// URL")
        raw = read_bounded(args.file, MAX_PAYLOAD_BYTES, "the payload file")
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise UsageError("the payload file is not UTF-8 JSON") from None
        if not isinstance(payload, dict):
            raise UsageError("the payload must be a JSON object of secrets-channel keys (docs/DESIGN.md §4)")
        if envelope.BUNDLE_VERSION_FIELD in payload:
            raise UsageError("the payload must not carry bundle_version: use --bundle-version")
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
        transport = OutboundClient(context=kms.create_kms_context(args.ca_file), reuse=False)
    except (OSError, ValueError) as exc:
        return _fail(EXIT_USAGE, f"--ca-file: cannot load it ({exc})")
    try:
        data_key = kms.generate_data_key(arn, context, credentials=credentials, region=region,
                                         transport=transport, endpoint=args.endpoint, now=now)
    except kms.KmsError as exc:
        return _fail(EXIT_REFUSED, f"{exc.code}: {exc}")
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
