"""The fake KMS itself: its BER writer against KMS's real blobs, a real AWS client (botocore)
driving it, its process mode, and a prompt shutdown."""

import base64
import json
import logging
import os
import pathlib
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclave import cms, devpki, envelope, kms
from enclave.outbound import OutboundClient
from tests.fakes import fake_kms
from tests.fakes.fake_kms import DocumentMinter, FakeKms
from tests.fakes.pki import TestCA
from tests.support import remember_key_files, remember_private_key, remember_secret, scan_later

try:
    import botocore.config
    import botocore.exceptions
    import botocore.session
    HAVE_BOTOCORE = True
except ImportError:  # requirements-test.txt not installed
    HAVE_BOTOCORE = False

ROOT_DIR = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT_DIR / "tests" / "data" / "kms"
PCR0 = bytes.fromhex("c3" * 48)
PROCESS_TIMEOUT_S = 20  # start-up, one call and SIGTERM of the fake as a process
KMS_SKI_OFFSET, KMS_SKI_BYTES = 33, 32  # where the real blobs hold their subjectKeyIdentifier
REAL_BLOBS = {  # file -> content chunked (True) or primitive [0] (False)
    "aws_nitro_enclaves_sdk_c_cms_test_sample.ber": True,
    "rustcrypto_kms_ciphertext_for_recipient_1.ber": True,
    "rustcrypto_kms_ciphertext_for_recipient_2.ber": True,
    "rustcrypto_kms_ciphertext_for_recipient_3.ber": False,
    "rustcrypto_kms_ciphertext_for_recipient_4.ber": True,
}


def new_rsa_key() -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    remember_private_key(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()),
                         kind="fake KMS test recipient key")
    return key


def spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


class NoBotocoreInTheRuntimeTest(unittest.TestCase):
    def test_enclave_never_imports_botocore(self):
        import ast
        offenders = []
        for path in sorted((ROOT_DIR / "enclave").rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.name}: {n}" for n in names
                              if n.split(".")[0] in ("botocore", "boto3")]
        self.assertEqual(offenders, [])


class BerShapeTest(unittest.TestCase):
    def test_writer_rebuilds_the_real_kms_blobs_byte_for_byte(self):
        for name, chunked in REAL_BLOBS.items():
            with self.subTest(name):
                blob = (DATA / name).read_bytes()
                parsed = cms.parse_enveloped(blob)
                rebuilt = fake_kms.kms_blob(
                    parsed.encrypted_key, parsed.iv, parsed.encrypted_content,
                    ski=blob[KMS_SKI_OFFSET:KMS_SKI_OFFSET + KMS_SKI_BYTES],
                    chunk=fake_kms.CHUNK_BYTES if chunked else None)
                self.assertEqual(rebuilt, blob)

    def test_ciphertext_for_recipient_decrypts_with_the_enclave_reader(self):
        key = new_rsa_key()
        data_key = os.urandom(32)
        remember_secret(data_key, kind="test data key")
        blob = fake_kms.ciphertext_for_recipient(key.public_key(), data_key)
        self.assertEqual(cms.decrypt_data_key(blob, key), data_key)
        long_blob = fake_kms.ciphertext_for_recipient(key.public_key(), os.urandom(2500))
        self.assertEqual(len(cms.parse_enveloped(long_blob).encrypted_content), 2512)
        self.assertIn(b"\x04\x82\x03\xe8", long_blob)  # a 1000-byte chunk header


class FakeFixture(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="test-fake-kms-")
        cls.dir = pathlib.Path(cls._tmp.name)
        cls.ca = TestCA("Fake KMS Test CA")
        cls.ca_file = cls.ca.write(cls.dir)
        cls.root = devpki.load_or_create_root(cls.dir / "state")
        remember_key_files(cls.dir / "state")
        cls.fake = FakeKms(cls.ca, attestation_roots=[cls.root.cert_der],
                           allowed_pcr0=[PCR0]).start()

    @classmethod
    def tearDownClass(cls):
        cls.fake.stop()
        cls._tmp.cleanup()

    def setUp(self):
        self.fake.set_mode("normal")


@unittest.skipUnless(HAVE_BOTOCORE, "botocore is not installed (pip install --require-hashes "
                                    "-r requirements-test.txt; `make test` does it)")
class BotocoreTest(FakeFixture):
    """A real AWS client (botocore's KMS model, signer, serializer and error parser)."""

    # botocore logs whole requests and answers at DEBUG (session tokens, data keys): keep the
    # third-party client's debug output out of the suite log that the leak scan reads.
    QUIET_LOGGERS = ("botocore", "urllib3")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._levels = {}
        for name in cls.QUIET_LOGGERS:
            cls._levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.WARNING)

    @classmethod
    def tearDownClass(cls):
        for name, level in cls._levels.items():
            logging.getLogger(name).setLevel(level)
        super().tearDownClass()

    def client(self, **override):
        creds = dict(aws_access_key_id=fake_kms.TEST_ACCESS_KEY_ID,
                     aws_secret_access_key=fake_kms.TEST_SECRET_ACCESS_KEY)
        creds.update(override)
        session = botocore.session.get_session()
        return session.create_client(
            "kms", endpoint_url=self.fake.url, region_name=fake_kms.DEFAULT_REGION,
            verify=self.ca_file, config=botocore.config.Config(
                retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=5),
            **creds)

    def error_code(self, call) -> str:
        with self.assertRaises(botocore.exceptions.ClientError) as ctx:
            call()
        return ctx.exception.response["Error"]["Code"]

    def test_generate_data_key_encrypt_decrypt(self):
        client = self.client()
        context = {"purpose": envelope.PURPOSE, "bundle_version": "3"}
        generated = client.generate_data_key(KeyId=self.fake.key_arn, KeySpec="AES_256",
                                             EncryptionContext=context)
        remember_secret(generated["Plaintext"], kind="test data key")
        self.assertEqual(len(generated["Plaintext"]), 32)
        self.assertEqual(generated["KeyId"], self.fake.key_arn)
        by_count = client.generate_data_key(KeyId=self.fake.key_arn, NumberOfBytes=32)
        remember_secret(by_count["Plaintext"], kind="test data key")
        self.assertEqual(len(by_count["Plaintext"]), 32)

        decrypted = client.decrypt(CiphertextBlob=generated["CiphertextBlob"],
                                   EncryptionContext=context)
        self.assertEqual(decrypted["Plaintext"], generated["Plaintext"])
        self.assertEqual(decrypted["KeyId"], self.fake.key_arn)

        encrypted = client.encrypt(KeyId=self.fake.key_arn, Plaintext=b"hello fake kms")
        self.assertEqual(client.decrypt(CiphertextBlob=encrypted["CiphertextBlob"],
                                        KeyId=self.fake.key_arn)["Plaintext"], b"hello fake kms")

        # The blob is bound to the context: another one is InvalidCiphertextException.
        self.assertEqual(self.error_code(lambda: client.decrypt(
            CiphertextBlob=generated["CiphertextBlob"],
            EncryptionContext=dict(context, bundle_version="4"))), "InvalidCiphertextException")

    def test_decrypt_with_recipient(self):
        client = self.client()
        generated = client.generate_data_key(KeyId=self.fake.key_arn, KeySpec="AES_256")
        remember_secret(generated["Plaintext"], kind="test data key")
        key = new_rsa_key()
        document = DocumentMinter(self.root, PCR0)(spki(key))
        answer = client.decrypt(CiphertextBlob=generated["CiphertextBlob"],
                                KeyId=self.fake.key_arn,
                                Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                                           "AttestationDocument": document})
        self.assertIsNone(answer.get("Plaintext"))
        self.assertEqual(cms.decrypt_data_key(answer["CiphertextForRecipient"], key),
                         generated["Plaintext"])

        # The key policy: a PCR0 that is not listed is AccessDeniedException.
        other = DocumentMinter(self.root, bytes(47) + b"\x01")(spki(new_rsa_key()))
        self.assertEqual(self.error_code(lambda: client.decrypt(
            CiphertextBlob=generated["CiphertextBlob"],
            Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                       "AttestationDocument": other})), "AccessDeniedException")

    def test_errors_surface_as_client_error_codes(self):
        self.assertEqual(self.error_code(lambda: self.client(
            aws_access_key_id="AKIAUNKNOWNKEY000000").generate_data_key(
            KeyId=self.fake.key_arn, KeySpec="AES_256")), "UnrecognizedClientException")
        self.assertEqual(self.error_code(lambda: self.client(
            aws_secret_access_key="wrong" * 8).generate_data_key(
            KeyId=self.fake.key_arn, KeySpec="AES_256")), "InvalidSignatureException")
        session = self.fake.issue_session(time.time() - 1)
        self.assertEqual(self.error_code(lambda: self.client(
            aws_access_key_id=session["AccessKeyId"],
            aws_secret_access_key=session["SecretAccessKey"],
            aws_session_token=session["SessionToken"]).generate_data_key(
            KeyId=self.fake.key_arn, KeySpec="AES_256")), "ExpiredTokenException")
        self.fake.set_mode("500")
        self.assertEqual(self.error_code(lambda: self.client().generate_data_key(
            KeyId=self.fake.key_arn, KeySpec="AES_256")), "KMSInternalException")

    def test_a_valid_session_token_is_accepted(self):
        session = self.fake.issue_session(time.time() + 600)
        answer = self.client(aws_access_key_id=session["AccessKeyId"],
                             aws_secret_access_key=session["SecretAccessKey"],
                             aws_session_token=session["SessionToken"]).encrypt(
            KeyId=self.fake.key_arn, Plaintext=b"x")
        self.assertEqual(answer["KeyId"], self.fake.key_arn)


class StaleSignatureTest(FakeFixture):
    def test_stale_date_is_signature_expired(self):
        clock_now = time.time()
        fake = FakeKms(self.ca, attestation_roots=[self.root.cert_der], allowed_pcr0=[PCR0],
                       clock=lambda: clock_now + 301).start()
        transport = OutboundClient(context=kms.create_kms_context(self.ca_file))
        try:
            creds = kms.AwsCredentials.from_delivery(fake.credentials(),
                                                     now=time.time())
            with self.assertRaises(kms.KmsError) as ctx:
                kms.generate_data_key(fake.key_arn, {}, credentials=creds,
                                      region=fake_kms.DEFAULT_REGION, transport=transport,
                                      endpoint=fake.url, now=clock_now)
            self.assertEqual(ctx.exception.kms_type, "InvalidSignatureException")
            self.assertRegex(ctx.exception.message,
                             r"Signature expired: \d{8}T\d{6}Z is now earlier than "
                             r"\d{8}T\d{6}Z \(\d{8}T\d{6}Z - 5 min\.\)")
        finally:
            transport.close()
            fake.stop()


class LifecycleTest(FakeFixture):
    def test_stop_is_prompt_even_while_a_request_hangs(self):
        fake = FakeKms(self.ca, attestation_roots=[self.root.cert_der], allowed_pcr0=[PCR0],
                       hang_s=30).start()
        fake.set_mode("hang")
        transport = OutboundClient(context=kms.create_kms_context(self.ca_file))
        creds = kms.AwsCredentials.from_delivery(fake.credentials(),
                                                 now=time.time())
        errors = []

        def call():
            try:
                kms.generate_data_key(fake.key_arn, {}, credentials=creds,
                                      region=fake_kms.DEFAULT_REGION, transport=transport,
                                      endpoint=fake.url, now=time.time(),
                                      timeout=10)
            except kms.KmsError as exc:
                errors.append(exc.code)

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 5
        while not fake.calls and time.monotonic() < deadline:  # bounded: the call arrives
            thread.join(0.01)
        self.assertTrue(fake.calls)
        start = time.monotonic()
        fake.stop()
        self.assertLess(time.monotonic() - start, 1.0)
        thread.join(5)
        transport.close()
        self.assertEqual(errors, ["kms_unavailable"])

    def test_process_mode(self):
        with tempfile.TemporaryDirectory() as tmp:
            root_file = pathlib.Path(tmp) / "root.crt"
            root_file.write_bytes(self.root.cert_pem)
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fakes.fake_kms", "--port", "0", "--ca-dir",
                 str(pathlib.Path(tmp) / "tls"), "--attestation-root", str(root_file),
                 "--pcr0", PCR0.hex(), "--key-file", str(pathlib.Path(tmp) / "key.json")],
                cwd=ROOT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                ready, _, _ = select.select([proc.stdout], [], [], PROCESS_TIMEOUT_S)
                self.assertTrue(ready, "the fake printed nothing")
                info = json.loads(proc.stdout.readline())
                remember_key_files(pathlib.Path(tmp) / "tls")
                self.assertTrue(info["url"].startswith("https://127.0.0.1:"))
                envelope.parse_key_arn(info["key_arn"])
                transport = OutboundClient(context=kms.create_kms_context(info["ca_file"]))
                try:
                    creds = kms.AwsCredentials(info["access_key_id"],
                                               fake_kms.TEST_SECRET_ACCESS_KEY)
                    data_key = kms.generate_data_key(
                        info["key_arn"], {"purpose": envelope.PURPOSE}, credentials=creds,
                        region=info["region"], transport=transport, endpoint=info["url"],
                        now=time.time())
                    remember_secret(data_key.plaintext, kind="test data key")
                finally:
                    transport.close()
                saved = json.loads((pathlib.Path(tmp) / "key.json").read_text())
                remember_secret(base64.b64decode(saved["material"]), kind="fake key material")
                self.assertTrue(info["key_arn"].endswith(saved["key_id"]))
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    out, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.communicate()
                scan_later(err, "fake_kms process stderr")
            self.assertEqual(proc.returncode, 0, err)


if __name__ == "__main__":
    unittest.main()
