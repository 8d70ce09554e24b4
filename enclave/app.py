"""The runtime object: holds the parts service.build_services makes, answers /healthz and /metrics,
and owns the route table of the HTTP API (docs/DESIGN.md §6)."""

from __future__ import annotations

import logging
import threading
import time

from .config import Settings
from .metrics import Metrics
from .request import Request
from .server import JSON_TYPE, Router, json_bytes

log = logging.getLogger(__name__)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WATERMARK_MAX_BODY_BYTES = 1024 * 1024  # docs/DESIGN.md §5: watermark bodies up to 1 MiB


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
        self._announced_ready = False
        self._readiness_lock = threading.Lock()
        self._health_cache = None  # (key, status, body, state); replaced whole, never mutated
        metrics.describe("enclave_uptime_seconds", "gauge", "Seconds since the runtime started")
        metrics.gauge_fn("enclave_uptime_seconds", lambda: time.monotonic() - self.started)

    # -- /healthz -----------------------------------------------------------------------
    def health(self, ready: bool | None = None) -> dict:
        store_health = self.store.health() if self.store else {}
        attestation = self.attestation.health() if self.attestation else {"source": None}
        secrets = store_health.get("secrets", {"received": False, "version": 0, "updated_at": None})
        mtls = store_health.get("mtls", {"configured": False, "not_after": None})
        degraded = not (self.ready() if ready is None else ready)  # as ?ready=1 judges
        return {
            "status": "degraded" if degraded else "ok",
            "mode": self.settings.mode,
            "env": self.settings.env,
            "missing": self.missing(),
            "secrets": secrets,
            "mtls": mtls,
            "attestation": attestation,
            "uptime_s": int(time.monotonic() - self.started),
        }

    def _attestation_ready(self) -> bool:
        return bool(self.attestation and self.attestation.ready())

    def note_readiness(self) -> None:
        """Log `ready` once, the first time everything the configuration needs is usable, and
        say what is still missing until then (names only, never values)."""
        with self._readiness_lock:  # the listener thread and start-up may both call this
            if self._announced_ready:
                return
            missing = self.missing()
            if self.ready():
                self._announced_ready = True
                log.info("ready: every part this configuration needs is usable")
            elif missing:
                log.info("not ready yet: waiting for %s", ", ".join(missing))

    def missing(self) -> list[str]:
        """The parts the configuration needs that are not usable now (ENCLAVE_READY_REQUIRES,
        and always an RPC secret): the names RPCs answer in 503 not_ready."""
        missing = []
        if not (self.authenticator and self.authenticator.has_secret(time.time())):
            missing.append("rpc_secret")
        if self.store:
            missing += self.store.missing(self.settings.ready_requires)
        return missing

    def ready(self) -> bool:
        """?ready=1: attestation usable, nothing missing, and secrets received (a delivery was
        accepted or, locally, the environment supplied them)."""
        return (bool(self.store and self.store.ready()) and self._attestation_ready()
                and not self.missing())

    def healthz(self, req: Request):
        """The answer is rebuilt only when what it shows changes: the secrets state (every
        accepted delivery), readiness, or the uptime second. Probes poll this endpoint hard."""
        want_ready = req.query.get("ready", ["0"])[-1] in ("1", "true")
        ready = self.ready()
        # the store's state is an immutable snapshot replaced on every change: compare identity
        state = self.store.current() if self.store else None
        key = (want_ready, ready, int(time.monotonic() - self.started),
               self.store.bundle_version if self.store else None)
        cached = self._health_cache
        if cached is not None and cached[0] == key and cached[3] is state:
            return cached[1], JSON_TYPE, cached[2]
        body = self.health(ready)
        status = 200
        if want_ready:
            body["ready"] = ready
            status = 200 if ready else 503
        data = json_bytes(body)
        self._health_cache = (key, status, data, state)
        return status, JSON_TYPE, data

    def metrics_text(self, req: Request):
        return 200, METRICS_CONTENT_TYPE, self.metrics.render().encode("utf-8")

    def close(self) -> None:
        for close in self.closers:
            try:
                close()
            except Exception:  # one failing closer must not keep the others open
                log.exception("error while closing %r", close)

    # -- routes --------------------------------------------------------------------------
    def router(self) -> Router:
        r = Router()
        r.add("GET", "/healthz", self.healthz, raw=True, head=True)
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
