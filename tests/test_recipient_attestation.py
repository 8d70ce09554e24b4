"""Recipient attestation documents (docs/DESIGN.md §15 step 2): a document whose public_key is
the one-shot RSA key of a KMS Decrypt, from the dev-shim and the NSM (through the fake device);
refused by a static source; and kms.unwrap_data_key with Attestation.recipient_document against
the fake KMS, allowed and denied by its PCR0 policy."""

from __future__ import annotations

import os
import tempfile
import time
import unittest
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclave import attestation, devpki, envelope, kms, nsm
from enclave.config import Settings
from enclave.nitro import Verifier, verifier
from enclave.outbound import OutboundClient
from tests.fakes.fake_kms import DEFAULT_REGION, FakeKms
from tests.fakes.fake_nsm import FakeNsm
from tests.fakes.pki import TestCA
from tests.support import (keep_off_console, remember_key_files, remember_private_key,
                           remember_secret)

PAYLOAD = {"ENCLAVE_RPC_SHARED_SECRET": "recipient-attested-rpc-secret-0123456789"}
remember_secret(*PAYLOAD.values(), kind="sealed test payload")
_quiet = []


def setUpModule():
    _quiet.append(keep_off_console("enclave.devpki", "enclave.attestation"))


def tearDownModule():
    while _quiet:
        _quiet.pop()()


def rsa_spki() -> bytes:
    """A fresh RSA-2048 public key as DER SubjectPublicKeyInfo, as kms.unwrap_data_key makes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def payload_of(document: bytes) -> dict:
    return cbor2.loads(cbor2.loads(document)[2])


class StateCase(unittest.TestCase):
    """A dev root and one RSA recipient key for the class (key generation costs ~50 ms)."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="test-recipient-")
        cls.state = Path(cls._tmp.name)
        cls.root = devpki.load_or_create_root(cls.state)
        remember_key_files(cls.state)
        cls.spki = rsa_spki()

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def dev_shim(self) -> attestation.Attestation:
        att = attestation.build_attestation(Settings(state_dir=self.state))
        self.addCleanup(att.close)
        return att

    def fake_nsm(self, mode: str = "ok") -> FakeNsm:
        fake = FakeNsm(self.root, mode=mode)
        self.addCleanup(fake.cleanup)
        return fake

    def nsm_attestation(self, fake: FakeNsm) -> attestation.Attestation:
        """The production factory with TEE_ATTESTATION_DOCUMENT_PATH=/dev/nsm, on the fake."""
        pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        remember_private_key(pem, kind="signing key PEM")
        settings = Settings(env="test", mode="remote", state_dir=self.state,
                            allow_insecure_dev_attestation=False, signing_private_key_pem=pem,
                            attestation_document_path=attestation.NSM_DEVICE)
        att = attestation.build_attestation(settings, nsm_open=fake.open)
        self.addCleanup(att.close)
        return att


class DevShimRecipientTest(StateCase):
    def test_document_verifies_and_binds_exactly_the_given_key(self):
        att = self.dev_shim()
        self.assertTrue(att.binds_recipient)
        document = att.recipient_document(self.spki)
        verified = Verifier([self.root.cert_der]).verify(
            document, at_ms=verifier.AT_DOCUMENT_TIME, max_age_ms=60_000)
        self.assertEqual(verified.public_key, self.spki)
        self.assertNotEqual(verified.public_key, att.identity.public_key_der)
        self.assertEqual(len(self.spki), 294)  # RSA-2048 SPKI, well under the NSM's 1 KiB
        self.assertEqual(verified.pcrs[0], attestation.measure_code())
        self.assertTrue(verified.module_id.startswith("dev-shim"))
        fields = payload_of(document)
        self.assertEqual(list(fields), list(verifier.DOCUMENT_FIELDS))  # the NSM's field order
        self.assertEqual(cbor2.dumps(fields), cbor2.loads(document)[2])  # plain definite CBOR
        self.assertIsNone(fields["nonce"])
        self.assertIsNone(fields["user_data"])

    def test_normal_documents_still_bind_the_signing_identity(self):
        att = self.dev_shim()
        att.recipient_document(self.spki)
        nonce = os.urandom(16)
        verified = Verifier([self.root.cert_der]).verify(
            att.source.document(nonce, b"u"), at_ms=verifier.AT_DOCUMENT_TIME,
            expected_nonce=nonce)
        self.assertEqual((verified.public_key, verified.user_data),
                         (att.identity.public_key_der, b"u"))

    def test_a_new_key_each_call_gives_a_new_binding(self):
        att = self.dev_shim()
        other = rsa_spki()
        self.assertEqual(payload_of(att.recipient_document(other))["public_key"], other)
        self.assertEqual(payload_of(att.recipient_document(self.spki))["public_key"], self.spki)

    def test_not_a_public_key_is_refused(self):
        source = self.dev_shim().source
        p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.assertEqual(payload_of(source.recipient_document(p384))["public_key"], p384)
        limit = attestation.RECIPIENT_PUBLIC_KEY_MAX_BYTES
        self.assertEqual(limit, nsm.NSM_USER_FIELD_MAX_BYTES)
        self.assertEqual(limit, verifier.MAX_USER_FIELD_BYTES)
        cases = {
            "empty": (b"", "0 bytes"),
            "over the NSM limit": (self.spki + bytes(limit), "the NSM's limit"),
            "not DER": (b"\x30\x03\x02\x01\x00", "not a DER SubjectPublicKeyInfo"),
            "text": (self.spki.hex(), "must be bytes, got str"),
            "none": (None, "must be bytes, got NoneType"),
        }
        for name, (value, message) in cases.items():
            with self.subTest(name), self.assertRaisesRegex(attestation.AttestationError,
                                                            message):
                source.recipient_document(value)


class StaticRecipientTest(StateCase):
    def test_static_source_refuses_with_a_clear_message(self):
        shim = self.dev_shim()
        static = attestation.StaticSource(shim.source.document(), shim.identity)
        att = attestation.Attestation(shim.identity, static)
        self.assertFalse(att.binds_recipient)
        with self.assertRaises(attestation.AttestationError) as ctx:
            att.recipient_document(self.spki)
        message = str(ctx.exception)
        for part in ("static", "ENCLAVE_SECRETS_SOURCE=kms", "/dev/nsm", "dev-shim"):
            self.assertIn(part, message)


class NsmRecipientTest(StateCase):

    def test_the_request_carries_the_key_and_the_document_binds_it(self):
        fake = self.fake_nsm()
        att = self.nsm_attestation(fake)
        self.assertTrue(att.binds_recipient)
        document = att.recipient_document(self.spki)
        self.assertEqual(fake.requests[-1], {"Attestation": {
            "user_data": None, "nonce": None, "public_key": self.spki}})
        verified = Verifier([self.root.cert_der]).verify(document,
                                                         at_ms=verifier.AT_DOCUMENT_TIME)
        self.assertEqual(verified.public_key, self.spki)
        self.assertNotEqual(verified.public_key, att.identity.public_key_der)
        # the start-up probe asked for the identity's key: the recipient key is only in its own
        self.assertEqual(fake.requests[0]["Attestation"]["public_key"],
                         att.identity.public_key_der)

    def test_device_errors_and_bad_keys_are_attestation_errors(self):
        fake = self.fake_nsm()
        att = self.nsm_attestation(fake)
        sent = len(fake.requests)
        with self.assertRaisesRegex(attestation.AttestationError, "the NSM's limit"):
            att.recipient_document(bytes(2000))
        self.assertEqual(len(fake.requests), sent)  # refused before the device is asked
        fake.mode = "error"
        with self.assertRaisesRegex(attestation.AttestationError, "InvalidArgument"):
            att.recipient_document(self.spki)


class KmsUnwrapTest(StateCase):
    """kms.unwrap_data_key(attest=Attestation.recipient_document) against the fake KMS."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.ca = TestCA("Recipient Attestation KMS CA")
        cls.ca_file = cls.ca.write(cls.state)
        cls.transport = OutboundClient(context=kms.create_kms_context(cls.ca_file))

    @classmethod
    def tearDownClass(cls):
        cls.transport.close()
        super().tearDownClass()

    def fake_kms(self, allowed_pcr0) -> FakeKms:
        fake = FakeKms(self.ca, attestation_roots=[self.root.cert_der],
                       allowed_pcr0=allowed_pcr0).start()
        self.addCleanup(fake.stop)
        return fake

    def sealed(self, fake: FakeKms, creds: kms.AwsCredentials) -> envelope.Envelope:
        context = {"purpose": envelope.PURPOSE, "bundle_version": "3"}
        data_key = kms.generate_data_key(fake.key_arn, context, credentials=creds,
                                         region=DEFAULT_REGION, transport=self.transport,
                                         endpoint=fake.url, now=time.time())
        remember_secret(data_key.plaintext, kind="test data key")
        return envelope.parse(envelope.seal(
            PAYLOAD, kms_key_arn=fake.key_arn, bundle_version=3, data_key=data_key.plaintext,
            encrypted_data_key=data_key.ciphertext_blob, nonce=os.urandom(12)))

    def unwrap(self, fake: FakeKms, attest) -> bytes:
        creds = kms.AwsCredentials.from_delivery(fake.credentials(), now=time.time())
        env = self.sealed(fake, creds)
        data_key = kms.unwrap_data_key(env, credentials=creds, region=DEFAULT_REGION,
                                       attest=attest, transport=self.transport,
                                       endpoint=fake.url, now=time.time())
        remember_secret(data_key, kind="unwrapped data key")
        self.assertEqual(envelope.open(env, data_key), PAYLOAD)
        return data_key

    def test_dev_shim_pcr0_in_the_policy_gets_the_data_key(self):
        # The dev-shim's PCR0 is attestation.measure_code(): this checkout's package sources.
        fake = self.fake_kms([attestation.measure_code()])
        self.assertEqual(len(self.unwrap(fake, self.dev_shim().recipient_document)), 32)
        self.assertEqual([op for op, _ in fake.calls], ["GenerateDataKey", "Decrypt"])

    def test_dev_shim_pcr0_not_in_the_policy_is_access_denied(self):
        fake = self.fake_kms([bytes.fromhex("c3" * 48)])
        with self.assertRaises(kms.KmsError) as ctx:
            self.unwrap(fake, self.dev_shim().recipient_document)
        self.assertEqual(ctx.exception.code, "kms_access_denied")
        self.assertEqual(ctx.exception.kms_type, "AccessDeniedException")

    def test_nsm_path_through_the_fake_device(self):
        nsm_fake = self.fake_nsm()
        att = self.nsm_attestation(nsm_fake)
        pcr0 = payload_of(att.source.document())["pcrs"][0]  # the fake NSM's PCR0
        self.unwrap(self.fake_kms([pcr0]), att.recipient_document)
        sent = nsm_fake.requests[-1]["Attestation"]["public_key"]
        self.assertEqual(serialization.load_der_public_key(sent).key_size, 2048)

    def test_static_source_is_kms_attestation_unavailable(self):
        shim = self.dev_shim()
        static = attestation.Attestation(
            shim.identity, attestation.StaticSource(shim.source.document(), shim.identity))
        fake = self.fake_kms([attestation.measure_code()])
        with self.assertRaises(kms.KmsError) as ctx:
            self.unwrap(fake, static.recipient_document)
        self.assertEqual(ctx.exception.code, "kms_attestation_unavailable")
        self.assertIn("ENCLAVE_SECRETS_SOURCE=kms", str(ctx.exception))
        self.assertEqual([op for op, _ in fake.calls], ["GenerateDataKey"])  # no Decrypt sent

    def test_a_document_from_another_root_is_refused_by_kms(self):
        fake = self.fake_kms([attestation.measure_code()])
        with tempfile.TemporaryDirectory() as other_state:
            other = attestation.build_attestation(Settings(state_dir=Path(other_state)))
            remember_key_files(other_state)
            with self.assertRaises(kms.KmsError) as ctx:
                self.unwrap(fake, other.recipient_document)
        self.assertEqual(ctx.exception.code, "kms_invalid_request")
        self.assertIn("Invalid attestation document", str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
