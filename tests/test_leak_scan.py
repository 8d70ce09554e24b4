"""The end-of-run secret leak scan (tests/run.py) itself: the registry and find_leaks."""

import base64
import unittest

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.support import (MIN_SECRET_CHARS, NEVER_LOGGED_MARKERS, SecretRegistry, find_leaks,
                           private_key_lines, secret_digest)

PLANTED = "planted-secret-5b1e0c9d7a"
CLEAN_LOG = """\
2024-01-01 00:00:00,000 INFO enclave.service: ready: http=tcp:127.0.0.1:1234 secrets=tcp:127.0.0.1:1
2024-01-01 00:00:01,000 WARNING enclave.rpcauth: refused: bad_signature
2024-01-01 00:00:02,000 DEBUG enclave.server: 127.0.0.1 "POST /v1/rpc/echo HTTP/1.1" 200 -
"""


def pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class FindLeaksTest(unittest.TestCase):
    def test_clean_text_reports_nothing(self):
        self.assertEqual(find_leaks(CLEAN_LOG, {PLANTED: "rpc shared secret"}), [])

    def test_planted_secret_is_found_with_kind_and_line_but_not_the_value(self):
        text = CLEAN_LOG + f"2024-01-01 00:00:03,000 INFO x: got {PLANTED} from the sender\n"
        leaks = find_leaks(text, {PLANTED: "rpc shared secret"}, source="suite.log")
        self.assertEqual([(leak.kind, leak.line) for leak in leaks], [("rpc shared secret", 4)])
        self.assertEqual(leaks[0].digest, secret_digest(PLANTED))
        self.assertNotIn(PLANTED, str(leaks[0]))
        self.assertIn("suite.log:4", str(leaks[0]))

    def test_every_line_is_reported_once(self):
        text = f"{PLANTED}\nclean\n{PLANTED} and {PLANTED} again\n"
        leaks = find_leaks(text, [PLANTED])
        self.assertEqual([leak.line for leak in leaks], [1, 3])

    def test_markers(self):
        self.assertIn("PRIVATE KEY", NEVER_LOGGED_MARKERS)
        leaks = find_leaks("a\n-----BEGIN EC PRIVATE KEY-----\n", {})
        self.assertEqual([(leak.kind, leak.line) for leak in leaks],
                         [("marker 'PRIVATE KEY'", 2)])


class RegistryTest(unittest.TestCase):
    def test_short_and_empty_values_are_ignored(self):
        registry = SecretRegistry()
        registry.remember(None, "", "x" * (MIN_SECRET_CHARS - 1), "y" * MIN_SECRET_CHARS)
        self.assertEqual(set(registry.values), {"y" * MIN_SECRET_CHARS})

    def test_bytes_are_registered_in_their_text_forms(self):
        registry = SecretRegistry()
        key = bytes(range(100, 132))
        registry.remember(key, kind="token sealing key")
        for form in (key.hex(), base64.b64encode(key).decode(),
                     base64.urlsafe_b64encode(key).decode().rstrip("=")):
            with self.subTest(form=form):
                self.assertTrue(find_leaks(f"log {form} line", registry.values, ()))

    def test_scan_later_texts_are_kept(self):
        registry = SecretRegistry()
        registry.scan_later(b"child stderr\n", "child")
        registry.scan_later("", "empty")
        self.assertEqual(registry.snapshot()[1], [("child", "child stderr\n")])


class PrivateKeyLinesTest(unittest.TestCase):
    def test_a_leaked_key_pem_is_found_even_without_its_header(self):
        for name, key in (("p-256", ec.generate_private_key(ec.SECP256R1())),
                          ("p-384", ec.generate_private_key(ec.SECP384R1())),
                          ("ed25519", ed25519.Ed25519PrivateKey.generate()),
                          ("rsa", rsa.generate_private_key(public_exponent=65537, key_size=1024))):
            with self.subTest(name):
                text = pem(key)
                lines = private_key_lines(text)
                self.assertTrue(lines)
                self.assertFalse(any("-----" in line for line in lines))
                registry = SecretRegistry()
                registry.remember_private_key(text)
                body = "\\n".join(text.splitlines()[1:-1])  # as a JSON-escaped log would show it
                self.assertTrue(find_leaks(f"payload {body}", registry.values, ()))

    def test_public_parts_are_not_registered(self):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_b64 = base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1)).decode()
        body = [line for line in pem(key).splitlines() if "-----" not in line]
        lines = private_key_lines(pem(key))
        self.assertLess(len(lines), len(body))  # the modulus lines at the start are public
        self.assertEqual(find_leaks(public_b64, {line: "key" for line in lines}, ()), [])


if __name__ == "__main__":
    unittest.main()
