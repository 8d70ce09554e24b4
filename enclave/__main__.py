"""`python3 -m enclave` and the zipapp's entry point."""

import sys

from enclave.cli import main

sys.exit(main())
