"""`check-config`: validate the environment and print the effective configuration, redacted."""

from __future__ import annotations

import json
import sys

from ..config import load_or_report

HELP = "validate the environment and print the effective configuration (secrets redacted)"


def add_arguments(parser) -> None:
    parser.add_argument("--env-file", metavar="PATH", help="read variables from a .env file first")


def run(args) -> int:
    settings = load_or_report(args.env_file)
    if settings is None:
        return 2
    print(json.dumps(settings.redacted(), indent=2, sort_keys=True))
    return 0
