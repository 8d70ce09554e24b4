"""Google OAuth on behalf of the host (docs/DESIGN.md §9): exchange, refresh, revoke.

The raw refresh token never leaves the enclave: the host only ever holds it sealed
(enclave.sealing). Tokens are sealed under the keyring's current key and opened under any key it
holds; `refresh` hands back a token sealed under the current key whenever the one it was given
is v1 or names a previous key (or Google rotated the refresh token), so clients migrate before an
old key is dropped. Codes, tokens, the client secret, keys and sealed values are never logged
(key ids are not secret).

Errors are enclave.errors classes, each with its status and code (the server answers them):
    request validation            -> 400 invalid_request
    Google 400 {"error": CODE}    -> 400 CODE (invalid_grant, redirect_uri_mismatch, ...)
    Google 401 / invalid_client   -> 502 upstream_auth_failed
    Google 5xx, other statuses    -> 502 upstream_error (+ upstream_status); the body of a
                                     non-2xx answer is read leniently: unreadable = no code
    200 not strict JSON, no token -> 502 upstream_invalid_response
    refresh token over the sealing limit -> 502 upstream_invalid_response (see _seal_refresh)
    unreachable / TLS / deadline  -> 502 upstream_unavailable / 502 upstream_tls_error /
                                     504 upstream_timeout, raised by the outbound client
    no client credentials yet     -> 503 not_ready (missing: google_credentials)
    no sealing key yet            -> 503 not_ready (missing: sealing_key)
    sealed token does not unseal  -> 400 invalid_sealed_token (altered, other client, key gone)
Nothing is retried at this level (an invalid_grant is final); the HTTP client only resends a
request that a stale keep-alive connection never delivered.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Callable
from urllib.parse import urlsplit

from . import sealing
from .errors import (GoogleOAuthNotConfigured, InvalidRequest, InvalidSealedToken,
                     TokenSealingNotConfigured, UpstreamAuthFailed, UpstreamError,
                     UpstreamInvalidResponse, UpstreamRejected)
from .metrics import UPSTREAM_SECONDS
from .outbound import OutboundClient, Response

log = logging.getLogger(__name__)

OUTCOME_METRIC = "enclave_google_oauth_total"
MAX_CODE_CHARS = 2048  # Google codes are ~70 characters
MAX_REDIRECT_URI_CHARS = 2048
MAX_TOKEN_CHARS = 4096  # access tokens can be long-ish (~200); refresh tokens ~100
MAX_DESCRIPTION_CHARS = 200  # Google's error_description, passed on to the host when printable
_VERIFIER_RE = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 section 4.1
_ERROR_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PRINTABLE_RE = re.compile(r"[ -~]*")


def _field(data: dict, name: str, limit: int, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"{name} is required")
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise InvalidRequest(f"{name} must be at most {limit} characters")
    if not _PRINTABLE_RE.fullmatch(value) or " " in value:
        raise InvalidRequest(
            f"{name} must be printable ASCII without spaces")
    return value


def _only(data: dict, allowed: tuple[str, ...]) -> None:
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise InvalidRequest(
            f"unexpected field {extra[0]!r}; allowed: {', '.join(allowed)}")


def _redirect_uri(data: dict) -> str:
    value = _field(data, "redirect_uri", MAX_REDIRECT_URI_CHARS)
    if value == "postmessage":  # Google Identity Services popup flow
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(
            "redirect_uri must be an http(s) URL with a host (or 'postmessage')")
    return value


class GoogleOAuth:
    """The three RPC handlers: each takes a Request, returns (status, dict) or raises ApiError."""

    def __init__(self, credentials_fn: Callable[[], tuple[str, str] | None],
                 keyring_fn: Callable[[], sealing.Keyring | None], client: OutboundClient,
                 token_url: str, revoke_url: str, metrics=None, *,
                 timeout_s: float | None = None):
        self._credentials_fn = credentials_fn
        self._keyring_fn = keyring_fn
        self._client = client
        self.token_url = token_url
        self.revoke_url = revoke_url
        self._metrics = metrics
        self._timeout_s = timeout_s  # None: the client's deadline (10 s)
        if metrics is not None:
            metrics.describe(UPSTREAM_SECONDS, "histogram", "Latency of upstream calls, by upstream")
            metrics.describe(OUTCOME_METRIC, "counter",
                             "Google OAuth operations, by operation and outcome")

    # -- shared steps ------------------------------------------------------------------------
    def _credentials(self) -> tuple[str, str]:
        creds = self._credentials_fn()
        if not creds or not creds[0] or not creds[1]:
            raise GoogleOAuthNotConfigured(
                "Google OAuth client credentials have not been delivered yet")
        return creds[0], creds[1]

    def _keyring(self) -> sealing.Keyring:
        """The keyring in force, taken once per request (a rotation mid-request cannot mix)."""
        keyring = self._keyring_fn()
        if keyring is None:
            raise TokenSealingNotConfigured("the token sealing key has not been delivered yet")
        return keyring

    def _count(self, operation: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.inc(OUTCOME_METRIC, {"operation": operation, "outcome": outcome})

    def _failed(self, operation: str, exc: UpstreamError) -> UpstreamError:
        """Count and log an upstream failure (its code is the metric outcome); returns it."""
        self._count(operation, exc.code)
        log.warning("Google %s failed: %s: %s", operation, exc.code, exc.message)
        return exc

    def _post(self, operation: str, upstream: str, url: str, form: dict) -> Response:
        started = time.monotonic()
        try:
            return self._client.post_form(url, form, timeout=self._timeout_s)
        except UpstreamError as exc:  # raised with its status and code by the outbound client
            self._failed(operation, exc)
            raise
        finally:
            if self._metrics is not None:
                self._metrics.observe(UPSTREAM_SECONDS, time.monotonic() - started,
                                      {"upstream": upstream})

    def _upstream_error(self, operation: str, response: Response) -> UpstreamError:
        """The error for a non-200 Google answer (the one mapping table, see the docstring).

        The body is read leniently: an unreadable one (HTML from a proxy, or a hostile 100k-deep
        JSON) only means there is no Google code, and the status decides.
        """
        body = response.json()
        code = body.get("error") if isinstance(body, dict) else None
        code = code if isinstance(code, str) and _ERROR_CODE_RE.fullmatch(code) else None
        description = body.get("error_description") if isinstance(body, dict) else None
        log.warning("Google %s answered %d (%s)", operation, response.status, code or "no code")
        if response.status == 401 or code in ("invalid_client", "unauthorized_client"):
            return self._failed(operation, UpstreamAuthFailed(
                "Google refused the enclave's OAuth client credentials"))
        if response.status == 400 and code:
            self._count(operation, code)
            message = f"Google refused the request ({code})"
            if (isinstance(description, str) and description
                    and len(description) <= MAX_DESCRIPTION_CHARS
                    and _PRINTABLE_RE.fullmatch(description)):
                message += f": {description}"
            return UpstreamRejected(code, message)
        return self._failed(operation, UpstreamError(
            f"Google answered HTTP {response.status}", upstream_status=response.status))

    def _token_answer(self, operation: str, response: Response, client_id: str,
                      keyring: sealing.Keyring, reseal: str | None = None) -> tuple[int, dict]:
        """The answer to the host. A refresh token from Google is sealed; without one, `reseal`
        (the refresh token the host sent, when it was not sealed under the current key) is."""
        if response.status != 200:
            raise self._upstream_error(operation, response)
        try:
            body = response.json_strict("Google")
            if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
                raise UpstreamInvalidResponse("Google's token answer has no access_token")
        except UpstreamInvalidResponse as exc:
            raise self._failed(operation, exc) from None
        answer = {"access_token": body["access_token"]}
        for name, kind in (("expires_in", int), ("token_type", str), ("scope", str),
                           ("id_token", str), ("refresh_token_expires_in", int)):
            value = body.get(name)
            if isinstance(value, kind) and not isinstance(value, bool):
                answer[name] = value
        refresh_token = body.get("refresh_token")
        if not (isinstance(refresh_token, str) and refresh_token):
            refresh_token = reseal
        if refresh_token is not None:
            answer["sealed_refresh_token"] = self._seal_refresh(operation, keyring,
                                                                refresh_token, client_id)
        self._count(operation, "ok")
        log.info("Google %s succeeded (refresh token sealed: %s)", operation,
                 f"yes, key {keyring.current_kid}" if "sealed_refresh_token" in answer else "no")
        return 200, answer

    def _seal_refresh(self, operation: str, keyring: sealing.Keyring, refresh_token: str,
                      client_id: str) -> str:
        """Seal Google's refresh token, or fail loudly: never a 200 that silently drops it.

        sealing.MAX_TOKEN_BYTES (4 KiB) is 8x the 512 bytes Google documents, so this should
        never trigger. If it does, the grant cannot be kept (the single-use code is spent): the
        answer is 502 upstream_invalid_response saying so, the log says it too (sizes only,
        never the token), and the token is revoked at Google, best effort, so no grant is left
        that nobody holds (Google would otherwise omit the refresh token on the next consent).
        """
        size = len(refresh_token.encode("utf-8"))
        if size <= sealing.MAX_TOKEN_BYTES:
            return sealing.seal(keyring, refresh_token, client_id)
        log.error("Google %s: the refresh token is %d bytes, over the sealing limit of %d "
                  "bytes; the grant cannot be kept and is revoked, the user must consent "
                  "again", operation, size, sealing.MAX_TOKEN_BYTES)
        try:
            revoked = self._post("revoke", "google_revoke", self.revoke_url,
                                 {"token": refresh_token}).status == 200
        except UpstreamError:
            revoked = False
        log.warning("Google %s: revoking the oversized grant %s", operation,
                    "succeeded" if revoked else "failed")
        raise self._failed(operation, UpstreamInvalidResponse(
            f"Google's refresh token is {size} bytes, over the sealing limit of "
            f"{sealing.MAX_TOKEN_BYTES} bytes; the grant could not be kept (it was "
            f"{'revoked' if revoked else 'not revoked'}): ask the user to consent again"))

    def _unseal(self, keyring: sealing.Keyring, sealed: str, client_id: str) -> str:
        try:
            token, kid = sealing.unseal(keyring, sealed, client_id)
        except sealing.SealingError as exc:
            # SealingError messages name no key or token; a kid is not secret.
            raise InvalidSealedToken(
                f"sealed_refresh_token does not unseal under this enclave's keys and client: "
                f"{exc}") from None
        if kid != keyring.current_kid:
            log.info("Opened a refresh token sealed under a previous key (%s)", kid)
        return token

    # -- handlers ----------------------------------------------------------------------------
    def exchange(self, req) -> tuple[int, dict]:
        """{"code", "redirect_uri", "code_verifier"?} -> access token + sealed refresh token."""
        data = req.json()
        _only(data, ("code", "redirect_uri", "code_verifier"))
        code = _field(data, "code", MAX_CODE_CHARS)
        redirect_uri = _redirect_uri(data)
        verifier = data.get("code_verifier")
        if verifier is not None and (not isinstance(verifier, str)
                                     or not _VERIFIER_RE.fullmatch(verifier)):
            raise InvalidRequest(
                "code_verifier must be 43-128 characters of A-Z a-z 0-9 - . _ ~")
        client_id, client_secret = self._credentials()
        # Checked before Google is called: a refresh token that cannot be sealed would be lost
        # together with the (single-use) code.
        keyring = self._keyring()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "client_id": client_id, "client_secret": client_secret}
        if verifier is not None:
            form["code_verifier"] = verifier
        response = self._post("exchange", "google_token", self.token_url, form)
        return self._token_answer("exchange", response, client_id, keyring)

    def refresh(self, req) -> tuple[int, dict]:
        """{"sealed_refresh_token"} -> a new access token, and `sealed_refresh_token` when Google
        rotated the refresh token or the one given was not sealed under the current key."""
        data = req.json()
        _only(data, ("sealed_refresh_token",))
        sealed = _field(data, "sealed_refresh_token", sealing.MAX_SEALED_CHARS)
        client_id, client_secret = self._credentials()
        keyring = self._keyring()
        refresh_token = self._unseal(keyring, sealed, client_id)
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
                "client_id": client_id, "client_secret": client_secret}
        response = self._post("refresh", "google_token", self.token_url, form)
        reseal = refresh_token if sealing.needs_reseal(keyring, sealed) else None
        return self._token_answer("refresh", response, client_id, keyring, reseal)

    def revoke(self, req) -> tuple[int, dict]:
        """{"sealed_refresh_token"} or {"token"} -> {"revoked": true[, "already_invalid": true]}."""
        data = req.json()
        _only(data, ("sealed_refresh_token", "token"))
        if ("sealed_refresh_token" in data) == ("token" in data):
            raise InvalidRequest(
                "give exactly one of sealed_refresh_token and token")
        client_id, _ = self._credentials()
        if "token" in data:
            token = _field(data, "token", MAX_TOKEN_CHARS)
        else:
            sealed = _field(data, "sealed_refresh_token", sealing.MAX_SEALED_CHARS)
            token = self._unseal(self._keyring(), sealed, client_id)
        response = self._post("revoke", "google_revoke", self.revoke_url, {"token": token})
        if response.status == 200:
            self._count("revoke", "ok")
            log.info("Google revoke succeeded")
            return 200, {"revoked": True}
        body = response.json()
        if (response.status == 400 and isinstance(body, dict)
                and body.get("error") == "invalid_token"):
            self._count("revoke", "already_invalid")
            log.info("Google revoke: token was already invalid")
            return 200, {"revoked": True, "already_invalid": True}
        raise self._upstream_error("revoke", response)
