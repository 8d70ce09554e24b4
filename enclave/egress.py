"""Egress over VSOCK (DESIGN.md section 10).

An enclave has no network. `ENCLAVE_EGRESS_ROUTES` maps `host:port` to the VSOCK address of a
`vsock-proxy` on the parent: `oauth2.googleapis.com:443=vsock:3:8443,...`. The connector opens an
AF_VSOCK stream to the route target (TLS then runs over it with `server_hostname=host`, see
outbound.py); hosts without a route are reached over TCP directly (local development).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable

from .addresses import VSOCK_CID_ANY, AddressError, parse_address, split_host_port
from .errors import EnclaveError

VARIABLE = "ENCLAVE_EGRESS_ROUTES"
MAX_ROUTES = 64  # a route table longer than this is a mistake, not a configuration


class EgressError(EnclaveError):
    """A malformed route table, or a route that cannot be used on this machine."""


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


def _vsock_connect(sock: socket.socket, address: tuple[int, int]) -> socket.socket:
    sock.connect(address)
    return sock


def _tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Connector:
    """Opens the stream for (host, port): AF_VSOCK to its route target, else TCP directly.

    `vsock_connect(sock, (cid, port)) -> socket` performs the final connect on the AF_VSOCK socket
    this class created; tests replace it (and only it) with a function that closes that socket and
    returns a loopback TCP one, so the code path up to `connect` stays the real one.
    """

    def __init__(self, routes: dict[tuple[str, int], Route] | None = None, *,
                 vsock_connect: Callable[[socket.socket, tuple[int, int]],
                                         socket.socket] = _vsock_connect,
                 tcp_connect: Callable[[str, int, float], socket.socket] = _tcp_connect):
        self.routes = dict(routes or {})
        self._vsock_connect = vsock_connect
        self._tcp_connect = tcp_connect

    @classmethod
    def from_setting(cls, text: str | None, **kwargs) -> "Connector":
        return cls(parse_routes(text), **kwargs)

    def route_for(self, host: str, port: int) -> Route | None:
        return self.routes.get((host.lower().strip("[]"), port))

    def connect(self, host: str, port: int, timeout: float) -> socket.socket:
        route = self.route_for(host, port)
        if route is None:
            return self._tcp_connect(host, port, timeout)
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise EgressError(f"route {route} needs AF_VSOCK, which this platform lacks")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            return self._vsock_connect(sock, (route.cid, route.vsock_port))
        except BaseException:
            sock.close()
            raise
