"""Egress over VSOCK (docs/DESIGN.md §10).

An enclave has no network. `ENCLAVE_EGRESS_ROUTES` maps `host:port` to the VSOCK address of a
`vsock-proxy` on the parent: `oauth2.googleapis.com:443=vsock:3:8443,...`. The connector opens an
AF_VSOCK stream to the route target (TLS then runs over it with `server_hostname=host`, see
outbound.py). What happens to a host without a route is the caller's choice, made once:

- `fail_closed=True` (staging and production): refused with EgressNotRouted (code
  `egress_not_routed`) before any socket exists, so an enclave never tries a network it lacks
  and a missing route is named instead of surfacing as a connect timeout;
- `fail_closed=False` (local development and tests): connected over TCP directly.

`is_routed` / `require_route` answer the same question without a connector, for validators
(a delivered ECS_WATERMARK_ENDPOINT must have a route in staging and production).
The production route list is generated from deploy/egress-routes.json by deploy/generate.py,
together with the parent's vsock-proxy allow-list, so the two cannot drift.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable

from .addresses import VSOCK_CID_ANY, AddressError, parse_address, split_host_port
from .errors import EnclaveError

VARIABLE = "ENCLAVE_EGRESS_ROUTES"
MAX_ROUTES = 64  # a route table longer than this is a mistake, not a configuration
NOT_ROUTED_CODE = "egress_not_routed"


class EgressError(EnclaveError):
    """A malformed route table, or a route that cannot be used on this machine.

    `code` is the snake_case name a caller maps to its answer (see EgressNotRouted).
    """

    code = "egress_error"


class EgressNotRouted(EgressError):
    """A host:port without a route while direct connections are refused (fail closed)."""

    code = NOT_ROUTED_CODE

    def __init__(self, host: str, port: int):
        shown = f"[{host}]" if ":" in host else host
        super().__init__(f"{NOT_ROUTED_CODE}: no route for {shown}:{port} in {VARIABLE} "
                         "and direct connections are refused")
        self.host = host
        self.port = port


@dataclass(frozen=True)
class Route:
    host: str  # lower case; IPv6 without brackets
    port: int
    cid: int
    vsock_port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}=vsock:{self.cid}:{self.vsock_port}"


def _parse_host_port(text: str, where: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(text, where, min_port=1)
    except AddressError as exc:
        raise EgressError(str(exc)) from None
    return host.lower(), port


def parse_routes(text: str | None) -> dict[tuple[str, int], Route]:
    """Parse `host:port=vsock:CID:PORT,...` into {(host, port): Route}; EgressError if malformed.

    None or an empty string means no routes. Entries are separated by commas; spaces around
    entries are ignored; a host:port may appear once.
    """
    routes: dict[tuple[str, int], Route] = {}
    if text is None or not text.strip():
        return routes
    entries = text.split(",")
    if len(entries) > MAX_ROUTES:
        raise EgressError(f"{VARIABLE}: at most {MAX_ROUTES} routes, got {len(entries)}")
    for index, entry in enumerate(entries, 1):
        entry = entry.strip()
        where = f"{VARIABLE} entry {index}"
        if not entry:
            raise EgressError(f"{where}: empty entry (check for a doubled or trailing comma)")
        source, sep, target = entry.partition("=")
        if not sep:
            raise EgressError(f"{where}: expected host:port=vsock:CID:PORT, got {entry!r}")
        host, port = _parse_host_port(source.strip(), where)
        try:
            address = parse_address(target.strip(), where)
        except AddressError as exc:
            raise EgressError(str(exc)) from None
        if address.family != "vsock":
            raise EgressError(f"{where}: the target must be vsock:CID:PORT, got {target.strip()!r}")
        if address.cid == VSOCK_CID_ANY:
            raise EgressError(f"{where}: the target CID must be a number, not ANY")
        if address.port == 0:
            raise EgressError(f"{where}: the target port must be 1..65535")
        if (host, port) in routes:
            raise EgressError(f"{where}: duplicate route for {source.strip()}")
        routes[(host, port)] = Route(host, port, address.cid, address.port)
    return routes


def _route_key(host: str, port: int) -> tuple[str, int]:
    return host.lower().strip("[]"), port


def is_routed(routes: dict[tuple[str, int], Route], host: str, port: int) -> bool:
    """True if `routes` (from parse_routes) has a route for host:port (host case-insensitive)."""
    return _route_key(host, port) in routes


def require_route(routes: dict[tuple[str, int], Route], host: str, port: int) -> Route:
    """The route for host:port, or EgressNotRouted."""
    route = routes.get(_route_key(host, port))
    if route is None:
        raise EgressNotRouted(host.strip("[]"), port)
    return route


def _vsock_connect(sock: socket.socket, address: tuple[int, int]) -> socket.socket:
    sock.connect(address)
    return sock


def _tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Connector:
    """Opens the stream for (host, port): AF_VSOCK to its route target; without a route,
    EgressNotRouted when `fail_closed`, else TCP directly.

    `fail_closed` defaults to False only so that existing local-development callers keep
    working; the runtime passes `fail_closed=settings.strict` (staging and production).

    `vsock_connect(sock, (cid, port)) -> socket` performs the final connect on the AF_VSOCK socket
    this class created; tests replace it (and only it) with a function that closes that socket and
    returns a loopback TCP one, so the code path up to `connect` stays the real one.
    """

    def __init__(self, routes: dict[tuple[str, int], Route] | None = None, *,
                 fail_closed: bool = False,
                 vsock_connect: Callable[[socket.socket, tuple[int, int]],
                                         socket.socket] | None = None,
                 tcp_connect: Callable[[str, int, float], socket.socket] = _tcp_connect):
        self.routes = dict(routes or {})
        self.fail_closed = fail_closed
        self._vsock_connect = vsock_connect
        self._tcp_connect = tcp_connect

    @classmethod
    def from_setting(cls, text: str | None, **kwargs) -> "Connector":
        return cls(parse_routes(text), **kwargs)

    def route_for(self, host: str, port: int) -> Route | None:
        return self.routes.get(_route_key(host, port))

    def connect(self, host: str, port: int, timeout: float) -> socket.socket:
        route = self.route_for(host, port)
        if route is None:
            if self.fail_closed:
                raise EgressNotRouted(host.strip("[]"), port)
            return self._tcp_connect(host, port, timeout)
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise EgressError(f"route {route} needs AF_VSOCK, which this platform lacks")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            # the module's function is looked up at call time, so a test can also guard it
            final_connect = self._vsock_connect or _vsock_connect
            return final_connect(sock, (route.cid, route.vsock_port))
        except BaseException:
            sock.close()
            raise
