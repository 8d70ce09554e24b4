"""NsmDevice and NsmSource against the fake /dev/nsm (production struct building and parsing)."""

import base64
import errno
import json
import tempfile
import unittest
from dataclasses import replace
from unittest import mock

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave import attestation, devpki, nsm
from enclave.nitro import verifier as verify
from enclave.config import Settings
from enclave.identity import SigningIdentity
from tests.fakes.fake_nsm import FakeNsm, dumps_indefinite
from tests.stack import LocalStack
from tests.support import remember_private_key


class NsmTestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.root = devpki.load_or_create_root(cls._tmp.name)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def fake(self, mode="ok") -> FakeNsm:
        fake = FakeNsm(self.root, mode=mode)
        self.addCleanup(fake.cleanup)
        return fake

    def device(self, fake) -> nsm.NsmDevice:
        device = fake.open()
        self.addCleanup(device.close)
        return device


class TestWireFormat(unittest.TestCase):
    def test_ioctl_number_is_iowr_0x0a_0_32(self):
        self.assertEqual(nsm.NSM_IOCTL_REQUEST, 0xC0200A00)

    def test_request_encoding(self):
        data = nsm.encode_request(user_data=b"u", nonce=None, public_key=b"k")
        self.assertEqual(cbor2.loads(data),
                         {"Attestation": {"user_data": b"u", "nonce": None, "public_key": b"k"}})

    def test_request_field_limit(self):
        with self.assertRaisesRegex(nsm.NsmError, "nonce is 1025 bytes"):
            nsm.encode_request(user_data=None, nonce=bytes(1025), public_key=None)

    def test_response_decoding(self):
        self.assertEqual(nsm.decode_response(cbor2.dumps({"Attestation": {"document": b"d"}})),
                         b"d")
        cases = {
            "error": (cbor2.dumps({"Error": "InternalError"}), "Error: 'InternalError'"),
            "other": (cbor2.dumps({"LockPCR": None}), "unexpected NSM response"),
            "no document": (cbor2.dumps({"Attestation": {}}), "unexpected NSM response"),
            "not cbor": (b"\xff\xff", "not valid CBOR"),
            "unterminated indefinite": (b"\xbf\x65Error", "not valid CBOR"),
            "trailing bytes": (cbor2.dumps({"Error": "x"}) + b"\x00", "not valid CBOR"),
        }
        for name, (data, message) in cases.items():
            with self.subTest(name), self.assertRaisesRegex(nsm.NsmError, message):
                nsm.decode_response(data)


class TestNsmDevice(NsmTestCase):
    def test_success_returns_a_document_binding_the_request(self):
        fake = self.fake()
        document = self.device(fake).attestation(user_data=b"ud", nonce=b"n" * 16,
                                                 public_key=b"pk")
        self.assertEqual(fake.requests, [{"Attestation": {
            "user_data": b"ud", "nonce": b"n" * 16, "public_key": b"pk"}}])
        fields = attestation.payload_fields(document)
        self.assertEqual((fields["nonce"], fields["user_data"], fields["public_key"]),
                         (b"n" * 16, b"ud", b"pk"))

    def test_error_response(self):
        with self.assertRaisesRegex(nsm.NsmError, "NSM answered Error: 'InvalidArgument'"):
            self.device(self.fake("error")).attestation(public_key=b"pk")

    def test_oversized_response_is_truncated_and_refused(self):
        with self.assertRaisesRegex(nsm.NsmError, "truncated"):
            self.device(self.fake("oversized")).attestation(public_key=b"pk")

    def test_unexpected_response(self):
        with self.assertRaisesRegex(nsm.NsmError, "unexpected NSM response"):
            self.device(self.fake("garbage")).attestation(public_key=b"pk")

    def test_ioctl_errno(self):
        with self.assertRaisesRegex(nsm.NsmError, "NSM ioctl failed"):
            self.device(self.fake("errno")).attestation(public_key=b"pk")

    def test_emsgsize(self):
        def ioctl(fd, request, arg, mutate):
            raise OSError(errno.EMSGSIZE, "Message too long")
        fake = self.fake()
        device = nsm.NsmDevice(fake.device_path, ioctl=ioctl)
        self.addCleanup(device.close)
        with self.assertRaisesRegex(nsm.NsmError, "too large"):
            device.attestation(public_key=b"pk")

    def test_missing_device(self):
        with self.assertRaisesRegex(nsm.NsmError, "cannot open /nonexistent/nsm"):
            nsm.NsmDevice("/nonexistent/nsm")

    def test_closed_device(self):
        device = self.fake().open()
        device.close()
        self.assertFalse(device.is_open)
        with self.assertRaisesRegex(nsm.NsmError, "closed"):
            device.attestation(public_key=b"pk")


class TestNsmSource(NsmTestCase):
    def settings(self, **kw):
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        remember_private_key(pem, kind="signing key PEM")
        identity = SigningIdentity.from_pem(pem)
        base = Settings(env="test", mode="remote", state_dir=self._tmp.name,
                        allow_insecure_dev_attestation=False, signing_private_key_pem=pem,
                        attestation_document_path="/dev/nsm")
        return replace(base, **kw), identity

    def test_build_attestation_uses_the_device_and_documents_verify(self):
        fake = self.fake()
        settings, identity = self.settings()
        att = attestation.build_attestation(settings, nsm_open=fake.open)
        self.addCleanup(att.close)
        self.assertEqual((att.name, att.insecure, att.source.nonce_bound), ("nsm", False, True))
        self.assertTrue(att.source.ready())
        nonce = b"\x07" * 32
        document = att.source.document(nonce, b"user")
        doc = verify.verify_document(document, roots=[self.root.cert_der],
                                     at_ms=verify.AT_DOCUMENT_TIME, expected_nonce=nonce)
        self.assertEqual(doc.public_key, identity.public_key_der)
        self.assertEqual(doc.user_data, b"user")
        self.assertEqual(fake.requests[-1]["Attestation"]["public_key"], identity.public_key_der)

    def test_indefinite_length_answers_and_documents(self):
        # The NSM's own CBOR (the response envelope and the document payload) may use
        # indefinite lengths; both are decoded as received and the document verifies.
        self.assertEqual(nsm.decode_response(dumps_indefinite({"Attestation": {"document": b"doc"}})),
                         b"doc")
        fake = self.fake("indefinite")
        settings, identity = self.settings()
        att = attestation.build_attestation(settings, nsm_open=fake.open)
        self.addCleanup(att.close)
        nonce = b"\x09" * 32
        document = att.source.document(nonce, b"user")
        self.assertEqual(cbor2.loads(document)[2][:1], b"\xbf")
        doc = verify.verify_document(document, roots=[self.root.cert_der],
                                     at_ms=verify.AT_DOCUMENT_TIME, expected_nonce=nonce)
        self.assertEqual((doc.public_key, doc.user_data), (identity.public_key_der, b"user"))

    def test_build_attestation_fails_at_start_up_when_the_nsm_errors(self):
        settings, _ = self.settings()
        with self.assertRaisesRegex(attestation.AttestationConfigError, "Error: 'InvalidArgument'"):
            attestation.build_attestation(settings, nsm_open=self.fake("error").open)

    def test_source_errors_become_attestation_errors(self):
        fake = self.fake()
        source = attestation.NsmSource(SigningIdentity.generate(), self.device(fake))
        fake.mode = "error"
        with self.assertRaises(attestation.AttestationError):
            source.document(b"n" * 16)


class TestRuntimeOverIndefiniteNsmAnswers(NsmTestCase):
    """The runtime's document and challenge endpoints on an NSM that answers in indefinite form."""

    def test_document_and_challenge_endpoints(self):
        fake = self.fake("indefinite")
        real_device = nsm.NsmDevice
        env = {"ENCLAVE_RUNTIME_MODE": "remote", "TEE_ATTESTATION_DOCUMENT_PATH": "/dev/nsm",
               "TEE_ALLOW_INSECURE_DEV_ATTESTATION": "false"}
        with mock.patch.object(nsm, "NsmDevice",
                               lambda path: real_device(fake.device_path, ioctl=fake.ioctl)):
            stack = LocalStack(watermark=False, google=False, env=env)
        self.addCleanup(stack.close)
        status, answer = stack.call("GET", "/v1/attestation/document", sign=False)
        self.assertEqual(status, 200, answer)
        document = base64.b64decode(answer["document"])
        self.assertEqual(cbor2.loads(document)[2][:1], b"\xbf")
        verify.verify_document(document, roots=[self.root.cert_der], at_ms=verify.AT_DOCUMENT_TIME)
        self.assertEqual(answer["format"], "aws-nitro")

        nonce = b"\x0b" * 32
        body = json.dumps({"nonce": base64.b64encode(nonce).decode(),
                           "user_data": base64.b64encode(b"bound").decode()}).encode()
        status, answer = stack.call("POST", "/v1/attestation/challenge", body, sign=False)
        self.assertEqual(status, 200, answer)
        self.assertTrue(answer["nonce_bound_document"])
        doc = verify.verify_document(base64.b64decode(answer["document"]),
                                     roots=[self.root.cert_der], at_ms=verify.AT_DOCUMENT_TIME,
                                     expected_nonce=nonce,
                                     evidence=base64.b64decode(answer["evidence"]))
        self.assertEqual(doc.user_data, b"bound")


if __name__ == "__main__":
    unittest.main()
