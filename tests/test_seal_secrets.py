"""`enclave.py seal-secrets` (docs/DESIGN.md §15, docs/ENCLAVE.md §6): the standard AWS
environment (endpoint, CA bundle), the strict payload and the runtime's validator as a dry run,
and the AWS CLI recipe of docs/ENCLAVE.md, followed step by step against the fake KMS, making an
envelope the enclave opens."""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import unittest

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave import envelope, kms
from enclave.host import seal_secrets
from tests.fakes import fake_kms
from tests.kms_fixture import FakeKmsCase
from tests.support import remember_secret, scan_later

ROOT_DIR = pathlib.Path(__file__).resolve().parent.parent
ENCLAVE_DOC = ROOT_DIR / "docs" / "ENCLAVE.md"
REGION = fake_kms.DEFAULT_REGION
PCR0 = bytes.fromhex("c3" * 48)
PAYLOAD = {"ENCLAVE_RPC_SHARED_SECRET": "seal-test-rpc-secret-0123456789abcdef-xyz",
           "GOOGLE_OAUTH_CLIENT_SECRET": "GOCSPX-seal-test-client-secret-0000"}
remember_secret(*PAYLOAD.values(), kind="seal-secrets test payload")
SUBPROCESS_TIMEOUT_S = 60


def dead_https_url() -> str:
    """An https:// URL on loopback where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"https://127.0.0.1:{sock.getsockname()[1]}/"


class SealFixture(FakeKmsCase):
    """One fake KMS (with a key policy on PCR0), its test CA and a dev attestation root."""

    PCR0 = PCR0
    NAME = "seal"

    def aws_environ(self, **extra) -> dict:
        creds = self.fake.credentials()
        return {"AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"], **extra}

    def payload_file(self, value) -> str:
        path = self.dir / f"payload-{os.urandom(4).hex()}.json"
        path.write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
        return str(path)

    def run_command(self, *argv, environ) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser()
        seal_secrets.add_arguments(parser)
        args = parser.parse_args([str(a) for a in argv])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = seal_secrets.run(args, environ=environ)
        scan_later(out.getvalue() + err.getvalue(), "seal-secrets output")
        return code, out.getvalue(), err.getvalue()

    def assert_opens(self, envelope_obj, expected_payload=PAYLOAD, version=None):
        """The enclave's way: parse, pin, KMS Decrypt with a Recipient document, AES-GCM open."""
        parsed = envelope.check_pinned(envelope.parse(envelope_obj), self.fake.key_arn, None)
        if version is not None:
            self.assertEqual(parsed.bundle_version, version)
        data_key = kms.unwrap_data_key(parsed, credentials=self.credentials(), region=REGION,
                                       attest=self.minter, transport=self.transport,
                                       endpoint=self.fake.url, now=time.time())
        remember_secret(data_key, kind="unwrapped data key")
        self.assertEqual(envelope.open(parsed, data_key), expected_payload)


class AwsEnvironmentTest(SealFixture):
    """Flags win; AWS_ENDPOINT_URL_KMS over AWS_ENDPOINT_URL; AWS_CA_BUNDLE as the CA file."""

    def seal(self, *flags, environ) -> tuple[int, str, str]:
        return self.run_command("--kms-key-arn", self.fake.key_arn, "--bundle-version", "5",
                                *flags, self.payload_file(PAYLOAD), environ=environ)

    def test_endpoint_and_ca_bundle_from_the_environment(self):
        calls = len(self.fake.calls)
        code, out, err = self.seal(environ=self.aws_environ(
            AWS_ENDPOINT_URL_KMS=self.fake.url, AWS_CA_BUNDLE=self.ca_file))
        self.assertEqual(code, 0, err)
        self.assertEqual(self.fake.calls[calls:], [("GenerateDataKey",
                                                    fake_kms.TEST_ACCESS_KEY_ID)])
        self.assert_opens(json.loads(out), version=5)

    def test_service_endpoint_wins_over_the_global_one(self):
        code, out, err = self.seal(environ=self.aws_environ(
            AWS_ENDPOINT_URL_KMS=self.fake.url, AWS_ENDPOINT_URL=dead_https_url(),
            AWS_CA_BUNDLE=self.ca_file))
        self.assertEqual(code, 0, err)
        # the global one alone is used too
        code, out, err = self.seal(environ=self.aws_environ(
            AWS_ENDPOINT_URL=self.fake.url, AWS_CA_BUNDLE=self.ca_file))
        self.assertEqual(code, 0, err)
        self.assert_opens(json.loads(out))

    def test_flags_win_over_the_environment(self):
        code, out, err = self.seal(
            "--endpoint", self.fake.url, "--ca-file", self.ca_file,
            environ=self.aws_environ(AWS_ENDPOINT_URL_KMS=dead_https_url(),
                                     AWS_ENDPOINT_URL=dead_https_url(),
                                     AWS_CA_BUNDLE=str(self.dir / "missing-bundle.pem")))
        self.assertEqual(code, 0, err)
        self.assert_opens(json.loads(out))

    def test_unreachable_endpoint_from_the_environment_exits_1_naming_it(self):
        dead = dead_https_url()
        code, out, err = self.seal(environ=self.aws_environ(AWS_ENDPOINT_URL_KMS=dead,
                                                            AWS_CA_BUNDLE=self.ca_file))
        self.assertEqual((code, out), (1, ""))
        self.assertIn("kms_unavailable", err)
        self.assertIn(f"endpoint {dead} from AWS_ENDPOINT_URL_KMS", err)

    def test_without_the_ca_bundle_the_fake_is_not_trusted(self):
        """Only the bundled Amazon roots by default: the fake's certificate is refused."""
        code, out, err = self.seal(environ=self.aws_environ(AWS_ENDPOINT_URL=self.fake.url))
        self.assertEqual((code, out), (1, ""))
        self.assertIn("kms_unavailable", err)

    def test_bad_environment_values_exit_2(self):
        cases = {
            "http AWS_ENDPOINT_URL_KMS": ({"AWS_ENDPOINT_URL_KMS": "http://127.0.0.1:1/"},
                                          "AWS_ENDPOINT_URL_KMS must be an https:// URL"),
            "http AWS_ENDPOINT_URL": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:1/"},
                                      "AWS_ENDPOINT_URL must be an https:// URL"),
            "unreadable AWS_CA_BUNDLE": ({"AWS_ENDPOINT_URL": self.fake.url,
                                          "AWS_CA_BUNDLE": str(self.dir / "missing.pem")},
                                         "AWS_CA_BUNDLE: cannot load"),
        }
        for name, (extra, message) in cases.items():
            with self.subTest(name):
                calls = len(self.fake.calls)
                code, out, err = self.seal(environ=self.aws_environ(**extra))
                self.assertEqual((code, out), (2, ""), err)
                self.assertIn(message, err)
                self.assertEqual(len(self.fake.calls), calls)  # KMS never asked


class PayloadCheckTest(SealFixture):
    """Strict JSON and the runtime's validator, before KMS is asked: exit 2, never a value."""

    def test_payloads_the_enclave_would_refuse_exit_2_before_kms(self):
        secret = "seal-test-never-echoed-" + os.urandom(8).hex()
        remember_secret(secret, kind="refused payload value")
        cases = {
            "duplicate key": (b'{"ENCLAVE_RPC_SHARED_SECRET": "%s", '
                              b'"ENCLAVE_RPC_SHARED_SECRET": "%s"}'
                              % ((secret + "a" * 16).encode(), (secret + "b" * 16).encode()),
                              "not strict JSON (duplicate key)"),
            "NaN": (b'{"ENCLAVE_RPC_SHARED_SECRET": NaN}', "not strict JSON"),
            "not JSON": (b'{"ENCLAVE_RPC_SHARED_SECRET": "' + secret.encode(),
                         "not valid JSON"),
            "not UTF-8": (b'{"ENCLAVE_RPC_SHARED_SECRET": "\xff"}', "not UTF-8"),
            "not an object": (json.dumps([secret]).encode(), "must be a JSON object"),
            "bundle_version inside": ({"bundle_version": 3}, "must not carry bundle_version"),
            "unknown key": ({"ENCLAVE_RPC_SHARED_SECRETS": secret},
                            "the enclave would refuse this payload: unknown_key:"),
            "short rpc secret": ({"ENCLAVE_RPC_SHARED_SECRET": secret[:20]},
                                 "invalid_secret: ENCLAVE_RPC_SHARED_SECRET must be at least"),
            "http endpoint": ({"ECS_WATERMARK_ENDPOINT": f"http://{secret}.internal/"},
                              "invalid_endpoint: ECS_WATERMARK_ENDPOINT must be an https://"),
            "bad mtls object": ({"MTLS_CLIENT_CERT_JSON": {"client_cert": secret}},
                                "the enclave would refuse this payload: "),
            "wrong type": ({"GOOGLE_OAUTH_CLIENT_ID": 7}, "invalid_type:"),
        }
        for name, (content, message) in cases.items():
            with self.subTest(name):
                calls = len(self.fake.calls)
                code, out, err = self.run_command(
                    "--kms-key-arn", self.fake.key_arn, "--endpoint", self.fake.url,
                    "--ca-file", self.ca_file, self.payload_file(content),
                    environ=self.aws_environ())
                self.assertEqual((code, out), (2, ""), err)
                self.assertTrue(err.startswith("seal-secrets: "), err)
                self.assertIn(message, err)
                self.assertEqual(err.count("\n"), 1)
                self.assertNotIn(secret, err)
                self.assertEqual(len(self.fake.calls), calls)  # KMS never asked

    def test_a_valid_payload_with_a_null_is_sealed(self):
        """What the validator accepts is sealed unchanged: null clears a key downstream."""
        payload = dict(PAYLOAD, GOOGLE_OAUTH_CLIENT_ID=None)
        code, out, err = self.run_command(
            "--kms-key-arn", self.fake.key_arn, "--endpoint", self.fake.url, "--ca-file",
            self.ca_file, "--bundle-version", "11", self.payload_file(payload),
            environ=self.aws_environ())
        self.assertEqual(code, 0, err)
        for value in PAYLOAD.values():
            self.assertNotIn(value, out)
        self.assert_opens(json.loads(out), payload, version=11)


class AwsCliRecipeTest(SealFixture):
    """docs/ENCLAVE.md §6 "Sealing without this repository": GenerateDataKey as the AWS CLI
    asks it, then AES-256-GCM with the documented AAD. The enclave must open the result, so
    the recipe cannot drift from enclave/envelope.py."""

    VERSION = 42

    def cli_generate_data_key(self, version: int) -> dict:
        """`aws kms generate-data-key --key-id ARN --key-spec AES_256 --encryption-context
        purpose=enclave-secrets/v1,bundle_version=N --output json`: the same request, and the
        answer the CLI prints (the JSON of KMS's answer, blobs in base64)."""
        answer = kms.call("GenerateDataKey",
                          {"KeyId": self.fake.key_arn, "KeySpec": "AES_256",
                           "EncryptionContext": {"purpose": "enclave-secrets/v1",
                                                 "bundle_version": str(version)}},
                          credentials=self.credentials(), region=REGION,
                          transport=self.transport, endpoint=self.fake.url, now=time.time())
        remember_secret(answer["Plaintext"], base64.b64decode(answer["Plaintext"]),
                        kind="recipe data key")
        return answer

    def test_envelope_built_by_hand_following_the_recipe(self):
        version = self.VERSION
        # (1) GenerateDataKey, no Recipient: the data key and its CiphertextBlob.
        context = {"purpose": "enclave-secrets/v1", "bundle_version": str(version)}
        data_key = kms.generate_data_key(self.fake.key_arn, context,
                                         credentials=self.credentials(), region=REGION,
                                         transport=self.transport, endpoint=self.fake.url,
                                         now=time.time())
        remember_secret(data_key.plaintext, kind="recipe data key")
        # (2) the plaintext: the payload plus "bundle_version": N (an integer)
        plaintext = json.dumps(dict(PAYLOAD, bundle_version=version)).encode("utf-8")
        # (3) the AAD, exactly as documented
        aad = json.dumps({"v": 1, "kms_key_arn": self.fake.key_arn,
                          "encryption_context": context},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=True
                         ).encode("ascii")
        # (4) AES-256-GCM, a 12-byte random nonce; the tag is appended to the ciphertext
        nonce = os.urandom(12)
        ciphertext = AESGCM(data_key.plaintext).encrypt(nonce, plaintext, aad)
        b64 = (lambda raw: base64.b64encode(raw).decode("ascii"))
        envelope_obj = {"v": 1, "kms_key_arn": self.fake.key_arn,
                        "encryption_context": context,
                        "encrypted_data_key": b64(data_key.ciphertext_blob),
                        "nonce": b64(nonce), "ciphertext": b64(ciphertext)}

        parsed = envelope.parse(json.loads(json.dumps(envelope_obj)))
        self.assertEqual(parsed.aad, aad)
        self.assertEqual(envelope.open(parsed, data_key.plaintext), PAYLOAD)
        self.assert_opens(envelope_obj, version=version)  # and KMS's way, with a Recipient

    def recipe_snippet(self) -> str:
        """The Python program of the documented `python3 -c '...'` step."""
        text = ENCLAVE_DOC.read_text()
        section = text[text.index("### Sealing without this repository"):]
        match = re.search(r"python3 -c '\n(.*?)\n' ", section, re.S)
        self.assertIsNotNone(match, "docs/ENCLAVE.md: no python3 -c '...' recipe step")
        program = match.group(1)
        self.assertNotIn("'", program)  # it sits inside single quotes in the shell
        return program

    def test_the_documented_snippet_runs_and_the_enclave_opens_its_envelope(self):
        program = self.recipe_snippet()
        doc = ENCLAVE_DOC.read_text()
        self.assertIn("aws kms generate-data-key --key-id \"$KMS_KEY_ARN\" --key-spec AES_256",
                      doc)
        self.assertIn("--encryption-context purpose=enclave-secrets/v1,bundle_version=", doc)
        answer = self.cli_generate_data_key(self.VERSION)
        payload_file = self.payload_file(PAYLOAD)
        result = subprocess.run(
            [sys.executable, "-c", program, self.fake.key_arn, str(self.VERSION), payload_file],
            input=json.dumps(answer), capture_output=True, text=True,
            timeout=SUBPROCESS_TIMEOUT_S)
        scan_later(result.stdout + result.stderr, "recipe snippet output")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "")
        envelope_obj = json.loads(result.stdout)
        for value in PAYLOAD.values():
            self.assertNotIn(value, result.stdout)
        self.assertNotIn(answer["Plaintext"], result.stdout)
        parsed = envelope.parse(envelope_obj)
        self.assertEqual(envelope.open(parsed, base64.b64decode(answer["Plaintext"])), PAYLOAD)
        self.assert_opens(envelope_obj, version=self.VERSION)

    def test_the_snippet_and_the_command_agree_on_everything_but_the_randomness(self):
        """Same key, version and payload: the same fields, context and plaintext."""
        code, out, err = self.run_command(
            "--kms-key-arn", self.fake.key_arn, "--endpoint", self.fake.url, "--ca-file",
            self.ca_file, "--bundle-version", str(self.VERSION), self.payload_file(PAYLOAD),
            environ=self.aws_environ())
        self.assertEqual(code, 0, err)
        from_command = json.loads(out)
        answer = self.cli_generate_data_key(self.VERSION)
        result = subprocess.run(
            [sys.executable, "-c", self.recipe_snippet(), self.fake.key_arn, str(self.VERSION),
             self.payload_file(PAYLOAD)],
            input=json.dumps(answer), capture_output=True, text=True,
            timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual(result.returncode, 0, result.stderr)
        from_recipe = json.loads(result.stdout)
        self.assertEqual(list(from_recipe), list(from_command))
        for field in ("v", "kms_key_arn", "encryption_context"):
            self.assertEqual(from_recipe[field], from_command[field], field)
        self.assertEqual(envelope.parse(from_recipe).aad, envelope.parse(from_command).aad)


if __name__ == "__main__":
    unittest.main()
