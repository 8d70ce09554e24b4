"""Sealed deliveries end to end (DESIGN.md section 15, ENCLAVE_SECRETS_SOURCE=kms).

The runtime runs in-process (tests.stack.LocalStack) with ENCLAVE_SECRETS_SOURCE=kms, pinned to
a key of the fake KMS, whose key policy allows the dev-shim's PCR0 (attestation.measure_code())
and trusts the dev root of the runtime's state directory (created before the runtime starts).
The fake KMS, the fake watermark service and the fake Google all hold certificates of one test
CA, the runtime's ENCLAVE_OUTBOUND_CA_FILE.

- EndToEndTest: `enclave.py seal-secrets` and `scripts/send-secrets.sh --kms` as processes; the
  unsealed secrets then serve a signed watermark RPC and a Google token exchange; the key policy
  refusing the runtime's PCR0 is kms_access_denied and changes nothing.
- RefusalTest: every bad delivery is one error ack with its code, changes nothing in force (nor
  the version, nor /healthz), and the next good delivery is still accepted.
Every ack, /healthz, /metrics and every process output is checked for every known secret here,
and handed to the suite-wide leak scan (tests.support) as well.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path
from unittest import mock

from cryptography.hazmat.primitives.asymmetric import rsa

from enclave import attestation, devpki, envelope, kms
from enclave.outbound import OutboundClient
from enclave.rpcauth import new_nonce, sign_request
from tests.fakes import fake_watermark
from tests.fakes.fake_kms import TEST_ACCESS_KEY_ID, FakeKms
from tests.fakes.pki import TestCA
from tests.stack import LocalStack
from tests.support import (REGISTRY, find_leaks, keep_off_console, private_key_lines,
                           remember_key_files, remember_secret, scan_later)

REPO = Path(__file__).resolve().parent.parent
SEND_SECRETS = REPO / "scripts" / "send-secrets.sh"
SUBPROCESS_TIMEOUT_S = 60
ACK_TIMEOUT_S = 30.0  # the listener answers within its own 30 s connection limit
HANG_TIMEOUT_S = 0.5  # the opener's KMS deadline in the hang case (the constant is 10 s)
HANG_BOUND_S = 30.0  # the fake's own bound in that case: far beyond the opener's deadline
REDIRECT = "https://app.example/oauth/callback"
OTHER_PCR0 = bytes.fromhex("c3" * 48)


RECIPIENT_KEY_POOL = 4  # RSA-2048 keys made once for the module (each costs ~0.1 s of CPU)
_patches = []


def setUpModule():
    """The runtime asks kms._new_recipient_key for a fresh key per Decrypt; here it gets one of
    a few keys made once, so the module does not spend seconds of CPU on key generation. The
    fresh-key-per-call rule itself is tested in tests/test_kms.py, without this."""
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=kms.RSA_KEY_BITS)
            for _ in range(RECIPIENT_KEY_POOL)]
    pool = itertools.cycle(keys)
    patcher = mock.patch.object(kms, "_new_recipient_key", lambda: next(pool))
    patcher.start()
    _patches.append(patcher)


def tearDownModule():
    while _patches:
        _patches.pop().stop()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def flip_first_byte(text: str) -> str:
    """The base64 of the same bytes with the first one changed."""
    raw = bytearray(base64.b64decode(text))
    raw[0] ^= 0x01
    return b64(bytes(raw))


def flip_last_byte(text: str) -> str:
    """The base64 of the same bytes with the last one changed."""
    raw = bytearray(base64.b64decode(text))
    raw[-1] ^= 0x01
    return b64(bytes(raw))


def deliver_raw(port: int, data: bytes, timeout: float = ACK_TIMEOUT_S) -> bytes:
    """Like socat: send, half-close, read everything until the listener closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        for _ in range(1024):  # an ack is one short line; bounded either way
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


class SealedStackCase(unittest.TestCase):
    """One fake KMS and one runtime (ENCLAVE_SECRETS_SOURCE=kms) for the class."""

    @classmethod
    def setUpClass(cls):
        cls._quiet = keep_off_console("enclave", "tests.fakes")
        cls._tmp = tempfile.TemporaryDirectory(prefix="test-sealed-")
        cls.dir = Path(cls._tmp.name)
        cls.state_dir = cls.dir / "state"
        # The runtime's dev-shim root, made first so that the fake KMS can trust it.
        cls.root = devpki.load_or_create_root(cls.state_dir)
        remember_key_files(cls.state_dir, kind="sealed test state")
        cls.ca = TestCA("Sealed Delivery Test CA")
        cls.ca_file = cls.ca.write(cls.dir, "ca")
        cls.fake = FakeKms(cls.ca, attestation_roots=[cls.root.cert_der],
                           allowed_pcr0=[attestation.measure_code()]).start()
        try:
            cls.stack = LocalStack(ca=cls.ca, env={
                "ENCLAVE_STATE_DIR": str(cls.state_dir),
                "ENCLAVE_SECRETS_SOURCE": "kms",
                "ENCLAVE_KMS_KEY_ARN": cls.fake.key_arn,
                "ENCLAVE_KMS_ENDPOINT": cls.fake.url,
            })
        except BaseException:
            cls.fake.stop()
            cls._tmp.cleanup()
            cls._quiet()
            raise
        cls.store = cls.stack.running.runtime.store
        cls.transport = OutboundClient(context=kms.create_kms_context(cls.ca_file))
        # A Google client of our own: the exchange works only with what the envelope carried.
        cls.google_client_id = "sealed-client-id.apps.googleusercontent.com"
        cls.google_client_secret = "GOCSPX-sealed-" + os.urandom(12).hex()
        remember_secret(cls.google_client_secret, kind="google client secret")
        cls.stack.fake_google.state.client_id = cls.google_client_id
        cls.stack.fake_google.state.client_secret = cls.google_client_secret
        # Values checked in every ack and answer here (besides the whole registry): the
        # access key id is not a secret for the suite log (the local stack prints it), but
        # nothing the runtime answers may carry it.
        cls.local_secrets = {TEST_ACCESS_KEY_ID: "test access key id"}

    @classmethod
    def tearDownClass(cls):
        cls.transport.close()
        cls.stack.close()
        cls.fake.stop()
        remember_key_files(cls.dir, kind="sealed test files")
        cls._tmp.cleanup()
        cls._quiet()

    def setUp(self):
        self.fake.set_mode("normal")

    # -- payloads and envelopes ----------------------------------------------------------------
    def new_payload(self) -> dict:
        """A full section 4 payload with fresh secrets, every one registered."""
        rpc_secret = "sealed-rpc-secret-" + os.urandom(16).hex()
        sealing_key = os.urandom(32)
        remember_secret(rpc_secret, kind="rpc shared secret")
        remember_secret(sealing_key, kind="token sealing key")
        client = self.ca.issue("enclave-client-sealed")  # TestCA registers its private key
        payload = self.stack.mtls_payload(client)
        payload.update({
            "GOOGLE_OAUTH_CLIENT_ID": self.google_client_id,
            "GOOGLE_OAUTH_CLIENT_SECRET": self.google_client_secret,
            "ENCLAVE_RPC_SHARED_SECRET": rpc_secret,
            "ENCLAVE_TOKEN_SEALING_KEY": b64(sealing_key),
        })
        self.local_secrets.update({rpc_secret: "rpc shared secret",
                                   self.google_client_secret: "google client secret",
                                   b64(sealing_key): "token sealing key",
                                   sealing_key.hex(): "token sealing key"})
        for line in private_key_lines(client.key_pem):
            self.local_secrets[line] = "mTLS client key"
        return payload

    def seal(self, payload: dict, version: int, key_arn: str | None = None) -> dict:
        """An envelope made in-process the way seal-secrets makes it."""
        key_arn = key_arn or self.fake.key_arn
        context = {"purpose": envelope.PURPOSE, "bundle_version": str(version)}
        data_key = kms.generate_data_key(
            key_arn, context, credentials=kms.AwsCredentials.from_environ(
                self.aws_environ(), now=time.time()),
            region=self.fake.region, transport=self.transport, endpoint=self.fake.url,
            now=time.time())
        remember_secret(data_key.plaintext, kind="test data key")
        self.local_secrets[b64(data_key.plaintext)] = "data key"
        return envelope.seal(payload, kms_key_arn=key_arn, bundle_version=version,
                             data_key=data_key.plaintext,
                             encrypted_data_key=data_key.ciphertext_blob, nonce=os.urandom(12))

    def aws_environ(self) -> dict:
        creds = self.fake.credentials()
        return {"AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"]}

    def delivery(self, sealed: dict, credentials: dict | None = None) -> dict:
        return {"SEALED_SECRETS": sealed,
                "AWS_CREDENTIALS": credentials or self.fake.credentials(),
                "AWS_REGION": self.fake.region}

    # -- the secrets channel and the HTTP API ------------------------------------------------
    def deliver(self, delivery: dict | bytes) -> dict:
        """One delivery on the real listener; the ack must be exactly one line of JSON."""
        data = delivery if isinstance(delivery, bytes) else json.dumps(delivery).encode()
        raw = deliver_raw(self.stack.secrets_port, data)
        self.assertTrue(raw.endswith(b"\n") and raw.count(b"\n") == 1, raw[:300])
        self.assert_clean(raw, "ack")
        return json.loads(raw)

    def assert_ok(self, delivery, changed=None) -> dict:
        ack = self.deliver(delivery)
        self.assertIs(ack.get("ok"), True, ack)
        if changed is not None:
            self.assertEqual(sorted(ack["changed"]), sorted(changed), ack)
        return ack

    def assert_refused(self, delivery, code: str) -> dict:
        ack = self.deliver(delivery)
        self.assertEqual(set(ack), {"ok", "version", "error"}, ack)
        self.assertIs(ack["ok"], False, ack)
        self.assertEqual(ack["error"]["code"], code, ack)
        self.assertTrue(ack["error"]["message"], ack)
        return ack

    def get(self, path: str):
        status, body = self.stack.call("GET", path, sign=False)
        self.assertEqual(status, 200, body)
        self.assert_clean(body if isinstance(body, bytes) else json.dumps(body), path)
        return body

    def healthz(self) -> dict:
        body = self.get("/healthz")
        body.pop("uptime_s", None)
        return body

    def in_force(self) -> dict:
        """What is in force, by identity and value: the state, the mTLS snapshot, the rest."""
        store = self.store
        return {"state": store.current(), "mtls": store.mtls(), "version": store.version,
                "bundle_version": store.bundle_version, "rpc": store.rpc_secrets(),
                "google": store.google_credentials(), "keyring": store.sealing_keyring(),
                "healthz": self.healthz()}

    def assert_unchanged(self, before: dict) -> None:
        after = self.in_force()
        self.assertIs(after["state"], before["state"])
        self.assertIs(after["mtls"], before["mtls"])
        for name in ("version", "bundle_version", "rpc", "google", "keyring", "healthz"):
            self.assertEqual(after[name], before[name], name)

    def rpc(self, method: str, target: str, body: dict, secret: str):
        data = json.dumps(body).encode()
        headers = sign_request(secret, method, target, data, int(time.time()), new_nonce())
        status, answer = self.stack.call(method, target, data, sign=False, headers=headers)
        if isinstance(answer, dict):
            for name in ("access_token", "id_token", "sealed_refresh_token"):
                remember_secret(answer.get(name), kind=name.replace("_", " "))
        return status, answer

    # -- leaks -------------------------------------------------------------------------------
    def assert_clean(self, text, label: str) -> None:
        """No registered secret (the whole suite registry), no credential of this module, no
        private key marker in `text`; and the text goes to the end-of-run scan as well."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        scan_later(text, f"test_sealed_delivery {label}")
        values, _ = REGISTRY.snapshot()
        values.update(self.local_secrets)
        leaks = find_leaks(text, values, source=label)
        self.assertEqual([str(leak) for leak in leaks], [], f"{label} leaks a secret")


class EndToEndTest(SealedStackCase):
    """seal-secrets -> send-secrets.sh --kms -> the runtime opens it -> the secrets serve."""

    BUNDLE_VERSION = 41

    def run_process(self, argv: list[str], env: dict, label: str) -> subprocess.CompletedProcess:
        argv = [str(a) for a in argv]
        for value in list(self.local_secrets) + [self.fake.credentials()["SecretAccessKey"]]:
            self.assertFalse(any(value in arg for arg in argv), f"a secret on {label}'s argv")
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=SUBPROCESS_TIMEOUT_S)
        self.assert_clean(result.stdout, f"{label} stdout")
        self.assert_clean(result.stderr, f"{label} stderr")
        return result

    def base_environ(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "SEND_SECRETS_", "ENCLAVE_", "ALFRED_"))}
        env["PYTHONPATH"] = str(REPO)
        return env

    def test_seal_send_open_and_use(self):
        payload = self.new_payload()
        payload_file = self.dir / "payload.json"
        payload_file.write_text(json.dumps(payload))
        self.addCleanup(payload_file.unlink)

        # (1) seal-secrets on the operator's machine: GenerateDataKey, AES-GCM, the envelope.
        sealed = self.run_process(
            [sys.executable, "enclave.py", "seal-secrets", "--kms-key-arn", self.fake.key_arn,
             "--endpoint", self.fake.url, "--ca-file", self.ca_file,
             "--bundle-version", self.BUNDLE_VERSION, payload_file],
            dict(self.base_environ(), **self.aws_environ()), "seal-secrets")
        self.assertEqual(sealed.returncode, 0, sealed.stderr)
        envelope_obj = json.loads(sealed.stdout)
        self.assertEqual(envelope_obj["encryption_context"],
                         {"purpose": envelope.PURPOSE, "bundle_version": str(self.BUNDLE_VERSION)})
        self.assertEqual(envelope_obj["kms_key_arn"], self.fake.key_arn)
        envelope_file = self.dir / "sealed.json"
        envelope_file.write_text(sealed.stdout)
        self.addCleanup(envelope_file.unlink)

        before = self.healthz()
        self.assertEqual(before["secrets"]["source"], "kms")
        self.assertEqual((before["secrets"]["received"], before["secrets"]["bundle_version"]),
                         (False, None))
        decrypts = sum(op == "Decrypt" for op, _ in self.fake.calls)

        # (2) send-secrets.sh --kms over TCP, the credentials from its environment only.
        env = dict(self.base_environ(), **self.aws_environ(), SEND_SECRETS_CREDENTIALS="env",
                   SEND_SECRETS_PYTHON=sys.executable, SEND_SECRETS_TRIES="1",
                   SEND_SECRETS_TIMEOUT=str(int(ACK_TIMEOUT_S)))
        sent = self.run_process(
            ["bash", SEND_SECRETS, "--tcp", f"127.0.0.1:{self.stack.secrets_port}",
             "--kms", envelope_file], env, "send-secrets.sh")
        self.assertEqual(sent.returncode, 0, sent.stdout + sent.stderr)
        self.assertEqual(sent.stdout.count("\n"), 1, sent.stdout)
        ack = json.loads(sent.stdout)
        self.assertEqual((set(ack), ack["ok"], ack["version"]),
                         ({"ok", "version", "changed"}, True, 1))
        self.assertEqual(sorted(ack["changed"]), sorted(payload))

        # (3) the runtime opened it itself: one Decrypt with its dev-shim Recipient document.
        self.assertEqual(sum(op == "Decrypt" for op, _ in self.fake.calls), decrypts + 1)
        health = self.healthz()
        self.assertEqual(health["secrets"]["source"], "kms")
        self.assertEqual(health["secrets"]["bundle_version"], self.BUNDLE_VERSION)
        self.assertEqual((health["secrets"]["received"], health["secrets"]["version"]), (True, 1))
        self.assertTrue(health["mtls"]["configured"])
        self.assertEqual(self.store.bundle_version, self.BUNDLE_VERSION)
        self.assert_clean(self.get("/metrics"), "/metrics")

        # (4) a signed watermark RPC over the delivered mTLS material, signed with the
        # delivered RPC secret (the stack's default secret no longer the current one).
        secret = payload["ENCLAVE_RPC_SHARED_SECRET"]
        body = {"sealed": True, "n": 1}
        status, answer = self.rpc("POST", "/v1/rpc/watermark", body, secret)
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["result"]["watermark"],
                         fake_watermark.watermark_for(body)["watermark"])
        self.assertEqual(answer["result"]["client"], "enclave-client-sealed")
        self.assertEqual(self.store.rpc_secrets()[0], secret)
        status, answer = self.rpc("POST", "/v1/rpc/watermark", body, "not-the-delivered-secret")
        self.assertEqual(status, 401, answer)

        # (5) a Google token exchange with the delivered client id and secret.
        code = self.stack.fake_google.mint_code(REDIRECT)
        status, answer = self.rpc("POST", "/v1/rpc/google/token/exchange",
                                  {"code": code, "redirect_uri": REDIRECT}, secret)
        self.assertEqual(status, 200, answer)
        self.assertTrue(answer.get("sealed_refresh_token"), answer)

        # (6) the key policy stops allowing this runtime's PCR0: kms_access_denied, and
        # nothing in force changes (a newer bundle, so it is no rollback).
        before = self.in_force()
        allowed = self.fake.allowed_pcr0
        self.fake.allowed_pcr0 = {OTHER_PCR0}
        try:
            denied = self.assert_refused(
                self.delivery(self.seal(self.new_payload(), self.BUNDLE_VERSION + 1)),
                "kms_access_denied")
        finally:
            self.fake.allowed_pcr0 = allowed
        self.assertIn("AccessDeniedException", denied["error"]["message"])
        self.assertEqual(denied["version"], 1)
        self.assert_unchanged(before)
        status, answer = self.rpc("POST", "/v1/rpc/watermark", body, secret)
        self.assertEqual(status, 200, answer)

        # (7) allowed again: a newer bundle rotates the RPC secret and advances bundle_version
        rotated = dict(payload, ENCLAVE_RPC_SHARED_SECRET="sealed-rpc-rotated-" +
                       os.urandom(16).hex())
        remember_secret(rotated["ENCLAVE_RPC_SHARED_SECRET"], kind="rpc shared secret")
        self.local_secrets[rotated["ENCLAVE_RPC_SHARED_SECRET"]] = "rpc shared secret"
        ack = self.assert_ok(self.delivery(self.seal(rotated, self.BUNDLE_VERSION + 2)),
                             changed=["ENCLAVE_RPC_SHARED_SECRET"])
        self.assertEqual(ack["version"], 2)
        self.assertEqual(self.healthz()["secrets"]["bundle_version"], self.BUNDLE_VERSION + 2)
        status, answer = self.rpc("POST", "/v1/rpc/watermark", body,
                                  rotated["ENCLAVE_RPC_SHARED_SECRET"])
        self.assertEqual(status, 200, answer)
        self.assert_clean(self.get("/metrics"), "/metrics")


class RefusalTest(SealedStackCase):
    """The refusal table: one error ack with its code each, nothing changes, the next good
    delivery is accepted."""

    BASE_VERSION = 500

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        try:
            helper = cls("test_refusal_table")
            cls.payload = helper.new_payload()
            cls.good = helper.seal(cls.payload, cls.BASE_VERSION)
            ack = helper.deliver(helper.delivery(cls.good))
            if not ack.get("ok"):
                raise AssertionError(f"the base delivery was refused: {ack}")
        except BaseException:
            cls.tearDownClass()
            raise

    def tampered(self, **fields) -> dict:
        sealed = copy.deepcopy(self.good)
        for name, value in fields.items():
            if name == "context":
                sealed["encryption_context"].update(value)
            else:
                sealed[name] = value
        return self.delivery(sealed)

    def check_refusal(self, delivery, code: str, *, mode: str | None = None,
                      kms_calls: int | None = None) -> dict:
        """Refused with `code` (the fake KMS in `mode` meanwhile) after `kms_calls` calls the
        fake accepted; nothing in force, the version or /healthz changes; the good bundle again
        (an equal bundle_version) is then accepted and changes nothing."""
        before, calls = self.in_force(), len(self.fake.calls)
        self.fake.set_mode(mode or "normal")
        try:
            ack = self.assert_refused(delivery, code)
        finally:
            self.fake.set_mode("normal")
        self.assertEqual(ack["version"], before["version"])
        self.assert_unchanged(before)
        if kms_calls is not None:
            self.assertEqual(len(self.fake.calls) - calls, kms_calls, "calls KMS accepted")
        again = self.assert_ok(self.delivery(self.good), changed=[])
        self.assertEqual(again["version"], before["version"])
        self.assert_unchanged(before)
        return ack

    def test_refusal_table(self):
        good = self.good
        other_key = self.fake.add_key()
        past = iso(utcnow() - dt.timedelta(minutes=5))
        expired_session = self.fake.issue_session(time.time() - 60)
        expired_session.pop("Expiration")  # only KMS knows: it answers ExpiredTokenException
        self.local_secrets.update({expired_session["SecretAccessKey"]: "session secret",
                                   expired_session["SessionToken"]: "session token"})
        newer = str(self.BASE_VERSION + 1)
        cases = [
            # (name, delivery, fake mode, code)
            ("kms_key_arn another key's", self.tampered(kms_key_arn=other_key), None,
             "envelope_key_mismatch"),
            ("sealed under another key", self.delivery(self.seal(self.payload,
                                                                 self.BASE_VERSION + 2,
                                                                 other_key)), None,
             "envelope_key_mismatch"),
            # a newer bundle_version in the context: KMS binds the data key to the context
            ("encryption_context bundle_version", self.tampered(
                context={"bundle_version": newer}), None, "kms_invalid_ciphertext"),
            ("encryption_context purpose", self.tampered(
                context={"purpose": "enclave-secrets/v2"}), None, "envelope_malformed"),
            ("v", self.tampered(v=2), None, "envelope_malformed"),
            ("ciphertext", self.tampered(ciphertext=flip_first_byte(good["ciphertext"])),
             None, "envelope_invalid"),
            ("nonce", self.tampered(nonce=flip_last_byte(good["nonce"])), None,
             "envelope_invalid"),
            ("tag", self.tampered(ciphertext=flip_last_byte(good["ciphertext"])), None,
             "envelope_invalid"),
            ("encrypted_data_key", self.tampered(
                encrypted_data_key=flip_last_byte(good["encrypted_data_key"])), None,
             "kms_invalid_ciphertext"),
            ("truncated CiphertextForRecipient", self.delivery(good), "truncated",
             "kms_invalid_response"),
            ("garbage CiphertextForRecipient", self.delivery(good), "garbage",
             "kms_invalid_response"),
            ("answer with Plaintext", self.delivery(good), "plaintext", "kms_invalid_response"),
            ("answer for another KeyId", self.delivery(good), "wrong_key_id",
             "kms_invalid_response"),
            ("rolled-back bundle_version", self.delivery(self.seal(self.payload,
                                                                   self.BASE_VERSION - 1)),
             None, "bundle_rollback"),
            ("AccessDenied", self.delivery(good), "deny", "kms_access_denied"),
            ("Expiration in the past", self.delivery(good, dict(self.fake.credentials(),
                                                                Expiration=past)),
             None, "kms_credentials_expired"),
            ("session KMS refuses as expired", self.delivery(good, expired_session), None,
             "kms_credentials_expired"),
            ("KMS 500", self.delivery(good), "500", "kms_unavailable"),
            ("missing AWS_CREDENTIALS", {k: v for k, v in self.delivery(good).items()
                                         if k != "AWS_CREDENTIALS"}, None,
             "kms_credentials_invalid"),
            ("plaintext secret keys", {"ENCLAVE_RPC_SHARED_SECRET": "plaintext-rpc-secret-"
                                       + os.urandom(8).hex()}, None, "plaintext_refused"),
            ("plaintext beside the envelope", dict(self.delivery(good),
                                                   GOOGLE_OAUTH_CLIENT_ID="x.apps.example"),
             None, "plaintext_refused"),
            ("an unknown extra key", dict(self.delivery(good), EXTRA_KEY="1"), None,
             "unknown_key"),
            ("no SEALED_SECRETS", {k: v for k, v in self.delivery(good).items()
                                   if k != "SEALED_SECRETS"}, None, "envelope_malformed"),
            ("SEALED_SECRETS as a string", dict(self.delivery(good),
                                                SEALED_SECRETS=json.dumps(good)), None,
             "envelope_malformed"),
            ("AWS_REGION not the key's", dict(self.delivery(good), AWS_REGION="eu-west-1"),
             None, "kms_invalid_request"),
            ("Expiration not a time", self.delivery(good, dict(self.fake.credentials(),
                                                               Expiration="tomorrow")),
             None, "kms_credentials_invalid"),
            # opened, then the section 4 validator, unchanged: a refused newer bundle does not
            # advance bundle_version
            ("an unknown key inside the sealed payload", self.delivery(self.seal(
                dict(self.payload, EXTRA_KEY="1"), self.BASE_VERSION + 3)), None,
             "unknown_key"),
            ("an invalid value inside the sealed payload", self.delivery(self.seal(
                dict(self.payload, ECS_WATERMARK_ENDPOINT="ftp://watermark.invalid"),
                self.BASE_VERSION + 4)), None, "invalid_endpoint"),
        ]
        # refused before any key generation or KMS call
        before_kms = {"kms_key_arn another key's", "sealed under another key",
                      "encryption_context purpose", "v", "rolled-back bundle_version",
                      "Expiration in the past", "missing AWS_CREDENTIALS",
                      "plaintext secret keys", "plaintext beside the envelope",
                      "an unknown extra key", "no SEALED_SECRETS", "SEALED_SECRETS as a string",
                      "AWS_REGION not the key's", "Expiration not a time"}
        self.assertLessEqual(before_kms, {case[0] for case in cases})
        for name, delivery, mode, code in cases:
            with self.subTest(name):
                if name in before_kms:
                    self.check_refusal(delivery, code, mode=mode, kms_calls=0)
                elif code == "kms_credentials_expired":  # refused at KMS's authentication
                    ack = self.check_refusal(delivery, code, mode=mode)
                    self.assertIn("ExpiredTokenException", ack["error"]["message"])
                else:  # one Decrypt (the fake records the calls whose signature it accepted)
                    self.check_refusal(delivery, code, mode=mode, kms_calls=1)
        metrics = self.get("/metrics").decode()
        for code in {case[3] for case in cases}:
            self.assertIn(f'enclave_secrets_deliveries_total{{reason="{code}",result="refused"}}',
                          metrics)

    def test_rollback_refused_and_an_equal_version_accepted(self):
        old = self.delivery(self.seal(self.payload, self.BASE_VERSION - 100))
        self.check_refusal(old, "bundle_rollback")
        # the same envelope again (a re-delivery of the bundle in force) is accepted...
        self.assert_ok(self.delivery(self.good), changed=[])
        # ...but another envelope under the same version is not: within a boot the parent
        # cannot swap in a different bundle (an older secret) by reusing a version number
        self.check_refusal(self.delivery(self.seal(self.payload, self.BASE_VERSION)),
                           "bundle_rollback")
        self.assertEqual(self.healthz()["secrets"]["bundle_version"], self.BASE_VERSION)

    def test_kms_hanging_is_unavailable_within_the_deadline(self):
        opener = self.store._sealed
        self.assertEqual(opener.timeout_s, kms.TIMEOUT_S)  # what open() passes on to KMS
        before = self.in_force()
        delivery = json.dumps(self.delivery(self.good)).encode()
        result = {}

        def first():
            started = time.monotonic()
            try:
                result["raw"] = deliver_raw(self.stack.secrets_port, delivery)
            except OSError as exc:
                result["error"] = exc
            result["elapsed"] = time.monotonic() - started

        calls = len(self.fake.calls)
        hang_s, self.fake.hang_s, opener.timeout_s = self.fake.hang_s, HANG_BOUND_S, HANG_TIMEOUT_S
        self.fake.set_mode("hang")
        thread = threading.Thread(target=first, name="hanging-delivery", daemon=True)
        try:
            thread.start()
            deadline = time.monotonic() + ACK_TIMEOUT_S
            while len(self.fake.calls) == calls and time.monotonic() < deadline:
                time.sleep(0.01)  # bounded: waits for the Decrypt to reach the fake
            self.assertEqual(self.fake.calls[calls:calls + 1], [("Decrypt", TEST_ACCESS_KEY_ID)])
            # HTTP keeps answering while KMS hangs, and a second sender is queued, then answered
            self.assertEqual(self.healthz()["secrets"], before["healthz"]["secrets"])
            second = self.deliver({"ENCLAVE_RPC_SHARED_SECRET": "queued-plaintext-" +
                                   os.urandom(8).hex()})
            thread.join(ACK_TIMEOUT_S)
            self.assertFalse(thread.is_alive())
        finally:
            opener.timeout_s = kms.TIMEOUT_S
            self.fake.set_mode("normal")  # releases the fake's hanging handler
            self.fake.hang_s = hang_s
            thread.join(ACK_TIMEOUT_S)
        self.assertNotIn("error", result)
        raw = result["raw"]
        self.assertEqual(raw.count(b"\n"), 1, raw)
        self.assert_clean(raw, "hang ack")
        ack = json.loads(raw)
        self.assertEqual((ack["ok"], ack["error"]["code"]), (False, "kms_unavailable"), ack)
        self.assertLess(result["elapsed"], HANG_TIMEOUT_S + 5.0)  # the opener's deadline,
        self.assertLess(result["elapsed"], HANG_BOUND_S)  # not the fake's
        self.assertEqual(second["error"]["code"], "plaintext_refused", second)
        self.assert_unchanged(before)
        self.assert_ok(self.delivery(self.good), changed=[])

    def test_session_credentials_are_accepted(self):
        """Temporary credentials (SessionToken, Expiration) as IMDS gives them: accepted."""
        session = self.fake.issue_session(time.time() + 3600)
        self.local_secrets.update({session["SecretAccessKey"]: "session secret",
                                   session["SessionToken"]: "session token",
                                   session["AccessKeyId"]: "session access key id"})
        self.assert_ok(self.delivery(self.good, session), changed=[])


if __name__ == "__main__":
    unittest.main()
