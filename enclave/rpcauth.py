"""Host -> enclave RPC authentication: HMAC-SHA256 over the request, a skew window, a replay cache.

docs/DESIGN.md §7. The check is a trust core: it takes headers, body bytes and `now` and does no
I/O. The server calls it in two steps so that it can refuse before reading a body:

    pending = auth.precheck(method, target, headers, now)   # (1)-(3): headers, formats, skew
    body = read exactly Content-Length bytes
    auth.finish(pending, body, now)                        # (4)-(5): MAC, then the nonce

Both raise AuthError (one type, one 401 answer; the reason is only for logs and metrics).
A full replay cache raises ReplayCacheFull (503): the request is never accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets as _secrets
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .errors import ApiError, RpcSecretNotReady

log = logging.getLogger(__name__)

# Published in the docs: accepted only when ALFRED_ENV=local and both listeners are on loopback.
LOCAL_DEFAULT_RPC_SECRET = "local-dev-enclave-rpc-secret"

SCHEME = "ENCLAVE-HMAC-SHA256"
SIGNATURE_VERSION = "v1"
HEADER_TIMESTAMP = "X-Enclave-Timestamp"
HEADER_NONCE = "X-Enclave-Nonce"
HEADER_SIGNATURE = "X-Enclave-Signature"
HEADERS = (HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22,64}")
SIGNATURE_RE = re.compile(r"v1=([0-9a-f]{64})")
NONCE_BYTES = 16  # 128 random bits -> 22 base64url characters, the minimum the format allows

# Nonces live 2 x skew (60 s at the default 30 s skew). 65,536 of them allow a sustained ~1,000
# signed requests/s at the default skew for about 7 MB at most (~110 B per nonce); beyond that
# the cache refuses (503) rather than forget a nonce that could still be replayed.
REPLAY_CACHE_CAPACITY = 65_536

AUTH_FAILURES_METRIC = "enclave_rpc_auth_failures_total"
_FAILURE_MESSAGE = "request authentication failed"


class AuthError(ApiError):
    """Any authentication failure. The answer is always the same 401; `reason` is for logs only."""

    def __init__(self, reason: str):
        super().__init__(401, "unauthorized", _FAILURE_MESSAGE)
        self.reason = reason

    def __repr__(self) -> str:
        return f"AuthError({self.reason!r})"


class ReplayCacheFull(ApiError):
    """The replay cache is at capacity: answer 503 and never accept the request."""

    RETRY_AFTER_S = 1

    def __init__(self):
        super().__init__(503, "replay_cache_full",
                         "too many signed requests in the replay window; retry shortly",
                         headers={"Retry-After": str(self.RETRY_AFTER_S)})


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def string_to_sign(method: str, target: str, timestamp: int | str, nonce: str,
                   body: bytes) -> str:
    """The signed string (section 7): six lines joined by `\\n`, no trailing newline."""
    return "\n".join((SCHEME, method, target, str(timestamp), nonce, body_sha256(body)))


def _mac(secret: str, text: str) -> bytes:
    return hmac.new(secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).digest()


def new_nonce() -> str:
    return _secrets.token_urlsafe(NONCE_BYTES)


def sign_request(secret: str, method: str, target: str, body: bytes, timestamp: int,
                 nonce: str) -> dict[str, str]:
    """The three X-Enclave-* headers for one request (clients, tests, probe, `sign`)."""
    mac = _mac(secret, string_to_sign(method, target, timestamp, nonce, body))
    return {
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: f"{SIGNATURE_VERSION}={mac.hex()}",
    }


@dataclass(frozen=True)
class PendingAuth:
    """What precheck() parsed; nothing in it is trusted until finish() checks the MAC."""

    method: str
    target: str
    unverified_timestamp: int
    unverified_nonce: str
    unverified_mac: bytes


def _header_values(headers, name: str) -> list[str]:
    """Every value of `name` (case-insensitive) from an email.message.Message or a mapping."""
    if hasattr(headers, "get_all"):
        values = headers.get_all(name) or []
    else:
        lowered = name.lower()
        values = []
        for key, value in headers.items():
            if key.lower() == lowered:
                values.extend(value if isinstance(value, (list, tuple)) else [value])
    return [str(v).strip(" \t") for v in values]


class ReplayCache:
    """Nonces seen in the last `ttl_s` seconds, bounded. Expiry in one-second buckets.

    Time may step backwards (tests, clock adjustments): a nonce then stays a little longer,
    never shorter.
    """

    def __init__(self, ttl_s: float, capacity: int):
        if capacity < 1:
            raise ValueError("replay cache capacity must be at least 1")
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._seen: set[str] = set()
        self._buckets: deque[tuple[int, list[str]]] = deque()  # (expiry second, nonces)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def _evict(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now:
            _, nonces = self._buckets.popleft()
            self._seen.difference_update(nonces)

    def add(self, nonce: str, now: float) -> None:
        """Record `nonce`; AuthError('replay') if seen, ReplayCacheFull if at capacity."""
        expiry = int(now + self.ttl_s) + 1
        with self._lock:
            self._evict(now)
            if nonce in self._seen:
                raise AuthError("replay")
            if len(self._seen) >= self.capacity:
                raise ReplayCacheFull()
            self._seen.add(nonce)
            if self._buckets and expiry <= self._buckets[-1][0]:
                self._buckets[-1][1].append(nonce)
            else:
                self._buckets.append((expiry, [nonce]))


class RpcAuthenticator:
    """Checks signed host RPCs against the current (and, during rotation, previous) secret.

    `secrets_fn(now)` returns the secrets valid at `now`: the current one and, inside the
    rotation grace period, the previous one. The local default secret is dropped unless
    `allow_local_default_secret` is true (pass `settings.env == "local"`).
    """

    def __init__(self, secrets_fn: Callable[[float], list[str]], max_skew_s: int,
                 metrics=None, replay_capacity: int = REPLAY_CACHE_CAPACITY, *,
                 allow_local_default_secret: bool = False):
        if max_skew_s < 1:
            raise ValueError("max_skew_s must be at least 1 second")
        self._secrets_fn = secrets_fn
        self.max_skew_s = max_skew_s
        self._metrics = metrics
        self._allow_local_default = allow_local_default_secret
        self.replay_cache = ReplayCache(2 * max_skew_s, replay_capacity)
        if metrics is not None:
            metrics.describe(AUTH_FAILURES_METRIC, "counter",
                             "Signed RPC requests refused, by reason")

    def _fail(self, reason: str, method: str, target: str) -> AuthError:
        if self._metrics is not None:
            self._metrics.inc(AUTH_FAILURES_METRIC, {"reason": reason})
        # The path only: a query string is the caller's data.
        log.warning("RPC authentication failed (reason=%s) for %s %s",
                    reason, method, target.split("?", 1)[0])
        return AuthError(reason)

    def has_secret(self, now: float) -> bool:
        """Whether any request could authenticate now (readiness: `rpc_secret`)."""
        return bool(self._secrets(now))

    def _not_ready(self) -> RpcSecretNotReady:
        if self._metrics is not None:
            self._metrics.inc(AUTH_FAILURES_METRIC, {"reason": "not_ready"})
        return RpcSecretNotReady("no RPC shared secret has been delivered yet "
                                 "(ENCLAVE_RPC_SHARED_SECRET over the secrets channel)")

    def _one_header(self, headers, name: str, method: str, target: str) -> str:
        values = _header_values(headers, name)
        if not values:
            raise self._fail("missing_header", method, target)
        if len(values) > 1:
            raise self._fail("duplicate_header", method, target)
        return values[0]

    def precheck(self, method: str, target: str, headers, now: float) -> PendingAuth:
        """Steps (0)-(3), before the body is read. Returns PendingAuth or raises AuthError
        (or RpcSecretNotReady: no secret to check against)."""
        # (0) a secret to check against: without one no request can authenticate, and the
        # caller learns why (503 not_ready, as /healthz says) instead of a misleading 401.
        if not self._secrets(now):
            raise self._not_ready()
        # (1) exactly one of each header
        ts_text, nonce, sig_text = (self._one_header(headers, n, method, target) for n in HEADERS)
        # (2) strict formats
        if not TIMESTAMP_RE.fullmatch(ts_text):
            raise self._fail("malformed_timestamp", method, target)
        if not NONCE_RE.fullmatch(nonce):
            raise self._fail("malformed_nonce", method, target)
        match = SIGNATURE_RE.fullmatch(sig_text)
        if match is None:
            raise self._fail("malformed_signature", method, target)
        # (3) two-sided clock skew
        timestamp = int(ts_text)
        if now - timestamp > self.max_skew_s:
            raise self._fail("stale", method, target)
        if timestamp - now > self.max_skew_s:
            raise self._fail("future", method, target)
        return PendingAuth(method, target, timestamp, nonce, bytes.fromhex(match.group(1)))

    def _secrets(self, now: float) -> list[str]:
        out = []
        for secret in self._secrets_fn(now) or []:
            if not secret:
                continue
            if secret == LOCAL_DEFAULT_RPC_SECRET and not self._allow_local_default:
                continue
            out.append(secret)
        return out

    def finish(self, pending: PendingAuth, body: bytes, now: float) -> None:
        """Steps (4)-(5), after exactly Content-Length bytes were read. Raises or returns None."""
        method, target = pending.method, pending.target
        # (4) MAC against every valid secret, constant-time, on bytes
        secrets = self._secrets(now)
        if not secrets:  # cleared since the precheck
            raise self._not_ready()
        text = string_to_sign(method, target, pending.unverified_timestamp,
                              pending.unverified_nonce, body)
        valid = False
        for secret in secrets:
            valid |= hmac.compare_digest(_mac(secret, text), pending.unverified_mac)
        if not valid:
            raise self._fail("bad_signature", method, target)
        # (5) only a verified nonce enters the replay cache
        try:
            self.replay_cache.add(pending.unverified_nonce, now)
        except AuthError as exc:
            raise self._fail(exc.reason, method, target) from None
        except ReplayCacheFull:
            if self._metrics is not None:
                self._metrics.inc(AUTH_FAILURES_METRIC, {"reason": "replay_cache_full"})
            log.warning("RPC replay cache full (%d nonces); refusing %s %s",
                        self.replay_cache.capacity, method, target.split("?", 1)[0])
            raise

    def verify(self, method: str, target: str, headers, body: bytes, now: float) -> None:
        """precheck + finish in one call, for callers that already hold the body."""
        self.finish(self.precheck(method, target, headers, now), body, now)
