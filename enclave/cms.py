"""KMS `CiphertextForRecipient`: a strict reader for its one CMS shape, and the data key inside.

docs/DESIGN.md §15 step 5. The blob is a CMS ContentInfo holding an EnvelopedData (RFC 5652)
in BER: constructed nodes may use indefinite lengths, primitives are definite, lengths minimal.
Exactly this shape is accepted, nothing else:

    ContentInfo SEQUENCE { id-envelopedData, [0] EXPLICIT EnvelopedData SEQUENCE {
        version 2,
        recipientInfos SET { KeyTransRecipientInfo SEQUENCE {          -- exactly one
            version 2, rid [0] subjectKeyIdentifier (ignored),
            keyEncryptionAlgorithm { id-RSAES-OAEP, { [0] sha256, [1] { id-mgf1, sha256 } } },
            encryptedKey OCTET STRING (256 bytes: RSA-2048) } },
        encryptedContentInfo SEQUENCE { id-data, { aes256-CBC, IV OCTET STRING (16) },
            [0] IMPLICIT encryptedContent: primitive, or constructed of OCTET STRING chunks } } }

with no originatorInfo, no unprotectedAttrs and no trailing bytes. A sha256 AlgorithmIdentifier
may carry NULL parameters (KMS) or none (OpenSSL); an explicit pSourceFunc [2] is refused. A trust
core: bytes and a key in, bytes out, no I/O. Every failure raises CmsError.
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import EnclaveError

RSA_KEY_BITS = 2048  # the enclave's one-shot recipient key (docs/DESIGN.md §15 step 2)
ENCRYPTED_KEY_BYTES = RSA_KEY_BITS // 8  # an RSA ciphertext is as long as the modulus
CONTENT_KEY_BYTES = 32  # AES-256
IV_BYTES = 16  # the AES block
AES_BLOCK_BYTES = 16
DATA_KEY_BYTES = 32  # the result: an AES-256 data key from GenerateDataKey
MAX_CONTENT_BYTES = 6144  # encrypted content; KMS answers at most 4 KiB of plaintext, padded
# Whole blob: the content, its chunk headers (KMS uses 1000-byte chunks, 4 bytes each) and about
# 500 bytes of structure, with room for a producer that chunks more finely.
MAX_BLOB_BYTES = 16384
MAX_KEY_ID_BYTES = 64  # subjectKeyIdentifier: KMS sends 32 bytes, OpenSSL 20; ignored anyway
MAX_LENGTH_OCTETS = 2  # a definite long-form length never needs more below MAX_BLOB_BYTES

# Tags (one byte each: every tag in the shape has a low tag number).
_INTEGER, _OCTET_STRING, _NULL, _OID = 0x02, 0x04, 0x05, 0x06
_SEQUENCE, _SET = 0x30, 0x31
_CTX0_PRIMITIVE, _CTX0, _CTX1 = 0x80, 0xA0, 0xA1
_CONSTRUCTED_BIT = 0x20

# Object identifiers as their DER content octets.
_OID_ENVELOPED_DATA = bytes.fromhex("2a864886f70d010703")  # 1.2.840.113549.1.7.3
_OID_DATA = bytes.fromhex("2a864886f70d010701")  # 1.2.840.113549.1.7.1
_OID_RSAES_OAEP = bytes.fromhex("2a864886f70d010107")  # 1.2.840.113549.1.1.7
_OID_MGF1 = bytes.fromhex("2a864886f70d010108")  # 1.2.840.113549.1.1.8
_OID_SHA256 = bytes.fromhex("608648016503040201")  # 2.16.840.1.101.3.4.2.1
_OID_AES256_CBC = bytes.fromhex("60864801650304012a")  # 2.16.840.1.101.3.4.1.42
_VERSION_2 = b"\x02"

_DECRYPT_FAILED = "CiphertextForRecipient does not decrypt to a data key under this recipient key"


class CmsError(EnclaveError):
    """A CiphertextForRecipient that is not the expected shape or does not decrypt."""


@dataclasses.dataclass(frozen=True)
class Enveloped:
    """The parts of a CiphertextForRecipient needed to decrypt it (structure only)."""
    encrypted_key: bytes  # RSAES-OAEP(SHA-256) of the AES-256 content-encryption key
    iv: bytes  # AES-256-CBC IV
    encrypted_content: bytes  # AES-256-CBC ciphertext, chunks concatenated


def _malformed(what: str) -> CmsError:
    return CmsError(f"CiphertextForRecipient is malformed: {what}")


class _Reader:
    """Consecutive BER elements in data[pos:end]; `indefinite` when it must close with 00 00."""

    def __init__(self, data: bytes, pos: int, end: int, indefinite: bool):
        self.data, self.pos, self.end, self.indefinite = data, pos, end, indefinite

    def _header(self, tag: int) -> int | None:
        """Consume the tag and length; the content length, or None for an indefinite one."""
        data, pos = self.data, self.pos
        if pos + 2 > self.end:
            raise _malformed(f"expected tag 0x{tag:02x} at offset {pos}, got the end")
        if data[pos] != tag:
            raise _malformed(f"expected tag 0x{tag:02x} at offset {pos}, got 0x{data[pos]:02x}")
        first, pos = data[pos + 1], pos + 2
        if first == 0x80:
            if not tag & _CONSTRUCTED_BIT:
                raise _malformed(f"indefinite length on primitive tag 0x{tag:02x}")
            self.pos = pos
            return None
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count > MAX_LENGTH_OCTETS or pos + count > self.end:
                raise _malformed(f"length of tag 0x{tag:02x} at offset {self.pos} is too long")
            octets = data[pos:pos + count]
            length, pos = int.from_bytes(octets, "big"), pos + count
            if octets[0] == 0 or length < 0x80:
                raise _malformed(f"length of tag 0x{tag:02x} at offset {self.pos} is not minimal")
        if length > self.end - pos:
            raise _malformed(f"tag 0x{tag:02x} at offset {self.pos} runs past its container")
        self.pos = pos
        return length

    def primitive(self, tag: int) -> bytes:
        length = self._header(tag)
        value = self.data[self.pos:self.pos + length]
        self.pos += length
        return value

    def expect(self, tag: int, value: bytes, what: str) -> None:
        if self.primitive(tag) != value:
            raise _malformed(f"expected {what}")

    def open(self, tag: int) -> "_Reader":
        """Enter a constructed element; close() it when its content has been read."""
        length = self._header(tag)
        if length is None:
            return _Reader(self.data, self.pos, self.end, indefinite=True)
        return _Reader(self.data, self.pos, self.pos + length, indefinite=False)

    def close(self, inner: "_Reader") -> None:
        if inner.indefinite:
            if inner.data[inner.pos:inner.pos + 2] != b"\x00\x00" or inner.pos + 2 > inner.end:
                raise _malformed(f"expected end-of-contents at offset {inner.pos}")
            self.pos = inner.pos + 2
        else:
            if inner.pos != inner.end:
                raise _malformed(f"unexpected bytes at offset {inner.pos}")
            self.pos = inner.end

    def next_is(self, tag: int) -> bool:
        return self.pos < self.end and self.data[self.pos] == tag

    def at_close(self) -> bool:
        if self.indefinite:
            return self.data[self.pos:self.pos + 2] == b"\x00\x00"
        return self.pos >= self.end


def _sha256_algorithm(reader: _Reader) -> None:
    """AlgorithmIdentifier { id-sha256, NULL or absent } (RFC 4055 section 2.1 allows both)."""
    alg = reader.open(_SEQUENCE)
    alg.expect(_OID, _OID_SHA256, "SHA-256 in the OAEP parameters")
    if alg.next_is(_NULL):
        alg.expect(_NULL, b"", "NULL parameters for SHA-256")
    reader.close(alg)


def _key_transport(recipients: _Reader) -> bytes:
    """The one KeyTransRecipientInfo; returns its encrypted key."""
    ktri = recipients.open(_SEQUENCE)
    ktri.expect(_INTEGER, _VERSION_2, "KeyTransRecipientInfo version 2 (subjectKeyIdentifier)")
    key_id = ktri.primitive(_CTX0_PRIMITIVE)  # which key: ignored, there is only one
    if not 0 < len(key_id) <= MAX_KEY_ID_BYTES:
        raise _malformed(f"subjectKeyIdentifier must be 1..{MAX_KEY_ID_BYTES} bytes")
    alg = ktri.open(_SEQUENCE)
    alg.expect(_OID, _OID_RSAES_OAEP, "RSAES-OAEP key transport")
    params = alg.open(_SEQUENCE)
    hash_field = params.open(_CTX0)
    _sha256_algorithm(hash_field)
    params.close(hash_field)
    mgf_field = params.open(_CTX1)
    mgf = mgf_field.open(_SEQUENCE)
    mgf.expect(_OID, _OID_MGF1, "MGF1 in the OAEP parameters")
    _sha256_algorithm(mgf)
    mgf_field.close(mgf)
    params.close(mgf_field)
    alg.close(params)  # nothing after [1]: a pSourceFunc [2] (a label) is refused here
    ktri.close(alg)
    encrypted_key = ktri.primitive(_OCTET_STRING)
    if len(encrypted_key) != ENCRYPTED_KEY_BYTES:
        raise _malformed(f"encrypted key must be {ENCRYPTED_KEY_BYTES} bytes (RSA-{RSA_KEY_BITS}),"
                         f" got {len(encrypted_key)}")
    recipients.close(ktri)
    return encrypted_key


def _encrypted_content(info: _Reader) -> bytes:
    """[0] IMPLICIT OCTET STRING: primitive, or constructed of primitive non-empty chunks."""
    if info.next_is(_CTX0_PRIMITIVE):
        return info.primitive(_CTX0_PRIMITIVE)
    chunks = []
    content = info.open(_CTX0)
    while not content.at_close():
        chunk = content.primitive(_OCTET_STRING)
        if not chunk:
            raise _malformed("empty encrypted content chunk")
        chunks.append(chunk)
    info.close(content)
    return b"".join(chunks)


def parse_enveloped(blob: bytes) -> Enveloped:
    """Read the shape in the module docstring, or raise CmsError."""
    if not isinstance(blob, (bytes, bytearray)):
        raise CmsError("CiphertextForRecipient must be bytes")
    if not blob or len(blob) > MAX_BLOB_BYTES:
        raise _malformed(f"size must be 1..{MAX_BLOB_BYTES} bytes, got {len(blob)}")
    blob = bytes(blob)
    root = _Reader(blob, 0, len(blob), indefinite=False)
    content_info = root.open(_SEQUENCE)
    content_info.expect(_OID, _OID_ENVELOPED_DATA, "an EnvelopedData ContentInfo")
    explicit = content_info.open(_CTX0)
    enveloped = explicit.open(_SEQUENCE)
    enveloped.expect(_INTEGER, _VERSION_2, "EnvelopedData version 2")  # no originatorInfo
    recipients = enveloped.open(_SET)
    encrypted_key = _key_transport(recipients)
    enveloped.close(recipients)  # a second RecipientInfo is refused here

    info = enveloped.open(_SEQUENCE)
    info.expect(_OID, _OID_DATA, "id-data content")
    alg = info.open(_SEQUENCE)
    alg.expect(_OID, _OID_AES256_CBC, "AES-256-CBC content encryption")
    iv = alg.primitive(_OCTET_STRING)
    if len(iv) != IV_BYTES:
        raise _malformed(f"IV must be {IV_BYTES} bytes, got {len(iv)}")
    info.close(alg)
    ciphertext = _encrypted_content(info)
    enveloped.close(info)

    explicit.close(enveloped)  # no unprotectedAttrs
    content_info.close(explicit)
    root.close(content_info)
    if root.pos != len(blob):
        raise _malformed(f"trailing bytes after the ContentInfo: {len(blob) - root.pos}")
    if not ciphertext or len(ciphertext) > MAX_CONTENT_BYTES or len(ciphertext) % AES_BLOCK_BYTES:
        raise _malformed(f"encrypted content must be 16..{MAX_CONTENT_BYTES} bytes in whole AES "
                         f"blocks, got {len(ciphertext)}")
    return Enveloped(encrypted_key, iv, ciphertext)


def decrypt_data_key(blob: bytes, rsa_private_key: rsa.RSAPrivateKey) -> bytes:
    """The 32-byte data key in a CiphertextForRecipient, or CmsError.

    A structure error says what is wrong (it depends only on the public blob); every
    cryptographic failure (OAEP, content key size, CBC padding, data key size) raises the same
    error with the same message. Use the RSA key for ONE attempt and then drop it, whatever the
    outcome, so that no failure can be probed twice (no padding oracle).
    """
    if not isinstance(rsa_private_key, rsa.RSAPrivateKey) or \
            rsa_private_key.key_size != RSA_KEY_BITS:
        raise CmsError(f"the recipient key must be an RSA-{RSA_KEY_BITS} private key")
    enveloped = parse_enveloped(blob)
    try:
        content_key = rsa_private_key.decrypt(
            enveloped.encrypted_key,
            OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
        if len(content_key) != CONTENT_KEY_BYTES:
            raise ValueError("content key size")
        decryptor = Cipher(algorithms.AES(content_key), modes.CBC(enveloped.iv)).decryptor()
        padded = decryptor.update(enveloped.encrypted_content) + decryptor.finalize()
        unpadder = padding.PKCS7(AES_BLOCK_BYTES * 8).unpadder()
        data_key = unpadder.update(padded) + unpadder.finalize()
    except Exception:  # one error for every failure: nothing tells a padding error apart
        raise CmsError(_DECRYPT_FAILED) from None
    if len(data_key) != DATA_KEY_BYTES:
        raise CmsError(_DECRYPT_FAILED)
    return data_key
