"""POST /v1/rpc/watermark: forward to the ECS watermark service over mTLS, sign the result.

The mTLS context comes from the secret store as an immutable snapshot per call. Connections are
pooled per context generation: after a rotation no pooled connection of the old context is
reused, while requests in flight on it finish normally (their connections are then closed).
The answer is {"result": <upstream JSON>, "signature": <base64 COSE_Sign1>} signed by the attested
identity over {"intent": "watermark/v1", "timestamp_ms", "request_sha256", "response_sha256"}
(see enclave.identity for how the digests are computed).

Errors are enclave.errors classes (each carries its status and code): MtlsNotConfigured and
WatermarkEndpointNotConfigured are 503 not_ready (missing: mtls); the upstream family from the outbound client as raised;
a non-2xx answer is UpstreamError 502 with its status; an answer that is not strict JSON
(outbound.parse_json) is UpstreamInvalidResponse 502. The metric outcome is the error code.
"""

from __future__ import annotations

import base64
import logging
import threading
import time

from .errors import (ApiError, MtlsNotConfigured, UpstreamError,
                     WatermarkEndpointNotConfigured)
from .identity import SigningIdentity
from .nitro.claims import INTENT_WATERMARK, canonical_json, sha256
from .metrics import UPSTREAM_SECONDS
from .outbound import OutboundClient, parse_json
from .request import Request

log = logging.getLogger(__name__)

UPSTREAM_TIMEOUT_S = 10.0  # docs/DESIGN.md §5: an upstream that takes longer answers 504


class WatermarkService:
    def __init__(self, store, identity: SigningIdentity, connector, metrics, *, path: str,
                 timeout_s: float = UPSTREAM_TIMEOUT_S, clock=time.time):
        self.store = store
        self.identity = identity
        self.connector = connector
        self.metrics = metrics
        self.path = path
        self.timeout_s = timeout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._generation = None
        self._client: OutboundClient | None = None
        metrics.describe("enclave_watermark_requests_total", "counter",
                         "watermark RPCs by outcome")
        metrics.describe(UPSTREAM_SECONDS, "histogram", "Latency of upstream calls, by upstream")

    def _client_for(self, snapshot):
        """(pool, snapshot) for the newest context; an older pool is retired, never reused.

        A request holding a snapshot older than the pool in use (it read the store just before
        a swap) takes the newer one instead: the pool never moves back to a retired context.
        """
        with self._lock:
            if self._generation is not None and snapshot.generation < self._generation:
                snapshot = self.store.mtls()
            if not snapshot.configured or not snapshot.endpoint:
                if self._client is not None:  # cleared: no idle connection keeps the old cert
                    self._client.close()
                    self._client, self._generation = None, snapshot.generation
                return None, snapshot
            if self._generation != snapshot.generation or self._client is None:
                old = self._client
                self._client = OutboundClient(self.connector, context=snapshot.context,
                                              timeout_s=self.timeout_s)
                self._generation = snapshot.generation
                if old is not None:
                    old.close()
            return self._client, snapshot

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None

    def _fail(self, exc: ApiError) -> ApiError:
        self.metrics.inc("enclave_watermark_requests_total", {"outcome": exc.code})
        return exc

    def _check_configured(self, snapshot) -> None:
        if not snapshot.configured:
            raise self._fail(MtlsNotConfigured("client certificates have not been delivered yet"))
        if not snapshot.endpoint:
            raise self._fail(WatermarkEndpointNotConfigured(
                "ECS_WATERMARK_ENDPOINT has not been delivered yet"))

    def handle(self, req: Request):
        client, snapshot = self._client_for(self.store.mtls())
        if client is None:  # not delivered yet, or cleared (its pool is then closed)
            self._check_configured(snapshot)
        req.json()  # the body must be a JSON object (400 otherwise); forwarded byte for byte
        url = snapshot.endpoint.rstrip("/") + self.path
        started = time.perf_counter()
        try:
            try:
                response = client.request("POST", url, req.body,
                                          {"Content-Type": "application/json"})
            finally:
                self.metrics.observe(UPSTREAM_SECONDS, time.perf_counter() - started,
                                     {"upstream": "watermark"})
            if not 200 <= response.status < 300:
                raise UpstreamError(f"the watermark service answered HTTP {response.status}",
                                    upstream_status=response.status)
            result = parse_json(response.body, "the watermark service")
        except UpstreamError as exc:  # raised with its status and code: only counted and logged
            log.warning("watermark upstream failed: %s: %s", exc.code, exc.message)
            self._fail(exc)
            raise
        claims = {
            "intent": INTENT_WATERMARK,
            "timestamp_ms": int(self.clock() * 1000),
            "request_sha256": sha256(req.body),
            "response_sha256": sha256(canonical_json(result)),
        }
        signature = self.identity.sign_claims(claims)
        self.metrics.inc("enclave_watermark_requests_total", {"outcome": "ok"})
        return 200, {"result": result, "signature": base64.b64encode(signature).decode("ascii")}
