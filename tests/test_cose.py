"""COSE_Sign1 encode/decode and ES384 / EdDSA signatures (including a real Nitro document)."""

import base64
import unittest
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from enclave.nitro import cose

DATA = Path(__file__).parent / "data" / "nitro"


def nitro_document(name: str = "blocky_nitrite_nitro_attestation") -> bytes:
    return base64.b64decode((DATA / f"{name}.b64").read_text())


class TestEncoding(unittest.TestCase):
    def test_es384_protected_header_bytes(self):
        self.assertEqual(cose.protected_header(cose.ALG_ES384), bytes.fromhex("a1013822"))

    def test_sig_structure(self):
        self.assertEqual(cbor2.loads(cose.sig_structure(b"\xa1\x01\x38\x22", b"payload")),
                         ["Signature1", b"\xa1\x01\x38\x22", b"", b"payload"])

    def test_hand_built_encodings_equal_cbor2(self):
        for size in (0, 23, 24, 255, 256, 65535, 65536):
            with self.subTest(size=size):
                payload = bytes(size)
                self.assertEqual(cose.sig_structure(b"\xa1\x01\x38\x22", payload, b"aad"),
                                 cbor2.dumps(["Signature1", b"\xa1\x01\x38\x22", b"aad", payload]))
                for tagged in (False, True):
                    body = [b"\xa1\x01\x38\x22", {}, payload, b"s" * 96]
                    self.assertEqual(cose.encode_sign1(b"\xa1\x01\x38\x22", payload, b"s" * 96,
                                                       tagged=tagged),
                                     cbor2.dumps(cbor2.CBORTag(18, body) if tagged else body))

    def test_round_trip_tagged_and_untagged(self):
        for tagged in (False, True):
            with self.subTest(tagged=tagged):
                data = cose.encode_sign1(b"\xa1\x01\x27", b"p", b"s", {4: b"kid"}, tagged=tagged)
                self.assertEqual(data[0], 0xD2 if tagged else 0x84)
                decoded = cose.decode_sign1(data)
                self.assertEqual((decoded.protected, decoded.unprotected, decoded.payload,
                                  decoded.signature, decoded.tagged),
                                 ({1: -8}, {4: b"kid"}, b"p", b"s", tagged))

    def test_decode_rejects_malformed(self):
        good = [b"\xa1\x01\x38\x22", {}, b"p", b"s"]
        cases = {
            "not cbor": b"\xff",
            "trailing bytes": cbor2.dumps(good) + b"\x00",
            "wrong tag": cbor2.dumps(cbor2.CBORTag(98, good)),
            "not an array": cbor2.dumps({"a": 1}),
            "three elements": cbor2.dumps(good[:3]),
            "protected not bytes": cbor2.dumps([{1: -35}, {}, b"p", b"s"]),
            "unprotected not a map": cbor2.dumps([good[0], [], b"p", b"s"]),
            "payload not bytes": cbor2.dumps([good[0], {}, "p", b"s"]),
            "signature not bytes": cbor2.dumps([good[0], {}, b"p", None]),
            "protected not a map": cbor2.dumps([cbor2.dumps([1]), {}, b"p", b"s"]),
            "unterminated indefinite array": b"\x9f" + b"".join(cbor2.dumps(x) for x in good),
            "indefinite string of mixed chunks": b"\x84" + cbor2.dumps(good[0]) + b"\xa0\x5f\x61p\xff" + cbor2.dumps(b"s"),
            "duplicate header": cbor2.dumps([b"\xa2\x01\x38\x22\x01\x26", {}, b"p", b"s"]),
            "too large": cbor2.dumps([good[0], {}, bytes(cose.MAX_SIGN1_BYTES), b"s"]),
            "not bytes at all": "text",
        }
        for name, data in cases.items():
            with self.subTest(name), self.assertRaises(cose.CoseError):
                cose.decode_sign1(data)


    def test_decode_accepts_indefinite_lengths(self):
        # AWS's current encoder writes indefinite-length items; the protected bytes and the
        # payload are kept exactly as received (a chunked bstr is joined, as CBOR defines it).
        good = [b"\xa1\x01\x38\x22", {}, b"payload", b"sig"]
        data = (b"\x9f" + cbor2.dumps(good[0]) + b"\xbf\xff" + b"\x5f\x43pay\x44load\xff"
                + cbor2.dumps(good[3]) + b"\xff")
        decoded = cose.decode_sign1(data)
        self.assertEqual((decoded.protected_bytes, decoded.unprotected, decoded.payload,
                          decoded.signature), tuple(good))


class TestSignatures(unittest.TestCase):
    def test_es384_round_trip_raw_signature(self):
        key = ec.generate_private_key(ec.SECP384R1())
        data = cose.sign1(key, b"payload")
        decoded = cose.decode_sign1(data)
        self.assertEqual(decoded.protected_bytes, bytes.fromhex("a1013822"))
        self.assertEqual(len(decoded.signature), cose.ES384_SIGNATURE_BYTES)
        cose.verify(key.public_key(), cose.ALG_ES384, decoded.protected_bytes, decoded.payload,
                    decoded.signature)

    def test_eddsa_round_trip(self):
        key = ed25519.Ed25519PrivateKey.generate()
        decoded = cose.decode_sign1(cose.sign1(key, b"payload", tagged=True))
        self.assertEqual(decoded.alg, cose.ALG_EDDSA)
        cose.verify(key.public_key(), cose.ALG_EDDSA, decoded.protected_bytes, decoded.payload,
                    decoded.signature)

    def test_verify_failures(self):
        es = ec.generate_private_key(ec.SECP384R1())
        ed = ed25519.Ed25519PrivateKey.generate()
        prot = cose.protected_header(cose.ALG_ES384)
        sig = cose.sign(es, cose.ALG_ES384, prot, b"payload")
        flipped = bytes([sig[0] ^ 1]) + sig[1:]
        cases = {
            "other payload": (es.public_key(), cose.ALG_ES384, prot, b"payloaD", sig),
            "flipped bit": (es.public_key(), cose.ALG_ES384, prot, b"payload", flipped),
            "re-encoded protected": (es.public_key(), cose.ALG_ES384, b"\xa1\x01\x39\x00\x22",
                                     b"payload", sig),
            "der signature": (es.public_key(), cose.ALG_ES384, prot, b"payload",
                              cose.raw_to_der(sig)),
            "wrong key": (ec.generate_private_key(ec.SECP384R1()).public_key(), cose.ALG_ES384,
                          prot, b"payload", sig),
            "alg mismatch": (ed.public_key(), cose.ALG_ES384, prot, b"payload", sig),
            "unknown alg": (es.public_key(), -7, prot, b"payload", sig),
            "short eddsa": (ed.public_key(), cose.ALG_EDDSA, prot, b"payload", b"x" * 63),
        }
        for name, args in cases.items():
            with self.subTest(name), self.assertRaises(cose.CoseError):
                cose.verify(*args)

    def test_unsupported_keys(self):
        for key in (ec.generate_private_key(ec.SECP256R1()), object()):
            with self.subTest(type(key).__name__), self.assertRaises(cose.CoseError):
                cose.alg_for_key(key)

    def test_real_nitro_document_signature(self):
        decoded = cose.decode_sign1(nitro_document())
        self.assertFalse(decoded.tagged)
        self.assertEqual(decoded.protected_bytes, bytes.fromhex("a1013822"))
        leaf = x509.load_der_x509_certificate(cbor2.loads(decoded.payload)["certificate"])
        cose.verify(leaf.public_key(), decoded.alg, decoded.protected_bytes, decoded.payload,
                    decoded.signature)

    def test_real_negative_document_signature_fails(self):
        decoded = cose.decode_sign1(nitro_document("eternis_fixtures_invalid_attestation"))
        leaf = x509.load_der_x509_certificate(cbor2.loads(decoded.payload)["certificate"])
        with self.assertRaisesRegex(cose.CoseError, "does not verify"):
            cose.verify(leaf.public_key(), decoded.alg, decoded.protected_bytes,
                        decoded.payload, decoded.signature)


if __name__ == "__main__":
    unittest.main()
