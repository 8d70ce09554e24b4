"""The log sink (enclave/logsink.py) and its parent-side receiver (scripts/enclave-logs.sh).

Everything runs over TCP on loopback. The one VSOCK path test swaps only the final connect of
the AF_VSOCK socket (as tests/test_egress.py does): no AF_VSOCK socket is ever connected.

Deadlines below are generous bounds on work that must not wait for a receiver, not timing
measurements: a logging call that blocked on the receiver would take SEND_TIMEOUT_S (5 s) per
line, so thousands of lines would blow through any of them.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

from enclave import logsink
from enclave.addresses import parse_address
from enclave.logs import JsonFormatter
from enclave.logsink import LogSink, LogSinkError, parse_sink, report_startup_failure
from tests.support import find_leaks, remember_secret, scan_later

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "enclave-logs.sh"
WAIT_S = 20.0  # bound on waiting for lines that should arrive at once
NO_BLOCK_DEADLINE_S = 60.0  # bound on logging thousands of lines while the receiver is useless
SMALL_RCVBUF = 4096  # a stuck receiver's kernel buffer: the sender blocks almost at once


def free_port() -> int:
    """A loopback port nothing listens on (bound and released; nothing else runs here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Receiver:
    """A loopback TCP receiver that records every byte, or (reading=False) accepts and never
    reads; always torn down with shutdown, close and join."""

    def __init__(self, port: int = 0, reading: bool = True):
        self.reading = reading
        self.cond = threading.Condition()
        self.data = bytearray()
        self.accepted = 0
        self.conns = []
        self.threads = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not reading:  # inherited by accepted sockets: no autotuned megabytes of buffer
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self._start(self._accept)

    def _start(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                self.accepted += 1
                self.conns.append(conn)
                self.cond.notify_all()
            if self.reading:
                self._start(self._read, conn)

    def _read(self, conn):
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            with self.cond:
                self.data += chunk
                self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = WAIT_S) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def wait_lines(self, count: int, timeout: float = WAIT_S) -> bool:
        return self.wait_for(lambda: self.data.count(b"\n") >= count, timeout)

    def raw(self) -> bytes:
        with self.cond:
            return bytes(self.data)

    def entries(self) -> list[dict]:
        return [json.loads(line) for line in self.raw().decode("utf-8").splitlines()]

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.sock.close()
        with self.cond:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        for thread in self.threads:
            thread.join(timeout=5)


class Recorder(logging.Handler):
    """Keeps the records themselves, to compare the sink's bytes with their formatting."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


class SinkTestCase(unittest.TestCase):
    def setUp(self):
        self.logger = logging.getLogger(f"tests.logsink.{self.id().rpartition('.')[2]}")
        self.logger.setLevel(logging.DEBUG)
        self.addCleanup(self.logger.setLevel, logging.NOTSET)

    def receiver(self, **kwargs) -> Receiver:
        receiver = Receiver(**kwargs)
        self.addCleanup(receiver.close)
        return receiver

    def sink(self, port: int, quiet: bool = False, **kwargs) -> LogSink:
        """A sink on this test's logger. `quiet`: the records stay off the suite log (thousands
        of synthetic lines say nothing there)."""
        sink = LogSink(parse_address(f"tcp:127.0.0.1:{port}"), **kwargs)
        self.logger.addHandler(sink)
        if quiet:
            self.logger.propagate = False
            self.addCleanup(setattr, self.logger, "propagate", True)

        def cleanup():
            self.logger.removeHandler(sink)
            sink.close(timeout=0.5)
            self.assertFalse(sink._thread.is_alive(), "the sender thread outlived close()")
        self.addCleanup(cleanup)
        return sink


class DeliveryTest(SinkTestCase):
    def test_lines_arrive_in_order(self):
        receiver = self.receiver()
        sink = self.sink(receiver.port)
        for index in range(200):
            self.logger.info("line %d of %s", index, "order")
        self.assertTrue(sink.flush(WAIT_S))
        self.assertTrue(receiver.wait_lines(200))
        entries = receiver.entries()
        self.assertEqual([e["msg"] for e in entries], [f"line {i} of order" for i in range(200)])
        self.assertEqual({e["level"] for e in entries}, {"info"})
        self.assertEqual({e["logger"] for e in entries}, {self.logger.name})
        stats = sink.stats()
        self.assertEqual((stats["sent"], stats["dropped"], stats["reconnects"], stats["queued"]),
                         (200, 0, 0, 0))
        self.assertTrue(stats["connected"])

    def test_bytes_are_exactly_the_json_records(self):
        """The sink adds nothing (no environment, no host data): each line is the record as
        enclave.logs.JsonFormatter formats it, escaping included, and nothing else."""
        secret = "env-only-value-" + os.urandom(12).hex()
        remember_secret(secret, kind="environment value the sink must not send")
        os.environ["ENCLAVE_TEST_LOGSINK_ENV"] = secret
        self.addCleanup(os.environ.pop, "ENCLAVE_TEST_LOGSINK_ENV", None)
        receiver = self.receiver()
        recorder = Recorder()
        self.logger.addHandler(recorder)
        self.addCleanup(self.logger.removeHandler, recorder)
        sink = self.sink(receiver.port)
        self.logger.warning("client sent %r", "a\r\nforged line\x1b[31m\u2028")
        try:
            raise ValueError("boom\nnot a new record")
        except ValueError:
            self.logger.exception("handler failed")
        self.assertTrue(sink.flush(WAIT_S))
        self.assertTrue(receiver.wait_lines(2))
        formatter = JsonFormatter()
        expected = "".join(formatter.format(r) + "\n" for r in recorder.records).encode("utf-8")
        received = receiver.raw()
        scan_later(received, "log sink receiver")
        self.assertEqual(received, expected)
        self.assertEqual(received.count(b"\n"), 2)  # CR/LF in values never split a line
        self.assertNotIn(b"\x1b", received)
        self.assertEqual(find_leaks(received.decode("utf-8"), [secret]), [])

    def test_overlong_line_is_replaced_by_a_notice(self):
        receiver = self.receiver()
        sink = self.sink(receiver.port)
        self.logger.error("x" * (logsink.MAX_LINE_BYTES + 10))
        self.logger.info("after")
        self.assertTrue(sink.flush(WAIT_S))
        self.assertTrue(receiver.wait_lines(2))
        first, second = receiver.entries()
        self.assertEqual((first["level"], first["logger"]), ("error", self.logger.name))
        self.assertIn("not sent (over 65536 bytes)", first["msg"])
        self.assertEqual(second["msg"], "after")

    def test_vsock_path_swaps_only_the_final_connect(self):
        if not hasattr(socket, "AF_VSOCK"):
            self.skipTest("no AF_VSOCK on this platform")
        receiver = self.receiver()
        calls = []

        def fake_vsock_connect(sock, address):
            calls.append((sock.family, sock.type, sock.gettimeout(), address))
            sock.close()  # never connected
            return socket.create_connection(("127.0.0.1", receiver.port), timeout=5)

        sink = LogSink(parse_sink("vsock:3:9000"), vsock_connect=fake_vsock_connect)
        self.logger.addHandler(sink)
        self.addCleanup(sink.close, 0.5)
        self.addCleanup(self.logger.removeHandler, sink)
        self.logger.info("over vsock")
        self.assertTrue(sink.flush(WAIT_S))
        self.assertTrue(receiver.wait_lines(1))
        self.assertEqual(receiver.entries()[0]["msg"], "over vsock")
        self.assertEqual(calls, [(socket.AF_VSOCK, socket.SOCK_STREAM, logsink.CONNECT_TIMEOUT_S,
                                  (3, 9000))])


class NeverBlocksTest(SinkTestCase):
    def test_absent_receiver_never_blocks_and_counts_drops(self):
        sink = self.sink(free_port(), quiet=True)
        lines = logsink.MAX_QUEUED_LINES + 2000
        started = time.monotonic()
        for index in range(lines):
            self.logger.info("nobody listens %d", index)
        self.assertLess(time.monotonic() - started, NO_BLOCK_DEADLINE_S)
        stats = sink.stats()
        self.assertEqual(stats["sent"], 0)
        self.assertFalse(stats["connected"])
        # the queue holds MAX_QUEUED_LINES, the sender one more (popped, waiting to connect)
        self.assertGreaterEqual(stats["dropped"], lines - logsink.MAX_QUEUED_LINES - 1)
        self.assertEqual(stats["dropped"] + stats["queued"], lines)
        self.assertFalse(sink.close(timeout=0.2))
        self.assertEqual(sink.stats()["dropped"], lines)

    def test_receiver_that_never_reads_never_blocks(self):
        receiver = self.receiver(reading=False)
        sink = self.sink(receiver.port, quiet=True)
        lines = 20_000
        padding = "p" * 1000  # 20 MB in all: far beyond every kernel buffer on the way
        started = time.monotonic()
        for index in range(lines):
            self.logger.info("stuck receiver %d %s", index, padding)
        self.assertLess(time.monotonic() - started, NO_BLOCK_DEADLINE_S)
        self.assertTrue(receiver.wait_for(lambda: receiver.accepted >= 1))
        stats = sink.stats()
        self.assertGreater(stats["dropped"], 0)
        self.assertEqual(stats["sent"] + stats["dropped"] + stats["queued"], lines)
        # close() is bounded too: it stops a sender blocked writing to the stuck receiver
        started = time.monotonic()
        self.assertFalse(sink.close(timeout=0.2))
        self.assertLess(time.monotonic() - started, logsink.SEND_TIMEOUT_S)

    def test_a_request_is_not_held_by_a_stuck_receiver(self):
        """An HTTP request whose handler logs completes while the receiver reads nothing."""
        from tests.support import http_call, running_server
        from enclave.server import Router
        receiver = self.receiver(reading=False)
        sink = self.sink(receiver.port, quiet=True, max_queued=10)
        logger = self.logger

        def handler(request):
            for index in range(2000):
                logger.info("request log %d %s", index, "q" * 500)
            return 200, {"ok": True}

        router = Router()
        router.add("GET", "/logs", handler)
        with running_server(router) as server:
            status, _, body = http_call(server.server_address[1], "GET", "/logs",
                                        timeout=NO_BLOCK_DEADLINE_S)
        self.assertEqual((status, body), (200, {"ok": True}))
        self.assertGreater(sink.stats()["dropped"], 0)


class ReconnectAndFlushTest(SinkTestCase):
    def test_reconnects_after_the_receiver_restarts(self):
        first = Receiver()
        port = first.port
        sink = self.sink(port, backoff_max_s=0.5)
        for index in range(5):
            self.logger.info("before %d", index)
        self.assertTrue(sink.flush(WAIT_S))
        self.assertTrue(first.wait_lines(5))
        first.close()
        second = self.receiver(port=port)
        for index in range(5):
            self.logger.info("after %d", index)
        self.assertTrue(sink.flush(WAIT_S))
        self.assertTrue(second.wait_lines(5))
        self.assertEqual([e["msg"] for e in first.entries()], [f"before {i}" for i in range(5)])
        self.assertEqual([e["msg"] for e in second.entries()], [f"after {i}" for i in range(5)])
        stats = sink.stats()
        self.assertEqual((stats["sent"], stats["dropped"], stats["reconnects"]), (10, 0, 1))

    def test_flush_delivers_pending_lines_before_close(self):
        port = free_port()
        sink = self.sink(port)  # nothing listens yet: lines wait in the queue
        for index in range(50):
            self.logger.info("pending %d", index)
        self.assertEqual(sink.stats()["sent"], 0)
        receiver = self.receiver(port=port)
        self.assertTrue(sink.close(timeout=WAIT_S))  # flush wakes the sender out of its backoff
        self.assertTrue(receiver.wait_lines(50))
        self.assertEqual([e["msg"] for e in receiver.entries()],
                         [f"pending {i}" for i in range(50)])
        self.assertEqual(sink.stats()["dropped"], 0)

    def test_close_is_bounded_and_counts_the_unsent(self):
        sink = self.sink(free_port())
        for index in range(10):
            self.logger.info("never sent %d", index)
        started = time.monotonic()
        self.assertFalse(sink.close(timeout=0.2))
        self.assertLess(time.monotonic() - started, 0.2 + logsink.STOP_JOIN_TIMEOUT_S + 1)
        self.assertEqual(sink.stats()["dropped"], 10)
        self.logger.info("after close")  # counted, never queued
        self.assertEqual(sink.stats()["dropped"], 11)


class SettingTest(unittest.TestCase):
    def test_parse_sink(self):
        self.assertEqual(str(parse_sink("vsock:3:9000")), "vsock:3:9000")
        self.assertEqual(str(parse_sink(" tcp:127.0.0.1:9000 ")), "tcp:127.0.0.1:9000")
        cases = [("ANY cid", "vsock:ANY:9000", "not ANY"),
                 ("port zero", "vsock:3:0", "port must be 1..65535"),
                 ("tcp port zero", "tcp:127.0.0.1:0", "port must be 1..65535"),
                 ("unknown transport", "udp:127.0.0.1:9000", "unknown transport"),
                 ("no port", "vsock:3", "expected vsock:CID:PORT"),
                 ("empty", "", "expected tcp:HOST:PORT")]
        for name, text, expected in cases:
            with self.subTest(name):
                with self.assertRaises(LogSinkError) as ctx:
                    parse_sink(text)
                self.assertIn("ENCLAVE_LOG_SINK", str(ctx.exception))
                self.assertIn(expected, str(ctx.exception))

    def test_unset_means_no_sink(self):
        for text in (None, "", "  "):
            with self.subTest(repr(text)):
                self.assertIsNone(logsink.from_setting(text))


class StartupFailureTest(unittest.TestCase):
    PROBLEMS = ["ALFRED_ENV must be one of local, test, staging, production",
                "ENCLAVE_RPC_SHARED_SECRET must be set unless ALFRED_ENV=local"]

    def test_problems_reach_the_receiver_before_return(self):
        receiver = Receiver()
        self.addCleanup(receiver.close)
        self.assertTrue(report_startup_failure(f"tcp:127.0.0.1:{receiver.port}", self.PROBLEMS))
        # written before it returned; the receiver's thread reads them right after
        self.assertTrue(receiver.wait_lines(len(self.PROBLEMS)))
        entries = receiver.entries()
        self.assertEqual([e["msg"] for e in entries],
                         [f"start-up failed: {p}" for p in self.PROBLEMS])
        self.assertEqual({(e["level"], e["logger"]) for e in entries}, {("error", "enclave")})

    def test_receiver_that_starts_late_still_gets_them(self):
        """The receiver starts only after the sink's first connect failed (its warning)."""
        port = free_port()
        first_failure = threading.Event()
        receivers = []

        class OnWarning(logging.Handler):
            def emit(self, record):
                if "cannot reach" in record.getMessage():
                    first_failure.set()

        watcher = OnWarning()
        sink_logger = logging.getLogger("enclave.logsink")
        sink_logger.addHandler(watcher)
        self.addCleanup(sink_logger.removeHandler, watcher)

        def late():
            if first_failure.wait(WAIT_S):
                receivers.append(Receiver(port=port))

        thread = threading.Thread(target=late)
        thread.start()
        try:
            self.assertTrue(report_startup_failure(f"tcp:127.0.0.1:{port}", self.PROBLEMS[:1],
                                                   timeout=WAIT_S))
            thread.join(WAIT_S)
            self.assertTrue(first_failure.is_set())
            self.assertTrue(receivers[0].wait_lines(1))
            self.assertEqual(len(receivers[0].entries()), 1)
        finally:
            thread.join(WAIT_S)
            for receiver in receivers:
                receiver.close()

    def test_no_sink_or_no_receiver(self):
        cases = [("unset", None, 5.0), ("malformed", "vsock:ANY:1", 5.0),
                 ("nobody listening", f"tcp:127.0.0.1:{free_port()}", 0.3)]
        for name, setting, timeout in cases:
            with self.subTest(name):
                started = time.monotonic()
                self.assertFalse(report_startup_failure(setting, self.PROBLEMS, timeout=timeout))
                self.assertLess(time.monotonic() - started,
                                timeout + logsink.STOP_JOIN_TIMEOUT_S + 1)


class ServeStartupFailureTest(unittest.TestCase):
    def test_configuration_error_reaches_the_receiver(self):
        receiver = Receiver()
        self.addCleanup(receiver.close)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
               "ALFRED_ENV": "not-an-environment",
               "ENCLAVE_LOG_SINK": f"tcp:127.0.0.1:{receiver.port}"}
        proc = subprocess.run([sys.executable, str(ROOT / "enclave.py"), "serve"], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        scan_later(proc.stdout + proc.stderr, "serve with a bad configuration")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        messages = [e["msg"] for e in receiver.entries()]
        self.assertTrue(any("ALFRED_ENV" in m for m in messages), messages)

    def test_a_running_runtime_sends_its_lines_and_counts_them(self):
        receiver = Receiver()
        self.addCleanup(receiver.close)
        with tempfile.TemporaryDirectory() as state:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
                   "ALFRED_ENV": "local", "ENCLAVE_HTTP_LISTEN": "tcp:127.0.0.1:0",
                   "ENCLAVE_SECRETS_LISTEN": "tcp:127.0.0.1:0",
                   "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "0", "ENCLAVE_STATE_DIR": state,
                   "ENCLAVE_CERTS_DIR": f"{state}/certs", "ENCLAVE_LOG_FORMAT": "json",
                   "ENCLAVE_LOG_SINK": f"tcp:127.0.0.1:{receiver.port}"}
            proc = subprocess.Popen([sys.executable, str(ROOT / "enclave.py"), "serve"], env=env,
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            try:
                serving = re.compile(r"serving: http=tcp:127\.0\.0\.1:(\d+)")
                self.assertTrue(receiver.wait_for(lambda: serving.search(
                    receiver.data.decode("utf-8", "replace"))), proc.poll())
                port = int(serving.search(receiver.raw().decode())[1])
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    text = resp.read().decode()
                sent = re.search(r"^enclave_log_sink_lines_sent_total (\S+)$", text, re.M)
                self.assertIsNotNone(sent, text)
                self.assertGreater(float(sent[1]), 0)
                self.assertIn("enclave_log_sink_lines_dropped_total 0", text)
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(timeout=30), 0)
                # the last lines, flushed before exit, reached the receiver too
                self.assertTrue(receiver.wait_for(lambda: b"stopped" in receiver.data))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                scan_later(proc.stdout.read(), "serve with a log sink")
                proc.stdout.close()


@unittest.skipUnless(shutil.which("socat"), "socat is not installed (scripts/ensure-tools.sh)")
class EnclaveLogsScriptTest(unittest.TestCase):
    def run_script(self, *args):
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=30)

    def test_help_and_usage(self):
        proc = self.run_script("--help")
        self.assertEqual(proc.returncode, 0)
        self.assertIn("usage: enclave-logs.sh", proc.stdout)
        for args in ([], ["--file"], ["--port", "x", "--journal"], ["--file", "a", "--journal"],
                     ["--bogus"]):
            with self.subTest(args):
                proc = self.run_script(*args)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertIn("usage:", proc.stderr)

    def test_tcp_file_mode_end_to_end(self):
        directory = pathlib.Path(self.enterContext(_tempdir()))
        path = directory / "enclave.log"
        port = free_port()
        proc = subprocess.Popen(["bash", str(SCRIPT), "--tcp", "--port", str(port),
                                 "--file", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def stop():
            if proc.poll() is None:
                proc.terminate()
            out, err = proc.communicate(timeout=10)
            scan_later(out + err, "enclave-logs.sh")
        self.addCleanup(stop)
        deadline = time.monotonic() + WAIT_S
        while True:  # until socat listens (bounded; it binds within milliseconds)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                self.assertIsNone(proc.poll(), "enclave-logs.sh exited early")
                self.assertLess(time.monotonic(), deadline, "socat never listened")
                time.sleep(0.05)
        logger = logging.getLogger("tests.logsink.script")
        sink = LogSink(parse_address(f"tcp:127.0.0.1:{port}"))
        logger.addHandler(sink)
        try:
            for index in range(100):
                logger.warning("to the file %d", index)
            self.assertTrue(sink.flush(WAIT_S))
        finally:
            logger.removeHandler(sink)
            self.assertTrue(sink.close(WAIT_S))
        deadline = time.monotonic() + WAIT_S
        while True:  # socat writes as it reads; the file fills within milliseconds
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            if text.count("\n") >= 100 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        entries = [json.loads(line) for line in text.splitlines()]
        self.assertEqual([e["msg"] for e in entries], [f"to the file {i}" for i in range(100)])
        self.assertEqual(path.stat().st_mode & 0o777, 0o640)


def _tempdir():
    import tempfile
    return tempfile.TemporaryDirectory(prefix="enclave-logs-")


if __name__ == "__main__":
    unittest.main()
