"""`check-config`: validate the environment and print the effective configuration, redacted."""

from __future__ import annotations

import json
import sys

from .config import ConfigError, load_settings

HELP = "validate the environment and print the effective configuration (secrets redacted)"


def add_arguments(parser) -> None:
    parser.add_argument("--env-file", metavar="PATH", help="read variables from a .env file first")


def report_config_error(exc: ConfigError) -> None:
    print("configuration error:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)


def run(args) -> int:
    try:
        settings = load_settings(dotenv=args.env_file)
    except ConfigError as exc:
        report_config_error(exc)
        return 2
    print(json.dumps(settings.redacted(), indent=2, sort_keys=True))
    return 0
