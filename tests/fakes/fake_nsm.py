"""A fake Nitro Secure Module: an ioctl with the kernel driver's semantics, for NsmDevice.

The production NsmDevice opens a file and calls ioctl(fd, 0xC0200A00, message, True) with two
iovecs. This fake reads the request bytes at the request iovec's address, answers in the real
CBOR format by writing into the response iovec's buffer (ctypes.memmove) and stores the length
back, truncating answers that do not fit like drivers/misc/nsm.c does.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import os
import struct
import tempfile
import time

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave import attestation, devpki, nsm
from enclave.nitro import cose

MESSAGE = struct.Struct("=QQQQ")
MODES = ("ok", "indefinite", "error", "oversized", "errno", "garbage")


def dumps_indefinite(value, *, nested: bool = True) -> bytes:
    """CBOR with indefinite lengths, as AWS has encoded attestation payloads since early 2026.

    The outer map or array is 0xbf/0x9f ... 0xff. With `nested`, so are the maps and arrays
    inside it, and byte and text strings of two or more units are indefinite strings of two
    chunks. Map keys stay definite, as AWS writes them.
    """
    def item(v, depth):
        if isinstance(v, dict) and (nested or depth == 0):
            return b"\xbf" + b"".join(cbor2.dumps(k) + item(x, depth + 1)
                                      for k, x in v.items()) + b"\xff"
        if isinstance(v, list) and (nested or depth == 0):
            return b"\x9f" + b"".join(item(x, depth + 1) for x in v) + b"\xff"
        if nested and isinstance(v, (bytes, str)) and len(v) >= 2:
            start = b"\x5f" if isinstance(v, bytes) else b"\x7f"
            half = len(v) // 2
            return start + cbor2.dumps(v[:half]) + cbor2.dumps(v[half:]) + b"\xff"
        return cbor2.dumps(v)
    return item(value, 0)


TEST_ROOT_COMMON_NAME = "Enclave test Nitro root (tests only)"


def make_test_root(now: float | None = None) -> devpki.Issued:
    """A Nitro-shaped root for tests that must pass strict checks: unlike the dev-shim root its
    subject does not say INSECURE, so `probe --require-attestation --root` accepts it. Valid
    around `now`, Unix seconds (default time.time())."""
    moment = dt.datetime.fromtimestamp(time.time() if now is None else now,
                                       dt.timezone.utc).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TEST_ROOT_COMMON_NAME)])
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(moment - dt.timedelta(hours=1))
            .not_valid_after(moment + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .sign(key, hashes.SHA384()))
    return devpki.Issued(cert, key, cert.public_bytes(serialization.Encoding.DER))


class FakeNsm:
    """Answers Attestation requests with documents signed by an INSECURE dev root."""

    def __init__(self, root: devpki.Issued, *, mode: str = "ok", clock=time.time):
        assert mode in MODES, mode
        self.mode = mode
        self.root = root
        self.leaf = devpki.issue_leaf(root, label="fake-nsm")
        self.clock = clock
        self.module_id = "i-0fake0nsm0000000-enc0000000000000000"
        self.requests: list = []
        # How the payload map is encoded: indefinite lengths in mode "indefinite".
        self.mint_encoder = dumps_indefinite if mode == "indefinite" else cbor2.dumps
        self.fds: list[int] = []
        fd, self.device_path = tempfile.mkstemp(prefix="fake-nsm-")
        os.close(fd)

    def cleanup(self) -> None:
        os.unlink(self.device_path)

    def open(self, path: str = attestation.NSM_DEVICE) -> nsm.NsmDevice:
        """Stands in for NsmDevice(path): the same class, on a plain file, with this ioctl."""
        return nsm.NsmDevice(self.device_path, ioctl=self.ioctl)

    def mint(self, request: dict) -> bytes:
        payload = self.mint_encoder({
            "module_id": self.module_id,
            "digest": "SHA384",
            "timestamp": int(self.clock() * 1000),
            "pcrs": {i: bytes([i + 1]) * 48 for i in range(16)},
            "certificate": self.leaf.cert_der,
            "cabundle": [self.root.cert_der],
            "public_key": request.get("public_key"),
            "user_data": request.get("user_data"),
            "nonce": request.get("nonce"),
        })
        protected = cose.protected_header(cose.ALG_ES384)
        signature = cose.sign(self.leaf.key, cose.ALG_ES384, protected, payload)
        return cose.encode_sign1(protected, payload, signature)

    def answer(self, request: dict) -> bytes:
        if self.mode == "error":
            return cbor2.dumps({"Error": "InvalidArgument"})
        if self.mode == "oversized":
            return cbor2.dumps({"Attestation": {"document": bytes(nsm.NSM_RESPONSE_MAX_BYTES)}})
        if self.mode == "garbage":
            return cbor2.dumps({"DescribePCR": {"lock": False, "data": b""}})
        body = request.get("Attestation") if isinstance(request, dict) else None
        if not isinstance(body, dict):
            return cbor2.dumps({"Error": "InvalidOperation"})
        answer = {"Attestation": {"document": self.mint(body)}}
        return dumps_indefinite(answer) if self.mode == "indefinite" else cbor2.dumps(answer)

    def ioctl(self, fd: int, request: int, arg, mutate_flag: bool = True) -> int:
        os.fstat(fd)  # a real open descriptor, as the kernel would require
        self.fds.append(fd)
        if request != nsm.NSM_IOCTL_REQUEST:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        if not mutate_flag or len(arg) != MESSAGE.size:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if self.mode == "errno":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        req_addr, req_len, resp_addr, resp_len = MESSAGE.unpack_from(arg)
        if req_len > nsm.NSM_REQUEST_MAX_BYTES:
            raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
        request_msg = cbor2.loads(ctypes.string_at(req_addr, req_len))
        self.requests.append(request_msg)
        answer = self.answer(request_msg)
        written = min(len(answer), resp_len)  # the driver truncates what does not fit
        ctypes.memmove(resp_addr, answer, written)
        struct.pack_into("=Q", arg, 24, written)
        return 0
