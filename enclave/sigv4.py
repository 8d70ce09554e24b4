"""AWS Signature Version 4 for requests signed in the Authorization header (docs/DESIGN.md §15).

A trust core: strings, bytes and a time in, headers out; no I/O and no clock. It signs the way
every AWS service except S3 expects: the path is normalized (dot segments and repeated slashes
removed) and percent-encoded once more on top of its wire form. S3 (no normalization, single
encoding), presigned query-string URLs, chunked payload signing and SigV4a are not offered.
Every failure raises SigV4Error.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Iterable, Mapping

from .errors import EnclaveError

ALGORITHM = "AWS4-HMAC-SHA256"
SCOPE_TERMINATOR = "aws4_request"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"  # X-Amz-Date, always UTC
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Headers sign() sets itself; a caller passing one would sign a value it does not send.
RESERVED_HEADERS = ("authorization", "x-amz-date", "x-amz-security-token")

MAX_METHOD_CHARS = 16  # longer than any HTTP method in use
MAX_SCOPE_PART_CHARS = 64  # region and service names are far shorter (e.g. ap-southeast-4, kms)
MAX_ACCESS_KEY_CHARS = 128  # IAM's documented maximum for an access key id

_METHOD = re.compile(rf"[A-Z]{{1,{MAX_METHOD_CHARS}}}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_BAD_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs except HTAB: no CR/LF folds
_OWS_RUN = re.compile(r"[ \t]+")
_BAD_URL_CHARS = re.compile(r"[\x00-\x1f\x7f#]")  # CTLs (no CR/LF smuggling) and a fragment
_BAD_PATH_CHARS = re.compile(r"[\x00-\x1f\x7f?#]")
_SCOPE_PART = re.compile(rf"[a-z0-9-]{{1,{MAX_SCOPE_PART_CHARS}}}")
_ACCESS_KEY = re.compile(rf"[A-Za-z0-9]{{1,{MAX_ACCESS_KEY_CHARS}}}")
_SESSION_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it is sent as a header value
_SCOPE_DATE = re.compile(r"[0-9]{8}")
_AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")


class SigV4Error(EnclaveError):
    """A request could not be signed (a malformed input or an unusable credential or time)."""


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def _quote(text: str | bytes) -> str:
    """Percent-encode everything but the RFC 3986 unreserved characters (uppercase hex)."""
    try:
        return urllib.parse.quote(text, safe="")  # always keeps A-Z a-z 0-9 - _ . ~
    except UnicodeEncodeError:
        raise SigV4Error("request text is not encodable as UTF-8") from None


def _requote(text: str) -> str:
    """Decode percent-escapes once (`+` stays a plus), then encode as _quote does."""
    try:
        raw = urllib.parse.unquote_to_bytes(text)
    except UnicodeEncodeError:
        raise SigV4Error("request text is not encodable as UTF-8") from None
    return _quote(raw)


def canonical_uri(path: str) -> str:
    """The normalized, encoded path: RFC 3986 dot-segment removal, repeated slashes collapsed,
    a trailing slash kept, then each segment percent-encoded (a `%` of the wire form too)."""
    if not isinstance(path, str) or not path.startswith("/") or _BAD_PATH_CHARS.search(path):
        raise SigV4Error(f"path must be an absolute path without query or fragment, got {path!r}")
    segments: list[str] = []
    raw = path.split("/")[1:]
    for segment in raw:
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    # "/a/" and "/a/." and "/a/b/.." all name a directory: the result keeps the slash.
    trailing = "/" if segments and raw[-1] in ("", ".", "..") else ""
    return "/" + "/".join(_quote(s) for s in segments) + trailing


def canonical_query(query: str) -> str:
    """Name/value pairs decoded once, re-encoded strictly and sorted by (name, value).

    A name without `=` gets an empty value; `+` is a literal plus (AWS encodes a space as %20).
    """
    if not isinstance(query, str) or _BAD_URL_CHARS.search(query):
        raise SigV4Error("query must be a string without control characters or a fragment")
    pairs = []
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((_requote(name), _requote(value)))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _header_pairs(headers) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    if not isinstance(items, Iterable):
        raise SigV4Error("headers must be a mapping or (name, value) pairs")
    pairs = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise SigV4Error("headers must be a mapping or (name, value) pairs")
        name, value = item
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise SigV4Error(f"header name must be an HTTP token, got {name!r}")
        if not isinstance(value, str) or _BAD_HEADER_VALUE.search(value):
            raise SigV4Error(f"header {name} must be a string without CR, LF or control characters")
        pairs.append((name, value))
    return pairs


def _canonical_headers(pairs: list[tuple[str, str]]) -> tuple[str, str]:
    """(the canonical header block, the signed header names joined with `;`).

    Names are lowercased and sorted; values trimmed, runs of spaces and tabs made one space;
    repeated headers joined with `,` in the order given. Every header given is signed; `host`
    must be one of them.
    """
    merged: dict[str, list[str]] = {}
    for name, value in pairs:
        merged.setdefault(name.lower(), []).append(_OWS_RUN.sub(" ", value).strip(" "))
    if "host" not in merged:
        raise SigV4Error("the host header must be signed")
    names = sorted(merged)
    block = "".join(f"{name}:{','.join(merged[name])}\n" for name in names)
    return block, ";".join(names)


def _canonical_request(method, path, query, headers, payload_sha256) -> tuple[str, str]:
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        raise SigV4Error(f"method must be 1-{MAX_METHOD_CHARS} uppercase letters, got {method!r}")
    if not isinstance(payload_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", payload_sha256):
        raise SigV4Error("payload hash must be 64 lowercase hex digits")
    block, signed = _canonical_headers(_header_pairs(headers))
    text = "\n".join([method, canonical_uri(path), canonical_query(query), block, signed,
                      payload_sha256])
    return text, signed


def canonical_request(method: str, path: str, query: str, headers, payload_sha256: str) -> str:
    """The SigV4 canonical request.

    `path` and `query` are the wire form (as in the request line, split at `?`); `headers` is a
    mapping or (name, value) pairs (pairs allow a repeated header); every header is signed.
    """
    return _canonical_request(method, path, query, headers, payload_sha256)[0]


def _scope_part(name: str, value: str) -> str:
    if not isinstance(value, str) or not _SCOPE_PART.fullmatch(value):
        raise SigV4Error(f"{name} must be 1-{MAX_SCOPE_PART_CHARS} of a-z 0-9 -, got {value!r}")
    return value


def credential_scope(date: str, region: str, service: str) -> str:
    """`YYYYMMDD/region/service/aws4_request`."""
    if not isinstance(date, str) or not _SCOPE_DATE.fullmatch(date):
        raise SigV4Error(f"scope date must be YYYYMMDD, got {date!r}")
    return "/".join([date, _scope_part("region", region), _scope_part("service", service),
                     SCOPE_TERMINATOR])


def string_to_sign(canonical: str, amz_date: str, region: str, service: str) -> str:
    """The string to sign for a canonical request made at `amz_date` (YYYYMMDDTHHMMSSZ)."""
    if not isinstance(amz_date, str) or not _AMZ_DATE.fullmatch(amz_date):
        raise SigV4Error(f"X-Amz-Date must be YYYYMMDDTHHMMSSZ, got {amz_date!r}")
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return "\n".join([ALGORITHM, amz_date, credential_scope(amz_date[:8], region, service),
                      digest])


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """HMAC chain `AWS4`+secret -> date -> region -> service -> `aws4_request`."""
    if not isinstance(secret, str) or not secret:
        raise SigV4Error("secret access key must be a non-empty string")
    credential_scope(date, region, service)  # validates the parts
    key = _hmac(("AWS4" + secret).encode("utf-8"), date)
    for part in (region, service, SCOPE_TERMINATOR):
        key = _hmac(key, part)
    return key


def signature(key: bytes, text_to_sign: str) -> str:
    """Lowercase hex HMAC-SHA256 of the string to sign under the signing key."""
    return _hmac(key, text_to_sign).hex()


def amz_date(now: float) -> str:
    """X-Amz-Date for `now`, Unix seconds (anything else, a datetime included, is refused)."""
    if isinstance(now, bool) or not isinstance(now, (int, float)):
        raise SigV4Error("the signing time must be Unix seconds (a float)")
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime(AMZ_DATE_FORMAT)


def _split_target(url_or_path: str) -> tuple[str, str, str]:
    """(host or "", path, query) of `https://host/path?query` or `/path?query`."""
    if not isinstance(url_or_path, str) or _BAD_URL_CHARS.search(url_or_path):
        raise SigV4Error("URL must be a string without control characters or a fragment")
    if url_or_path.startswith("/"):
        path, _, query = url_or_path.partition("?")
        return "", path, query
    try:
        parts = urllib.parse.urlsplit(url_or_path)
    except ValueError:
        raise SigV4Error("URL must be https://host/path or an absolute path") from None
    if parts.scheme not in ("https", "http") or not parts.netloc or "@" in parts.netloc:
        raise SigV4Error("URL must be https://host/path or an absolute path")
    return parts.netloc, parts.path or "/", parts.query


def sign(method: str, url_or_path: str, headers, body: bytes, *, access_key: str,
         secret_key: str, session_token: str | None = None, region: str, service: str,
         now: float) -> dict[str, str]:
    """The headers to add to a request so that it carries a SigV4 signature made at `now`
    (Unix seconds).

    Returns `X-Amz-Date`, `Authorization`, `X-Amz-Security-Token` (signed) when a session token
    is given, and `Host` when `headers` has none and `url_or_path` is a full URL. Every header in
    `headers` is signed, so send exactly those (plus the returned ones) and the body given.
    """
    if not isinstance(access_key, str) or not _ACCESS_KEY.fullmatch(access_key):
        raise SigV4Error(f"access key id must be 1-{MAX_ACCESS_KEY_CHARS} letters and digits")
    if session_token is not None and (not isinstance(session_token, str)
                                      or not _SESSION_TOKEN.fullmatch(session_token)):
        raise SigV4Error("session token must be non-empty visible ASCII")
    if not isinstance(body, (bytes, bytearray)):
        raise SigV4Error("body must be bytes")
    when = amz_date(now)
    url_host, path, query = _split_target(url_or_path)
    pairs = _header_pairs(headers)
    given = {name.lower(): value for name, value in pairs}
    for name in RESERVED_HEADERS:
        if name in given:
            raise SigV4Error(f"header {name} is set by sign(), not by the caller")
    added: dict[str, str] = {}
    if "host" not in given:
        if not url_host:
            raise SigV4Error("a Host header or a full URL is required")
        added["Host"] = url_host
    elif url_host and given["host"].strip() != url_host:
        raise SigV4Error(f"Host header {given['host']!r} differs from the URL host {url_host!r}")
    added["X-Amz-Date"] = when
    if session_token is not None:
        added["X-Amz-Security-Token"] = session_token
    canonical, signed = _canonical_request(method, path, query, pairs + list(added.items()),
                                           hashlib.sha256(body).hexdigest())
    key = signing_key(secret_key, when[:8], region, service)
    proof = signature(key, string_to_sign(canonical, when, region, service))
    scope = credential_scope(when[:8], region, service)
    added["Authorization"] = (f"{ALGORITHM} Credential={access_key}/{scope}, "
                              f"SignedHeaders={signed}, Signature={proof}")
    return added
