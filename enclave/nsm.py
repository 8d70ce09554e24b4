"""The Nitro Secure Module device: ask /dev/nsm for an attestation document over its ioctl.

Wire format (aws-nitro-enclaves-nsm-api `src/driver`, Linux `drivers/misc/nsm.c`): one ioctl
_IOWR(0x0A, 0, 32) whose argument is two iovecs {u64 base, u64 len}: the CBOR request and a
response buffer. The device writes the CBOR answer into the response buffer and stores its
length back into the response iovec (truncating silently if the buffer is too small).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct

import cbor2

from .errors import EnclaveError
from .nitro import cose

logger = logging.getLogger(__name__)

NSM_IOCTL_MAGIC = 0x0A
NSM_MESSAGE_BYTES = 32  # two iovecs of (u64 base, u64 len)
NSM_IOCTL_REQUEST = 0xC0200A00  # _IOWR(0x0A, 0, 32): dir=3 << 30 | size 32 << 16 | 0x0A << 8 | 0
NSM_REQUEST_MAX_BYTES = 0x1000  # the driver refuses larger requests
NSM_RESPONSE_MAX_BYTES = 0x3000  # response buffer size the AWS library uses (12 KiB)
NSM_USER_FIELD_MAX_BYTES = 1024  # user_data, nonce and public_key each hold at most 1 KiB
NSM_RESPONSE_MAX_DEPTH = 4  # {"Attestation": {"document": bytes}}: two maps, with room to spare
# Native order: request.base, request.len, response.base, response.len.
_MESSAGE = struct.Struct("=QQQQ")

assert _MESSAGE.size == NSM_MESSAGE_BYTES
assert NSM_IOCTL_REQUEST == (3 << 30) | (NSM_MESSAGE_BYTES << 16) | (NSM_IOCTL_MAGIC << 8)


class NsmError(EnclaveError):
    """The NSM refused, failed or answered something that is not an attestation document."""


def encode_request(*, user_data: bytes | None, nonce: bytes | None,
                   public_key: bytes | None) -> bytes:
    """CBOR {"Attestation": {"user_data", "nonce", "public_key"}} (null for absent fields)."""
    for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
        if value is not None and not isinstance(value, bytes):
            raise NsmError(f"{name} must be bytes, got {type(value).__name__}")
        if value is not None and len(value) > NSM_USER_FIELD_MAX_BYTES:
            raise NsmError(f"{name} is {len(value)} bytes, the NSM accepts at most "
                           f"{NSM_USER_FIELD_MAX_BYTES}")
    request = cbor2.dumps({"Attestation": {
        "user_data": user_data, "nonce": nonce, "public_key": public_key}})
    if len(request) > NSM_REQUEST_MAX_BYTES:
        raise NsmError(f"NSM request is {len(request)} bytes, limit {NSM_REQUEST_MAX_BYTES}")
    return request


def decode_response(data: bytes, truncated: bool = False) -> bytes:
    """The document from {"Attestation": {"document": bytes}}, or NsmError for {"Error": ...}."""
    try:
        answer = cose.loads_strict(data, max_depth=NSM_RESPONSE_MAX_DEPTH)
    except cose.CoseError:
        if truncated:
            raise NsmError(f"NSM response filled the whole {NSM_RESPONSE_MAX_BYTES}-byte buffer "
                           "and does not decode: it was truncated") from None
        raise NsmError(f"NSM response is not valid CBOR ({len(data)} bytes)") from None
    if isinstance(answer, dict) and len(answer) == 1:
        if "Error" in answer:
            raise NsmError(f"NSM answered Error: {answer['Error']!r}")
        body = answer.get("Attestation")
        if isinstance(body, dict) and isinstance(body.get("document"), bytes):
            return body["document"]
    shape = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
    raise NsmError(f"unexpected NSM response: expected Attestation.document, got {shape}")


class NsmDevice:
    """An open /dev/nsm. `ioctl` is injectable (default fcntl.ioctl) for a fake device in tests."""

    def __init__(self, path: str, ioctl=None):
        self.path = path
        self._ioctl = ioctl or fcntl.ioctl
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmError(f"cannot open {path}: {exc.strerror} "
                           "(is this a Nitro Enclave?)") from None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def process(self, request: bytes) -> bytes:
        """One raw exchange: CBOR request in, CBOR response out (the production ioctl path)."""
        fd = self._fd  # read once: close() may run on another thread
        if fd is None:
            raise NsmError(f"{self.path} is closed")
        if len(request) > NSM_REQUEST_MAX_BYTES:
            raise NsmError(f"NSM request is {len(request)} bytes, limit {NSM_REQUEST_MAX_BYTES}")
        request_buf = ctypes.create_string_buffer(request, len(request))
        response_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_BYTES)
        message = bytearray(_MESSAGE.pack(ctypes.addressof(request_buf), len(request),
                                          ctypes.addressof(response_buf), NSM_RESPONSE_MAX_BYTES))
        try:
            self._ioctl(fd, NSM_IOCTL_REQUEST, message, True)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise NsmError("NSM refused the request as too large") from None
            raise NsmError(f"NSM ioctl failed: {exc.strerror or exc}") from None
        length = _MESSAGE.unpack(message)[3]
        if length > NSM_RESPONSE_MAX_BYTES:
            raise NsmError(f"NSM reported a {length}-byte response for a "
                           f"{NSM_RESPONSE_MAX_BYTES}-byte buffer")
        return ctypes.string_at(response_buf, length)

    def attestation(self, *, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes:
        """A fresh attestation document (raw COSE_Sign1 bytes) binding these fields."""
        response = self.process(encode_request(user_data=user_data, nonce=nonce,
                                               public_key=public_key))
        return decode_response(response, truncated=len(response) >= NSM_RESPONSE_MAX_BYTES)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
