"""`check-config`: validate the environment and print the effective configuration, redacted.

It runs the checks `serve` runs before it binds (enclave.service.preflight: the signing key
parses, the document file reads and matches it, MTLS_CLIENT_CERT_JSON validates), so an image
that `serve` would refuse is refused here first, with every problem listed at once.
"""

from __future__ import annotations

import json
import sys

from ..config import load_or_report, report_problems

HELP = "validate the environment and print the effective configuration (secrets redacted)"


def add_arguments(parser) -> None:
    parser.add_argument("--env-file", metavar="PATH", help="read variables from a .env file first")


def run(args) -> int:
    from ..service import preflight

    settings = load_or_report(args.env_file)
    if settings is None:
        return 2
    problems = preflight(settings)
    if problems:
        report_problems(problems)
        return 2
    print(json.dumps(settings.redacted(), indent=2, sort_keys=True))
    sys.stdout.flush()
    return 0
