"""Configuration: a frozen Settings object built from the environment, fail-closed.

`load_settings(environ)` returns Settings or raises ConfigError listing every problem at once.
Problems name the variable, never its value.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from .addresses import Address, AddressError, is_loopback_ip, parse_address
from .egress import EgressError, parse_routes
from .errors import EnclaveError
from .logsink import LogSinkError, parse_sink
from .rpcauth import LOCAL_DEFAULT_RPC_SECRET
from .secrets import MIN_RPC_SECRET_BYTES, SEALING_KEY_BYTES

ENVIRONMENTS = ("local", "test", "staging", "production")
STRICT_ENVIRONMENTS = ("staging", "production")
MODES = ("dev-shim", "remote", "disabled")
DEFAULT_SKEW_SECONDS = 30
MIN_SKEW_SECONDS, MAX_SKEW_SECONDS = 1, 300
DEFAULT_SECRETS_TIMEOUT_SECONDS = 5.0
MAX_SECRETS_TIMEOUT_SECONDS = 600.0  # a start-up window longer than 10 min is a mistake
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
GOOGLE_REVOKE_URL = "https://oauth2.googleapis.com/revoke"
DEFAULT_WATERMARK_PATH = "/v1/watermark"
MAX_DOTENV_BYTES = 1024 * 1024  # a .env file larger than 1 MiB is not a .env file

EPHEMERAL_SIGNING_KEY = "ephemeral"  # generated in memory at boot, never leaves the process
# Secret VALUES never come from the environment in staging/production: an enclave's environment
# is its image, public and measured. They arrive over the secrets channel (port 7777).
CHANNEL_ONLY_SECRETS = ("ENCLAVE_RPC_SHARED_SECRET", "ENCLAVE_TOKEN_SEALING_KEY",
                        "GOOGLE_OAUTH_CLIENT_SECRET", "MTLS_CLIENT_CERT_JSON")
# Parts /healthz?ready=1 can wait for (ENCLAVE_READY_REQUIRES); an RPC secret is always needed.
SECRETS_SOURCES = ("channel", "kms")  # plaintext deliveries, or KMS-sealed envelopes only
READY_PARTS = ("rpc_secret", "sealing_key", "google_credentials", "mtls")
STRICT_READY_REQUIRES = READY_PARTS  # a production enclave serves Google and the watermark RPC

# Variables whose values are secrets: never printed, only "<set>".
SECRET_FIELDS = frozenset({
    "signing_private_key_pem", "rpc_shared_secret", "mtls_client_cert_json",
    "google_client_secret", "token_sealing_key", "attestation_document_b64",
})


class ConfigError(EnclaveError):
    """One or more configuration problems; `problems` lists each, naming the variable."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class Settings:
    env: str = "local"
    mode: str = "dev-shim"
    base_url: str = "http://127.0.0.1:8181"
    http_listen: Address = field(default_factory=lambda: parse_address("tcp:127.0.0.1:8181"))
    secrets_listen: Address = field(default_factory=lambda: parse_address("tcp:127.0.0.1:7777"))
    secrets_allowed_peers: tuple[str, ...] = ("vsock:3", "127.0.0.1")
    secrets_initial_timeout_s: float = DEFAULT_SECRETS_TIMEOUT_SECONDS
    certs_dir: Path = Path(".local/certs")
    state_dir: Path = Path(".local")
    attestation_required: bool = False
    allow_insecure_dev_attestation: bool = True
    signing_private_key_pem: bytes | None = field(default=None, repr=False)
    attestation_document_path: str | None = None
    attestation_document_b64: str | None = field(default=None, repr=False)
    # None: no secret until one is delivered over the secrets channel (staging/production).
    rpc_shared_secret: str | None = field(default=LOCAL_DEFAULT_RPC_SECRET, repr=False)
    # The published local default secret is accepted by the authenticator only when this is
    # true: ALFRED_ENV=local set explicitly and both listeners on loopback (load_settings
    # decides; a Settings built by hand never allows it).
    allow_local_default_secret: bool = False
    rpc_max_skew_s: int = DEFAULT_SKEW_SECONDS
    mtls_client_cert_json: str | None = field(default=None, repr=False)
    ecs_watermark_endpoint: str | None = None
    ecs_watermark_path: str = DEFAULT_WATERMARK_PATH
    google_client_id: str | None = None
    google_client_secret: str | None = field(default=None, repr=False)
    google_token_url: str = GOOGLE_TOKEN_URL
    google_revoke_url: str = GOOGLE_REVOKE_URL
    outbound_ca_file: str | None = None
    token_sealing_key: bytes | None = field(default=None, repr=False)  # None: generated per boot (local/test only)
    egress_routes: str | None = None  # parsed by enclave.egress
    log_format: str = "text"
    log_level: str = "INFO"
    # What /healthz?ready=1 waits for besides attestation and an RPC secret (READY_PARTS).
    ready_requires: tuple[str, ...] = ()
    log_sink: str | None = None  # ENCLAVE_LOG_SINK, parsed by enclave.logsink
    secrets_source: str = "channel"  # SECRETS_SOURCES
    kms_key_arn: str | None = None  # the one KMS key whose envelopes this image accepts
    kms_endpoint: str | None = None  # local/test override of https://kms.<region>.amazonaws.com

    @property
    def strict(self) -> bool:
        return self.env in STRICT_ENVIRONMENTS

    def redacted(self) -> dict:
        """The effective configuration for display: secret values replaced by `<set>`."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value is not None:
                value = "<set>"
            elif isinstance(value, (Address, Path)):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def is_loopback_listener(address: Address) -> bool:
    """A TCP listener only this machine can reach: a loopback IP or `localhost`."""
    return address.family == "tcp" and (is_loopback_ip(address.host)
                                        or address.host.lower() == "localhost")


def _is_utf8(value: str) -> bool:
    """False for a string holding lone surrogates: os.environ's form of undecodable bytes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _named(name: str, exc: Exception) -> str:
    """`NAME: message`, without repeating NAME when the message already starts with it."""
    message = str(exc)
    return message if re.match(rf"{name}\b", message) else f"{name}: {message}"


def read_dotenv(path: str | os.PathLike) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `#` comments, optional `export`, simple quotes."""
    data = Path(path).read_bytes()[:MAX_DOTENV_BYTES].decode("utf-8")
    values = {}
    for line in data.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


class _Reader:
    """Reads variables and collects problems instead of stopping at the first one."""

    def __init__(self, environ: dict[str, str]):
        self.environ = environ
        self.problems: list[str] = []
        self.undecodable: set[str] = set()

    def raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        if value is not None and not _is_utf8(value):
            # Undecodable bytes: reported once; the variable then counts as unset, and the
            # problems that follow from that are dropped (load_settings) so it is named once.
            if name not in self.undecodable:
                self.undecodable.add(name)
                self.problems.append(f"{name} is not valid UTF-8")
            return None
        return None if value is None or value == "" else value

    def set_but_empty(self, name: str) -> bool:
        """A safety switch that is present but empty is a broken template, not "use the default"."""
        if self.environ.get(name) == "":
            self.problems.append(f"{name} is set but empty")
            return True
        return False

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.raw(name)
        if value is None:
            self.set_but_empty(name)
            return default
        if value not in choices:
            self.problems.append(f"{name} must be one of {', '.join(choices)}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            self.set_but_empty(name)
            return default
        if value in ("true", "1"):
            return True
        if value in ("false", "0"):
            return False
        self.problems.append(f"{name} must be true, false, 1 or 0")
        return default

    def number(self, name: str, default, low, high, kind=int):
        value = self.raw(name)
        if value is None:
            return default
        what = "a number" if kind is float else "a whole number"
        problem = f"{name} must be {what} from {low:g} to {high:g}"
        if not re.fullmatch(r"[0-9]{1,9}" + (r"(\.[0-9]{1,6})?" if kind is float else ""), value):
            self.problems.append(problem)
            return default
        number = kind(value)
        if not low <= number <= high:
            self.problems.append(problem)
            return default
        return number

    def address(self, name: str, default: str) -> Address:
        value = self.raw(name) or default
        try:
            return parse_address(value, name)
        except AddressError as exc:
            self.problems.append(_named(name, exc))
            return parse_address(default)

    def url(self, name: str, default: str | None, schemes=("https",)) -> str | None:
        value = self.raw(name)
        if value is None:
            return default
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            self.problems.append(f"{name} must be a {' or '.join(schemes)} URL with a host")
            return default
        return value


def _listen_from_base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def _signing_key(reader: _Reader) -> bytes | None:
    """The PEM, or None for a per-boot key (`ephemeral`, or unset: the checks say if allowed)."""
    value = reader.raw("TEE_ATTESTATION_SIGNING_PRIVATE_KEY")
    if value is None or value == EPHEMERAL_SIGNING_KEY:
        return None
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_bytes()
        except OSError as exc:
            reader.problems.append(
                f"TEE_ATTESTATION_SIGNING_PRIVATE_KEY: cannot read key file ({exc.strerror})")
            return None
    return value.replace("\\n", "\n").encode("utf-8")


def _ready_requires(reader: _Reader, strict: bool) -> tuple[str, ...]:
    """ENCLAVE_READY_REQUIRES: comma-separated READY_PARTS (default: all of them in
    staging/production, none beyond an RPC secret elsewhere)."""
    value = reader.raw("ENCLAVE_READY_REQUIRES")
    if value is None:
        return STRICT_READY_REQUIRES if strict else ()
    parts = tuple(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))
    unknown = [p for p in parts if p not in READY_PARTS]
    if unknown or not parts:
        reader.problems.append(f"ENCLAVE_READY_REQUIRES must list some of {', '.join(READY_PARTS)}")
        return STRICT_READY_REQUIRES if strict else ()
    return parts


def _sealing_key(reader: _Reader) -> bytes | None:
    value = reader.raw("ENCLAVE_TOKEN_SEALING_KEY")
    if value is None:
        return None
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        reader.problems.append("ENCLAVE_TOKEN_SEALING_KEY must be base64")
        return None
    if len(key) != SEALING_KEY_BYTES:
        reader.problems.append(f"ENCLAVE_TOKEN_SEALING_KEY must decode to {SEALING_KEY_BYTES} bytes")
        return None
    return key


def load_settings(environ: dict[str, str] | None = None, dotenv: str | None = None) -> Settings:
    """Build Settings from `environ` (default os.environ) over an optional `.env` file."""
    merged: dict[str, str] = {}
    if dotenv is not None:
        try:
            merged.update(read_dotenv(dotenv))
        except OSError as exc:
            raise ConfigError([f"--env-file {dotenv}: cannot read it "
                               f"({exc.strerror or type(exc).__name__})"]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"--env-file {dotenv}: not UTF-8 (byte {exc.start})"]) from None
    merged.update(os.environ if environ is None else environ)
    r = _Reader(merged)

    env = r.choice("ALFRED_ENV", ENVIRONMENTS, "local")
    env_explicit = r.raw("ALFRED_ENV") is not None
    env_unreadable = "ALFRED_ENV" in r.undecodable  # reported; nothing follows from it
    strict = env in STRICT_ENVIRONMENTS
    local = env == "local"
    mode = r.choice("ENCLAVE_RUNTIME_MODE", MODES, "dev-shim")
    base_url = r.url("ENCLAVE_RUNTIME_BASE_URL", "http://127.0.0.1:8181", ("http", "https"))
    http_listen = r.address("ENCLAVE_HTTP_LISTEN", _listen_from_base_url(base_url))
    secrets_listen = r.address("ENCLAVE_SECRETS_LISTEN",
                               "tcp:127.0.0.1:7777" if local else "vsock:ANY:7777")
    peers_raw = r.raw("ENCLAVE_SECRETS_ALLOWED_PEERS")
    peers = tuple(p.strip() for p in (peers_raw or "vsock:3,127.0.0.1").split(",") if p.strip())
    for peer in peers:
        if not re.fullmatch(r"vsock:[0-9]{1,10}", peer) and not is_loopback_ip(peer):
            r.problems.append("ENCLAVE_SECRETS_ALLOWED_PEERS entries must be vsock:CID or a "
                              "loopback IP (secrets never come from the network)")
            break
    # The published local secret and the dev-shim defaults: only with ALFRED_ENV=local set
    # explicitly AND both listeners reachable from this machine only (docs/DESIGN.md §3).
    public_listeners = [name for name, address in (("ENCLAVE_HTTP_LISTEN", http_listen),
                                                   ("ENCLAVE_SECRETS_LISTEN", secrets_listen))
                        if not is_loopback_listener(address)]
    local_defaults = local and env_explicit and not public_listeners
    if not env_explicit:
        why_not_local = "but ALFRED_ENV is unset (set it to local for local development)"
    else:
        why_not_local = (f"but {' and '.join(public_listeners)} "
                         f"{'is' if len(public_listeners) == 1 else 'are'} not on loopback")
    timeout = r.number("ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS", DEFAULT_SECRETS_TIMEOUT_SECONDS,
                       0.0, MAX_SECRETS_TIMEOUT_SECONDS, float)
    certs_dir = Path(r.raw("ENCLAVE_CERTS_DIR") or (".local/certs" if local else "/opt/enclave/certs"))
    state_dir = Path(r.raw("ENCLAVE_STATE_DIR") or (".local" if local else "/opt/enclave/state"))
    required = r.boolean("TEE_ATTESTATION_REQUIRED", False)
    allow_insecure = r.boolean("TEE_ALLOW_INSECURE_DEV_ATTESTATION", local_defaults)
    signing_value = r.raw("TEE_ATTESTATION_SIGNING_PRIVATE_KEY")
    signing_key = _signing_key(r)
    from .attestation import NSM_DEVICE as nsm_device  # here: attestation is heavy to import
    doc_path = r.raw("TEE_ATTESTATION_DOCUMENT_PATH")
    doc_b64 = r.raw("TEE_ATTESTATION_DOCUMENT")
    secret = r.raw("ENCLAVE_RPC_SHARED_SECRET")
    skew = r.number("ENCLAVE_RPC_AUTH_MAX_SKEW_SECONDS", DEFAULT_SKEW_SECONDS,
                    MIN_SKEW_SECONDS, MAX_SKEW_SECONDS)
    endpoint = r.url("ECS_WATERMARK_ENDPOINT", None)
    wm_path = r.raw("ECS_WATERMARK_PATH") or DEFAULT_WATERMARK_PATH
    if not wm_path.startswith("/"):
        r.problems.append("ECS_WATERMARK_PATH must start with /")
        wm_path = DEFAULT_WATERMARK_PATH
    token_url = r.url("GOOGLE_OAUTH_TOKEN_URL", GOOGLE_TOKEN_URL)
    revoke_url = r.url("GOOGLE_OAUTH_REVOKE_URL", GOOGLE_REVOKE_URL)
    ca_file = r.raw("ENCLAVE_OUTBOUND_CA_FILE")
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        r.problems.append("ENCLAVE_OUTBOUND_CA_FILE: file not found or not readable")
    sealing_key = _sealing_key(r)
    egress_routes = r.raw("ENCLAVE_EGRESS_ROUTES")
    routes = {}
    try:
        routes = parse_routes(egress_routes)
    except EgressError as exc:
        r.problems.append(_named("ENCLAVE_EGRESS_ROUTES", exc))
    log_sink = r.raw("ENCLAVE_LOG_SINK")
    if log_sink is not None:
        try:
            if parse_sink(log_sink).family != "vsock" and strict:
                r.problems.append(f"ENCLAVE_LOG_SINK must be vsock:CID:PORT when ALFRED_ENV={env} "
                                  "(an enclave has no network; tcp: is for local development)")
        except LogSinkError as exc:
            r.problems.append(str(exc))
    source = r.choice("ENCLAVE_SECRETS_SOURCE", SECRETS_SOURCES, "channel")
    kms_key_arn, kms_region = r.raw("ENCLAVE_KMS_KEY_ARN"), None
    if kms_key_arn is not None:
        from .envelope import EnvelopeError, parse_key_arn
        try:
            kms_key_arn, kms_region = parse_key_arn(kms_key_arn)
        except EnvelopeError:
            r.problems.append("ENCLAVE_KMS_KEY_ARN must be a KMS key ARN "
                              "(arn:aws:kms:REGION:ACCOUNT:key/ID)")
    kms_endpoint = r.url("ENCLAVE_KMS_ENDPOINT", None)
    log_format = r.choice("ENCLAVE_LOG_FORMAT", ("text", "json"), "text")
    log_level = r.choice("ENCLAVE_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    mtls_json = r.raw("MTLS_CLIENT_CERT_JSON")
    google_client_id = r.raw("GOOGLE_OAUTH_CLIENT_ID")
    google_client_secret = r.raw("GOOGLE_OAUTH_CLIENT_SECRET")

    if doc_path and doc_b64:
        r.problems.append("set only one of TEE_ATTESTATION_DOCUMENT_PATH and TEE_ATTESTATION_DOCUMENT")
    if signing_value == EPHEMERAL_SIGNING_KEY and mode != "dev-shim" and (doc_b64 or (
            doc_path and doc_path != nsm_device)):
        r.problems.append(f"TEE_ATTESTATION_SIGNING_PRIVATE_KEY={EPHEMERAL_SIGNING_KEY} needs "
                          f"TEE_ATTESTATION_DOCUMENT_PATH={nsm_device}: a static document cannot "
                          "bind a key made at boot")
    ready_requires = _ready_requires(r, strict)
    if source == "kms":
        if kms_key_arn is None:
            r.problems.append("ENCLAVE_SECRETS_SOURCE=kms requires ENCLAVE_KMS_KEY_ARN (the key "
                              "whose envelopes this image accepts)")
        if mode != "dev-shim" and (doc_b64 or (doc_path and doc_path != nsm_device)):
            r.problems.append("ENCLAVE_SECRETS_SOURCE=kms needs TEE_ATTESTATION_DOCUMENT_PATH="
                              f"{nsm_device} (or ENCLAVE_RUNTIME_MODE=dev-shim locally): a static "
                              "document cannot bind the one-shot KMS recipient key")
        if strict and kms_region and ("kms." + kms_region + ".amazonaws.com", 443) not in routes:
            r.problems.append(f"ENCLAVE_SECRETS_SOURCE=kms needs an ENCLAVE_EGRESS_ROUTES route "
                              f"for kms.{kms_region}.amazonaws.com:443 when ALFRED_ENV={env}")
    elif kms_endpoint is not None:
        r.problems.append("ENCLAVE_KMS_ENDPOINT is used only with ENCLAVE_SECRETS_SOURCE=kms")
    if mode == "dev-shim" and not strict:  # strict environments reject dev-shim outright
        if env_unreadable:
            pass
        elif not allow_insecure and local and r.raw("TEE_ALLOW_INSECURE_DEV_ATTESTATION") is None:
            r.problems.append("TEE_ALLOW_INSECURE_DEV_ATTESTATION must be set to true for "
                              f"dev-shim attestation: it defaults to true only when "
                              f"ALFRED_ENV=local and both listeners are on loopback, "
                              f"{why_not_local}")
        elif not allow_insecure:
            r.problems.append("ENCLAVE_RUNTIME_MODE=dev-shim requires TEE_ALLOW_INSECURE_DEV_ATTESTATION=true")
        if required:
            r.problems.append("ENCLAVE_RUNTIME_MODE=dev-shim requires TEE_ATTESTATION_REQUIRED=false")
    if (mode == "remote" or strict) and not (doc_path or doc_b64):
        r.problems.append("TEE_ATTESTATION_DOCUMENT_PATH or TEE_ATTESTATION_DOCUMENT must be set "
                          + (f"when ALFRED_ENV={env}" if strict else "when ENCLAVE_RUNTIME_MODE=remote"))
    if strict:
        if mode != "remote":
            r.problems.append(f"ENCLAVE_RUNTIME_MODE must be remote when ALFRED_ENV={env}")
        if not required:
            r.problems.append(f"TEE_ATTESTATION_REQUIRED must be true when ALFRED_ENV={env}")
        if allow_insecure:
            r.problems.append(f"TEE_ALLOW_INSECURE_DEV_ATTESTATION must be false when ALFRED_ENV={env}")
        if signing_value is None:
            r.problems.append(f"TEE_ATTESTATION_SIGNING_PRIVATE_KEY must be set when "
                              f"ALFRED_ENV={env}: {EPHEMERAL_SIGNING_KEY} with "
                              f"TEE_ATTESTATION_DOCUMENT_PATH={nsm_device}, or a key for a "
                              "static document")
        elif signing_key is not None and doc_path == nsm_device:
            r.problems.append(f"TEE_ATTESTATION_SIGNING_PRIVATE_KEY must be {EPHEMERAL_SIGNING_KEY} "
                              f"with TEE_ATTESTATION_DOCUMENT_PATH={nsm_device} when "
                              f"ALFRED_ENV={env}: a key in the environment is in the public "
                              "image, so anyone holding it could sign as the enclave")
        for name in CHANNEL_ONLY_SECRETS:
            if r.raw(name) is not None:
                r.problems.append(f"{name} is a secret: when ALFRED_ENV={env} it arrives only "
                                  "over the secrets channel, never from the environment (an "
                                  "enclave's environment is its public image)")
        for name in ("GOOGLE_OAUTH_TOKEN_URL", "GOOGLE_OAUTH_REVOKE_URL", "ENCLAVE_OUTBOUND_CA_FILE",
                     "ENCLAVE_KMS_ENDPOINT"):
            if r.raw(name) is not None:
                r.problems.append(f"{name} may only be overridden when ALFRED_ENV is local or test")
        for name in ("ECS_WATERMARK_ENDPOINT",):
            if r.raw(name) is not None:
                r.problems.append(f"{name} comes over the secrets channel when ALFRED_ENV={env} "
                                  "(the environment is for local development)")
    elif secret is None and not local:
        r.problems.append("ENCLAVE_RPC_SHARED_SECRET must be set unless ALFRED_ENV=local")
    elif secret is None and not local_defaults and not env_unreadable:
        r.problems.append("ENCLAVE_RPC_SHARED_SECRET must be set: the published local default "
                          f"is used only when ALFRED_ENV=local and both listeners are on "
                          f"loopback, {why_not_local}")
    if secret == LOCAL_DEFAULT_RPC_SECRET and not strict:
        if not local:
            r.problems.append("ENCLAVE_RPC_SHARED_SECRET: the local default is accepted only "
                              "when ALFRED_ENV=local")
        elif not local_defaults and not env_unreadable:
            r.problems.append("ENCLAVE_RPC_SHARED_SECRET: the published local default is "
                              "accepted only when ALFRED_ENV=local and both listeners are on "
                              f"loopback, {why_not_local}")

    if r.problems:
        problems = r.problems
        for name in r.undecodable:  # named once, by its own problem
            own = f"{name} is not valid UTF-8"
            problems = [p for p in problems if p == own or not p.startswith(name)]
        # de-duplicate, keep order
        raise ConfigError(list(dict.fromkeys(problems)))
    return Settings(
        env=env, mode=mode, base_url=base_url, http_listen=http_listen,
        secrets_listen=secrets_listen, secrets_allowed_peers=peers,
        secrets_initial_timeout_s=timeout, certs_dir=certs_dir, state_dir=state_dir,
        attestation_required=required, allow_insecure_dev_attestation=allow_insecure,
        signing_private_key_pem=signing_key, attestation_document_path=doc_path,
        attestation_document_b64=doc_b64,
        rpc_shared_secret=secret if secret is not None or strict else LOCAL_DEFAULT_RPC_SECRET,
        allow_local_default_secret=local_defaults,
        rpc_max_skew_s=skew, mtls_client_cert_json=mtls_json,
        ecs_watermark_endpoint=endpoint, ecs_watermark_path=wm_path,
        google_client_id=google_client_id, google_client_secret=google_client_secret,
        google_token_url=token_url, google_revoke_url=revoke_url, outbound_ca_file=ca_file,
        token_sealing_key=sealing_key, egress_routes=egress_routes,
        log_format=log_format, log_level=log_level, ready_requires=ready_requires,
        secrets_source=source, kms_key_arn=kms_key_arn, kms_endpoint=kms_endpoint,
        log_sink=log_sink,
    )


def report_problems(problems: list[str]) -> None:
    """Print every problem to stderr, one per line (the caller exits 2)."""
    print("configuration error:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def load_or_report(env_file: str | None):
    """Settings, or None after printing every problem to stderr (the caller exits 2)."""
    try:
        return load_settings(dotenv=env_file)
    except ConfigError as exc:
        report_problems(exc.problems)
        return None
