"""Run the unittest suite and end with one line: `N passed, N failed, N skipped`.

Usage: python -m tests.run [-v] [-j N] [PATTERN_OR_MODULE ...]

The whole suite runs its test modules in N worker processes (default: two per CPU, at most
MAX_DEFAULT_JOBS): each worker runs whole modules (so setUpModule/tearDownModule hold),
taking the next one when it is done. `-j 1`, or naming tests, runs in this process.

Every log record of every logger (DEBUG and up) goes to a file of its own for this run
(enclave-tests-*.log in the temp directory, named at the end), so concurrent runs never share one.
After the tests, subprocess output handed to tests.support.scan_later() is appended to that file
and the whole file is scanned for every secret registered with tests.support.remember_secret()
(in any worker) and for the NEVER_LOGGED_MARKERS. Each hit is reported by kind, line number and
a SHA-256 prefix (never the value); any hit adds one failed check ("secret leak scan") and the
exit code is 1.
"""

import concurrent.futures
import io
import logging
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
import unittest
from typing import NamedTuple

from tests import support

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_REPORTED_LEAKS = 50
JOBS_PER_CPU = 2  # most test time is spent waiting on sockets and deadlines, not computing
MAX_DEFAULT_JOBS = 4  # beyond this the cores, not the waits, bound the suite
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Modules that mostly wait on processes they start (whole local stacks, servers, scripts): they
# start first, so that the short modules fill the gaps instead of trailing behind them.
START_FIRST = ("tests.test_local_stack", "tests.test_deploy", "tests.test_sealed_delivery",
               "tests.test_production_boot", "tests.test_attestation_e2e")


class CountingResult(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def new_log_path(prefix: str = "enclave-tests-") -> str:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".log")  # 0600, unique per run
    os.close(fd)
    return path


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


class Outcome(NamedTuple):
    """What one run (a module in a worker, or the whole suite here) counted."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    ran: int = 0
    attached: bool = True  # the log handler was still in place at the end


def run_tests(suite: unittest.TestSuite, stream, verbosity: int, log_path: str) -> Outcome:
    """Run `suite` with every log record (DEBUG and up, any logger) going to `log_path`."""
    root = logging.getLogger()
    handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    runner = unittest.TextTestRunner(resultclass=CountingResult, verbosity=verbosity,
                                     stream=stream)
    result = runner.run(suite)
    attached = handler in root.handlers
    root.removeHandler(handler)
    handler.close()
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    return Outcome(result.passed, failed, len(result.skipped), result.testsRun, attached)


def _run_module(name: str) -> tuple:
    """In a worker: run one test module; hand back its counts, output, log and secrets."""
    log_path = new_log_path("enclave-tests-part-")
    stream = io.StringIO()
    started = time.monotonic()
    try:
        suite = unittest.TestLoader().loadTestsFromName(name)
        outcome = run_tests(suite, stream, _worker_verbosity, log_path)
    except BaseException:  # an import error, a SystemExit in a fixture: report it, never lose it
        stream.write(f"ERROR: {name} did not run to the end\n{traceback.format_exc()}")
        outcome = Outcome(failed=1, ran=1)
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        log_text = fh.read()
    os.unlink(log_path)
    secrets, texts = support.REGISTRY.snapshot()
    support.REGISTRY.texts.clear()  # each text is handed back once
    return (name, outcome, stream.getvalue(), log_text, secrets, texts,
            time.monotonic() - started)


_worker_verbosity = 1


def _init_worker(verbosity: int) -> None:
    global _worker_verbosity
    _worker_verbosity = verbosity
    logging.getLogger().handlers.clear()  # the parent's suite log is the parent's


def module_names() -> list[str]:
    """Every tests/test_*.py as a module name: START_FIRST, then the largest files first (a
    rough cost order, so the long modules start early and the short ones fill the gaps)."""
    files = [f for f in os.listdir(TESTS_DIR) if f.startswith("test_") and f.endswith(".py")]
    files.sort(key=lambda f: (-os.path.getsize(os.path.join(TESTS_DIR, f)), f))
    names = [f"tests.{f[:-3]}" for f in files]
    return [n for n in START_FIRST if n in names] + [n for n in names if n not in START_FIRST]


def _warm_up() -> None:
    """Before forking: compile the sources once (a fresh clone has no bytecode, and every worker
    would compile the same modules) and import the heavy libraries every test module uses, so
    each worker inherits them instead of importing them again. Nothing here starts a thread."""
    import compileall
    for folder in ("enclave", "tests", "bench"):
        compileall.compile_dir(os.path.join(os.path.dirname(TESTS_DIR), folder), quiet=1)
    import cbor2  # noqa: F401
    import cryptography.x509  # noqa: F401
    import http.server  # noqa: F401
    import ssl  # noqa: F401


def run_parallel(jobs: int, verbosity: int, log_file: str) -> Outcome:
    """Modules in `jobs` forked workers; their logs and registries are merged into this run's.
    A worker that dies (a crash, os._exit, the OOM killer) fails its module and every module
    still pending: the run ends with them counted as failed, it never hangs."""
    total = Outcome()
    _warm_up()
    context = multiprocessing.get_context("fork")  # workers start from this clean process
    names = module_names()
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context,
                                                initializer=_init_worker,
                                                initargs=(verbosity,)) as pool, \
            open(log_file, "a", encoding="utf-8") as log:
        futures = {pool.submit(_run_module, name): name for name in names}
        for future in concurrent.futures.as_completed(futures):
            try:
                result = future.result()
            except Exception as exc:  # BrokenProcessPool: the worker is gone
                name = futures[future]
                sys.stderr.write(f"{name}: FAILED, its worker died ({type(exc).__name__})\n")
                total = Outcome(*(a + b for a, b in zip(total[:4], (0, 1, 0, 1))),
                                attached=total.attached)
                continue
            name, outcome, output, log_text, secrets, texts, seconds = result
            sys.stderr.write(f"{name}: {outcome.passed} passed, {outcome.failed} failed, "
                             f"{outcome.skipped} skipped ({seconds:.1f}s)\n")
            if outcome.failed or verbosity > 1:
                sys.stderr.write(output)
            log.write(f"===== {name} =====\n{log_text}")
            for value, kind in secrets.items():
                support.REGISTRY.values.setdefault(value, kind)
            support.REGISTRY.texts.extend(texts)
            total = Outcome(*(a + b for a, b in zip(total[:4], outcome[:4])),
                            attached=total.attached and outcome.attached)
    return total


def main(argv: list[str]) -> int:
    verbosity = 2 if "-v" in argv else 1
    jobs, names, args = None, [], iter(argv)
    for arg in args:
        if arg == "-j":
            jobs = int(next(args, "1"))
        elif arg != "-v":
            names.append(arg)
    if jobs is None:
        jobs = 1 if names else max(1, min(JOBS_PER_CPU * (os.cpu_count() or 1), MAX_DEFAULT_JOBS))
    log_file = new_log_path()
    started = time.monotonic()
    if jobs > 1 and not names:
        outcome = run_parallel(jobs, verbosity, log_file)
    else:
        loader = unittest.TestLoader()
        if names:
            suite = unittest.TestSuite(loader.loadTestsFromName(n) for n in names)
        else:
            suite = loader.discover("tests", pattern="test_*.py", top_level_dir=".")
        outcome = run_tests(suite, sys.stderr, verbosity, log_file)
    sys.stderr.flush()
    elapsed = time.monotonic() - started
    failed, attached = outcome.failed, outcome.attached

    scan_started = time.monotonic()
    leaks = scan_suite_log(log_file)
    scan_s = time.monotonic() - scan_started
    size_kib = os.path.getsize(log_file) / 1024
    print(f"suite took {elapsed:.1f}s with {jobs} process(es); runtime logs in {log_file} "
          f"({size_kib:.0f} KiB)")
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
    print(f"{outcome.passed} passed, {failed} failed, {outcome.skipped} skipped")
    if outcome.ran == 0:
        print("no test ran")
        return 1
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
