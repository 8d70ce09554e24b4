"""The runtime's parts wired together, and the route table of the HTTP API (DESIGN.md §6)."""

from __future__ import annotations

import time

from .config import Settings
from .metrics import Metrics
from .request import Request
from .server import Router

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WATERMARK_MAX_BODY_BYTES = 1024 * 1024  # DESIGN §5: watermark bodies up to 1 MiB


class Runtime:
    """Holds the parts (attestation, secret store, RPC services) and answers /healthz, /metrics."""

    def __init__(self, settings: Settings, *, metrics: Metrics, attestation=None, store=None,
                 google=None, watermark=None, authenticator=None, closers=()):
        self.settings = settings
        self.metrics = metrics
        self.attestation = attestation  # enclave.attestation.AttestationService
        self.store = store  # enclave.secretstore.SecretStore
        self.google = google  # enclave.google.GoogleOAuth
        self.watermark = watermark  # enclave.watermark.WatermarkService
        self.authenticator = authenticator  # enclave.rpcauth.RpcAuthenticator
        self.closers = list(closers)  # release pooled connections and devices on stop
        self.started = time.monotonic()
        metrics.gauge_fn("enclave_uptime_seconds", lambda: time.monotonic() - self.started)

    # -- /healthz -----------------------------------------------------------------------
    def health(self) -> dict:
        store_health = self.store.health() if self.store else {}
        attestation = self.attestation.health() if self.attestation else {"source": None}
        secrets = store_health.get("secrets", {"received": False, "version": 0, "updated_at": None})
        mtls = store_health.get("mtls", {"configured": False, "not_after": None})
        degraded = not self.ready()  # the same judgement as ?ready=1
        return {
            "status": "degraded" if degraded else "ok",
            "mode": self.settings.mode,
            "env": self.settings.env,
            "secrets": secrets,
            "mtls": mtls,
            "attestation": attestation,
            "uptime_s": round(time.monotonic() - self.started, 3),
        }

    def _attestation_ready(self) -> bool:
        return bool(self.attestation and self.attestation.ready())

    def ready(self) -> bool:
        return bool(self.store and self.store.ready()) and self._attestation_ready()

    def healthz(self, req: Request):
        body = self.health()
        if req.query.get("ready", ["0"])[-1] in ("1", "true"):
            body["ready"] = self.ready()
            return (200 if body["ready"] else 503), body
        return 200, body

    def metrics_text(self, req: Request):
        return 200, METRICS_CONTENT_TYPE, self.metrics.render().encode("utf-8")

    def close(self) -> None:
        for close in self.closers:
            close()

    # -- routes --------------------------------------------------------------------------
    def router(self) -> Router:
        r = Router()
        r.add("GET", "/healthz", self.healthz)
        r.add("GET", "/metrics", self.metrics_text, raw=True)
        if self.attestation:
            r.add("GET", "/v1/attestation/document", self.attestation.document)
            r.add("POST", "/v1/attestation/challenge", self.attestation.challenge_json, raw=True)
        if self.google:
            r.add("POST", "/v1/rpc/google/token/exchange", self.google.exchange, auth=True)
            r.add("POST", "/v1/rpc/google/token/refresh", self.google.refresh, auth=True)
            r.add("POST", "/v1/rpc/google/token/revoke", self.google.revoke, auth=True)
        if self.watermark:
            r.add("POST", "/v1/rpc/watermark", self.watermark.handle, auth=True,
                  max_body=WATERMARK_MAX_BODY_BYTES)
        return r
