"""Run the unittest suite and end with one line: `N passed, N failed, N skipped`.

Usage: python -m tests.run [-v] [PATTERN_OR_MODULE ...]

Every log record of every logger (DEBUG and up) goes to a file of its own for this run
(enclave-tests-*.log in the temp directory, named at the end), so concurrent runs never share one.
After the tests, subprocess output handed to tests.support.scan_later() is appended to that file
and the whole file is scanned for every secret registered with tests.support.remember_secret()
and for the NEVER_LOGGED_MARKERS. Each hit is reported by kind, line number and a SHA-256 prefix
(never the value); any hit adds one failed check ("secret leak scan") and the exit code is 1.
"""

import logging
import os
import sys
import tempfile
import time
import unittest

from tests import support

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_REPORTED_LEAKS = 50


class CountingResult(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def open_suite_log() -> tuple[str, logging.Handler]:
    fd, path = tempfile.mkstemp(prefix="enclave-tests-", suffix=".log")  # 0600, unique per run
    os.close(fd)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return path, handler


def scan_suite_log(path: str) -> list:
    """Append the scan_later() texts to the suite log, then scan the whole file."""
    secrets, texts = support.REGISTRY.snapshot()
    with open(path, "a", encoding="utf-8") as fh:
        for label, text in texts:
            fh.write(f"===== scan_later: {label} =====\n{text}")
            if not text.endswith("\n"):
                fh.write("\n")
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    return support.find_leaks(text, secrets, support.NEVER_LOGGED_MARKERS,
                              source=os.path.basename(path))


def main(argv: list[str]) -> int:
    verbosity = 2 if "-v" in argv else 1
    log_file, handler = open_suite_log()
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
    elapsed = time.monotonic() - started

    root = logging.getLogger()
    attached = handler in root.handlers
    root.removeHandler(handler)
    handler.close()
    scan_started = time.monotonic()
    leaks = scan_suite_log(log_file)
    scan_s = time.monotonic() - scan_started
    size_kib = os.path.getsize(log_file) / 1024
    print(f"suite took {elapsed:.1f}s; runtime logs in {log_file} ({size_kib:.0f} KiB)")
    registered = len(support.REGISTRY.values)
    if not attached:
        print("secret leak scan: FAILED: the suite log handler was removed during the run "
              "(something reconfigured the root logger), so the log is incomplete")
        failed += 1
    if leaks:
        print(f"secret leak scan: FAILED: {len(leaks)} hit(s) of {registered} registered values "
              f"and {len(support.NEVER_LOGGED_MARKERS)} marker(s) ({scan_s:.1f}s):")
        for leak in leaks[:MAX_REPORTED_LEAKS]:
            print(f"  {leak}")
        if len(leaks) > MAX_REPORTED_LEAKS:
            print(f"  ... and {len(leaks) - MAX_REPORTED_LEAKS} more")
        failed += 1
    else:
        print(f"secret leak scan: clean ({registered} registered values, "
              f"{len(support.NEVER_LOGGED_MARKERS)} marker(s), {scan_s:.1f}s)")
    print(f"{result.passed} passed, {failed} failed, {skipped} skipped")
    if result.testsRun == 0:
        print("no test ran")
        return 1
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
