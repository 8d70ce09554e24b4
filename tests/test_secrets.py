"""The secrets validator and merger (enclave.secrets): bytes and a time in, no I/O."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import random
import unittest

from enclave import sealing, secrets
from enclave.sealing import Keyring
from enclave.secrets import SecretsState, apply_update, parse_delivery
from tests.fakes.pki import TestCA
from tests.support import remember_private_key, remember_secret

NOW_DT = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)  # for certificate validity
NOW = NOW_DT.timestamp()  # `now` as the module takes it: Unix seconds
RPC_SECRET = "r" * 40
OTHER_RPC_SECRET = "s" * 40
SEALING_KEY_B64 = base64.b64encode(bytes(range(32))).decode()
remember_secret(RPC_SECRET, OTHER_RPC_SECRET, kind="rpc shared secret")
remember_secret(bytes(range(32)), kind="token sealing key")
remember_secret("google-client-secret-value", "secret-1", kind="google client secret")

_CA: TestCA | None = None


def shared_ca() -> TestCA:
    """One CA for the whole run (key generation is the slow part)."""
    global _CA
    if _CA is None:
        _CA = TestCA("Enclave Secrets Test CA")
    return _CA


_UNUSABLE_CAS: list[tuple[str, TestCA]] | None = None


def unusable_cas() -> list[tuple[str, TestCA]]:
    """(name, CA) for every shape of `ca_cert` that must be refused `invalid_ca` at NOW."""
    global _UNUSABLE_CAS
    if _UNUSABLE_CAS is None:
        day = dt.timedelta(days=1)
        _UNUSABLE_CAS = [
            ("expired", TestCA("Expired CA", not_before=NOW_DT - 10 * day,
                               not_after=NOW_DT - day)),
            ("not yet valid", TestCA("Future CA", not_before=NOW_DT + day,
                                     not_after=NOW_DT + 10 * day)),
            ("CA:FALSE", TestCA("Not A CA", ca=False)),
            ("no basicConstraints", TestCA("No Constraints CA", ca=None)),
            ("keyUsage without keyCertSign", TestCA("No CertSign CA", key_cert_sign=False)),
        ]
    return _UNUSABLE_CAS


def mtls_object(issued=None, *, key_pem: bytes | None = None, ca_pem: bytes | None = None) -> dict:
    """An MTLS_CLIENT_CERT_JSON object for a client certificate from the test CA."""
    issued = issued or shared_ca().issue("enclave-client")
    return {"client_cert": issued.cert_pem.decode(),
            "client_key": (key_pem or issued.key_pem).decode(),
            "ca_cert": (ca_pem or shared_ca().cert_pem).decode()}


def quiet_enclave_logs(test: unittest.TestCase) -> None:
    """Keep expected warnings (refused deliveries) off the test output; assertLogs still works."""
    handler, logger = logging.NullHandler(), logging.getLogger("enclave")
    logger.addHandler(handler)
    test.addCleanup(logger.removeHandler, handler)


def secret_strings(payload: dict) -> list[str]:
    """Every secret value in a payload, as substrings that must never show up in a message."""
    found = []
    for key, value in payload.items():
        if key == "MTLS_CLIENT_CERT_JSON" and isinstance(value, dict):
            key_pem = value.get("client_key") or ""
            # The base64 body of the key, line by line: no part of it may leak.
            found += [line for line in key_pem.splitlines() if line and "-----" not in line]
        elif key in ("GOOGLE_OAUTH_CLIENT_SECRET", "ENCLAVE_RPC_SHARED_SECRET",
                     "ENCLAVE_TOKEN_SEALING_KEY") and isinstance(value, str) and len(value) >= 6:
            found.append(value)
        elif key == "ENCLAVE_TOKEN_SEALING_KEY" and isinstance(value, list):  # the keyring form
            found += [item for item in value if isinstance(item, str) and len(item) >= 6]
    return found


class ParseDeliveryTest(unittest.TestCase):
    def test_refused_bytes(self):
        rng = random.Random(1)
        cases = [
            ("random bytes", bytes(rng.randrange(256) for _ in range(512)), "malformed_json"),
            ("truncated JSON", b'{"GOOGLE_OAUTH_CLIENT_ID": "abc', "malformed_json"),
            ("a JSON array", b'["GOOGLE_OAUTH_CLIENT_ID"]', "not_an_object"),
            ("a JSON string", b'"hello"', "not_an_object"),
            ("a JSON null", b"null", "not_an_object"),
            ("empty", b"", "malformed_json"),
            ("only whitespace", b" \n\t ", "malformed_json"),
            ("two objects", b'{}\n{}', "malformed_json"),
            ("NaN", b'{"x": NaN}', "malformed_json"),
            ("duplicate key", b'{"GOOGLE_OAUTH_CLIENT_ID": "a", "GOOGLE_OAUTH_CLIENT_ID": "b"}',
             "malformed_json"),
            ("deep nesting", b"[" * 100_000, "malformed_json"),
            ("300 KiB", b'{"GOOGLE_OAUTH_CLIENT_ID": "' + b"a" * (300 * 1024) + b'"}', "too_large"),
        ]
        for name, data, code in cases:
            with self.subTest(name):
                with self.assertRaises(secrets.SecretsError) as caught:
                    parse_delivery(data)
                self.assertEqual(caught.exception.code, code)
                self.assertTrue(caught.exception.message)

    def test_accepts_an_object_with_or_without_newline(self):
        self.assertEqual(parse_delivery(b'{"a": 1}'), {"a": 1})
        self.assertEqual(parse_delivery(b'{"a": 1}\r\n'), {"a": 1})
        self.assertEqual(parse_delivery(b"{}"), {})

    def test_exactly_the_limit_is_accepted(self):
        head, tail = b'{"GOOGLE_OAUTH_CLIENT_ID": "', b'"}'
        data = head + b"a" * (secrets.MAX_DELIVERY_BYTES - len(head) - len(tail)) + tail
        self.assertEqual(len(data), secrets.MAX_DELIVERY_BYTES)
        parse_delivery(data)
        with self.assertRaises(secrets.TooLarge):
            parse_delivery(data + b" ")

    def test_is_complete_object(self):
        cases = [
            (b'{"a": 1}\n', True),
            (b'{"a": {"b": 2}}\r\n', True),
            (b'{"a": 1}', False),  # no newline yet: wait for more or for EOF
            (b'{"a": {\n', False),
            (b'{"a": {"b": 2}\n', False),  # a nested object closed, the outer one not
            (b'[1]\n', False),
            (b'\xff}\n', False),
        ]
        for data, expected in cases:
            with self.subTest(data=data):
                self.assertIs(secrets.is_complete_object(data), expected)


class ApplyUpdateRefusalTest(unittest.TestCase):
    def test_refused_payloads(self):
        ca = shared_ca()
        good = ca.issue("enclave-client")
        other = ca.issue("someone-else")
        expired = ca.issue("expired", not_before=NOW_DT - dt.timedelta(days=10),
                           not_after=NOW_DT - dt.timedelta(days=1))
        future = ca.issue("future", not_before=NOW_DT + dt.timedelta(days=1),
                          not_after=NOW_DT + dt.timedelta(days=10))
        encrypted_key = good.key.private_bytes(
            secrets.serialization.Encoding.PEM, secrets.serialization.PrivateFormat.PKCS8,
            secrets.serialization.BestAvailableEncryption(b"passphrase"))
        remember_private_key(encrypted_key, kind="encrypted private key PEM")
        # Refused values are still secrets: a refusal must not log them either.
        remember_secret("ghp_" + "x" * 80, "hunter2hunter2", "short-secret-123",
                        kind="refused secret value")
        mtls = "MTLS_CLIENT_CERT_JSON"
        cases = [
            ("unknown key", {"GOOGLE_OAUTH_CLIENT_IDD": "x"}, "unknown_key"),
            ("unknown key with a secret in its name", {"ghp_" + "x" * 80: 1}, "unknown_key"),
            ("google id not a string", {"GOOGLE_OAUTH_CLIENT_ID": 5}, "invalid_type"),
            ("google secret a list", {"GOOGLE_OAUTH_CLIENT_SECRET": ["a"]}, "invalid_type"),
            ("google secret empty", {"GOOGLE_OAUTH_CLIENT_SECRET": ""}, "invalid_type"),
            ("rpc secret a number", {"ENCLAVE_RPC_SHARED_SECRET": 12345}, "invalid_type"),
            ("rpc secret too short", {"ENCLAVE_RPC_SHARED_SECRET": "short-secret-123"},
             "invalid_secret"),
            ("sealing key not base64", {"ENCLAVE_TOKEN_SEALING_KEY": "not base64!!"},
             "invalid_secret"),
            ("sealing key 16 bytes",
             {"ENCLAVE_TOKEN_SEALING_KEY": base64.b64encode(b"k" * 16).decode()}, "invalid_secret"),
            ("endpoint http", {"ECS_WATERMARK_ENDPOINT": "http://watermark.internal:8080"},
             "invalid_endpoint"),
            ("endpoint without host", {"ECS_WATERMARK_ENDPOINT": "https://"}, "invalid_endpoint"),
            ("endpoint no scheme", {"ECS_WATERMARK_ENDPOINT": "watermark.internal:8080"},
             "invalid_endpoint"),
            ("endpoint with credentials",
             {"ECS_WATERMARK_ENDPOINT": "https://user:hunter2hunter2@watermark.internal"},
             "invalid_endpoint"),
            ("endpoint bad port", {"ECS_WATERMARK_ENDPOINT": "https://host:99999"},
             "invalid_endpoint"),
            ("endpoint a number", {"ECS_WATERMARK_ENDPOINT": 443}, "invalid_type"),
            ("mtls a number", {mtls: 1}, "invalid_type"),
            ("mtls a string that is not JSON", {mtls: "{client_cert:"}, "invalid_type"),
            ("mtls missing ca_cert", {mtls: {k: v for k, v in mtls_object(good).items()
                                             if k != "ca_cert"}}, "invalid_type"),
            ("mtls unknown field", {mtls: {**mtls_object(good), "password": "x"}}, "unknown_key"),
            ("cert not PEM", {mtls: {**mtls_object(good), "client_cert": "garbage"}},
             "invalid_certificate"),
            ("key not PEM", {mtls: {**mtls_object(good), "client_key": "garbage"}},
             "invalid_certificate"),
            ("key encrypted", {mtls: mtls_object(good, key_pem=encrypted_key)},
             "invalid_certificate"),
            ("key not matching certificate", {mtls: mtls_object(good, key_pem=other.key_pem)},
             "key_mismatch"),
            ("expired certificate", {mtls: mtls_object(expired)}, "certificate_expired"),
            ("certificate not yet valid", {mtls: mtls_object(future)}, "certificate_not_yet_valid"),
            ("CA not PEM", {mtls: mtls_object(good, ca_pem=b"not a PEM certificate")}, "invalid_ca"),
            ("CA is a key", {mtls: mtls_object(good, ca_pem=good.key_pem)}, "invalid_ca"),
            # All-or-nothing: one good key does not get through with a bad one.
            ("good and bad together", {"GOOGLE_OAUTH_CLIENT_ID": "fine",
                                       "ECS_WATERMARK_ENDPOINT": "http://x"}, "invalid_endpoint"),
        ]
        current = SecretsState()
        for name, payload, code in cases:
            with self.subTest(name):
                with self.assertRaises(secrets.SecretsError) as caught:
                    apply_update(current, payload, NOW)
                error = caught.exception
                self.assertEqual(error.code, code, error.message)
                for secret in secret_strings(payload) + ["hunter2hunter2", "ghp_"]:
                    self.assertNotIn(secret, error.message)

    def test_not_an_object(self):
        with self.assertRaises(secrets.NotAnObject):
            apply_update(SecretsState(), ["x"], NOW)

    def test_every_error_class_has_its_own_code(self):
        classes = [c for c in vars(secrets).values()
                   if isinstance(c, type) and issubclass(c, secrets.SecretsError)]
        codes = [c.code for c in classes]
        self.assertEqual(len(codes), len(set(codes)))
        for code in codes:
            self.assertRegex(code, r"^[a-z]+(_[a-z]+)*$")


LONE_SURROGATE = "\ud800"  # what JSON "\ud800" decodes to: not encodable as UTF-8


def unusable_string_cases() -> list[tuple[str, dict, str]]:
    """(name, payload, expected code): strings the runtime could not use (surrogates, controls).

    Each payload is what parse_delivery makes of a JSON delivery (json.dumps writes a lone
    surrogate as the escape "\ud800", exactly as a sender would).
    """
    issued = shared_ca().issue("enclave-client")
    mtls = "MTLS_CLIENT_CERT_JSON"

    def in_pem_body(pem: bytes, char: str) -> str:
        lines = pem.decode().splitlines()
        lines[1] = lines[1][:10] + char + lines[1][10:]
        return "\n".join(lines) + "\n"

    remember_secret("unusable-secret", kind="refused google client secret")
    cases = []
    for char, what in ((LONE_SURROGATE, "a lone surrogate"), ("\x00", "NUL"), ("\n", "newline"),
                       ("\x7f", "DEL"), ("\x85", "a C1 control")):
        cases += [
            (f"GOOGLE_OAUTH_CLIENT_ID with {what}",
             {"GOOGLE_OAUTH_CLIENT_ID": f"client{char}-id.apps"}, "invalid_secret"),
            (f"GOOGLE_OAUTH_CLIENT_SECRET with {what}",
             {"GOOGLE_OAUTH_CLIENT_SECRET": f"GOCSPX-{char}unusable-secret"}, "invalid_secret"),
            (f"ENCLAVE_RPC_SHARED_SECRET with {what}",
             {"ENCLAVE_RPC_SHARED_SECRET": RPC_SECRET + char}, "invalid_secret"),
            (f"ENCLAVE_TOKEN_SEALING_KEY with {what}",
             {"ENCLAVE_TOKEN_SEALING_KEY": SEALING_KEY_B64[:8] + char + SEALING_KEY_B64[8:]},
             "invalid_secret"),
            (f"ECS_WATERMARK_ENDPOINT host with {what}",
             {"ECS_WATERMARK_ENDPOINT": f"https://wm{char}.internal:8443"}, "invalid_endpoint"),
            (f"ECS_WATERMARK_ENDPOINT path with {what}",
             {"ECS_WATERMARK_ENDPOINT": f"https://wm.internal:8443/v1{char}"}, "invalid_endpoint"),
        ]
    for char, what, codes in ((LONE_SURROGATE, "a lone surrogate", ("invalid_type",) * 3),
                              ("\x00", "NUL", ("invalid_certificate",) * 2 + ("invalid_ca",))):
        for field, code in zip(("client_cert", "client_key", "ca_cert"), codes):
            pem = {"client_cert": issued.cert_pem, "client_key": issued.key_pem,
                   "ca_cert": shared_ca().cert_pem}[field]
            obj = {**mtls_object(issued), field: in_pem_body(pem, char)}
            cases.append((f"{mtls}.{field} with {what}", {mtls: obj}, code))
            cases.append((f"{mtls}.{field} with {what}, object as a JSON string",
                          {mtls: json.dumps(obj)}, code))
    return [(name, parse_delivery(json.dumps(payload).encode()), code)
            for name, payload, code in cases]


BAD_ENDPOINTS = [
    ("empty label", "https://a..b"),
    ("leading dot", "https://.wm.internal"),
    ("trailing dot", "https://wm.internal."),
    ("label of 64", "https://" + "a" * 64 + ".internal"),
    ("name of 254", "https://" + ".".join(["a" * 63] * 3 + ["b" * 62])),
    ("underscore", "https://wm_1.internal"),
    ("punctuation", "https://wm!.internal"),
    ("label starting with a hyphen", "https://-wm.internal"),
    ("label ending with a hyphen", "https://wm-.internal"),
    ("space in the host", "https://wm .internal"),
    ("tab (urlsplit would drop it)", "https://wm.inter\tnal:8443"),
    ("invalid A-label", "https://xn--zz.internal"),
    ("IDNA-prohibited character", "https://wm\u200e.internal"),
    ("three-part number", "https://10.0.1"),
    ("octet over 255", "https://10.0.0.256"),
    ("hex number", "https://0x7f.1"),
    ("one big number", "https://2130706433"),
    ("IPv4 with a leading zero", "https://010.0.0.1"),
    ("IPv4 in brackets", "https://[10.0.0.1]"),
    ("IPvFuture", "https://[v1.wm]"),
    ("IPv6 zone id", "https://[fe80::1%25eth0]:8443"),
    ("junk after the brackets", "https://[::1]x:8443"),
    ("unbracketed IPv6", "https://::1"),
    ("port 0", "https://wm.internal:0"),
    ("empty port", "https://wm.internal:"),
    ("signed port", "https://wm.internal:+443"),
    ("backslash before @", "https://wm.internal\\@evil.example"),
    ("empty query", "https://wm.internal/v1?"),
    ("empty fragment", "https://wm.internal/v1#"),
    ("non-ASCII path", "https://wm.internal/v\u00e9"),
    ("space in the path", "https://wm.internal/v 1"),
]
GOOD_ENDPOINTS = [
    "https://wm.internal:8443", "https://WM.Internal", "https://127.0.0.1:9443",
    "https://[::1]:8443/v1", "https://[2001:db8::1]", "https://b\u00fccher.example",
    "https://xn--bcher-kva.example", "https://a-b.c-d.example/x/y%20z", "https://localhost",
    "https://" + "a" * 63 + ".internal", "https://" + ".".join(["a" * 63] * 3 + ["b" * 61]),
    "https://wm1.internal:65535/",
]


class UnusableStringTest(unittest.TestCase):
    """Strings the runtime cannot send are refused at validation with the key's code."""

    def test_surrogates_and_control_characters_are_refused(self):
        for name, payload, code in unusable_string_cases():
            with self.subTest(name):
                with self.assertRaises(secrets.SecretsError) as caught:
                    apply_update(SecretsState(), payload, NOW)
                self.assertEqual(caught.exception.code, code, caught.exception.message)
                caught.exception.message.encode("utf-8")  # the message itself is sendable
                for secret in secret_strings(payload):
                    self.assertNotIn(secret, caught.exception.message)

    def test_bad_endpoint_hosts_are_refused(self):
        for name, url in BAD_ENDPOINTS:
            with self.subTest(name, url=url):
                with self.assertRaises(secrets.InvalidEndpoint):
                    apply_update(SecretsState(), {"ECS_WATERMARK_ENDPOINT": url}, NOW)

    def test_usable_endpoints_are_accepted_unchanged(self):
        for url in GOOD_ENDPOINTS:
            with self.subTest(url=url):
                state, _ = apply_update(SecretsState(), {"ECS_WATERMARK_ENDPOINT": url}, NOW)
                self.assertEqual(state.get("ECS_WATERMARK_ENDPOINT"), url)

    def test_non_ascii_credentials_are_accepted(self):
        state, _ = apply_update(SecretsState(), {"GOOGLE_OAUTH_CLIENT_ID": "client-\u00e9t\u00e9",
                                                 "ENCLAVE_RPC_SHARED_SECRET": "\u00e9" * 20}, NOW)
        self.assertEqual(state.get("GOOGLE_OAUTH_CLIENT_ID"), "client-\u00e9t\u00e9")


class UnusableCaTest(unittest.TestCase):
    """A `ca_cert` the TLS stack cannot verify a server with is refused, never acknowledged."""

    def test_unusable_ca_is_refused(self):
        good = shared_ca().issue("enclave-client")
        for name, ca in unusable_cas():
            for shape, ca_pem in (("alone", ca.cert_pem),
                                  ("second in a bundle", shared_ca().cert_pem + ca.cert_pem)):
                with self.subTest(name, shape=shape):
                    payload = {"MTLS_CLIENT_CERT_JSON": mtls_object(good, ca_pem=ca_pem)}
                    with self.assertRaises(secrets.InvalidCa) as caught:
                        apply_update(SecretsState(), payload, NOW)
                    self.assertEqual(caught.exception.code, "invalid_ca")
                    self.assertIn("ca_cert", caught.exception.message)
                    for secret in secret_strings(payload):
                        self.assertNotIn(secret, caught.exception.message)

    def test_ca_validity_is_judged_at_now(self):
        ca = TestCA("Short CA", not_before=NOW_DT - dt.timedelta(hours=1),
                    not_after=NOW_DT + dt.timedelta(hours=1))
        issued = ca.issue("enclave-client", not_before=NOW_DT - dt.timedelta(hours=3),
                          not_after=NOW_DT + dt.timedelta(days=2))
        payload = {"MTLS_CLIENT_CERT_JSON": mtls_object(issued, ca_pem=ca.cert_pem)}
        apply_update(SecretsState(), payload, NOW)
        for moment in (NOW + 7200, NOW - 7200):
            with self.subTest(moment=moment):
                with self.assertRaises(secrets.InvalidCa):
                    apply_update(SecretsState(), payload, moment)


class ApplyUpdateMergeTest(unittest.TestCase):
    def test_merge_replace_keep_clear(self):
        state, changed = apply_update(SecretsState(), {
            "GOOGLE_OAUTH_CLIENT_ID": "id-1", "GOOGLE_OAUTH_CLIENT_SECRET": "secret-1",
            "ECS_WATERMARK_ENDPOINT": "https://wm.internal:8443"}, NOW)
        self.assertEqual((state.version, state.received, state.updated_at), (1, True, NOW))
        self.assertEqual(changed, ["ECS_WATERMARK_ENDPOINT", "GOOGLE_OAUTH_CLIENT_ID",
                                   "GOOGLE_OAUTH_CLIENT_SECRET"])
        later = NOW + 300
        state2, changed = apply_update(state, {"GOOGLE_OAUTH_CLIENT_ID": "id-2",
                                               "ECS_WATERMARK_ENDPOINT": None}, later)
        self.assertEqual(changed, ["ECS_WATERMARK_ENDPOINT", "GOOGLE_OAUTH_CLIENT_ID"])
        self.assertEqual(state2.version, 2)
        self.assertEqual(state2.updated_at, later)
        self.assertEqual(state2.get("GOOGLE_OAUTH_CLIENT_ID"), "id-2")  # replaced
        self.assertEqual(state2.get("GOOGLE_OAUTH_CLIENT_SECRET"), "secret-1")  # kept
        self.assertIsNone(state2.get("ECS_WATERMARK_ENDPOINT"))  # cleared
        self.assertNotIn("ECS_WATERMARK_ENDPOINT", state2.values)
        # The old state is untouched (frozen, values read-only).
        self.assertEqual(state.get("ECS_WATERMARK_ENDPOINT"), "https://wm.internal:8443")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            state.version = 9
        with self.assertRaises(TypeError):
            state.values["GOOGLE_OAUTH_CLIENT_ID"] = "x"

    def test_identical_redelivery_is_a_no_op(self):
        obj = mtls_object()
        payload = {"MTLS_CLIENT_CERT_JSON": obj, "ENCLAVE_RPC_SHARED_SECRET": RPC_SECRET}
        state, changed = apply_update(SecretsState(), payload, NOW)
        self.assertEqual(state.version, 1)
        again, changed = apply_update(state, payload, NOW + 3600)
        self.assertEqual(changed, [])
        self.assertIs(again, state)  # same version, same object, same updated_at
        # The same material as a JSON string (the original system sends both forms).
        as_string, changed = apply_update(state, {"MTLS_CLIENT_CERT_JSON": json.dumps(obj)}, NOW)
        self.assertEqual((as_string.version, changed), (1, []))
        # Clearing a key that is not set changes nothing either.
        cleared, changed = apply_update(state, {"GOOGLE_OAUTH_CLIENT_ID": None}, NOW)
        self.assertEqual((cleared.version, changed), (1, []))

    def test_empty_first_delivery_counts_as_received(self):
        state, changed = apply_update(SecretsState(), {}, NOW)
        self.assertEqual((state.version, state.received, changed), (0, True, []))

    def test_mtls_material_is_canonical_and_dated(self):
        issued = shared_ca().issue("enclave-client")
        obj = mtls_object(issued)
        obj["client_cert"] = "junk before the PEM\n" + obj["client_cert"] + "\n\n"
        state, _ = apply_update(SecretsState(), {"MTLS_CLIENT_CERT_JSON": obj}, NOW)
        material = state.mtls
        self.assertEqual(material.client_cert_pem, issued.cert_pem)
        self.assertEqual(material.not_after, issued.cert.not_valid_after_utc)
        self.assertEqual(state.mtls_not_after, issued.cert.not_valid_after_utc)
        self.assertTrue(material.client_key_pem.startswith(b"-----BEGIN PRIVATE KEY-----"))

    def test_ca_bundle_of_two_certificates(self):
        bundle = shared_ca().cert_pem + TestCA("Second CA").cert_pem
        state, _ = apply_update(SecretsState(),
                                {"MTLS_CLIENT_CERT_JSON": mtls_object(ca_pem=bundle)}, NOW)
        self.assertEqual(state.mtls.ca_cert_pem.count(b"BEGIN CERTIFICATE"), 2)

    def test_validity_is_judged_at_now(self):
        issued = shared_ca().issue("enclave-client", not_before=NOW_DT - dt.timedelta(hours=1),
                                 not_after=NOW_DT + dt.timedelta(hours=1))
        payload = {"MTLS_CLIENT_CERT_JSON": mtls_object(issued)}
        apply_update(SecretsState(), payload, NOW)
        with self.assertRaises(secrets.CertificateExpired):
            apply_update(SecretsState(), payload, NOW + 7200)
        with self.assertRaises(secrets.CertificateNotYetValid):
            apply_update(SecretsState(), payload, NOW - 7200)

    def test_values_are_canonical(self):
        state, _ = apply_update(SecretsState(), {"ENCLAVE_TOKEN_SEALING_KEY": SEALING_KEY_B64,
                                                 "ENCLAVE_RPC_SHARED_SECRET": RPC_SECRET}, NOW)
        self.assertEqual(state.get("ENCLAVE_TOKEN_SEALING_KEY"), Keyring(bytes(range(32))))
        self.assertEqual(state.get("ENCLAVE_RPC_SHARED_SECRET"), RPC_SECRET)

    def test_repr_never_shows_a_secret(self):
        payload = {"MTLS_CLIENT_CERT_JSON": mtls_object(), "ENCLAVE_RPC_SHARED_SECRET": RPC_SECRET,
                   "GOOGLE_OAUTH_CLIENT_SECRET": "google-client-secret-value",
                   "ENCLAVE_TOKEN_SEALING_KEY": SEALING_KEY_B64}
        state, _ = apply_update(SecretsState(), payload, NOW)
        state, _ = apply_update(state, {"ENCLAVE_RPC_SHARED_SECRET": OTHER_RPC_SECRET}, NOW)
        text = repr(state) + repr(state.mtls) + str(state)
        for secret in secret_strings(payload) + [OTHER_RPC_SECRET]:
            self.assertNotIn(secret, text)


def sealing_keys(count: int, label: str = "test") -> list[bytes]:
    """Distinct fixed sealing keys, registered with the leak scan."""
    keys = [hashlib.sha256(f"{label} sealing key {i}".encode()).digest() for i in range(count)]
    remember_secret(*keys, kind="token sealing key")
    return keys


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def respelled(text: str) -> str:
    """Another base64 spelling of the same 32 bytes: the last character's two spare bits set."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = text[:42] + alphabet[alphabet.index(text[42]) ^ 1] + text[43:]
    assert other != text and base64.b64decode(other) == base64.b64decode(text)
    return other


SEALING = "ENCLAVE_TOKEN_SEALING_KEY"


class SealingKeyDeliveryTest(unittest.TestCase):
    """ENCLAVE_TOKEN_SEALING_KEY: one base64 key rotates the keyring, a list states all of it."""

    def setUp(self):
        self.keys = sealing_keys(sealing.MAX_PREVIOUS_KEYS + 3)
        self.a, self.b, self.c = self.keys[:3]

    def deliver(self, state: SecretsState, value) -> tuple[SecretsState, list[str]]:
        return apply_update(state, {SEALING: value}, NOW)

    def test_one_key_becomes_current_and_keeps_the_replaced_one(self):
        state = secrets.initial_state({SEALING: self.a})  # configuration gives one key
        self.assertEqual(state.get(SEALING), Keyring(self.a))
        state, changed = self.deliver(state, b64(self.b))
        self.assertEqual(changed, [SEALING])
        self.assertEqual(state.get(SEALING), Keyring(self.b, (self.a,)))
        state, _ = self.deliver(state, b64(self.c))
        self.assertEqual(state.get(SEALING), Keyring(self.c, (self.b, self.a)))
        with self.subTest("the current key again changes nothing"):
            again, changed = self.deliver(state, b64(self.c))
            self.assertEqual((again.version, changed), (state.version, []))
            self.assertIs(again.get(SEALING), state.get(SEALING))
        with self.subTest("a previous key again becomes current (rollback)"):
            back, _ = self.deliver(state, b64(self.a))
            self.assertEqual(back.get(SEALING), Keyring(self.a, (self.c, self.b)))

    def test_rotations_keep_at_most_max_previous_keys(self):
        state = SecretsState()
        for key in self.keys:
            state, _ = self.deliver(state, b64(key))
        keyring = state.get(SEALING)
        self.assertEqual(keyring.current, self.keys[-1])
        self.assertEqual(len(keyring.previous), sealing.MAX_PREVIOUS_KEYS)
        # newest first; the oldest ones were dropped
        self.assertEqual(keyring.previous,
                         tuple(reversed(self.keys[-1 - sealing.MAX_PREVIOUS_KEYS:-1])))

    def test_a_list_states_the_whole_keyring(self):
        state, _ = self.deliver(SecretsState(), b64(self.a))
        state, _ = self.deliver(state, b64(self.b))
        cases = [
            ("current and previous", [self.c, self.b], Keyring(self.c, (self.b,))),
            ("one key alone drops every other", [self.c], Keyring(self.c)),
            ("the longest list", self.keys[:secrets.MAX_SEALING_KEYS],
             Keyring(self.keys[0], tuple(self.keys[1:secrets.MAX_SEALING_KEYS]))),
        ]
        for name, keys, expected in cases:
            with self.subTest(name):
                after, changed = self.deliver(state, [b64(k) for k in keys])
                self.assertEqual((after.get(SEALING), changed), (expected, [SEALING]))
        with self.subTest("the keyring in force again changes nothing"):
            again, changed = self.deliver(state, [b64(self.b), b64(self.a)])
            self.assertEqual((again.version, changed), (state.version, []))

    def test_null_clears_every_key(self):
        state, _ = self.deliver(SecretsState(), [b64(self.a), b64(self.b)])
        cleared, changed = self.deliver(state, None)
        self.assertEqual(changed, [SEALING])
        self.assertIsNone(cleared.get(SEALING))
        fresh, _ = self.deliver(cleared, b64(self.c))  # nothing kept from before the clear
        self.assertEqual(fresh.get(SEALING), Keyring(self.c))

    def test_refused_values(self):
        good = [b64(k) for k in self.keys]
        short = base64.b64encode(b"k" * 16).decode()
        cases = [
            ("a number", 5, "invalid_type", SEALING),
            ("an object", {"current": good[0]}, "invalid_type", SEALING),
            ("an empty list", [], "invalid_secret", SEALING),
            ("too many keys", good[:secrets.MAX_SEALING_KEYS + 1], "invalid_secret", SEALING),
            ("a duplicate", [good[0], good[1], good[0]], "invalid_secret", f"{SEALING}[2]"),
            ("the same key spelled twice", [good[0], respelled(good[0])], "invalid_secret",
             f"{SEALING}[1]"),
            ("bad base64", [good[0], "not base64!!"], "invalid_secret", f"{SEALING}[1]"),
            ("wrong size", [short, good[1]], "invalid_secret", f"{SEALING}[0]"),
            ("a number in the list", [good[0], 7], "invalid_type", f"{SEALING}[1]"),
            ("null in the list", [good[0], None], "invalid_type", f"{SEALING}[1]"),
            ("an empty string in the list", [good[0], ""], "invalid_type", f"{SEALING}[1]"),
            ("a nested list", [[good[0]]], "invalid_type", f"{SEALING}[0]"),
            ("a control character", [good[0], good[1][:4] + "\x00" + good[1][4:]],
             "invalid_secret", f"{SEALING}[1]"),
        ]
        current, _ = self.deliver(SecretsState(), good[0])
        for name, value, code, named in cases:
            with self.subTest(name):
                with self.assertRaises(secrets.SecretsError) as ctx:
                    self.deliver(current, value)
                self.assertEqual(ctx.exception.code, code, ctx.exception.message)
                self.assertIn(named, ctx.exception.message)
                for secret in good + [short]:
                    self.assertNotIn(secret, ctx.exception.message)
                    self.assertNotIn(secret.rstrip("="), ctx.exception.message)

    def test_repr_never_shows_a_key(self):
        state, _ = self.deliver(SecretsState(), [b64(self.a), b64(self.b)])
        text = repr(state) + str(state) + repr(state.get(SEALING))
        for key in (self.a, self.b):
            for form in (b64(key).rstrip("="), key.hex(), repr(key)):
                self.assertNotIn(form, text)


class RpcRotationTest(unittest.TestCase):
    GRACE = 300

    def test_rotation_keeps_the_previous_secret_for_the_grace_period(self):
        state = secrets.initial_state({"ENCLAVE_RPC_SHARED_SECRET": RPC_SECRET})
        self.assertEqual(secrets.rpc_secrets(state, NOW, self.GRACE), [RPC_SECRET])
        rotated, changed = apply_update(state, {"ENCLAVE_RPC_SHARED_SECRET": OTHER_RPC_SECRET}, NOW)
        self.assertEqual(changed, ["ENCLAVE_RPC_SHARED_SECRET"])
        at = lambda seconds: NOW + seconds  # noqa: E731
        self.assertEqual(secrets.rpc_secrets(rotated, at(0), self.GRACE),
                         [OTHER_RPC_SECRET, RPC_SECRET])
        self.assertEqual(secrets.rpc_secrets(rotated, at(299), self.GRACE),
                         [OTHER_RPC_SECRET, RPC_SECRET])
        self.assertEqual(secrets.rpc_secrets(rotated, at(300), self.GRACE), [OTHER_RPC_SECRET])
        self.assertEqual(secrets.rpc_secrets(rotated, at(-1), self.GRACE), [OTHER_RPC_SECRET])
        # An unrelated change keeps the rotation record.
        later, _ = apply_update(rotated, {"GOOGLE_OAUTH_CLIENT_ID": "x"}, at(10))
        self.assertEqual(secrets.rpc_secrets(later, at(20), self.GRACE),
                         [OTHER_RPC_SECRET, RPC_SECRET])

    def test_clearing_revokes_without_grace(self):
        state = secrets.initial_state({"ENCLAVE_RPC_SHARED_SECRET": RPC_SECRET})
        cleared, changed = apply_update(state, {"ENCLAVE_RPC_SHARED_SECRET": None}, NOW)
        self.assertEqual(changed, ["ENCLAVE_RPC_SHARED_SECRET"])
        self.assertEqual(secrets.rpc_secrets(cleared, NOW, self.GRACE), [])

    def test_initial_state_rejects_unknown_keys(self):
        with self.assertRaises(secrets.UnknownKey):
            secrets.initial_state({"NOPE": "x"})


if __name__ == "__main__":
    unittest.main()
