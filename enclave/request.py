"""The request object handed to route handlers (the server builds it; handlers only read it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from email.message import Message

from .errors import ApiError


@dataclass
class Request:
    method: str
    target: str  # the request target exactly as sent: path and query
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes = b""
    client: tuple = ()
    # Filled by the server after a successful HMAC check (routes with auth=True).
    authenticated: bool = False
    extras: dict = field(default_factory=dict)

    def json(self) -> dict:
        """The body as a JSON object, or ApiError 400 (malformed_json / invalid_request)."""
        try:
            value = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "malformed_json", "request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise ApiError(400, "invalid_request", "request body must be a JSON object")
        return value
