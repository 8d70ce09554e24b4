"""One fake KMS (its key policy on one PCR0), its test CA, a dev attestation root, a document
minter and a KMS transport for a TestCase class: what tests/test_kms.py and
tests/test_seal_secrets.py share."""

import pathlib
import tempfile
import time
import unittest

from enclave import devpki, kms
from enclave.outbound import OutboundClient
from tests.fakes.fake_kms import DocumentMinter, FakeKms
from tests.fakes.pki import TestCA
from tests.support import remember_key_files


class FakeKmsCase(unittest.TestCase):
    PCR0: bytes = bytes.fromhex("a1" * 48)  # the PCR0 the fake's key policy allows
    NAME = "kms"

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix=f"test-{cls.NAME}-")
        cls.dir = pathlib.Path(cls._tmp.name)
        cls.ca = TestCA(f"{cls.NAME} Test CA")
        cls.ca_file = cls.ca.write(cls.dir)
        cls.root = devpki.load_or_create_root(cls.dir / "state")
        remember_key_files(cls.dir / "state")
        cls.minter = DocumentMinter(cls.root, cls.PCR0)
        cls.fake = FakeKms(cls.ca, attestation_roots=[cls.root.cert_der],
                           allowed_pcr0=[cls.PCR0]).start()
        cls.transport = OutboundClient(context=kms.create_kms_context(cls.ca_file))

    @classmethod
    def tearDownClass(cls):
        cls.transport.close()
        cls.fake.stop()
        cls._tmp.cleanup()

    def setUp(self):
        self.fake.set_mode("normal")

    def credentials(self, **override) -> kms.AwsCredentials:
        return kms.AwsCredentials.from_delivery(dict(self.fake.credentials(), **override),
                                                now=time.time())
