"""The secrets in force, and the one place that changes them.

`SecretStore.apply` runs under one lock: validate (enclave.secrets, pure) -> stage the
certificate files (enclave.certstore) -> build a NEW SSLContext from them (enclave.tls) ->
activate the files -> swap the references. Any failure before the swap refuses the delivery and
leaves the files, the context and the version as they were.

Readers never lock: `current()` and `mtls()` return immutable snapshots taken by reference, so a
reader holds either the old or the new context, never a half-built one.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit

from . import certstore, egress, sealing, secrets, tls
from .metrics import Metrics
from .secrets import (ECS_WATERMARK_ENDPOINT, ENCLAVE_RPC_SHARED_SECRET, ENCLAVE_TOKEN_SEALING_KEY,
                      GOOGLE_OAUTH_CLIENT_ID, GOOGLE_OAUTH_CLIENT_SECRET, MTLS_CLIENT_CERT_JSON,
                      SEALING_KEY_BYTES, Bundle, BundleRollback, Busy, EndpointNotRoutable,
                      InvalidCertificate, RequiredSecret, SecretsError, SecretsState, Stopping,
                      StorageFailed)

log = logging.getLogger(__name__)

# The readiness part (ENCLAVE_READY_REQUIRES, not_ready's `missing`) each delivery key serves.
PART_OF_KEY = {
    ENCLAVE_RPC_SHARED_SECRET: "rpc_secret",
    ENCLAVE_TOKEN_SEALING_KEY: "sealing_key",
    GOOGLE_OAUTH_CLIENT_ID: "google_credentials",
    GOOGLE_OAUTH_CLIENT_SECRET: "google_credentials",
    MTLS_CLIENT_CERT_JSON: "mtls",
    ECS_WATERMARK_ENDPOINT: "mtls",
}
HTTPS_PORT = 443
RPC_SECRET_GRACE_S = 300  # a rotated ENCLAVE_RPC_SHARED_SECRET stays valid this long (docs/DESIGN.md §4)
APPLY_LOCK_TIMEOUT_S = 10.0  # a second applier waits this long, then gets `busy`

M_DELIVERIES = "enclave_secrets_deliveries_total"
M_VERSION = "enclave_secrets_version"
M_MTLS_EXPIRY = "enclave_mtls_cert_expiry_timestamp_seconds"


@dataclass(frozen=True)
class MtlsSnapshot:
    """What a watermark call needs, taken once per call. `generation` changes on every swap of
    the context or the endpoint: a pooled connection from another generation is not reused."""

    context: ssl.SSLContext | None
    endpoint: str | None
    generation: int
    not_after: datetime | None

    @property
    def configured(self) -> bool:
        return self.context is not None


@dataclass(frozen=True)
class GoogleCredentials:
    client_id: str
    client_secret: str = field(repr=False)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def _iso_unix(seconds: float | None) -> str | None:
    return None if seconds is None else _iso(datetime.fromtimestamp(seconds, timezone.utc))


class SecretStore:
    """Holds the current SecretsState and the mTLS snapshot; applies deliveries one at a time."""

    def __init__(self, settings, metrics: Metrics | None = None, clock=None, *,
                 lock_timeout_s: float = APPLY_LOCK_TIMEOUT_S, sealed=None):
        """Initial values come from `settings` (environment; local). An invalid
        MTLS_CLIENT_CERT_JSON there raises SecretsError (the caller exits 2). The certs
        directory is settled first (certstore.recover): an update a crash interrupted in an
        earlier run leaves the old complete set or the new one, never a mix. `clock` is a
        zero-argument callable returning Unix seconds (default time.time).
        """
        self._settings = settings
        self._certs_dir = settings.certs_dir
        self._metrics = metrics or Metrics()
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._lock_timeout_s = lock_timeout_s
        self._received = threading.Event()
        self.on_applied: list = []  # called (no arguments) after each accepted delivery
        self.stopping = False  # set on SIGTERM: no delivery is applied from then on
        # ENCLAVE_SECRETS_SOURCE=kms: an enclave.sealed.SealedSecretsOpener; only sealed
        # envelopes are accepted, and the highest bundle_version applied since boot is kept.
        self._sealed = sealed
        self._bundle: Bundle | None = None  # the newest sealed bundle applied since boot
        self._describe_metrics()
        try:
            # A crash during an earlier run's update left the old or the new set; settle it.
            certstore.recover(self._certs_dir)
        except certstore.CertStoreError as exc:
            log.error("%s; the next certificate delivery will try again", exc)

        values = {
            ECS_WATERMARK_ENDPOINT: settings.ecs_watermark_endpoint,
            GOOGLE_OAUTH_CLIENT_ID: settings.google_client_id,
            GOOGLE_OAUTH_CLIENT_SECRET: settings.google_client_secret,
            ENCLAVE_RPC_SHARED_SECRET: settings.rpc_shared_secret,
            ENCLAVE_TOKEN_SEALING_KEY: settings.token_sealing_key,
        }
        if values[ENCLAVE_TOKEN_SEALING_KEY] is None and not settings.strict:
            # Generated per boot outside staging/production (docs/DESIGN.md §3).
            values[ENCLAVE_TOKEN_SEALING_KEY] = os.urandom(SEALING_KEY_BYTES)
        # Secrets the environment supplied (local): the runtime is usable without a delivery.
        self._env_supplied = any(v is not None for v in (
            settings.mtls_client_cert_json, settings.ecs_watermark_endpoint,
            settings.google_client_id, settings.google_client_secret))
        context = None
        if settings.mtls_client_cert_json is not None:
            try:
                material = secrets.validate_value(MTLS_CLIENT_CERT_JSON,
                                                  settings.mtls_client_cert_json, self._clock())
            except SecretsError as exc:
                raise type(exc)(f"MTLS_CLIENT_CERT_JSON from the environment: "
                                f"{exc.message}") from None
            values[MTLS_CLIENT_CERT_JSON] = material
            context = self._install_certificates(material)
            log.info("Loaded mTLS certificates from the environment (not after %s)",
                     _iso(material.not_after))
        self._state = secrets.initial_state(values)
        self._mtls = MtlsSnapshot(context, self._state.get(ECS_WATERMARK_ENDPOINT), 0,
                                  self._state.mtls_not_after)

    # --- readers (no lock: each returns one immutable snapshot) ---------------------------------

    def current(self) -> SecretsState:
        return self._state

    @property
    def version(self) -> int:
        return self._state.version

    def mtls(self) -> MtlsSnapshot:
        return self._mtls

    def rpc_secrets(self, now: float | None = None) -> list[str]:
        """The current shared secret, then the previous one for RPC_SECRET_GRACE_S after a
        rotation. `now` is Unix seconds (default: the store's clock)."""
        if now is None:
            now = self._clock()
        return secrets.rpc_secrets(self._state, now, RPC_SECRET_GRACE_S)

    def google_credentials(self) -> GoogleCredentials | None:
        state = self._state
        client_id = state.get(GOOGLE_OAUTH_CLIENT_ID)
        client_secret = state.get(GOOGLE_OAUTH_CLIENT_SECRET)
        if client_id is None or client_secret is None:
            return None
        return GoogleCredentials(client_id, client_secret)

    def sealing_keyring(self) -> sealing.Keyring | None:
        """The token sealing keys in force: a key a delivery replaced stays a previous key
        until the process restarts (enclave.secrets.merge_sealing_key)."""
        return self._state.get(ENCLAVE_TOKEN_SEALING_KEY)

    def health(self) -> dict:
        """The `secrets` and `mtls` parts of /healthz. Never a secret value."""
        state, snapshot = self._state, self._mtls
        return {
            "secrets": {"received": state.received, "version": state.version,
                        "updated_at": _iso_unix(state.updated_at),
                        "source": "kms" if self._sealed is not None else "channel",
                        "bundle_version": self.bundle_version},
            "mtls": {"configured": snapshot.configured, "not_after": _iso(snapshot.not_after)},
        }

    def _refuse_unroutable_endpoint(self, new_state: SecretsState, changed: list[str]) -> None:
        """staging/production: an enclave reaches the watermark service only through an egress
        route, so an endpoint without one is refused now rather than failing every call."""
        endpoint = new_state.get(ECS_WATERMARK_ENDPOINT)
        if not self._settings.strict or ECS_WATERMARK_ENDPOINT not in changed or not endpoint:
            return
        parts = urlsplit(endpoint)
        port = parts.port or HTTPS_PORT
        if not egress.is_routed(egress.parse_routes(self._settings.egress_routes),
                                parts.hostname, port):
            raise EndpointNotRoutable(f"{ECS_WATERMARK_ENDPOINT}: {parts.hostname}:{port} has no "
                                      "ENCLAVE_EGRESS_ROUTES route in this image")

    def _refuse_clearing_required(self, new_state: SecretsState, changed: list[str]) -> None:
        """A delivery may clear a secret only if the configuration does not need it: the RPC
        secret always, the others when ENCLAVE_READY_REQUIRES lists their part."""
        required = {"rpc_secret", *self._settings.ready_requires}
        for key in changed:
            if new_state.get(key) is None and PART_OF_KEY[key] in required:
                raise RequiredSecret(f"{key} cannot be cleared: this configuration needs "
                                     f"{PART_OF_KEY[key]} (deliver a new value instead)")

    @property
    def bundle_version(self) -> int | None:
        """The highest sealed bundle_version applied since boot (kms), else None."""
        return None if self._bundle is None else self._bundle.version

    def missing(self, parts) -> list[str]:
        """Which of `parts` (sealing_key, google_credentials, mtls; others are not the store's)
        are not usable now. mtls needs the certificates, unexpired, AND the endpoint."""
        snapshot = self._mtls
        usable = {
            "sealing_key": self.sealing_keyring() is not None,
            "google_credentials": self.google_credentials() is not None,
            # usable through notAfter itself, as validation judges it (RFC 5280: inclusive)
            "mtls": (snapshot.configured and snapshot.endpoint is not None
                     and (snapshot.not_after is None
                          or snapshot.not_after.timestamp() >= self._clock())),
        }
        return [part for part in parts if part in usable and not usable[part]]

    def ready(self) -> bool:
        """Secrets are usable: a delivery was accepted, or the environment supplied them."""
        return self._state.received or self._env_supplied

    def wait_first(self, timeout: float) -> bool:
        """Block until the first valid delivery (True) or the timeout (False)."""
        return self._received.wait(timeout)

    # --- the writer -------------------------------------------------------------------------

    def deliver(self, data: bytes, peer: str = "") -> dict:
        """Parse and apply one delivery; the ack to send back (never holds a secret)."""
        try:
            unverified, bundle = secrets.parse_delivery(data), None
            if self._sealed is not None:  # ciphertext only: open it (KMS; up to its deadline)
                unverified, bundle = self._sealed.open(unverified, self.bundle_version)
            state, changed = self.apply(unverified, bundle)
        except SecretsError as exc:
            return self.refuse(exc, peer)
        except Exception:  # a bug must not kill the listener, nor answer with internals
            log.exception("Secrets delivery from %s failed unexpectedly", peer or "?")
            return self.refuse(SecretsError("internal error; the delivery was not applied"), peer,
                               code="internal_error")
        self._metrics.inc(M_DELIVERIES, {"result": "accepted"})
        for callback in self.on_applied:
            try:
                callback()
            except Exception:  # an observer must never turn an applied delivery into an error
                log.exception("secrets observer %r failed", callback)
        return {"ok": True, "version": state.version, "changed": changed}

    def refuse(self, exc: SecretsError, peer: str = "", code: str | None = None) -> dict:
        """Count and log a refused delivery; the error ack."""
        code = code or exc.code
        self._metrics.inc(M_DELIVERIES, {"result": "refused", "reason": code})
        log.warning("Refused secrets delivery from %s: %s (%s)", peer or "?", code, exc.message)
        return {"ok": False, "version": self._state.version,
                "error": {"code": code, "message": exc.message}}

    def apply(self, unverified: dict, bundle: Bundle | None = None
              ) -> tuple[SecretsState, list[str]]:
        """Validate and apply an unverified delivery object; SecretsError changes nothing.
        `bundle`: the sealed bundle it came from (kms), checked for rollback under the lock and
        recorded once applied. Once stopping, nothing is applied."""
        if not self._lock.acquire(timeout=self._lock_timeout_s):
            raise Busy("another delivery is being applied; try again")
        try:
            if self.stopping:  # SIGTERM arrived (perhaps while KMS answered): nothing changes
                raise Stopping("the runtime is stopping; the delivery was not applied")
            last = self._bundle
            if bundle is not None and last is not None:
                if bundle.version < last.version:
                    raise BundleRollback(f"bundle_version {bundle.version} is older than "
                                         f"{last.version}, applied since boot")
                if bundle.version == last.version and bundle.digest != last.digest:
                    raise BundleRollback(f"bundle_version {bundle.version} was already applied "
                                         "with other contents: seal with a higher version")
            result = self._apply_locked(unverified)
            if bundle is not None and (last is None or bundle.version > last.version):
                self._bundle = bundle
            return result
        finally:
            self._lock.release()

    def _apply_locked(self, unverified: dict) -> tuple[SecretsState, list[str]]:
        current, snapshot = self._state, self._mtls
        new_state, changed = secrets.apply_update(current, unverified, self._clock())
        self._refuse_clearing_required(new_state, changed)
        self._refuse_unroutable_endpoint(new_state, changed)
        if not changed:
            self._commit(new_state, snapshot)
            log.info("Received secrets update (no change, version %d)", new_state.version)
            return new_state, changed

        staged = None
        try:
            if MTLS_CLIENT_CERT_JSON in changed or ECS_WATERMARK_ENDPOINT in changed:
                context = snapshot.context
                if MTLS_CLIENT_CERT_JSON in changed:
                    material = new_state.mtls
                    if material is None:
                        context = None
                    else:
                        staged = self._stage(material)
                        context = self._build_context(staged)
                snapshot = MtlsSnapshot(context, new_state.get(ECS_WATERMARK_ENDPOINT),
                                        snapshot.generation + 1, new_state.mtls_not_after)
            if MTLS_CLIENT_CERT_JSON in changed:
                try:
                    if staged is not None:
                        certstore.activate(self._certs_dir, staged)
                    else:
                        certstore.clear(self._certs_dir)
                except certstore.CertStoreError as exc:
                    raise StorageFailed(str(exc)) from None
                staged = None  # live now: never discard
        except BaseException:
            if staged is not None and not certstore.is_live(self._certs_dir, staged):
                certstore.discard(staged)
            raise
        self._commit(new_state, snapshot)
        log.info("Received secrets update (version %d, changed: %s)", new_state.version,
                 ", ".join(changed))
        if MTLS_CLIENT_CERT_JSON in changed:
            if snapshot.configured:
                log.info("Successfully updated certificates (not after %s)",
                         _iso(snapshot.not_after))
            else:
                log.info("mTLS certificates cleared")
        if ENCLAVE_TOKEN_SEALING_KEY in changed:
            keyring = new_state.get(ENCLAVE_TOKEN_SEALING_KEY)  # key ids are not secret
            log.info("Token sealing keys: %s", f"current {keyring.kids[0]}, previous "
                     f"{', '.join(keyring.kids[1:]) or 'none'}" if keyring else "none (cleared)")
        return new_state, changed

    def _commit(self, state: SecretsState, snapshot: MtlsSnapshot) -> None:
        # The swap: two reference assignments; each reader takes one snapshot of each.
        self._mtls = snapshot
        self._state = state
        self._received.set()

    def _stage(self, material) -> certstore.CertFiles:
        try:
            return certstore.stage(self._certs_dir, material.client_cert_pem,
                                   material.client_key_pem, material.ca_cert_pem)
        except certstore.CertStoreError as exc:
            raise StorageFailed(str(exc)) from None

    @staticmethod
    def _build_context(files: certstore.CertFiles) -> ssl.SSLContext:
        try:
            return tls.mtls_client_context(files.ca_cert, files.client_cert, files.client_key)
        except ssl.SSLError as exc:
            # OpenSSL's reason (e.g. EE_KEY_TOO_SMALL) names a rule, never key material.
            raise InvalidCertificate(f"the TLS library refused the certificates "
                                     f"({exc.reason or 'unknown reason'})") from None
        except OSError as exc:
            raise StorageFailed(f"cannot read the written certificates: {exc.strerror}") from None

    def _install_certificates(self, material) -> ssl.SSLContext:
        """Start-up path (environment): stage, build, activate."""
        staged = self._stage(material)
        try:
            context = self._build_context(staged)
            certstore.activate(self._certs_dir, staged)
        except BaseException as exc:
            if not certstore.is_live(self._certs_dir, staged):
                certstore.discard(staged)
            if isinstance(exc, certstore.CertStoreError):
                raise StorageFailed(str(exc)) from None
            raise
        return context

    # --- metrics ----------------------------------------------------------------------------

    def _describe_metrics(self) -> None:
        m = self._metrics
        m.describe(M_DELIVERIES, "counter", "Secrets deliveries by result and refusal reason")
        m.describe(M_VERSION, "gauge", "Version of the secrets in force (0: none delivered)")
        m.describe(M_MTLS_EXPIRY, "gauge", "mTLS client certificate notAfter, unix seconds")
        m.gauge_fn(M_VERSION, lambda: self._state.version)
        m.gauge_fn(M_MTLS_EXPIRY,
                   lambda: self._mtls.not_after.timestamp() if self._mtls.not_after else None)
