"""The root exception and the errors an HTTP handler raises to answer with a JSON error.

Each ApiError subclass carries its HTTP status and snake_case code as class attributes (the
model is h11's `error_status_hint`), so the one place that turns an error into an answer is the
server (`status`, `code`, `message`, `headers`, `body()`), and no caller maps a failure twice.

Upstream failures (Google, the watermark service, and any later client such as KMS) share one
vocabulary, the UpstreamError family:

    UpstreamError            502 upstream_error            a non-2xx answer we do not map
    UpstreamUnavailable      502 upstream_unavailable      connect refused/reset, broken stream
    UpstreamTLSError         502 upstream_tls_error        handshake or certificate failure
    UpstreamTimeout          504 upstream_timeout          the per-request deadline passed
    UpstreamInvalidResponse  502 upstream_invalid_response malformed, unparseable, oversized
    UpstreamAuthFailed       502 upstream_auth_failed      the upstream refused OUR credentials

enclave.outbound raises these directly (its OutboundError is UpstreamError), so a handler lets
them propagate. README.md's error table lists every code the HTTP API answers.
"""

from __future__ import annotations


class EnclaveError(Exception):
    """Root of every error this package raises on purpose."""


class ApiError(EnclaveError):
    """An answer to the client: HTTP status, snake_case code and a human sentence.

    `ApiError(status, code, message)` builds any answer; the subclasses below fix `status` and
    `code` on the class and take only the message. The message is sent to the client, so it
    must never contain a secret value.
    """

    status: int = 500
    code: str = "internal_error"

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class ClassifiedError(ApiError):
    """An ApiError whose class says its status and code; only the message varies."""

    def __init__(self, message: str, *, headers: dict | None = None):
        super().__init__(type(self).status, type(self).code, message, headers)


# -- 400: the caller can fix the request ------------------------------------------------------
class InvalidRequest(ClassifiedError):
    status, code = 400, "invalid_request"


class InvalidSealedToken(ClassifiedError):
    status, code = 400, "invalid_sealed_token"


class UpstreamRejected(ApiError):
    """The upstream refused the request for a reason the caller can fix; its own code is passed
    on (Google's `invalid_grant`, `redirect_uri_mismatch`, ...)."""

    status = 400

    def __init__(self, code: str, message: str):
        super().__init__(type(self).status, code, message)


# -- 503: a secret or setting has not been delivered yet --------------------------------------
class NotReady(ClassifiedError):
    """503 not_ready: what the route needs has not arrived over the secrets channel yet.

    `missing` names the parts, in the vocabulary of /healthz and ENCLAVE_READY_REQUIRES:
    rpc_secret, sealing_key, google_credentials, mtls (certificates and endpoint).
    """

    status, code = 503, "not_ready"
    missing: tuple[str, ...] = ()

    def __init__(self, message: str, *, missing: tuple[str, ...] | None = None):
        super().__init__(message)
        if missing is not None:
            self.missing = tuple(missing)

    def body(self) -> dict:
        body = super().body()
        body["error"]["missing"] = list(self.missing)
        return body


class RpcSecretNotReady(NotReady):
    missing = ("rpc_secret",)


class GoogleOAuthNotConfigured(NotReady):
    missing = ("google_credentials",)


class TokenSealingNotConfigured(NotReady):
    missing = ("sealing_key",)


class MtlsNotConfigured(NotReady):
    missing = ("mtls",)


class WatermarkEndpointNotConfigured(NotReady):
    missing = ("mtls",)  # the endpoint travels with the certificates (ECS_WATERMARK_ENDPOINT)


# -- 502/504: the upstream failed -------------------------------------------------------------
class UpstreamError(ClassifiedError):
    """Root of every upstream failure; raised as itself for a non-2xx answer we do not map.

    `upstream_status` (when known) goes to the `X-Upstream-Status` header and to the body's
    `error.upstream_status`.
    """

    status, code = 502, "upstream_error"

    def __init__(self, message: str, *, upstream_status: int | None = None,
                 headers: dict | None = None):
        headers = dict(headers or {})
        if upstream_status is not None:
            headers["X-Upstream-Status"] = str(upstream_status)
        super().__init__(message, headers=headers)
        self.upstream_status = upstream_status

    def body(self) -> dict:
        body = super().body()
        if self.upstream_status is not None:
            body["error"]["upstream_status"] = self.upstream_status
        return body


class UpstreamUnavailable(UpstreamError):
    """Could not connect, the connection broke, or no complete answer arrived."""

    code = "upstream_unavailable"


class UpstreamTLSError(UpstreamError):
    """The TLS handshake failed: untrusted certificate, wrong host name, refused client cert."""

    code = "upstream_tls_error"


class UpstreamTimeout(UpstreamError):
    """The per-request deadline passed."""

    status, code = 504, "upstream_timeout"


class UpstreamInvalidResponse(UpstreamError):
    """The answer is malformed: not HTTP, too large, not strict JSON, or missing fields."""

    code = "upstream_invalid_response"


class EgressNotRouted(UpstreamError):
    """staging/production: the upstream host has no ENCLAVE_EGRESS_ROUTES route, so no
    connection was attempted (an enclave has no direct network; nothing falls back to TCP)."""

    status, code = 502, "egress_not_routed"


class UpstreamAuthFailed(UpstreamError):
    """The upstream refused the enclave's own credentials (Google 401 invalid_client)."""

    code = "upstream_auth_failed"
