"""Logging set-up: operator text lines, or one JSON object per line (ENCLAVE_LOG_FORMAT=json).

Both formats escape control characters in every value (message, logger name, traceback), so
bytes a client sends (CR, ESC, BEL...) can neither forge a log line nor drive a terminal: CR, LF
and TAB show as \\r, \\n, \\t, other C0/C1 controls and DEL as \\xNN, line separators and lone
surrogates as \\uNNNN. A traceback keeps its line breaks, each line indented under its record.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# C0 controls, DEL, C1 controls, the Unicode line/paragraph separators, lone surrogates
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_CONTROL_BUT_LF = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
TRACEBACK_INDENT = "  "  # a record starts at column 0; its traceback lines never do


def _escape_char(match: re.Match) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as a visible escape."""
    return _CONTROL.sub(_escape_char, text)


def _escape_block(text: str) -> str:
    """A multi-line block (a traceback): controls escaped except its own line breaks."""
    return _CONTROL_BUT_LF.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT with control characters escaped; a traceback follows, indented."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = escape_controls(self.formatMessage(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        blocks = [record.exc_text] if record.exc_text else []
        if record.stack_info:
            blocks.append(self.formatStack(record.stack_info))
        for block in blocks:
            lines = _escape_block(block.rstrip("\n")).split("\n")
            text += "".join("\n" + TRACEBACK_INDENT + line for line in lines)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line; every value escaped as in the text format."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": escape_controls(record.name),
            "msg": escape_controls(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = _escape_block(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = _escape_block(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def make_handler(fmt: str = "text", stream=None) -> logging.Handler:
    """A handler on `stream` (default stderr) in the text or JSON format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


def setup_logging(fmt: str = "text", level: str = "INFO", stream=None,
                  extra: tuple[logging.Handler, ...] = ()) -> None:
    """Route every logger to one handler on stderr, plus `extra` handlers (idempotent).

    `extra` is where the log sink goes (enclave.logsink.LogSink: the same records, as JSON
    lines, to the parent); handlers replaced here are removed, not closed.
    """
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    for other in extra:
        root.addHandler(other)
    root.setLevel(level)
