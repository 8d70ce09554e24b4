"""Listen and connect addresses: `tcp:HOST:PORT` and `vsock:CID|ANY:PORT`."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from .errors import EnclaveError

VSOCK_CID_ANY = 0xFFFFFFFF  # VMADDR_CID_ANY
MAX_PORT = 65535
MAX_VSOCK_CID = 0xFFFFFFFF


class AddressError(EnclaveError):
    """An address string that is not `tcp:HOST:PORT` or `vsock:CID|ANY:PORT`."""


@dataclass(frozen=True)
class Address:
    family: str  # "tcp" or "vsock"
    host: str  # TCP host (empty for vsock)
    port: int
    cid: int = 0  # vsock CID; VSOCK_CID_ANY for ANY

    def __str__(self) -> str:
        if self.family == "vsock":
            cid = "ANY" if self.cid == VSOCK_CID_ANY else str(self.cid)
            return f"vsock:{cid}:{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def socket_family(self) -> int:
        if self.family == "vsock":
            return socket.AF_VSOCK
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def sockaddr(self) -> tuple:
        if self.family == "vsock":
            return (self.cid, self.port)
        return (self.host, self.port)


def split_host_port(text: str, what: str, min_port: int = 0) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` -> (host, port); AddressError naming `what` otherwise."""
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise AddressError(f"{what}: expected [IPv6]:PORT, got {text!r}")
        port_text = tail[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise AddressError(f"{what}: expected host:port, got {text!r}")
        if ":" in host:
            raise AddressError(f"{what}: put IPv6 hosts in brackets, got {text!r}")
    if not host or any(c.isspace() for c in host):
        raise AddressError(f"{what}: missing or invalid host in {text!r}")
    return host, _port(port_text, what, min_port)


def _port(text: str, what: str, min_port: int = 0) -> int:
    if not (text.isascii() and text.isdigit()) or not min_port <= int(text) <= MAX_PORT:
        raise AddressError(f"{what}: port must be {min_port}..{MAX_PORT}, got {text!r}")
    return int(text)


def parse_address(text: str, what: str = "address") -> Address:
    """Parse `tcp:HOST:PORT` (IPv6 hosts in brackets) or `vsock:CID|ANY:PORT`."""
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise AddressError(f"{what}: expected tcp:HOST:PORT or vsock:CID:PORT, got {text!r}")
    if scheme == "tcp":
        host, port = split_host_port(rest, what)
        return Address("tcp", host, port)
    if scheme == "vsock":
        cid_text, sep, port_text = rest.partition(":")
        if not sep:
            raise AddressError(f"{what}: expected vsock:CID:PORT, got {text!r}")
        if cid_text.upper() == "ANY":
            cid = VSOCK_CID_ANY
        elif cid_text.isdigit() and int(cid_text) <= MAX_VSOCK_CID:
            cid = int(cid_text)
        else:
            raise AddressError(f"{what}: vsock CID must be a number or ANY, got {cid_text!r}")
        return Address("vsock", "", _port(port_text, what), cid)
    raise AddressError(f"{what}: unknown transport {scheme!r} (use tcp or vsock)")


def is_loopback_ip(text: str) -> bool:
    """True for a loopback IP address literal (127.0.0.0/8, ::1); names are not resolved."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def peer_label(family: int, peer) -> str:
    """How a connected peer is named in ENCLAVE_SECRETS_ALLOWED_PEERS: `vsock:CID` or an IP."""
    if family == getattr(socket, "AF_VSOCK", -1):
        return f"vsock:{peer[0]}"
    return str(peer[0])
