"""The sealed-secrets envelope (docs/DESIGN.md §15): round trip, tampering, malformed fields."""

import base64
import copy
import json
import os
import unittest

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave import envelope
from enclave.envelope import EnvelopeError
from tests.support import remember_secret

ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_ARN = "arn:aws:kms:us-east-1:111122223333:key/0000abcd-12ab-34cd-56ef-1234567890ab"
PAYLOAD = {"ENCLAVE_RPC_SHARED_SECRET": "sealed-rpc-secret-0123456789abcdef",
           "ECS_WATERMARK_ENDPOINT": "https://watermark.internal.example:8080"}
remember_secret(PAYLOAD["ENCLAVE_RPC_SHARED_SECRET"], kind="sealed test payload")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def new_data_key() -> bytes:
    key = os.urandom(32)
    remember_secret(key, kind="envelope test data key")
    return key


def sealed(data_key: bytes, payload=None, *, version: int = 7, arn: str = ARN) -> dict:
    return envelope.seal(PAYLOAD if payload is None else payload, kms_key_arn=arn,
                         bundle_version=version, data_key=data_key,
                         encrypted_data_key=b"kms-ciphertext-blob-" + os.urandom(8),
                         nonce=os.urandom(12))


def reseal_raw(data_key: bytes, obj: dict, plaintext: bytes) -> dict:
    """obj with its ciphertext replaced by an AES-GCM seal of `plaintext` under obj's AAD."""
    out = copy.deepcopy(obj)
    aad = envelope.aad(obj["v"], obj["kms_key_arn"], obj["encryption_context"])
    out["ciphertext"] = b64(AESGCM(data_key).encrypt(base64.b64decode(obj["nonce"]),
                                                     plaintext, aad))
    return out


class RoundTripTest(unittest.TestCase):
    def test_seal_then_open(self):
        key = new_data_key()
        obj = sealed(key)
        self.assertEqual(set(obj), envelope.ENVELOPE_KEYS)
        self.assertEqual(obj["encryption_context"],
                         {"purpose": "enclave-secrets/v1", "bundle_version": "7"})
        env = envelope.parse(json.loads(json.dumps(obj)))
        self.assertEqual(env.bundle_version, 7)
        self.assertEqual(env.region, "us-east-1")
        self.assertEqual(envelope.open(env, key), PAYLOAD)
        self.assertNotIn(PAYLOAD["ENCLAVE_RPC_SHARED_SECRET"], repr(env))

    def test_aad_is_the_canonical_json_of_section_15(self):
        env = envelope.parse(sealed(new_data_key()))
        self.assertEqual(env.aad, (
            '{"encryption_context":{"bundle_version":"7","purpose":"enclave-secrets/v1"},'
            f'"kms_key_arn":"{ARN}","v":1}}').encode("ascii"))

    def test_bundle_version_zero_and_empty_payload(self):
        key = new_data_key()
        self.assertEqual(envelope.open(envelope.parse(sealed(key, {}, version=0)), key), {})

    def test_seal_refuses_what_open_would_refuse(self):
        key = new_data_key()
        cases = {
            "payload not an object": dict(payload=["x"]),
            "payload carries bundle_version": dict(payload={"bundle_version": 7}),
            "negative version": dict(version=-1),
            "alias instead of a key ARN": dict(arn="arn:aws:kms:us-east-1:111122223333:alias/x"),
        }
        for name, kwargs in cases.items():
            with self.subTest(name), self.assertRaises(EnvelopeError):
                sealed(key, **kwargs)
        for name, extra in (("short data key", dict(data_key=b"k" * 16)),
                            ("short nonce", dict(nonce=b"n" * 8))):
            args = dict(kms_key_arn=ARN, bundle_version=1, data_key=key,
                        encrypted_data_key=b"blob", nonce=os.urandom(12))
            args.update(extra)
            with self.subTest(name), self.assertRaises(EnvelopeError):
                envelope.seal({}, **args)


class TamperTest(unittest.TestCase):
    """Every AAD-bound field, the ciphertext, tag and nonce: refused when opening."""

    @classmethod
    def setUpClass(cls):
        cls.key = new_data_key()
        cls.obj = sealed(cls.key)

    def assert_does_not_open(self, obj):
        with self.assertRaises(EnvelopeError) as ctx:
            envelope.open(envelope.parse(obj), self.key)
        self.assertEqual(ctx.exception.code, "envelope_invalid")
        self.assertNotIn(PAYLOAD["ENCLAVE_RPC_SHARED_SECRET"], str(ctx.exception))

    def test_aad_bound_fields(self):
        def flip(raw: str, index: int) -> str:
            data = bytearray(base64.b64decode(raw))
            data[index] ^= 0x01
            return b64(bytes(data))

        cases = {
            "kms_key_arn": lambda o: o.update(kms_key_arn=OTHER_ARN),
            "bundle_version": lambda o: o["encryption_context"].update(bundle_version="8"),
            "ciphertext first byte": lambda o: o.update(ciphertext=flip(o["ciphertext"], 0)),
            "tag last byte": lambda o: o.update(ciphertext=flip(o["ciphertext"], -1)),
            "tag dropped": lambda o: o.update(ciphertext=b64(
                base64.b64decode(o["ciphertext"])[:-16] + bytes(16))),
            "nonce": lambda o: o.update(nonce=flip(o["nonce"], 3)),
        }
        for name, mutate in cases.items():
            with self.subTest(name):
                obj = copy.deepcopy(self.obj)
                mutate(obj)
                self.assert_does_not_open(obj)

    def test_purpose_and_v_are_pinned_before_the_aad(self):
        # Changing them cannot even reach AES-GCM: parse() accepts only the one value.
        for name, mutate in (("purpose", lambda o: o["encryption_context"].update(
                purpose="enclave-secrets/v2")), ("v", lambda o: o.update(v=2))):
            with self.subTest(name):
                obj = copy.deepcopy(self.obj)
                mutate(obj)
                with self.assertRaises(EnvelopeError) as ctx:
                    envelope.parse(obj)
                self.assertEqual(ctx.exception.code, "envelope_malformed")

    def test_a_different_v_or_purpose_changes_the_aad(self):
        base = envelope.aad(1, ARN, {"purpose": "enclave-secrets/v1", "bundle_version": "7"})
        self.assertNotEqual(base, envelope.aad(2, ARN, {"purpose": "enclave-secrets/v1",
                                                        "bundle_version": "7"}))
        self.assertNotEqual(base, envelope.aad(1, ARN, {"purpose": "enclave-secrets/v2",
                                                        "bundle_version": "7"}))

    def test_encrypted_data_key_is_not_in_the_aad(self):
        # Tampering with it is caught by KMS (InvalidCiphertextException: the blob is
        # authenticated under the KMS key and the encryption context), not here: with the
        # right data key, the envelope still opens. tests/test_kms.py checks KMS's refusal.
        obj = copy.deepcopy(self.obj)
        obj["encrypted_data_key"] = b64(b"something else entirely")
        self.assertEqual(envelope.open(envelope.parse(obj), self.key), PAYLOAD)

    def test_wrong_data_key(self):
        with self.assertRaises(EnvelopeError) as ctx:
            envelope.open(envelope.parse(self.obj), new_data_key())
        self.assertEqual(ctx.exception.code, "envelope_invalid")
        with self.assertRaises(EnvelopeError):
            envelope.open(envelope.parse(self.obj), b"short")

    def test_authenticated_but_inconsistent_plaintext(self):
        cases = {
            "not JSON": b"\xff\xfe not json",
            "not an object": b'["bundle_version", 7]',
            "no bundle_version": b'{"A": "b"}',
            "bundle_version as a string": b'{"bundle_version": "7"}',
            "bundle_version as a bool": b'{"bundle_version": true}',
            "other bundle_version": b'{"bundle_version": 6}',
            "duplicate keys": b'{"bundle_version": 7, "A": 1, "A": 2}',
        }
        for name, plaintext in cases.items():
            with self.subTest(name):
                self.assert_does_not_open(reseal_raw(self.key, self.obj, plaintext))


class PinningTest(unittest.TestCase):
    def setUp(self):
        self.env = envelope.parse(sealed(new_data_key(), version=7))

    def test_pinned_key_and_versions(self):
        self.assertIs(envelope.check_pinned(self.env, ARN, None), self.env)
        self.assertIs(envelope.check_pinned(self.env, ARN, 7), self.env)  # a re-delivery
        self.assertIs(envelope.check_pinned(self.env, ARN, 6), self.env)

    def test_other_key_is_refused(self):
        with self.assertRaises(EnvelopeError) as ctx:
            envelope.check_pinned(self.env, OTHER_ARN, None)
        self.assertEqual(ctx.exception.code, "envelope_key_mismatch")

    def test_rollback_is_refused(self):
        with self.assertRaises(EnvelopeError) as ctx:
            envelope.check_pinned(self.env, ARN, 8)
        self.assertEqual(ctx.exception.code, "bundle_rollback")
        self.assertIn("7", ctx.exception.message)
        self.assertIn("8", ctx.exception.message)


class MalformedTest(unittest.TestCase):
    """parse() refuses every malformed field with envelope_malformed."""

    @classmethod
    def setUpClass(cls):
        cls.obj = sealed(new_data_key())

    def test_table(self):
        ctx = lambda **kw: {"purpose": "enclave-secrets/v1", "bundle_version": "7", **kw}
        cases = [
            ("missing v", "v", None),
            ("v is a bool", "v", True),
            ("v is a string", "v", "1"),
            ("v is 0", "v", 0),
            ("ARN not a string", "kms_key_arn", 7),
            ("alias ARN", "kms_key_arn", "arn:aws:kms:us-east-1:111122223333:alias/secrets"),
            ("bare key id", "kms_key_arn", "1234abcd-12ab-34cd-56ef-1234567890ab"),
            ("ARN of another service", "kms_key_arn",
             "arn:aws:s3:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"),
            ("ARN with a short account", "kms_key_arn",
             "arn:aws:kms:us-east-1:1111:key/1234abcd-12ab-34cd-56ef-1234567890ab"),
            ("ARN with uppercase key id", "kms_key_arn",
             "arn:aws:kms:us-east-1:111122223333:key/1234ABCD-12ab-34cd-56ef-1234567890ab"),
            ("ARN with trailing newline", "kms_key_arn", ARN + "\n"),
            ("ARN too long", "kms_key_arn", ARN + "a" * 300),
            ("context not an object", "encryption_context", "purpose=enclave-secrets/v1"),
            ("context missing purpose", "encryption_context", {"bundle_version": "7"}),
            ("context with an extra key", "encryption_context", ctx(extra="x")),
            ("context value not a string", "encryption_context", ctx(bundle_version=7)),
            ("context value not ASCII", "encryption_context", ctx(purpose="enclave-secrets/v1é")),
            ("context value with a control", "encryption_context",
             ctx(purpose="enclave-secrets/v1\n")),
            ("bundle_version negative", "encryption_context", ctx(bundle_version="-1")),
            ("bundle_version leading zero", "encryption_context", ctx(bundle_version="07")),
            ("bundle_version with a sign", "encryption_context", ctx(bundle_version="+7")),
            ("bundle_version empty", "encryption_context", ctx(bundle_version="")),
            ("bundle_version decimal point", "encryption_context", ctx(bundle_version="7.0")),
            ("bundle_version too long", "encryption_context", ctx(bundle_version="9" * 16)),
            ("bundle_version non-ASCII digit", "encryption_context", ctx(bundle_version="٧")),
            ("edk not a string", "encrypted_data_key", 12),
            ("edk empty", "encrypted_data_key", ""),
            ("edk not base64", "encrypted_data_key", "not base64!"),
            ("edk base64url", "encrypted_data_key", "-_-_"),
            ("edk without padding", "encrypted_data_key", "YWJj" + "ZA"),
            ("edk too long", "encrypted_data_key", b64(bytes(6145))),
            ("nonce 11 bytes", "nonce", b64(bytes(11))),
            ("nonce 16 bytes", "nonce", b64(bytes(16))),
            ("edk non-canonical (trailing bits)", "encrypted_data_key", "YWJ="),
            ("nonce with whitespace", "nonce", " " + b64(bytes(12))),
            ("ciphertext shorter than a tag", "ciphertext", b64(bytes(16))),
            ("ciphertext too long", "ciphertext", b64(bytes(192 * 1024 + 1))),
            ("ciphertext null", "ciphertext", None),
        ]
        for name, field, value in cases:
            with self.subTest(name):
                obj = copy.deepcopy(self.obj)
                if name.startswith("missing"):
                    del obj[field]
                else:
                    obj[field] = value
                with self.assertRaises(EnvelopeError) as raised:
                    envelope.parse(obj)
                self.assertEqual(raised.exception.code, "envelope_malformed")

    def test_not_an_object_and_unknown_keys(self):
        for value in (None, [], "envelope", 1):
            with self.subTest(value=value), self.assertRaises(EnvelopeError):
                envelope.parse(value)
        obj = dict(self.obj, extra=1)
        with self.assertRaises(EnvelopeError) as ctx:
            envelope.parse(obj)
        self.assertIn("unknown extra", ctx.exception.message)

    def test_other_partitions_and_multi_region_keys(self):
        for arn in ("arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/"
                    "1234abcd-12ab-34cd-56ef-1234567890ab",
                    "arn:aws:kms:eu-west-1:111122223333:key/mrk-"
                    "1234abcd12ab34cd56ef1234567890ab"):
            with self.subTest(arn):
                self.assertEqual(envelope.parse_key_arn(arn)[0], arn)
        # The runtime dials kms.<region>.amazonaws.com: a partition whose KMS lives under another
        # DNS suffix (aws-cn: amazonaws.com.cn) would always fail, so it is refused up front.
        with self.assertRaises(EnvelopeError):
            envelope.parse_key_arn("arn:aws-cn:kms:cn-north-1:111122223333:key/mrk-"
                                   "1234abcd12ab34cd56ef1234567890ab")


if __name__ == "__main__":
    unittest.main()
