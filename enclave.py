#!/usr/bin/env python3
"""Entry point: `python3 enclave.py [command]` (the same as `python3 dist/enclave.pyz`)."""

import sys

from enclave.cli import main

if __name__ == "__main__":
    sys.exit(main())
