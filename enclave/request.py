"""The request handed to route handlers (the server builds it; handlers only read it), and
the request-target rule that the server, `sign` and scripts/rpc.sh share."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import ApiError

# A request target is origin-form ASCII (RFC 9112 3.2.1): clients percent-encode anything else.
# Refused: anything outside visible ASCII (controls, space, DEL, non-ASCII) and a fragment.
_REFUSED_TARGET_CHAR = re.compile(r"[^\x21-\x7e]|#")


def target_problem(target: str) -> str | None:
    """Why an origin-form target (it starts with "/") is refused, or None when it is accepted.

    The server answers 400 invalid_target; `sign` and scripts/rpc.sh refuse the same targets,
    so a signature is only ever made over bytes the server will authenticate as sent.
    """
    if target.startswith("//"):
        return "the request target must not start with //"
    bad = _REFUSED_TARGET_CHAR.search(target)
    if bad is None:
        return None
    if bad.group() == "#":
        return "the request target must not carry a fragment (#)"
    if bad.group() > "\x7f":
        return "the request target must be ASCII: percent-encode other characters"
    return "the request target must not contain spaces or control characters"


class Headers:
    """Request headers: case-insensitive names, every value kept in order (a minimal Message)."""

    __slots__ = ("_items", "_index")

    def __init__(self, items: list[tuple[str, str]]):
        self._items = items
        index: dict[str, list[str]] = {}
        for name, value in items:
            index.setdefault(name.lower(), []).append(value)
        self._index = index

    def get(self, name: str, default=None):
        values = self._index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str, failobj=None):
        values = self._index.get(name.lower())
        return list(values) if values else failobj

    def __getitem__(self, name: str):
        return self.get(name)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._index

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Request:
    method: str
    target: str  # the request target exactly as sent: path and query
    path: str
    query: dict[str, list[str]]
    headers: Headers
    body: bytes = b""
    client: tuple = ()

    def json(self) -> dict:
        """The body as a JSON object, or ApiError 400 (malformed_json / invalid_request)."""
        try:
            value = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: "[[[[..."
            raise ApiError(400, "malformed_json", "request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise ApiError(400, "invalid_request", "request body must be a JSON object")
        return value
