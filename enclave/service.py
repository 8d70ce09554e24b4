"""`serve`: the start-up sequence of DESIGN.md §2 and the graceful stop on SIGTERM/SIGINT.

1. configuration (exit 2 on any problem)  2. signing identity and attestation source (exit 2)
3. bind the secrets listener FIRST, wait for a first delivery (bounded)  4. start HTTP, log
`ready`  5. on SIGTERM/SIGINT stop accepting, drain in-flight requests (5 s), exit 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass

from .app import Runtime
from .config import Settings, load_or_report
from .errors import EnclaveError
from .logs import setup_logging
from .metrics import Metrics
from .server import HttpServer

HELP = "run the runtime (the default command)"
log = logging.getLogger("enclave")


def add_arguments(parser) -> None:
    parser.add_argument("--env-file", metavar="PATH", help="read variables from a .env file first")


@dataclass
class Running:
    """A started runtime (used by `serve` and by tests that run it in-process)."""
    settings: Settings
    runtime: Runtime
    http: HttpServer
    listener: object
    threads: list

    def stop(self) -> bool:
        clean = self.http.drain()
        self.listener.shutdown()
        if clean:  # requests still running after the drain keep their devices and pools
            self.runtime.close()
        for thread in self.threads:
            thread.join(timeout=5)
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
    store = SecretStore(settings, metrics)
    connector = Connector.from_setting(settings.egress_routes)
    outbound = OutboundClient(connector, ca_file=settings.outbound_ca_file)
    authenticator = RpcAuthenticator(store.rpc_secrets, settings.rpc_max_skew_s, metrics,
                                     allow_local_default_secret=settings.env == "local")
    def google_credentials():
        creds = store.google_credentials()
        return (creds.client_id, creds.client_secret) if creds else None

    google = GoogleOAuth(google_credentials, store.sealing_key,
                         outbound, settings.google_token_url, settings.google_revoke_url, metrics)
    watermark = WatermarkService(store, attestation.identity, connector, metrics,
                                 path=settings.ecs_watermark_path)
    service = AttestationService(attestation, metrics)
    return Runtime(settings, metrics=metrics, attestation=service, store=store, google=google,
                   watermark=watermark, authenticator=authenticator,
                   closers=(outbound.close, watermark.close, attestation.close))


def start(settings: Settings, metrics: Metrics | None = None) -> Running:
    """Steps 2-4: build, bind the secrets listener first, wait for secrets, start HTTP."""
    from .secrets_listener import SecretsListener, wait_for_initial

    metrics = metrics or Metrics()
    runtime = build_services(settings, metrics)
    listener = SecretsListener(settings.secrets_listen, runtime.store,
                               settings.secrets_allowed_peers, metrics)
    listener.bind()
    threads = [listener.start()]
    try:
        wait_for_initial(runtime.store, settings.secrets_initial_timeout_s,
                         via=listener.address.family.upper())
        http = HttpServer(settings.http_listen, runtime.router(), metrics=metrics,
                          authenticator=runtime.authenticator)
    except BaseException:
        listener.shutdown()
        raise
    threads.append(http.serve_in_thread())
    insecure = " INSECURE dev-shim attestation" if settings.mode == "dev-shim" else ""
    log.info("ready: http=%s secrets=%s mode=%s env=%s%s", _actual(settings.http_listen, http),
             listener.address, settings.mode, settings.env, insecure)
    return Running(settings, runtime, http, listener, [t for t in threads if t])


def _actual(address, http: HttpServer) -> str:
    if address.family == "tcp":
        return f"tcp:{address.host}:{http.server_address[1]}"
    return str(address)


def run(args) -> int:
    settings = load_or_report(args.env_file)
    if settings is None:
        return 2
    setup_logging(settings.log_format, settings.log_level)
    if settings.mode == "disabled":
        print("ENCLAVE_RUNTIME_MODE=disabled: the runtime refuses to serve "
              "(set remote in an enclave, or dev-shim locally)", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        running = start(settings)
    except (EnclaveError, OSError) as exc:
        log.error("start-up failed: %s", exc)
        return 2
    while not stop.wait(1.0):
        pass
    log.info("stopping: draining in-flight requests")
    clean = running.stop()
    log.info("stopped%s", "" if clean else " (some requests were cut off after the drain limit)")
    return 0
