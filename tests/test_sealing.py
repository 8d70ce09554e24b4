"""Refresh-token sealing (AES-256-GCM, AAD = purpose + client id)."""

import base64
import os
import unittest

from enclave import sealing
from enclave.sealing import SealingError, seal, unseal
from tests.support import remember_secret

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CLIENT = "123-abc.apps.googleusercontent.com"
TOKEN = "1//0gTESTrefreshTOKEN-abcdefghijklmnopqrstuvwxyz0123456789"
remember_secret(KEY, OTHER_KEY, kind="token sealing key")
remember_secret(TOKEN, kind="google refresh token")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SealingTest(unittest.TestCase):
    def test_round_trip_and_format(self):
        sealed = seal(KEY, TOKEN, CLIENT)
        self.assertRegex(sealed, r"^v1\.[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]+$")
        self.assertNotIn(TOKEN, sealed)
        self.assertEqual(unseal(KEY, sealed, CLIENT), TOKEN)

    def test_fresh_nonce_per_seal(self):
        self.assertNotEqual(seal(KEY, TOKEN, CLIENT), seal(KEY, TOKEN, CLIENT))

    def test_refused_under_another_key_or_client(self):
        sealed = seal(KEY, TOKEN, CLIENT)
        for name, key, client in (("other key", OTHER_KEY, CLIENT),
                                  ("other client", KEY, CLIENT + "x"),
                                  ("empty client", KEY, "")):
            with self.subTest(name), self.assertRaises(SealingError):
                unseal(key, sealed, client)

    def test_every_changed_character_is_refused(self):
        sealed = seal(KEY, "1//0g-short", CLIENT)
        for index, char in enumerate(sealed):
            for replacement in {"A", "B", "Q", "g", "w", "_", "-", "."} - {char}:
                tampered = sealed[:index] + replacement + sealed[index + 1:]
                with self.subTest(index=index, replacement=replacement):
                    with self.assertRaises(SealingError):
                        unseal(KEY, tampered, CLIENT)

    def test_every_flipped_ciphertext_bit_is_refused(self):
        sealed = seal(KEY, TOKEN, CLIENT)
        version, nonce, blob = sealed.split(".")
        raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
        for bit in range(len(raw) * 8):
            changed = bytearray(raw)
            changed[bit // 8] ^= 1 << (bit % 8)
            with self.subTest(bit=bit), self.assertRaises(SealingError):
                unseal(KEY, f"{version}.{nonce}.{b64(bytes(changed))}", CLIENT)

    def test_malformed_inputs(self):
        sealed = seal(KEY, TOKEN, CLIENT)
        version, nonce, blob = sealed.split(".")
        cases = {
            "empty": "",
            "wrong version": f"v2.{nonce}.{blob}",
            "no version": f"{nonce}.{blob}",
            "extra part": f"{sealed}.x",
            "padded base64": f"v1.{nonce}.{blob}==",
            "standard alphabet": f"v1.{nonce}.{blob.replace('-', '+').replace('_', '/')}"
                                 if ("-" in blob or "_" in blob) else f"v1.{nonce}.{blob}+",
            "short nonce": f"v1.{b64(os.urandom(8))}.{blob}",
            "tag only": f"v1.{nonce}.{b64(os.urandom(16))}",
            "truncated": sealed[:-4],
            "huge": "v1." + "A" * 16 + "." + "A" * 10_000,
            "not a string": None,
        }
        for name, value in cases.items():
            with self.subTest(name), self.assertRaises(SealingError):
                unseal(KEY, value, CLIENT)

    def test_key_length_enforced(self):
        for key in (b"", bytes(16), bytes(31), bytes(33)):
            with self.subTest(len(key)), self.assertRaises(SealingError):
                seal(key, TOKEN, CLIENT)

    def test_token_bounds(self):
        with self.assertRaises(SealingError):
            seal(KEY, "", CLIENT)
        with self.assertRaises(SealingError):
            seal(KEY, "x" * (sealing.MAX_TOKEN_BYTES + 1), CLIENT)
        big = "x" * sealing.MAX_TOKEN_BYTES
        self.assertEqual(unseal(KEY, seal(KEY, big, CLIENT), CLIENT), big)

    def test_limit_fits_any_google_refresh_token(self):
        # Google documents refresh tokens of up to 512 bytes; the limit leaves ample room, and
        # the sealed form of the largest token passes the unseal length check.
        self.assertGreaterEqual(sealing.MAX_TOKEN_BYTES, 4096)
        for size in (512, 2049, sealing.MAX_TOKEN_BYTES):
            with self.subTest(size=size):
                token = "1//0g" + "x" * (size - 5)
                sealed = seal(KEY, token, CLIENT)
                self.assertLessEqual(len(sealed), sealing.MAX_SEALED_CHARS)
                self.assertEqual(unseal(KEY, sealed, CLIENT), token)

    def test_errors_never_carry_the_token(self):
        sealed = seal(KEY, TOKEN, CLIENT)
        with self.assertRaises(SealingError) as ctx:
            unseal(OTHER_KEY, sealed, CLIENT)
        self.assertNotIn(TOKEN, str(ctx.exception))
        self.assertNotIn(sealed, str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
