"""The runtime's log formats: one line per record, control characters escaped in every value."""

import contextlib
import io
import json
import logging
import re
import unittest

from enclave.logs import setup_logging
from enclave.server import Router
from tests.support import parse_raw_response, raw_exchange, running_server

log = logging.getLogger(__name__)

# Raw C0 controls but LF, DEL, C1 controls and Unicode line separators: none may reach a log.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
HOSTILE = "a\rb\nc\x1b[2Jd\x07e\x00f\x7fg\x85h\x9bi\u2028j\tk"
ESCAPED = "a\\rb\\nc\\x1b[2Jd\\x07e\\x00f\\x7fg\\x85h\\x9bi\\u2028j\\tk"


@contextlib.contextmanager
def runtime_log(fmt: str):
    """The runtime's own set-up (setup_logging) on the root logger while the block runs.

    It replaces the suite log's handler for that time, so the hostile records written here do
    not reach the suite log raw (they carry no secret); the handler is put back afterwards.
    """
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    setup_logging(fmt, "DEBUG", stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


def boom(text: str):
    raise ValueError(text)


class Escaping(unittest.TestCase):
    def records(self, fmt: str) -> list[str]:
        with runtime_log(fmt) as stream:
            log.warning("value: %s", HOSTILE)
            logging.getLogger("tests.test_logs.\x1bname").warning("plain")
            try:
                boom("injected\n2030-01-01 00:00:00,000 INFO enclave.fake: forged\x1b[0m")
            except ValueError:
                log.exception("failed on %s", HOSTILE)
        return stream.getvalue()

    def test_text_format(self):
        text = self.records("text")
        self.assertIsNone(RAW_CONTROL.search(text), repr(text))
        lines = text.splitlines()
        self.assertIn(f"value: {ESCAPED}", lines[0])
        self.assertIn("tests.test_logs.\\x1bname: plain", lines[1])
        self.assertIn(f"failed on {ESCAPED}", lines[2])
        # the traceback follows its record, every line indented: nothing forges a new record
        self.assertTrue(all(line.startswith(" ") for line in lines[3:]), lines[3:])
        self.assertIn("\\x1b[0m", lines[-1])
        self.assertTrue(text.endswith("\n"))

    def test_json_format(self):
        text = self.records("json")
        self.assertIsNone(RAW_CONTROL.search(text), repr(text))
        lines = text.splitlines()
        self.assertEqual(len(lines), 3, lines)  # one object per line
        entries = [json.loads(line) for line in lines]
        for entry in entries:  # decoded values are free of controls too
            self.assertIsNone(RAW_CONTROL.search(entry["msg"] + entry["logger"]), entry)
        self.assertEqual(entries[0]["msg"], f"value: {ESCAPED}")
        self.assertEqual(entries[1]["logger"], "tests.test_logs.\\x1bname")
        self.assertIsNone(RAW_CONTROL.search(entries[2]["exc"]), entries[2]["exc"])
        self.assertIn("forged\\x1b[0m", entries[2]["exc"])


class FromARequest(unittest.TestCase):
    def test_control_bytes_sent_by_a_client_are_escaped_in_the_log(self):
        router = Router()
        router.add("GET", "/note", lambda req: (log.warning("client note: %s",
                                                            req.headers.get("X-Note")),
                                                (200, {}))[1])
        note = b"a\x1b]0;owned\x07b\x1b[2Jc\x7fd"
        for fmt in ("text", "json"):
            with self.subTest(fmt), runtime_log(fmt) as stream:
                with running_server(router) as server:
                    data = raw_exchange(server.port, b"GET /note HTTP/1.1\r\nHost: x\r\n"
                                        b"X-Note: " + note + b"\r\nConnection: close\r\n\r\n")
                self.assertEqual(parse_raw_response(data)[0], 200)
                text = stream.getvalue()
                self.assertIsNone(RAW_CONTROL.search(text), repr(text))
                shown = json.loads(text)["msg"] if fmt == "json" else text
                self.assertIn("a\\x1b]0;owned\\x07b\\x1b[2Jc\\x7fd", shown)


if __name__ == "__main__":
    unittest.main()
