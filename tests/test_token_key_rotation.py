"""Rotating ENCLAVE_TOKEN_SEALING_KEY: through the secrets store, then end to end through the
running runtime and the fake Google (tests.stack.LocalStack).

Every key is registered with the leak scan; the suite log (runtime logs included) is scanned
for them at the end of the run, and acks and /healthz are checked here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import unittest
from pathlib import Path

from enclave import sealing
from enclave.config import Settings
from enclave.metrics import Metrics
from enclave.sealing import Keyring, key_id
from enclave.secrets import MAX_SEALING_KEYS
from enclave.secretstore import SecretStore
from tests.sealing_vectors import seal_v1
from tests.stack import GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, LocalStack
from tests.support import captured_logs, remember_secret
from tests.test_secrets import quiet_enclave_logs

SEALING = "ENCLAVE_TOKEN_SEALING_KEY"
CLIENT = "rotation-client.apps.googleusercontent.com"
REDIRECT = "https://app.example/oauth/callback"
KEYS = [hashlib.sha256(f"rotation test sealing key {i}".encode()).digest() for i in range(8)]
remember_secret(*KEYS, kind="token sealing key")
KEY_A, KEY_B, KEY_C = KEYS[:3]
TOKEN = "1//0gROTATIONtestREFRESHtoken-0123456789"
remember_secret(TOKEN, kind="google refresh token")


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def key_forms(keys=KEYS) -> list[str]:
    """How a key could show up in text: base64 (padded or not), base64url, hex."""
    forms = []
    for key in keys:
        forms += [b64(key), b64(key).rstrip("="),
                  base64.urlsafe_b64encode(key).decode().rstrip("="), key.hex()]
    return forms


class StoreRotationTest(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="key-rotation-")
        self.addCleanup(tmp.cleanup)
        quiet_enclave_logs(self)
        self.store = SecretStore(Settings(certs_dir=Path(tmp.name) / "certs",
                                          token_sealing_key=KEY_A), Metrics())

    def deliver(self, value) -> dict:
        ack = self.store.deliver(json.dumps({SEALING: value}).encode())
        for form in key_forms():
            self.assertNotIn(form, json.dumps(ack))
        return ack

    def test_one_key_rotates_and_keeps_the_replaced_key_in_memory(self):
        old = sealing.seal(self.store.sealing_keyring(), TOKEN, CLIENT)
        remember_secret(old, kind="sealed refresh token")
        with captured_logs() as logs:
            ack = self.deliver(b64(KEY_B))
        self.assertEqual(ack, {"ok": True, "version": 1, "changed": [SEALING]})
        keyring = self.store.sealing_keyring()
        self.assertEqual(keyring, Keyring(KEY_B, (KEY_A,)))
        self.assertEqual(sealing.unseal(keyring, old, CLIENT), (TOKEN, key_id(KEY_A)))
        self.assertTrue(sealing.seal(keyring, TOKEN, CLIENT).startswith(f"v2.{key_id(KEY_B)}."))
        # The log names the key ids in force, never a key.
        text = logs.getvalue()
        self.assertIn(f"current {key_id(KEY_B)}, previous {key_id(KEY_A)}", text)
        for form in key_forms():
            self.assertNotIn(form, text)

    def test_a_list_states_the_whole_keyring(self):
        self.deliver(b64(KEY_B))
        ack = self.deliver([b64(KEY_C), b64(KEY_A)])
        self.assertEqual((ack["ok"], ack["changed"]), (True, [SEALING]))
        self.assertEqual(self.store.sealing_keyring(), Keyring(KEY_C, (KEY_A,)))
        self.deliver([b64(KEY_C)])
        self.assertEqual(self.store.sealing_keyring(), Keyring(KEY_C))

    def test_refused_keyrings_change_nothing(self):
        good = [b64(k) for k in KEYS]
        cases = [
            ("too many keys", good[:MAX_SEALING_KEYS + 1], SEALING),
            ("a duplicate", [good[1], good[1]], f"{SEALING}[1]"),
            ("bad base64", [good[1], "!!not-base64!!"], f"{SEALING}[1]"),
            ("wrong size", [base64.b64encode(KEY_B[:31]).decode()], f"{SEALING}[0]"),
            ("wrong size, one key", base64.b64encode(KEY_B + b"x").decode(), SEALING),
        ]
        for name, value, named in cases:
            with self.subTest(name):
                ack = self.deliver(value)
                self.assertEqual((ack["ok"], ack["version"], ack["error"]["code"]),
                                 (False, 0, "invalid_secret"))
                self.assertIn(named, ack["error"]["message"])
                self.assertEqual(self.store.sealing_keyring(), Keyring(KEY_A))

    def test_strict_environment_starts_without_keys(self):
        with tempfile.TemporaryDirectory(prefix="key-rotation-") as tmp:
            store = SecretStore(Settings(env="production", certs_dir=Path(tmp) / "certs"),
                                Metrics())
            self.assertIsNone(store.sealing_keyring())
            ack = store.deliver(json.dumps({SEALING: [b64(KEY_B), b64(KEY_A)]}).encode())
            self.assertTrue(ack["ok"], ack)
            self.assertEqual(store.sealing_keyring(), Keyring(KEY_B, (KEY_A,)))


class EndToEndRotationTest(unittest.TestCase):
    """Exchange under key A, rotate to B, refresh migrates the A token, drop A: refused."""

    @classmethod
    def setUpClass(cls):
        cls.stack = LocalStack(watermark=False, env={SEALING: b64(KEY_A)})
        ack = cls.stack.deliver({"GOOGLE_OAUTH_CLIENT_ID": GOOGLE_CLIENT_ID,
                                 "GOOGLE_OAUTH_CLIENT_SECRET": GOOGLE_CLIENT_SECRET})
        assert ack["ok"], ack

    @classmethod
    def tearDownClass(cls):
        cls.stack.close()

    def rpc(self, operation: str, body: dict) -> tuple[int, dict]:
        status, answer = self.stack.call("POST", f"/v1/rpc/google/token/{operation}",
                                         json.dumps(body).encode())
        if isinstance(answer, dict):
            for name in ("access_token", "id_token", "sealed_refresh_token"):
                remember_secret(answer.get(name), kind=name.replace("_", " "))
        return status, answer

    def deliver(self, value) -> None:
        ack = self.stack.deliver({SEALING: value})
        self.assertEqual((ack["ok"], ack["changed"]), (True, [SEALING]), ack)
        for form in key_forms():
            self.assertNotIn(form, json.dumps(ack))

    def test_rotation_end_to_end(self):
        # (1) Exchange under key A: a v2 token naming A.
        code = self.stack.fake_google.mint_code(REDIRECT)
        status, answer = self.rpc("exchange", {"code": code, "redirect_uri": REDIRECT})
        self.assertEqual(status, 200, answer)
        sealed_a = answer["sealed_refresh_token"]
        self.assertTrue(sealed_a.startswith(f"v2.{key_id(KEY_A)}."))
        raw, _ = sealing.unseal(Keyring(KEY_A), sealed_a, GOOGLE_CLIENT_ID)
        v1_a = seal_v1(KEY_A, raw, GOOGLE_CLIENT_ID)  # as the runtime before the keyring made it
        remember_secret(v1_a, kind="sealed refresh token")

        # (2) Deliver key B as one string: A stays a previous key.
        self.deliver(b64(KEY_B))

        # (3) Refresh with the A token (v2, then v1): 200, and a v2 token under B...
        for name, sealed in (("v2 under A", sealed_a), ("v1 under A", v1_a)):
            with self.subTest(name):
                status, answer = self.rpc("refresh", {"sealed_refresh_token": sealed})
                self.assertEqual(status, 200, answer)
                sealed_b = answer["sealed_refresh_token"]
                self.assertTrue(sealed_b.startswith(f"v2.{key_id(KEY_B)}."))
                self.assertEqual(sealing.unseal(Keyring(KEY_B), sealed_b, GOOGLE_CLIENT_ID),
                                 (raw, key_id(KEY_B)))
        # ...which refreshes in turn, with nothing to migrate.
        status, answer = self.rpc("refresh", {"sealed_refresh_token": sealed_b})
        self.assertEqual(status, 200, answer)
        self.assertNotIn("sealed_refresh_token", answer)

        # (4) A list of C alone drops A and B: their tokens answer 400 invalid_sealed_token.
        self.deliver([b64(KEY_C)])
        for name, sealed in (("v2 under A", sealed_a), ("v1 under A", v1_a),
                             ("v2 under B", sealed_b)):
            with self.subTest(name):
                status, answer = self.rpc("refresh", {"sealed_refresh_token": sealed})
                self.assertEqual(status, 400, answer)
                self.assertEqual(answer["error"]["code"], "invalid_sealed_token")

        # Neither /healthz nor any answer above shows a key.
        status, health = self.stack.call("GET", "/healthz", sign=False)
        self.assertEqual(status, 200)
        for form in key_forms():
            self.assertNotIn(form, json.dumps(health))


if __name__ == "__main__":
    unittest.main()
