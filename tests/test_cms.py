"""KMS CiphertextForRecipient: real KMS blobs, envelopes made by `openssl cms`, and refusals."""

import datetime
import os
import pathlib
import shutil
import subprocess
import tempfile
import unittest

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

from enclave import cms
from enclave.cms import CmsError, decrypt_data_key, parse_enveloped
from tests.fakes.fake_kms import indefinite, tlv
from tests.support import remember_private_key, remember_secret, scan_later

DATA = pathlib.Path(__file__).parent / "data" / "kms"
OPENSSL = shutil.which("openssl")
OPENSSL_TIMEOUT_S = 30  # one `openssl cms -encrypt` of a few KiB takes milliseconds
# (file, encrypted content bytes, IV, first bytes of the encrypted key, content chunked?)
REAL_BLOBS = (
    ("aws_nitro_enclaves_sdk_c_cms_test_sample.ber", 48, "688c6d5f7f31b0fecedf09f2e7c99ac9",
     "a0614593", True),
    ("rustcrypto_kms_ciphertext_for_recipient_1.ber", 16, "37343df1470df625eeb6f4bfd2f1acc3",
     "29cffeb1", True),
    ("rustcrypto_kms_ciphertext_for_recipient_2.ber", 48, "688c6d5f7f31b0fecedf09f2e7c99ac9",
     "a0614593", True),
    ("rustcrypto_kms_ciphertext_for_recipient_3.ber", 16, "e66c1172aee0f2f7be34e3afc6b0e4fe",
     "4a1ca122", False),
    ("rustcrypto_kms_ciphertext_for_recipient_4.ber", 4112, "f92dcb53d4617d10fc5a8bff96d7d6ff",
     "a848346b", True),
)
KMS_SKI_OFFSET, KMS_SKI_BYTES = 33, 32  # where the real blobs hold their subjectKeyIdentifier
KMS_CHUNK_BYTES = 1000


# -- the KMS shape, written with the fake KMS's BER writer (checked below to rebuild the real
# blobs byte for byte) --

def oid(hex_content: str) -> bytes:
    return tlv(0x06, bytes.fromhex(hex_content))


ENVELOPED_DATA = oid("2a864886f70d010703")
ID_DATA = oid("2a864886f70d010701")
RSAES_OAEP = oid("2a864886f70d010107")
MGF1_OID = oid("2a864886f70d010108")
P_SPECIFIED = oid("2a864886f70d010109")
SHA256_OID = oid("608648016503040201")
SHA1_OID = oid("2b0e03021a")
AES256_CBC = oid("60864801650304012a")
AES128_CBC = oid("608648016503040102")
SIGNED_DATA = oid("2a864886f70d010702")
SHA256_ALG = tlv(0x30, SHA256_OID, tlv(0x05))  # KMS writes NULL parameters


def oaep_alg(hash_alg: bytes = SHA256_ALG, extra: bytes = b"") -> bytes:
    return tlv(0x30, RSAES_OAEP, tlv(0x30, tlv(0xA0, hash_alg),
                                     tlv(0xA1, tlv(0x30, MGF1_OID, hash_alg)), extra))


def ktri(encrypted_key: bytes, ski: bytes = b"\x11" * KMS_SKI_BYTES, version: int = 2,
         alg: bytes | None = None) -> bytes:
    return tlv(0x30, tlv(0x02, bytes([version])), tlv(0x80, ski), alg or oaep_alg(),
               tlv(0x04, encrypted_key))


def kms_blob(encrypted_key: bytes, iv: bytes, content: bytes, chunk: int | None = KMS_CHUNK_BYTES,
             *, ski: bytes = b"\x11" * KMS_SKI_BYTES, recipients=None, version: int = 2,
             originator: bytes = b"", unprotected: bytes = b"", data_oid: bytes = ID_DATA,
             cipher_alg: bytes | None = None, enc: bytes | None = None,
             outer_oid: bytes = ENVELOPED_DATA) -> bytes:
    """KMS's shape: indefinite outer nodes, content in `chunk`-byte chunks (None: primitive)."""
    if enc is None:
        enc = (tlv(0x80, content) if chunk is None else indefinite(
            0xA0, *[tlv(0x04, content[i:i + chunk]) for i in range(0, len(content), chunk)]))
    if recipients is None:
        recipients = [ktri(encrypted_key, ski)]
    info = indefinite(0x30, data_oid, cipher_alg or tlv(0x30, AES256_CBC, tlv(0x04, iv)), enc)
    enveloped = indefinite(0x30, tlv(0x02, bytes([version])), originator,
                           tlv(0x31, *recipients), info, unprotected)
    return indefinite(0x30, outer_oid, indefinite(0xA0, enveloped))


def aes_cbc(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def seal_for(public_key, data_key: bytes, *, content_key: bytes | None = None,
             label: bytes | None = None, oaep_hash=hashes.SHA256, **shape) -> bytes:
    """What KMS would answer: data_key under a fresh AES-256 key wrapped with RSAES-OAEP."""
    content_key = content_key if content_key is not None else os.urandom(32)
    iv = os.urandom(16)
    wrapped = public_key.encrypt(content_key, OAEP(mgf=MGF1(oaep_hash()), algorithm=oaep_hash(),
                                                   label=label))
    return kms_blob(wrapped, iv, aes_cbc(content_key, iv, data_key), **shape)


def new_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    remember_private_key(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()),
                         kind=f"RSA-{bits} test recipient key")
    return key


def write_cert(key: rsa.RSAPrivateKey, path: pathlib.Path) -> bytes:
    """A self-signed certificate with a subjectKeyIdentifier (what `-keyid` puts in the rid)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cms test recipient")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=36500))
            .add_extension(ski, critical=False).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ski.digest


class RealBlobTest(unittest.TestCase):
    """(a) KMS's own answers (structure only: their private keys are not public)."""

    def test_structure(self):
        for name, content_bytes, iv, key_prefix, chunked in REAL_BLOBS:
            with self.subTest(name):
                blob = (DATA / name).read_bytes()
                parsed = parse_enveloped(blob)
                self.assertEqual(len(parsed.encrypted_key), 256)
                self.assertEqual(parsed.encrypted_key[:4].hex(), key_prefix)
                self.assertEqual(parsed.iv.hex(), iv)
                self.assertEqual(len(parsed.encrypted_content), content_bytes)

    def test_the_writer_rebuilds_each_blob_byte_for_byte(self):
        # Proves that the refusal variants below differ from KMS's shape only where intended,
        # and that chunks (4 x 1000 + 112 bytes in _4) are concatenated in order.
        for name, _, _, _, chunked in REAL_BLOBS:
            with self.subTest(name):
                blob = (DATA / name).read_bytes()
                parsed = parse_enveloped(blob)
                ski = blob[KMS_SKI_OFFSET:KMS_SKI_OFFSET + KMS_SKI_BYTES]
                rebuilt = kms_blob(parsed.encrypted_key, parsed.iv, parsed.encrypted_content,
                                   KMS_CHUNK_BYTES if chunked else None, ski=ski)
                self.assertEqual(rebuilt, blob)

    def test_every_truncation_is_refused(self):
        for name, *_ in REAL_BLOBS:
            blob = (DATA / name).read_bytes()
            for end in range(len(blob)):
                with self.subTest(name, end=end), self.assertRaises(CmsError):
                    parse_enveloped(blob[:end])

    def test_trailing_bytes_are_refused(self):
        blob = (DATA / REAL_BLOBS[1][0]).read_bytes()
        for extra in (b"\x00", b"\x00\x00", b"\x30\x00", blob):
            with self.subTest(extra=extra[:4]), self.assertRaises(CmsError):
                parse_enveloped(blob + extra)


class DecryptTest(unittest.TestCase):
    """Envelopes in KMS's exact shape, made here for a key the test holds."""

    @classmethod
    def setUpClass(cls):
        cls.key = new_key()
        cls.other_key = new_key()
        cls.data_key = os.urandom(32)
        remember_secret(cls.data_key, kind="test data key")

    def test_decrypts_to_the_data_key(self):
        for label, shape in (("chunked", {}), ("primitive", {"chunk": None}),
                             ("16-byte chunks", {"chunk": 16})):
            with self.subTest(label):
                blob = seal_for(self.key.public_key(), self.data_key, **shape)
                self.assertEqual(decrypt_data_key(blob, self.key), self.data_key)

    def test_sha256_parameters_may_be_absent(self):
        wrapped = self.key.public_key().encrypt(
            content_key := os.urandom(32), OAEP(MGF1(hashes.SHA256()), hashes.SHA256(), None))
        iv = os.urandom(16)
        absent = tlv(0x30, SHA256_OID)  # OpenSSL's form
        blob = kms_blob(wrapped, iv, aes_cbc(content_key, iv, self.data_key),
                        recipients=[ktri(wrapped, alg=oaep_alg(absent))])
        self.assertEqual(decrypt_data_key(blob, self.key), self.data_key)

    def test_cryptographic_failures_are_one_error_with_one_message(self):
        public = self.key.public_key()
        cases = {
            "wrong private key": (seal_for(public, self.data_key), self.other_key),
            "OAEP label": (seal_for(public, self.data_key, label=b"x"), self.key),
            "OAEP SHA-1 under a SHA-256 claim": (seal_for(public, self.data_key,
                                                          oaep_hash=hashes.SHA1), self.key),
            "AES-128 content key": (seal_for(public, self.data_key,
                                             content_key=os.urandom(16)), self.key),
            "plaintext 0 bytes": (seal_for(public, b""), self.key),
            "plaintext 16 bytes": (seal_for(public, self.data_key[:16]), self.key),
            "plaintext 31 bytes": (seal_for(public, self.data_key[:31]), self.key),
            "plaintext 33 bytes": (seal_for(public, self.data_key + b"x"), self.key),
            "plaintext 64 bytes": (seal_for(public, self.data_key * 2), self.key),
        }
        messages = set()
        for label, (blob, key) in cases.items():
            with self.subTest(label), self.assertRaises(CmsError) as caught:
                decrypt_data_key(blob, key)
            messages.add(str(caught.exception))
        self.assertEqual(len(messages), 1, messages)

    def test_flipped_bytes_in_key_or_last_blocks_are_refused(self):
        blob = seal_for(self.key.public_key(), self.data_key, chunk=None)
        parsed = parse_enveloped(blob)
        key_at = blob.index(parsed.encrypted_key)
        content_at = blob.index(parsed.encrypted_content)
        # Any change to blocks 2 and 3 breaks the padding block (all 0x10) or its length.
        offsets = [key_at + i for i in range(len(parsed.encrypted_key))]
        offsets += [content_at + i for i in range(16, len(parsed.encrypted_content))]
        for offset in offsets:
            changed = bytearray(blob)
            changed[offset] ^= 0x01
            with self.subTest(offset=offset), self.assertRaises(CmsError):
                decrypt_data_key(bytes(changed), self.key)

    def test_cbc_is_malleable_in_the_iv_and_first_block(self):
        # Not an integrity check: such a change yields another 32-byte key, which the envelope's
        # AES-256-GCM tag (docs/DESIGN.md §15 step 6) then refuses.
        blob = seal_for(self.key.public_key(), self.data_key, chunk=None)
        parsed = parse_enveloped(blob)
        changed = bytearray(blob)
        changed[blob.index(parsed.iv)] ^= 0x01
        other = decrypt_data_key(bytes(changed), self.key)
        self.assertEqual(len(other), 32)
        self.assertNotEqual(other, self.data_key)

    def test_every_flipped_byte_raises_only_cms_error(self):
        blob = seal_for(self.key.public_key(), self.data_key, chunk=16)
        parsed = parse_enveloped(blob)
        ski_at = blob.index(b"\x11" * KMS_SKI_BYTES)
        iv_at = blob.index(parsed.iv)
        first_block_at = blob.index(parsed.encrypted_content[:16])
        malleable = range(iv_at, iv_at + 16), range(first_block_at, first_block_at + 16)
        for offset in range(len(blob)):
            changed = bytearray(blob)
            changed[offset] ^= 0x80
            with self.subTest(offset=offset):
                try:
                    result = decrypt_data_key(bytes(changed), self.key)
                except CmsError:
                    continue
                if ski_at <= offset < ski_at + KMS_SKI_BYTES:
                    self.assertEqual(result, self.data_key)  # the key identifier is ignored
                else:  # only the IV or first content block (see the malleability test)
                    self.assertTrue(any(offset in span for span in malleable), offset)
                    self.assertNotEqual(result, self.data_key)

    def test_recipient_key_must_be_rsa_2048(self):
        blob = seal_for(self.key.public_key(), self.data_key)
        for label, key in (("RSA-1024", new_key(1024)), ("not a key", b"key"), ("None", None)):
            with self.subTest(label), self.assertRaises(CmsError):
                decrypt_data_key(blob, key)

    def test_not_bytes(self):
        for value in (None, "30 80", memoryview(b"\x30\x80")):
            with self.subTest(type(value).__name__), self.assertRaises(CmsError):
                parse_enveloped(value)


class ShapeRefusalTest(unittest.TestCase):
    """(c) Every departure from the shape, built with the writer above."""

    def test_refusals(self):
        key, iv, content = os.urandom(256), os.urandom(16), os.urandom(48)
        sha1_alg = tlv(0x30, SHA1_OID, tlv(0x05))
        empty_label = tlv(0xA2, tlv(0x30, P_SPECIFIED, tlv(0x04, b"")))
        cases = {
            "signedData ContentInfo": dict(outer_oid=SIGNED_DATA),
            "EnvelopedData version 0": dict(version=0),
            "originatorInfo": dict(originator=tlv(0xA0)),
            "unprotectedAttrs": dict(unprotected=tlv(0xA1, tlv(0x30))),
            "no recipient": dict(recipients=[]),
            "two recipients": dict(recipients=[ktri(key), ktri(key)]),
            "recipient version 0": dict(recipients=[ktri(key, version=0)]),
            "issuer and serial rid in a version 2 recipient": dict(recipients=[tlv(
                0x30, tlv(0x02, b"\x02"), tlv(0x30, tlv(0x30), tlv(0x02, b"\x01")), oaep_alg(),
                tlv(0x04, key))]),
            "empty key identifier": dict(recipients=[ktri(key, ski=b"")]),
            "key identifier of 65 bytes": dict(recipients=[ktri(key, ski=b"\x01" * 65)]),
            "OAEP with SHA-1": dict(recipients=[ktri(key, alg=oaep_alg(sha1_alg))]),
            "OAEP hash parameters not NULL": dict(recipients=[ktri(key, alg=oaep_alg(
                tlv(0x30, SHA256_OID, tlv(0x04, b""))))]),
            "OAEP explicit pSourceFunc": dict(recipients=[ktri(key, alg=oaep_alg(
                extra=empty_label))]),
            "PKCS#1 v1.5 key transport": dict(recipients=[ktri(key, alg=tlv(
                0x30, oid("2a864886f70d010101"), tlv(0x05)))]),
            "encrypted key of RSA-1024": dict(recipients=[ktri(key[:128])]),
            "encrypted key of RSA-3072": dict(recipients=[ktri(key + key[:128])]),
            "content type not id-data": dict(data_oid=ENVELOPED_DATA),
            "AES-128-CBC": dict(cipher_alg=tlv(0x30, AES128_CBC, tlv(0x04, iv))),
            "IV of 12 bytes": dict(cipher_alg=tlv(0x30, AES256_CBC, tlv(0x04, iv[:12]))),
            "IV with extra parameter": dict(cipher_alg=tlv(0x30, AES256_CBC, tlv(0x04, iv),
                                                          tlv(0x05))),
            "no encrypted content": dict(enc=b""),
            "empty primitive content": dict(enc=tlv(0x80, b"")),
            "empty chunked content": dict(enc=indefinite(0xA0)),
            "empty chunk": dict(enc=indefinite(0xA0, tlv(0x04, content), tlv(0x04, b""))),
            "nested constructed chunk": dict(enc=indefinite(0xA0, indefinite(
                0x24, tlv(0x04, content)))),
            "chunk not an OCTET STRING": dict(enc=indefinite(0xA0, tlv(0x80, content))),
            "indefinite length on a primitive": dict(enc=b"\x80\x80" + content + b"\x00\x00"),
            "non-minimal length": dict(enc=b"\x80\x81\x30" + content),
            "length with leading zero": dict(enc=b"\x80\x82\x00\x30" + content),
            "three length octets": dict(enc=b"\x80\x83\x00\x00\x30" + content),
            "reserved length 0xff": dict(enc=b"\x80\xff" + content),
            "content not whole blocks": dict(enc=tlv(0x80, content[:47])),
            "content of 6160 bytes": dict(enc=tlv(0x80, os.urandom(6160))),
        }
        for label, shape in cases.items():
            with self.subTest(label), self.assertRaises(CmsError):
                parse_enveloped(kms_blob(key, iv, content, **shape))
        self.assertEqual(len(parse_enveloped(kms_blob(key, iv, os.urandom(6144)))
                             .encrypted_content), cms.MAX_CONTENT_BYTES)

    def test_definite_wrapping_of_an_indefinite_end_is_refused(self):
        # An end-of-contents where a definite container ends early, and a blob over the cap.
        key, iv, content = os.urandom(256), os.urandom(16), os.urandom(48)
        blob = kms_blob(key, iv, content)
        with self.assertRaises(CmsError):
            parse_enveloped(blob[:-2] + b"\x00\x01")
        with self.assertRaises(CmsError):
            parse_enveloped(b"\x30\x80" + b"\x00" * cms.MAX_BLOB_BYTES)


@unittest.skipUnless(OPENSSL, "the openssl CLI is not installed (scripts/ensure-tools.sh)")
class OpensslEnvelopeTest(unittest.TestCase):
    """(b) Envelopes made by an independent CMS implementation: `openssl cms -encrypt`."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory(prefix="cms-test-")
        root = pathlib.Path(cls.dir.name)
        cls.key = new_key()
        cls.other_key = new_key()
        cls.cert = root / "recipient.pem"
        cls.ski = write_cert(cls.key, cls.cert)
        cls.other_cert = root / "other.pem"
        write_cert(cls.other_key, cls.other_cert)
        cls.cert_1024 = root / "rsa1024.pem"
        write_cert(new_key(1024), cls.cert_1024)
        cls.cert_3072 = root / "rsa3072.pem"
        write_cert(new_key(3072), cls.cert_3072)
        cls.data_key = os.urandom(32)
        remember_secret(cls.data_key, kind="test data key")
        cls.stream = cls.encrypt(cls.data_key)
        cls.definite = cls.encrypt(cls.data_key, stream=False)

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    @classmethod
    def encrypt(cls, plaintext: bytes, certs=None, *, oaep: bool = True, keyid: bool = True,
                stream: bool = True) -> bytes:
        root = pathlib.Path(cls.dir.name)
        source, target = root / "plain.bin", root / "envelope.der"
        source.write_bytes(plaintext)
        command = [OPENSSL, "cms", "-encrypt", "-binary", "-aes-256-cbc", "-outform", "DER",
                   "-in", str(source), "-out", str(target)]
        command += ["-keyid"] if keyid else []
        command += ["-stream"] if stream else []
        for cert in certs or [cls.cert]:
            command += ["-recip", str(cert)]
            if oaep:
                command += ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256",
                            "-keyopt", "rsa_mgf1_md:sha256"]
        done = subprocess.run(command, capture_output=True, timeout=OPENSSL_TIMEOUT_S)
        scan_later(done.stderr, "openssl cms -encrypt")
        if done.returncode != 0:
            raise AssertionError(f"openssl cms failed: {done.stderr.decode(errors='replace')}")
        return target.read_bytes()

    def test_decrypts_streamed_and_definite_forms(self):
        self.assertIn(b"\xa0\x80\x04", self.stream)  # chunked [0] with indefinite length
        self.assertNotIn(b"\x30\x80", self.definite)  # DER: every length definite
        for label, blob in (("-stream", self.stream), ("definite", self.definite)):
            with self.subTest(label):
                self.assertEqual(decrypt_data_key(blob, self.key), self.data_key)
                self.assertEqual(len(parse_enveloped(blob).iv), 16)

    def test_long_chunked_content_is_concatenated(self):
        plaintext = os.urandom(cms.MAX_CONTENT_BYTES - 16)  # padded to exactly the cap
        blob = self.encrypt(plaintext)
        self.assertIn(b"\xa0\x80\x04", blob)
        parsed = parse_enveloped(blob)
        self.assertEqual(len(parsed.encrypted_content), cms.MAX_CONTENT_BYTES)
        content_key = self.key.decrypt(parsed.encrypted_key,
                                       OAEP(MGF1(hashes.SHA256()), hashes.SHA256(), None))
        decryptor = Cipher(algorithms.AES(content_key), modes.CBC(parsed.iv)).decryptor()
        padded = decryptor.update(parsed.encrypted_content) + decryptor.finalize()
        self.assertEqual(padded[:len(plaintext)], plaintext)
        self.assertEqual(padded[len(plaintext):], b"\x10" * 16)
        with self.assertRaises(CmsError):
            decrypt_data_key(blob, self.key)  # valid, but not a 32-byte key

    def test_refusals(self):
        cases = {
            "PKCS#1 v1.5 key transport": lambda: self.encrypt(self.data_key, oaep=False),
            "issuer and serial recipient": lambda: self.encrypt(self.data_key, keyid=False),
            "two recipients": lambda: self.encrypt(self.data_key, [self.cert, self.other_cert]),
            "RSA-1024 recipient": lambda: self.encrypt(self.data_key, [self.cert_1024]),
            "RSA-3072 recipient": lambda: self.encrypt(self.data_key, [self.cert_3072]),
            "content over 6144 bytes": lambda: self.encrypt(os.urandom(cms.MAX_CONTENT_BYTES)),
            "plaintext of 16 bytes": lambda: self.encrypt(self.data_key[:16]),
            "plaintext of 33 bytes": lambda: self.encrypt(self.data_key + b"x"),
            "trailing byte": lambda: self.stream + b"\x00",
        }
        for label, make in cases.items():
            blob = make()
            with self.subTest(label), self.assertRaises(CmsError):
                decrypt_data_key(blob, self.key)
        with self.assertRaises(CmsError):
            decrypt_data_key(self.stream, self.other_key)

    def test_every_truncation_is_refused(self):
        for label, blob in (("-stream", self.stream), ("definite", self.definite)):
            for end in range(len(blob)):
                with self.subTest(label, end=end), self.assertRaises(CmsError):
                    decrypt_data_key(blob[:end], self.key)

    def test_flipped_encrypted_key_and_content_are_refused(self):
        parsed = parse_enveloped(self.definite)
        for label, part, start in (("key", parsed.encrypted_key, 0),
                                   ("content", parsed.encrypted_content, 16)):
            at = self.definite.index(part)
            for index in range(start, len(part), 7):
                changed = bytearray(self.definite)
                changed[at + index] ^= 0xFF
                with self.subTest(label, index=index), self.assertRaises(CmsError):
                    decrypt_data_key(bytes(changed), self.key)

    def test_key_identifier_is_the_certificate_ski_and_is_ignored(self):
        self.assertIn(self.ski, self.stream)
        changed = self.stream.replace(self.ski, bytes(len(self.ski)))
        self.assertEqual(decrypt_data_key(changed, self.key), self.data_key)


if __name__ == "__main__":
    unittest.main()
