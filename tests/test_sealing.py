"""Refresh-token sealing under a keyring (AES-256-GCM; v2 names its key, v1 still opens)."""

import base64
import hashlib
import os
import unittest

from enclave import sealing
from enclave.sealing import Keyring, SealingError, key_id, needs_reseal, seal, unseal
from tests.sealing_vectors import V1_CLIENT, V1_KEY, V1_SEALED, V1_TOKEN, seal_v1
from tests.support import remember_secret

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
THIRD_KEY = bytes(range(2, 34))
CLIENT = "123-abc.apps.googleusercontent.com"
TOKEN = "1//0gTESTrefreshTOKEN-abcdefghijklmnopqrstuvwxyz0123456789"
remember_secret(KEY, OTHER_KEY, THIRD_KEY, kind="token sealing key")
remember_secret(TOKEN, kind="google refresh token")
RING = Keyring(KEY)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KeyIdTest(unittest.TestCase):
    def test_kid_is_the_documented_hash_and_stable(self):
        expected = b64(hashlib.sha256(b"enclave-token-sealing-kid/v1\0" + KEY).digest()[:8])
        self.assertEqual(key_id(KEY), expected)
        self.assertEqual(key_id(KEY), "t950xQRWVao")  # pinned: tokens in the field carry it
        self.assertEqual(len(key_id(KEY)), sealing.KID_CHARS)
        self.assertEqual(sealing.KID_CHARS, 11)

    def test_kid_differs_per_key_and_shows_no_key_bytes(self):
        kids = {key_id(k) for k in (KEY, OTHER_KEY, THIRD_KEY, V1_KEY)}
        self.assertEqual(len(kids), 4)
        for kid in kids:
            self.assertNotIn(kid, b64(KEY) + KEY.hex() + base64.b64encode(KEY).decode())

    def test_kid_needs_a_key(self):
        for key in (b"", bytes(31), bytes(33), "x" * 32, None):
            with self.subTest(key=type(key).__name__ + str(len(key or ""))):
                with self.assertRaises(SealingError):
                    key_id(key)


class KeyringTest(unittest.TestCase):
    def test_kids_current_first(self):
        ring = Keyring(KEY, (OTHER_KEY, THIRD_KEY))
        self.assertEqual(ring.kids, (key_id(KEY), key_id(OTHER_KEY), key_id(THIRD_KEY)))
        self.assertEqual(ring.current_kid, key_id(KEY))
        self.assertEqual(ring.keys, (KEY, OTHER_KEY, THIRD_KEY))
        self.assertEqual(ring, Keyring(bytearray(KEY), (OTHER_KEY, THIRD_KEY)))
        self.assertNotEqual(ring, Keyring(KEY, (THIRD_KEY, OTHER_KEY)))

    def test_refused_keyrings(self):
        many = tuple(os.urandom(32) for _ in range(sealing.MAX_PREVIOUS_KEYS + 1))
        remember_secret(*many, kind="token sealing key")
        cases = [
            ("current too short", bytes(31), ()),
            ("current too long", bytes(33), ()),
            ("current not bytes", b64(KEY), ()),
            ("previous too short", KEY, (bytes(16),)),
            ("previous a list", KEY, [OTHER_KEY]),
            ("too many previous", KEY, many),
            ("current again in previous", KEY, (OTHER_KEY, KEY)),
            ("previous twice", KEY, (OTHER_KEY, OTHER_KEY)),
        ]
        for name, current, previous in cases:
            with self.subTest(name), self.assertRaises(SealingError):
                Keyring(current, previous)
        Keyring(KEY, many[:sealing.MAX_PREVIOUS_KEYS])  # the limit itself is fine

    def test_repr_shows_kids_never_keys(self):
        ring = Keyring(KEY, (OTHER_KEY,))
        text = repr(ring) + str(ring)
        self.assertIn(key_id(OTHER_KEY), text)
        for key in (KEY, OTHER_KEY):
            for form in (key.hex(), b64(key), base64.b64encode(key).decode(), repr(key)):
                self.assertNotIn(form, text)


class SealingTest(unittest.TestCase):
    def test_round_trip_and_format(self):
        sealed = seal(RING, TOKEN, CLIENT)
        self.assertRegex(sealed, r"^v2\.[A-Za-z0-9_-]{11}\.[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]+$")
        self.assertEqual(sealed.split(".")[1], key_id(KEY))
        self.assertNotIn(TOKEN, sealed)
        self.assertEqual(unseal(RING, sealed, CLIENT), (TOKEN, key_id(KEY)))

    def test_seals_under_the_current_key_and_opens_under_previous(self):
        old = seal(Keyring(OTHER_KEY), TOKEN, CLIENT)
        ring = Keyring(KEY, (THIRD_KEY, OTHER_KEY))
        new = seal(ring, TOKEN, CLIENT)
        self.assertEqual(new.split(".")[1], key_id(KEY))
        self.assertEqual(unseal(ring, old, CLIENT), (TOKEN, key_id(OTHER_KEY)))
        self.assertEqual(unseal(ring, new, CLIENT), (TOKEN, key_id(KEY)))
        with self.assertRaises(SealingError):  # the old keyring does not know the new key
            unseal(Keyring(OTHER_KEY), new, CLIENT)

    def test_unknown_kid_says_the_key_is_gone(self):
        sealed = seal(Keyring(OTHER_KEY), TOKEN, CLIENT)
        with self.assertRaises(SealingError) as ctx:
            unseal(Keyring(KEY, (THIRD_KEY,)), sealed, CLIENT)
        self.assertIn("sealed under a key this enclave no longer holds", str(ctx.exception))
        self.assertIn(key_id(OTHER_KEY), str(ctx.exception))

    def test_needs_reseal(self):
        ring = Keyring(KEY, (OTHER_KEY,))
        cases = [
            ("v2 under the current key", seal(ring, TOKEN, CLIENT), False),
            ("v2 under a previous key", seal(Keyring(OTHER_KEY), TOKEN, CLIENT), True),
            ("v1 under the current key", seal_v1(KEY, TOKEN, CLIENT), True),
            ("v1 under a previous key", seal_v1(OTHER_KEY, TOKEN, CLIENT), True),
        ]
        for name, sealed, expected in cases:
            with self.subTest(name):
                self.assertEqual(unseal(ring, sealed, CLIENT)[0], TOKEN)
                self.assertIs(needs_reseal(ring, sealed), expected)

    def test_fresh_nonce_per_seal(self):
        self.assertNotEqual(seal(RING, TOKEN, CLIENT), seal(RING, TOKEN, CLIENT))

    def test_refused_under_another_key_or_client(self):
        sealed = seal(RING, TOKEN, CLIENT)
        for name, ring, client in (("other key", Keyring(OTHER_KEY), CLIENT),
                                   ("other client", RING, CLIENT + "x"),
                                   ("empty client", RING, "")):
            with self.subTest(name), self.assertRaises(SealingError):
                unseal(ring, sealed, client)

    def test_tampering_is_refused(self):
        ring = Keyring(KEY, (OTHER_KEY,))
        sealed = seal(ring, TOKEN, CLIENT)
        version, kid, nonce, blob = sealed.split(".")
        raw = b64decode(blob)

        def flip(data: bytes, index: int) -> bytes:
            return data[:index] + bytes([data[index] ^ 1]) + data[index + 1:]
        cases = {
            # The AAD binds the kid: naming another key of the ring does not verify.
            "kid of another held key": f"{version}.{key_id(OTHER_KEY)}.{nonce}.{blob}",
            "kid of an unknown key": f"{version}.{key_id(THIRD_KEY)}.{nonce}.{blob}",
            "kid not 8 bytes": f"{version}.{kid[:-1]}.{nonce}.{blob}",
            "kid padded": f"{version}.{kid}=.{nonce}.{blob}",
            "nonce changed": f"{version}.{kid}.{b64(flip(b64decode(nonce), 0))}.{blob}",
            "ciphertext changed": f"{version}.{kid}.{nonce}.{b64(flip(raw, 0))}",
            "tag changed": f"{version}.{kid}.{nonce}.{b64(flip(raw, len(raw) - 1))}",
            "tag dropped": f"{version}.{kid}.{nonce}.{b64(raw[:-16])}",
            "version v1": f"v1.{kid}.{nonce}.{blob}",
            "version v1 without the kid": f"v1.{nonce}.{blob}",
            "version v3": f"v3.{kid}.{nonce}.{blob}",
            "kid dropped": f"{version}.{nonce}.{blob}",
        }
        for name, tampered in cases.items():
            with self.subTest(name), self.assertRaises(SealingError):
                unseal(ring, tampered, CLIENT)

    def test_every_changed_character_is_refused(self):
        sealed = seal(RING, "1//0g-short", CLIENT)
        for index, char in enumerate(sealed):
            for replacement in {"A", "B", "Q", "g", "w", "_", "-", "."} - {char}:
                tampered = sealed[:index] + replacement + sealed[index + 1:]
                with self.subTest(index=index, replacement=replacement):
                    with self.assertRaises(SealingError):
                        unseal(RING, tampered, CLIENT)

    def test_every_flipped_ciphertext_bit_is_refused(self):
        sealed = seal(RING, TOKEN, CLIENT)
        version, kid, nonce, blob = sealed.split(".")
        raw = b64decode(blob)
        for bit in range(len(raw) * 8):
            changed = bytearray(raw)
            changed[bit // 8] ^= 1 << (bit % 8)
            with self.subTest(bit=bit), self.assertRaises(SealingError):
                unseal(RING, f"{version}.{kid}.{nonce}.{b64(bytes(changed))}", CLIENT)

    def test_malformed_inputs(self):
        sealed = seal(RING, TOKEN, CLIENT)
        version, kid, nonce, blob = sealed.split(".")
        cases = {
            "empty": "",
            "no version": f"{kid}.{nonce}.{blob}",
            "extra part": f"{sealed}.x",
            "padded base64": f"v2.{kid}.{nonce}.{blob}==",
            "standard alphabet": f"v2.{kid}.{nonce}.{blob.replace('-', '+').replace('_', '/')}"
                                 if ("-" in blob or "_" in blob) else f"v2.{kid}.{nonce}.{blob}+",
            "short nonce": f"v2.{kid}.{b64(os.urandom(8))}.{blob}",
            "tag only": f"v2.{kid}.{nonce}.{b64(os.urandom(16))}",
            "truncated": sealed[:-4],
            "huge": "v2." + kid + "." + "A" * 16 + "." + "A" * 10_000,
            "v1 huge": "v1." + "A" * 16 + "." + "A" * 10_000,
            "v1 short nonce": f"v1.{b64(os.urandom(8))}.{blob}",
            "not a string": None,
        }
        for name, value in cases.items():
            with self.subTest(name), self.assertRaises(SealingError):
                unseal(RING, value, CLIENT)

    def test_token_bounds(self):
        with self.assertRaises(SealingError):
            seal(RING, "", CLIENT)
        with self.assertRaises(SealingError):
            seal(RING, "x" * (sealing.MAX_TOKEN_BYTES + 1), CLIENT)
        big = "x" * sealing.MAX_TOKEN_BYTES
        self.assertEqual(unseal(RING, seal(RING, big, CLIENT), CLIENT)[0], big)

    def test_limit_fits_any_google_refresh_token(self):
        # Google documents refresh tokens of up to 512 bytes; the limit leaves ample room, and
        # the sealed form of the largest token passes the unseal length check exactly.
        self.assertGreaterEqual(sealing.MAX_TOKEN_BYTES, 4096)
        for size in (512, 2049, sealing.MAX_TOKEN_BYTES):
            with self.subTest(size=size):
                token = "1//0g" + "x" * (size - 5)
                sealed = seal(RING, token, CLIENT)
                self.assertLessEqual(len(sealed), sealing.MAX_SEALED_CHARS)
                self.assertEqual(unseal(RING, sealed, CLIENT)[0], token)
        largest = seal(RING, "x" * sealing.MAX_TOKEN_BYTES, CLIENT)
        self.assertEqual(len(largest), sealing.MAX_SEALED_CHARS)
        self.assertLess(len(seal_v1(KEY, "x" * sealing.MAX_TOKEN_BYTES, CLIENT)), len(largest))

    def test_errors_never_carry_the_token_or_a_key(self):
        sealed = seal(RING, TOKEN, CLIENT)
        for ring in (Keyring(OTHER_KEY), Keyring(OTHER_KEY, (KEY,))):
            with self.subTest(ring=ring), self.assertRaises(SealingError) as ctx:
                unseal(ring, sealed[:-1] + ("A" if sealed[-1] != "A" else "B"), CLIENT)
            text = str(ctx.exception)
            for secret in (TOKEN, sealed, KEY.hex(), b64(KEY), OTHER_KEY.hex(), b64(OTHER_KEY)):
                self.assertNotIn(secret, text)


class V1CompatibilityTest(unittest.TestCase):
    """Tokens sealed before the keyring (v1, no kid) still open, under any held key."""

    def test_reference_writer_reproduces_the_vector(self):
        nonce = b64decode(V1_SEALED.split(".")[1])
        self.assertEqual(seal_v1(V1_KEY, V1_TOKEN, V1_CLIENT, nonce), V1_SEALED)

    def test_vector_opens_under_the_current_or_a_previous_key(self):
        cases = [
            ("current", Keyring(V1_KEY)),
            ("current with previous keys", Keyring(V1_KEY, (KEY, OTHER_KEY))),
            ("newest previous", Keyring(KEY, (V1_KEY,))),
            ("oldest previous", Keyring(KEY, (OTHER_KEY, THIRD_KEY, V1_KEY))),
        ]
        for name, ring in cases:
            with self.subTest(name):
                self.assertEqual(unseal(ring, V1_SEALED, V1_CLIENT), (V1_TOKEN, key_id(V1_KEY)))
                self.assertTrue(needs_reseal(ring, V1_SEALED))

    def test_vector_refused_without_its_key_or_for_another_client(self):
        for name, ring, client in (("key not held", Keyring(KEY, (OTHER_KEY,)), V1_CLIENT),
                                   ("other client", Keyring(V1_KEY), V1_CLIENT + "x")):
            with self.subTest(name), self.assertRaises(SealingError) as ctx:
                unseal(ring, V1_SEALED, client)
            self.assertIn("does not verify", str(ctx.exception))

    def test_every_changed_character_of_the_vector_is_refused(self):
        ring = Keyring(KEY, (V1_KEY,))
        for index, char in enumerate(V1_SEALED):
            replacement = "A" if char != "A" else "B"
            tampered = V1_SEALED[:index] + replacement + V1_SEALED[index + 1:]
            with self.subTest(index=index), self.assertRaises(SealingError):
                unseal(ring, tampered, V1_CLIENT)


if __name__ == "__main__":
    unittest.main()
