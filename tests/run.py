"""Run the unittest suite and end with one line: `N passed, N failed, N skipped`.

Usage: python -m tests.run [-v] [PATTERN_OR_MODULE ...]
"""

import logging
import os
import sys
import tempfile
import time
import unittest

# The runtime logs a lot by design; the suite keeps those lines in a file, not on the console.
LOG_FILE = os.path.join(tempfile.gettempdir(), "enclave-tests.log")


class CountingResult(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def main(argv: list[str]) -> int:
    verbosity = 2 if "-v" in argv else 1
    handler = logging.FileHandler(LOG_FILE, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    names = [a for a in argv if a != "-v"]
    loader = unittest.TestLoader()
    if names:
        suite = unittest.TestSuite(loader.loadTestsFromName(n) for n in names)
    else:
        suite = loader.discover("tests", pattern="test_*.py", top_level_dir=".")
    runner = unittest.TextTestRunner(resultclass=CountingResult, verbosity=verbosity,
                                     stream=sys.stderr)
    started = time.monotonic()
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    sys.stderr.flush()
    print(f"suite took {time.monotonic() - started:.1f}s; runtime logs in {LOG_FILE}")
    print(f"{result.passed} passed, {failed} failed, {skipped} skipped")
    if result.testsRun == 0:
        print("no test ran")
        return 1
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
