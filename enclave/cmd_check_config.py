"""`check-config`: validate the environment and print the effective configuration, redacted."""

from __future__ import annotations

import json
import sys

from .config import ConfigError, load_settings

HELP = "validate the environment and print the effective configuration (secrets redacted)"


def add_arguments(parser) -> None:
    parser.add_argument("--env-file", metavar="PATH", help="read variables from a .env file first")


def load_or_report(env_file: str | None):
    """Settings, or None after printing every problem to stderr (the caller exits 2)."""
    try:
        return load_settings(dotenv=env_file)
    except ConfigError as exc:
        print("configuration error:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None


def run(args) -> int:
    settings = load_or_report(args.env_file)
    if settings is None:
        return 2
    print(json.dumps(settings.redacted(), indent=2, sort_keys=True))
    return 0
