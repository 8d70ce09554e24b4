"""`serve`: the start-up sequence of docs/DESIGN.md §2 and the graceful stop on SIGTERM/SIGINT.

1. configuration, then `preflight` (exit 2 listing every problem, also sent to ENCLAVE_LOG_SINK)
2. signing identity and attestation source (exit 2)  3. bind the secrets listener, then HTTP (a
busy address: exit 2 naming the variable)  4. serve both at once; RPCs answer 503 not_ready until
what they need arrives; wait for a first delivery (bounded; SIGTERM ends it); log `ready` once
everything the configuration needs is usable  5. on SIGTERM/SIGINT stop applying deliveries,
stop accepting, drain in-flight requests (5 s), exit 0 within 6 s.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from . import logsink
from .app import Runtime
from .config import (ConfigError, Settings, is_loopback_listener, load_settings,
                     report_problems)
from .errors import EnclaveError
from .logs import setup_logging
from .metrics import Metrics
from .server import HttpServer

HELP = "run the runtime (the default command)"
log = logging.getLogger("enclave")


def add_arguments(parser) -> None:
    parser.add_argument("--env-file", metavar="PATH", help="read variables from a .env file first")


class ListenError(ConfigError):
    """A listen address that cannot be bound (busy, not local, no permission): exit 2."""

    def __init__(self, variable: str, address, exc: OSError):
        reason = exc.strerror or type(exc).__name__
        super().__init__([f"{variable}: cannot listen on {address} ({reason})"])


def local_default_secret_allowed(settings: Settings) -> bool:
    """The published local RPC secret is usable only when configuration allowed it (ALFRED_ENV=
    local set explicitly) AND both listeners are on loopback; checked again here so a Settings
    built any other way cannot enable it on a network listener."""
    return (settings.allow_local_default_secret and settings.env == "local"
            and is_loopback_listener(settings.http_listen)
            and is_loopback_listener(settings.secrets_listen))


def preflight(settings: Settings, now: float | None = None) -> list[str]:
    """Every problem `serve` would refuse before it binds, all at once, naming the variable.
    Certificates are checked at `now`, Unix seconds (default: time.time()).

    `check-config` runs this too. It has no side effects: it writes no file (the dev-shim root is
    created by `serve`), opens no device (`/dev/nsm` exists only in an enclave) and binds nothing.
    """
    from . import attestation, secrets
    from .identity import IdentityError, SigningIdentity
    from .nitro import cose
    from .nitro.encoding import decode_b64, read_document_bytes

    problems: list[str] = []
    if settings.mode == "disabled":
        return problems  # serve refuses with its own message; nothing else is built
    identity = None
    if settings.signing_private_key_pem is not None:
        try:
            identity = SigningIdentity.from_pem(settings.signing_private_key_pem)
        except IdentityError as exc:
            problems.append(str(exc))
    path, inline = settings.attestation_document_path, settings.attestation_document_b64
    if settings.mode != "dev-shim" and path != attestation.NSM_DEVICE and (path or inline):
        if settings.signing_private_key_pem is None and not settings.strict:
            identity = SigningIdentity.generate()  # what serve does: a per-boot identity
        try:
            if identity is not None:
                source = (attestation.StaticSource.from_file(path, identity) if path
                          else attestation.StaticSource.from_base64(inline, identity))
                if settings.attestation_required:
                    attestation._check_static(source, settings)
            elif path:  # no usable key: still check that the document reads and parses
                with open(path, "rb") as fh:
                    data = fh.read(attestation.MAX_STATIC_DOCUMENT_FILE_BYTES + 1)
                attestation.payload_fields(read_document_bytes(data))
            else:
                attestation.payload_fields(decode_b64(inline))
        except ConfigError as exc:
            problems.extend(exc.problems)
        except OSError as exc:
            problems.append(f"TEE_ATTESTATION_DOCUMENT_PATH: cannot read {path} "
                            f"({exc.strerror or type(exc).__name__})")
        except (ValueError, cose.CoseError):
            name = "TEE_ATTESTATION_DOCUMENT_PATH" if path else "TEE_ATTESTATION_DOCUMENT"
            problems.append(f"{name}: not an attestation document")
    if settings.mtls_client_cert_json is not None:
        moment = time.time() if now is None else now
        try:
            secrets.validate_value(secrets.MTLS_CLIENT_CERT_JSON, settings.mtls_client_cert_json,
                                   moment)
        except secrets.SecretsError as exc:
            message = exc.message
            if not message.startswith(secrets.MTLS_CLIENT_CERT_JSON):
                message = f"{secrets.MTLS_CLIENT_CERT_JSON}: {message}"
            problems.append(message)
    return problems


STOP_BUDGET_S = 5.5  # SIGTERM to exit: the design allows 6 s; the rest is the process's own exit
LISTENER_STOP_S = 0.3  # a delivery in a KMS call is abandoned after this on SIGTERM
THREAD_JOIN_S = 0.2  # all the runtime's threads together, after the drain
LOG_SINK_STOP_S = 0.3  # the last lines' flush to ENCLAVE_LOG_SINK, out of the same budget


@dataclass
class Running:
    """A started runtime (used by `serve` and by tests that run it in-process)."""
    settings: Settings
    runtime: Runtime
    http: HttpServer
    listener: object
    threads: list

    def stop(self, deadline: float | None = None) -> bool:
        """Stop by `deadline` (time.monotonic(); default STOP_BUDGET_S from now): no delivery
        applies from now on, the secrets listener gets LISTENER_STOP_S (a sealed delivery may
        be inside a KMS call), HTTP drains in-flight requests with what is left, then threads."""
        if deadline is None:
            deadline = time.monotonic() + STOP_BUDGET_S
        self.runtime.store.stopping = True
        self.listener.shutdown(timeout=LISTENER_STOP_S)
        drain_s = deadline - THREAD_JOIN_S - LOG_SINK_STOP_S - time.monotonic()
        clean = self.http.drain(timeout=max(0.0, drain_s))
        if clean:  # requests still running after the drain keep their devices and pools
            self.runtime.close()
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - LOG_SINK_STOP_S - time.monotonic()))
        return clean


def build_services(settings: Settings, metrics: Metrics):
    """Every part the runtime needs, built before anything listens. Raises EnclaveError."""
    from .attestation import AttestationService, build_attestation
    from .egress import Connector
    from .google import GoogleOAuth
    from .outbound import OutboundClient
    from .rpcauth import RpcAuthenticator
    from .secretstore import SecretStore
    from .watermark import WatermarkService

    attestation = build_attestation(settings)
    # staging/production: no direct connection ever; a host without a route is refused
    connector = Connector.from_setting(settings.egress_routes, fail_closed=settings.strict)
    sealed = closers = None
    if settings.secrets_source == "kms":
        sealed, closers = _sealed_opener(settings, attestation, connector)
    store = SecretStore(settings, metrics, sealed=sealed)
    outbound = OutboundClient(connector, ca_file=settings.outbound_ca_file)
    authenticator = RpcAuthenticator(store.rpc_secrets, settings.rpc_max_skew_s, metrics,
                                     allow_local_default_secret=local_default_secret_allowed(
                                         settings))
    def google_credentials():
        creds = store.google_credentials()
        return (creds.client_id, creds.client_secret) if creds else None

    google = GoogleOAuth(google_credentials, store.sealing_keyring,
                         outbound, settings.google_token_url, settings.google_revoke_url, metrics)
    watermark = WatermarkService(store, attestation.identity, connector, metrics,
                                 path=settings.ecs_watermark_path)
    service = AttestationService(attestation, metrics)
    return Runtime(settings, metrics=metrics, attestation=service, store=store, google=google,
                   watermark=watermark, authenticator=authenticator,
                   closers=(outbound.close, watermark.close, attestation.close, *(closers or ())))


def _sealed_opener(settings: Settings, attestation, connector):
    """ENCLAVE_SECRETS_SOURCE=kms: the opener of sealed deliveries and what must be closed."""
    from . import kms
    from .outbound import OutboundClient
    from .sealed import SealedSecretsOpener

    # Only the bundled Amazon roots, or only the fake's CA in local/test (config refuses the
    # override in staging/production). TLS ends here, inside the enclave, over the egress route.
    context = kms.create_kms_context(settings.outbound_ca_file if not settings.strict else None)
    transport = OutboundClient(connector, context=context)
    opener = SealedSecretsOpener(settings.kms_key_arn, attest=attestation.recipient_document,
                                 transport=transport, endpoint=settings.kms_endpoint)
    return opener, (transport.close,)


def start(settings: Settings, metrics: Metrics | None = None,
          stop: threading.Event | None = None) -> Running:
    """Steps 2-4: build, bind both listeners (secrets first), serve, wait for secrets.

    Both addresses are bound before the secrets listener accepts anything, so a busy HTTP
    port fails start-up (ListenError) before any delivery is acknowledged. HTTP serves from
    then on: /healthz, /metrics and attestation answer during the start-up window, RPCs answer
    503 not_ready until what they need arrives. `stop` (set by SIGTERM/SIGINT) ends the window.
    """
    from .secrets_listener import SecretsListener, wait_for_initial

    metrics = metrics or Metrics()
    runtime = build_services(settings, metrics)
    listener = SecretsListener(settings.secrets_listen, runtime.store,
                               settings.secrets_allowed_peers, metrics)
    try:
        try:
            listener.bind()
        except OSError as exc:
            raise ListenError("ENCLAVE_SECRETS_LISTEN", settings.secrets_listen, exc) from None
        try:
            http = HttpServer(settings.http_listen, runtime.router(), metrics=metrics,
                              authenticator=runtime.authenticator)
        except OSError as exc:
            raise ListenError("ENCLAVE_HTTP_LISTEN", settings.http_listen, exc) from None
    except BaseException:
        listener.shutdown()
        runtime.close()
        raise
    threads = [listener.start(), http.serve_in_thread()]
    running = Running(settings, runtime, http, listener, [t for t in threads if t])
    insecure = " INSECURE dev-shim attestation" if settings.mode == "dev-shim" else ""
    log.info("serving: http=%s secrets=%s mode=%s env=%s%s", _actual(settings.http_listen, http),
             listener.address, settings.mode, settings.env, insecure)
    runtime.store.on_applied.append(runtime.note_readiness)
    try:
        wait_for_initial(runtime.store, settings.secrets_initial_timeout_s,
                         via=listener.address.family.upper(), stop=stop)
    except BaseException:
        running.stop()
        raise
    runtime.note_readiness()
    return running


def _actual(address, http: HttpServer) -> str:
    if address.family == "tcp":
        return f"tcp:{address.host}:{http.server_address[1]}"
    return str(address)


def run(args) -> int:
    """`serve`: every exit 2 also reaches ENCLAVE_LOG_SINK before the process ends, since
    nothing reads an enclave's console outside debug mode."""
    try:
        settings = load_settings(dotenv=args.env_file)
    except ConfigError as exc:
        report_problems(exc.problems)
        logsink.report_startup_failure(os.environ.get(logsink.VARIABLE), exc.problems)
        return 2
    if settings.mode == "disabled":
        message = ("ENCLAVE_RUNTIME_MODE=disabled: the runtime refuses to serve "
                   "(set remote in an enclave, or dev-shim locally)")
        print(message, file=sys.stderr)
        logsink.report_startup_failure(settings.log_sink, [message])
        return 2
    problems = preflight(settings)
    if problems:
        report_problems(problems)
        logsink.report_startup_failure(settings.log_sink, problems)
        return 2
    sink = logsink.from_setting(settings.log_sink)
    setup_logging(settings.log_format, settings.log_level, extra=(sink,) if sink else ())
    code = 2
    try:
        code = _serve(settings, sink)
        return code
    finally:
        if sink is not None:  # an exit 2 waits longer: its reason must reach the parent
            sink.close(logsink.STARTUP_REPORT_TIMEOUT_S if code == 2 else LOG_SINK_STOP_S)


LOG_SINK_METRICS = (  # (name, kind, help, the LogSink.stats() field)
    ("enclave_log_sink_lines_sent_total", "counter", "Log lines delivered to ENCLAVE_LOG_SINK",
     "sent"),
    ("enclave_log_sink_lines_dropped_total", "counter",
     "Log lines dropped because the sink's queue was full (the runtime never waits for it)",
     "dropped"),
    ("enclave_log_sink_reconnects_total", "counter", "Reconnections to ENCLAVE_LOG_SINK",
     "reconnects"),
    ("enclave_log_sink_lines_queued", "gauge", "Log lines waiting for ENCLAVE_LOG_SINK", "queued"),
)


def _serve(settings: Settings, sink=None) -> int:
    """Steps 2-5 of `serve` once the configuration holds; the exit code."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    metrics = Metrics()
    if sink is not None:  # described before anything serves: the first scrape shows them
        for name, kind, help_text, field in LOG_SINK_METRICS:
            metrics.describe(name, kind, help_text)
            metrics.gauge_fn(name, lambda field=field: sink.stats()[field])
    try:
        running = start(settings, metrics, stop=stop)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("start-up failed: %s", problem)
        return 2
    except (EnclaveError, OSError) as exc:
        log.error("start-up failed: %s", exc)
        return 2
    except Exception:  # a bug: its reason still goes to the log (and the log sink) before exit
        log.exception("start-up failed unexpectedly")
        return 2
    while not stop.wait(1.0):  # a bounded wait: signal handlers run between the waits
        pass
    deadline = time.monotonic() + STOP_BUDGET_S  # from the signal: one budget for every step
    log.info("stopping: draining in-flight requests")
    clean = running.stop(deadline)
    log.info("stopped%s", "" if clean else " (some requests were cut off after the drain limit)")
    return 0
