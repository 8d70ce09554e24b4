"""The Nitro verifier against real documents, a tampering table, evidence, and `verify` CLI runs."""

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import cbor2

from enclave import attestation, devpki, identity
from enclave.host import verify as cmd_verify
from enclave.nitro import claims as nitro_claims
from enclave.nitro import cose
from enclave.nitro import verifier as verify
from enclave.nitro.verifier import AT_DOCUMENT_TIME, VerificationError, verify_document
from tests.fakes.fake_nsm import FakeNsm, dumps_indefinite
from tests.support import challenge, keep_off_console

DATA = Path(__file__).parent / "data" / "nitro"
HOUR_MS = 3600 * 1000
PROD = "blocky_nitrite_nitro_attestation"
DEBUG = "blocky_nitrite_nitro_attestation_debug"
ETERNIS_EXAMPLE = "eternis_fixtures_example_attestation"
ETERNIS_LIB = "eternis_src_lib_rs_test_verify"
NEGATIVE = "eternis_fixtures_invalid_attestation"
POSITIVES = {PROD: 1725719859545, DEBUG: 1725719886508, ETERNIS_EXAMPLE: 1725911352400,
             ETERNIS_LIB: 1726606030288}
PROD_PCRS = {
    0: "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a",
    1: "0343b056cd8485ca7890ddd833476d78460aed2aa161548e4e26bedf321726696257d623e8805f3f605946b3d8b0c6aa",
    2: "d5dcbdea0aa39c802f9d55ced2ea6e4d74ecec5f08fe40c508882639c9090642669106a062a3e24ee2805a3024b9b75c",
    4: "45706d7b621e4620a332e147a5ddb000b049f73d47d3e61f6b03d2069152d4df6a4a786ad1c10102b955799a9dc96b44",
}
ETERNIS_PCR3 = ("671ca1e328f75015b2aeee60639cc5252bc835d8bb690444d1f8e2bf4260f73d"
                "c1b71e07a14a770c7d0becac6eb3b53f")
_quiet = []


def setUpModule():
    _quiet.append(keep_off_console("enclave.devpki", "enclave.attestation"))


def tearDownModule():
    while _quiet:
        _quiet.pop()()


def load(name: str) -> bytes:
    return base64.b64decode((DATA / f"{name}.b64").read_text())


def aws_roots() -> list[bytes]:
    return [verify.nitro_root_der()]


class TestBundledRoot(unittest.TestCase):
    def test_bundled_root_is_the_published_one(self):
        der = verify.nitro_root_der()
        self.assertEqual(hashlib.sha256(der).hexdigest(), verify.NITRO_ROOT_DER_SHA256)
        self.assertEqual(der, verify.pem_to_der_certs(
            (DATA / "aws_nitro_root_g1.pem").read_bytes())[0])


class TestRealDocuments(unittest.TestCase):
    def test_production_document_verifies_at_its_own_timestamp(self):
        expected = {i: bytes.fromhex(h) for i, h in PROD_PCRS.items()}
        for at in (AT_DOCUMENT_TIME, POSITIVES[PROD]):
            with self.subTest(at=at):
                doc = verify_document(load(PROD), roots=aws_roots(), at_ms=at,
                                      expected_pcrs=expected)
                self.assertEqual(doc.module_id, "i-0a22e5c5f24d22174-enc0191cceb4289903f")
                self.assertEqual((doc.digest, doc.timestamp_ms), ("SHA384", POSITIVES[PROD]))
                self.assertEqual(sorted(doc.pcrs), list(range(16)))
                self.assertTrue(all(len(v) == 48 for v in doc.pcrs.values()))
                for index, value in expected.items():
                    self.assertEqual(doc.pcrs[index], value)
                for name in ("public_key", "user_data", "nonce"):
                    self.assertEqual(getattr(doc, name), b"\x01" * 1024, name)
                self.assertFalse(doc.debug)
                self.assertEqual(doc.root_der, verify.nitro_root_der())

    def test_production_document_with_expected_nonce_and_max_age(self):
        verify_document(load(PROD), roots=aws_roots(), at_ms=POSITIVES[PROD] + 60_000,
                        expected_nonce=b"\x01" * 1024, max_age_ms=120_000)

    def test_tagged_form_verifies(self):
        parts = cbor2.loads(load(PROD))
        tagged = cbor2.dumps(cbor2.CBORTag(18, parts))
        self.assertEqual(verify_document(tagged, roots=aws_roots(),
                                         at_ms=AT_DOCUMENT_TIME).module_id,
                         "i-0a22e5c5f24d22174-enc0191cceb4289903f")

    def test_debug_documents_rejected_unless_allowed(self):
        for name in (DEBUG, ETERNIS_EXAMPLE, ETERNIS_LIB):
            with self.subTest(name):
                with self.assertRaises(VerificationError) as ctx:
                    verify_document(load(name), roots=aws_roots(), at_ms=AT_DOCUMENT_TIME)
                self.assertEqual(ctx.exception.step, 6)
                self.assertIn("debug", str(ctx.exception))
                doc = verify_document(load(name), roots=aws_roots(), at_ms=AT_DOCUMENT_TIME,
                                      allow_debug=True)
                self.assertTrue(doc.debug)

    def test_eternis_documents(self):
        for name in (ETERNIS_EXAMPLE, ETERNIS_LIB):
            with self.subTest(name):
                doc = verify_document(load(name), roots=aws_roots(), at_ms=AT_DOCUMENT_TIME,
                                      allow_debug=True,
                                      expected_pcrs={3: bytes.fromhex(ETERNIS_PCR3)},
                                      expected_nonce=bytes(19) + b"\x01")
                self.assertEqual(doc.timestamp_ms, POSITIVES[name])
        doc = verify_document(load(ETERNIS_EXAMPLE), roots=aws_roots(),
                              at_ms=AT_DOCUMENT_TIME, allow_debug=True)
        self.assertEqual(doc.public_key, b"dummy")

    def test_negative_document_fails_at_the_signature(self):
        for allow_debug in (False, True):
            with self.subTest(allow_debug=allow_debug):
                with self.assertRaises(VerificationError) as ctx:
                    verify_document(load(NEGATIVE), roots=aws_roots(), at_ms=AT_DOCUMENT_TIME,
                                    allow_debug=allow_debug)
                self.assertEqual(ctx.exception.step, 5)

    def test_every_document_expires_a_few_hours_later(self):
        for name, ts in POSITIVES.items():
            with self.subTest(name):
                with self.assertRaises(VerificationError) as ctx:
                    verify_document(load(name), roots=aws_roots(), at_ms=ts + 4 * HOUR_MS,
                                    allow_debug=True)
                self.assertEqual(ctx.exception.step, 4)
                self.assertIn("certificate", ctx.exception.message)
                self.assertIn("not valid at the verification time", ctx.exception.message)

    def test_every_document_rejected_against_another_root(self):
        with tempfile.TemporaryDirectory() as tmp:
            other = devpki.load_or_create_root(tmp).cert_der
        for name in list(POSITIVES) + [NEGATIVE]:
            with self.subTest(name):
                with self.assertRaises(VerificationError) as ctx:
                    verify_document(load(name), roots=[other], at_ms=AT_DOCUMENT_TIME,
                                    allow_debug=True)
                self.assertEqual(ctx.exception.step, 3)
                self.assertIn(hashlib.sha256(other).hexdigest(), ctx.exception.message)

    def test_no_roots_fails_closed(self):
        with self.assertRaises(VerificationError) as ctx:
            verify_document(load(PROD), roots=[], at_ms=AT_DOCUMENT_TIME)
        self.assertEqual(ctx.exception.step, 3)

    def test_cache_never_bypasses_time_or_chain_checks(self):
        verifier = verify.Verifier.production()
        self.assertEqual(verifier.trusted_roots, tuple(aws_roots()))
        verifier.verify(load(PROD), at_ms=AT_DOCUMENT_TIME)  # now cached
        with self.assertRaises(VerificationError) as ctx:
            verifier.verify(load(PROD), at_ms=POSITIVES[PROD] + 4 * HOUR_MS)
        self.assertEqual(ctx.exception.step, 4)
        verifier.verify(load(PROD), at_ms=AT_DOCUMENT_TIME)
        # The cache belongs to the verifier: one with other roots never trusts the chain.
        with tempfile.TemporaryDirectory() as tmp, self.assertRaises(VerificationError) as ctx:
            other_root = devpki.load_or_create_root(tmp).cert_der
            verify.Verifier([other_root]).verify(load(PROD), at_ms=AT_DOCUMENT_TIME)
        self.assertEqual(ctx.exception.step, 3)

    def test_unexpected_errors_fail_closed(self):
        with self.assertRaises(VerificationError) as ctx:
            verify_document(load(PROD), roots=aws_roots(), at_ms=AT_DOCUMENT_TIME,
                            expected_pcrs={0: "not bytes"})
        self.assertEqual(ctx.exception.step, 6)
        self.assertIn("unexpected TypeError", ctx.exception.message)
        with self.assertRaises(VerificationError) as ctx:
            verify_document(load(PROD), roots=aws_roots(), at_ms=1.5)
        self.assertEqual(ctx.exception.step, 2)


class TestPcrAllowLists(unittest.TestCase):
    """expected_pcrs maps an index to one value or to an allow-list (a rollout's old and new
    images); each pinned index must equal one of its values."""

    def verify(self, expected_pcrs):
        return verify_document(load(PROD), roots=aws_roots(), at_ms=AT_DOCUMENT_TIME,
                               expected_pcrs=expected_pcrs)

    def test_old_or_new_value_accepted(self):
        real = {i: bytes.fromhex(h) for i, h in PROD_PCRS.items()}
        other = bytes([1]) * 48
        cases = {
            "real value first": {0: [real[0], other]},
            "real value last": {0: (other, bytes(48), real[0])},
            "a set": {0: {other, real[0]}},
            "a frozenset and a plain value": {0: frozenset({real[0]}), 1: real[1]},
            "every pinned index has its list": {i: [other, v] for i, v in real.items()},
            "a bytearray": {0: [bytearray(real[0])]},
        }
        for name, expected in cases.items():
            with self.subTest(name):
                self.assertEqual(self.verify(expected).pcrs[0], real[0])

    def test_neither_value_refused(self):
        old, new = bytes([1]) * 48, bytes([2]) * 48
        with self.assertRaises(VerificationError) as ctx:
            self.verify({0: [old, new]})
        self.assertEqual(ctx.exception.step, 6)
        self.assertIn(f"PCR0: expected one of 2 values [{old.hex()}, {new.hex()}], "
                      f"got {PROD_PCRS[0]}", ctx.exception.message)

    def test_one_index_matching_is_not_enough(self):
        real0 = bytes.fromhex(PROD_PCRS[0])
        with self.assertRaises(VerificationError) as ctx:
            self.verify({0: [real0], 1: [bytes(48), bytes([1]) * 48]})
        self.assertEqual(ctx.exception.step, 6)
        self.assertIn("PCR1: expected one of 2 values", ctx.exception.message)

    def test_absent_index_refused(self):
        with self.assertRaises(VerificationError) as ctx:
            self.verify({20: [bytes(48), bytes([1]) * 48]})
        self.assertEqual(ctx.exception.step, 6)
        self.assertIn("got absent", ctx.exception.message)

    def test_empty_allow_list_fails_closed(self):
        for empty in ([], (), set(), frozenset()):
            with self.subTest(type(empty).__name__):
                with self.assertRaises(VerificationError) as ctx:
                    self.verify({0: empty})
                self.assertEqual(ctx.exception.step, 6)
                self.assertIn("allow-list is empty", ctx.exception.message)

    def test_values_must_be_bytes(self):
        for bad in ("ab" * 48, ["ab" * 48], [None]):
            with self.subTest(bad=bad):
                with self.assertRaises(VerificationError) as ctx:
                    self.verify({0: bad})
                self.assertEqual(ctx.exception.step, 6)
                self.assertIn("unexpected TypeError", ctx.exception.message)

    def test_no_pins(self):
        for none in (None, {}):
            with self.subTest(none=none):
                self.assertFalse(self.verify(none).debug)


def _rebuild(doc: bytes, *, protected=None, payload=None, signature=None, tag=None,
             mutate=None) -> bytes:
    prot, unprot, body, sig = cbor2.loads(doc)
    if mutate is not None:
        fields = cbor2.loads(body)
        mutate(fields)
        body = cbor2.dumps(fields)
    parts = [prot if protected is None else protected, unprot,
             body if payload is None else payload, sig if signature is None else signature]
    return cbor2.dumps(parts if tag is None else cbor2.CBORTag(tag, parts))


def _set(name, value):
    def mutate(fields):
        fields[name] = value
    return mutate


def _flip_pcr(index):
    def mutate(fields):
        fields["pcrs"][index] = bytes([fields["pcrs"][index][0] ^ 1]) + fields["pcrs"][index][1:]
    return mutate


def _cabundle(fn):
    def mutate(fields):
        fields["cabundle"] = fn(list(fields["cabundle"]))
    return mutate


class TestIndefiniteLengthPayloads(unittest.TestCase):
    """Since early 2026 AWS encodes the payload map with indefinite length (0xbf ... 0xff)."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.root = devpki.load_or_create_root(cls._tmp.name)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_rewritten_real_payload_passes_step_2_and_fails_only_at_the_signature(self):
        # The reproduction: the real 2024 payload re-framed as an indefinite map. Its
        # claims still parse (steps 2-4 pass); the signature covers the old bytes (step 5).
        protected, unprotected, payload, signature = cbor2.loads(load(PROD))
        self.assertEqual(payload[0] & 0xE0, 0xA0)  # a definite-length map today
        rewritten = b"\xbf" + payload[1:] + b"\xff"
        self.assertEqual(cbor2.loads(rewritten), cbor2.loads(payload))
        document = cbor2.dumps([protected, unprotected, rewritten, signature])
        with self.assertRaises(VerificationError) as ctx:
            verify_document(document, roots=aws_roots(), at_ms=AT_DOCUMENT_TIME)
        self.assertEqual(ctx.exception.step, 5, str(ctx.exception))

    def test_indefinite_documents_signed_by_a_test_root_verify(self):
        for nested in (False, True):
            with self.subTest(nested=nested):
                fake = FakeNsm(self.root, mode="indefinite")
                self.addCleanup(fake.cleanup)
                if not nested:
                    fake.mint_encoder = lambda claims: dumps_indefinite(claims, nested=False)
                nonce, user_data = b"\x05" * 32, b"claims-0123456789"
                document = fake.mint({"nonce": nonce, "user_data": user_data,
                                      "public_key": b"\x04" * 97})
                payload = cbor2.loads(document)[2]
                self.assertEqual(payload[:1], b"\xbf")
                nonce_head = b"\x5f" if nested else b"\x58\x20"  # indefinite or 32-byte bstr
                self.assertIn(cbor2.dumps("nonce") + nonce_head, payload)
                doc = verify_document(document, roots=[self.root.cert_der],
                                      at_ms=AT_DOCUMENT_TIME, expected_nonce=nonce)
                self.assertEqual((doc.nonce, doc.user_data, doc.public_key),
                                 (nonce, user_data, b"\x04" * 97))
                self.assertEqual(doc.sha384, hashlib.sha384(document).digest())
                # One byte changed in a signed claim: the signature no longer holds (step 5).
                at = payload.index(user_data[-4:])
                tampered_payload = payload[:at] + b"X" + payload[at + 1:]
                parts = cbor2.loads(document)
                tampered = cbor2.dumps([parts[0], parts[1], tampered_payload, parts[3]])
                with self.assertRaises(VerificationError) as ctx:
                    verify_document(tampered, roots=[self.root.cert_der],
                                    at_ms=AT_DOCUMENT_TIME)
                self.assertEqual(ctx.exception.step, 5, str(ctx.exception))

    def test_indefinite_payload_keeps_the_depth_size_and_duplicate_key_limits(self):
        fake = FakeNsm(self.root, mode="indefinite")
        self.addCleanup(fake.cleanup)
        claims = cbor2.loads(cbor2.loads(fake.mint({}))[2])
        key = cbor2.dumps("module_id") + cbor2.dumps("again")
        cases = {
            "duplicate key": b"\xbf" + key + key + b"\xff",
            "too deep": b"\xbf" + cbor2.dumps("x") + b"\x9f" * 40 + b"\xff" * 41,
            "unterminated": dumps_indefinite(claims)[:-1],
            "trailing bytes": dumps_indefinite(claims) + b"\x00",
            "chunk of the wrong type": b"\xbf" + cbor2.dumps("module_id") + b"\x7f\x41a\xff\xff",
            "break outside an item": b"\xff",
        }
        for name, payload in cases.items():
            with self.subTest(name):
                document = cose.encode_sign1(cose.protected_header(cose.ALG_ES384), payload,
                                             bytes(96))
                with self.assertRaises(VerificationError) as ctx:
                    verify_document(document, roots=[self.root.cert_der],
                                    at_ms=AT_DOCUMENT_TIME)
                self.assertEqual(ctx.exception.step, 2, str(ctx.exception))


class TestTampering(unittest.TestCase):
    def test_tampering_table(self):
        doc = load(PROD)
        fields = cbor2.loads(cbor2.loads(doc)[2])
        sig = cbor2.loads(doc)[3]
        debug_leaf = cbor2.loads(cbor2.loads(load(DEBUG))[2])["certificate"]
        other_leaf = cbor2.loads(cbor2.loads(load(ETERNIS_EXAMPLE))[2])["certificate"]
        ts = POSITIVES[PROD]
        cases = [
            # (name, document, extra verify_document arguments, expected step)
            ("module_id changed", _rebuild(doc, mutate=_set("module_id", "i-evil")), {}, 5),
            ("digest changed", _rebuild(doc, mutate=_set("digest", "SHA256")), {}, 2),
            ("timestamp changed", _rebuild(doc, mutate=_set("timestamp", ts + 1)), {}, 5),
            ("timestamp not an integer", _rebuild(doc, mutate=_set("timestamp", str(ts))), {}, 2),
            ("PCR0 changed", _rebuild(doc, mutate=_flip_pcr(0)), {}, 5),
            ("PCR4 changed", _rebuild(doc, mutate=_flip_pcr(4)), {}, 5),
            ("PCR of 32 bytes", _rebuild(doc, mutate=lambda f: f["pcrs"].update({5: bytes(32)})),
             {}, 2),
            ("PCR index 32", _rebuild(doc, mutate=lambda f: f["pcrs"].update({32: bytes(48)})),
             {}, 2),
            ("public_key changed", _rebuild(doc, mutate=_set("public_key", b"\x02" * 1024)), {}, 5),
            ("user_data changed", _rebuild(doc, mutate=_set("user_data", b"\x02" * 1024)), {}, 5),
            ("nonce changed", _rebuild(doc, mutate=_set("nonce", b"\x02" * 1024)), {}, 5),
            ("nonce set to null", _rebuild(doc, mutate=_set("nonce", None)), {}, 5),
            ("user_data too long", _rebuild(doc, mutate=_set("user_data", bytes(1025))), {}, 2),
            ("empty public_key", _rebuild(doc, mutate=_set("public_key", b"")), {}, 2),
            ("extra field", _rebuild(doc, mutate=_set("extra", b"x")), {}, 2),
            ("missing pcrs", _rebuild(doc, mutate=lambda f: f.pop("pcrs")), {}, 2),
            ("payload not a map", _rebuild(doc, payload=cbor2.dumps([1, 2])), {}, 2),
            ("certificate swapped (same chain)", _rebuild(doc, mutate=_set("certificate",
                                                                            debug_leaf)), {}, 4),
            ("certificate swapped (other chain)", _rebuild(doc, mutate=_set("certificate",
                                                                             other_leaf)), {}, 4),
            ("certificate not DER", _rebuild(doc, mutate=_set("certificate", b"\x30\x03abc")),
             {}, 4),
            ("cabundle intermediates reordered",
             _rebuild(doc, mutate=_cabundle(lambda c: [c[0], c[2], c[1], c[3]])), {}, 4),
            ("cabundle reversed", _rebuild(doc, mutate=_cabundle(lambda c: c[::-1])), {}, 3),
            ("cabundle truncated", _rebuild(doc, mutate=_cabundle(lambda c: c[:-1])), {}, 4),
            ("cabundle only the root", _rebuild(doc, mutate=_cabundle(lambda c: c[:1])), {}, 4),
            ("cabundle empty", _rebuild(doc, mutate=_cabundle(lambda c: [])), {}, 2),
            ("cabundle with the leaf as CA", _rebuild(doc, mutate=_cabundle(
                lambda c: c + [fields["certificate"]])), {}, 4),
            ("signature bit flipped", _rebuild(doc, signature=bytes([sig[0] ^ 0x80]) + sig[1:]),
             {}, 5),
            ("signature truncated", _rebuild(doc, signature=sig[:95]), {}, 5),
            ("DER instead of raw signature", _rebuild(doc, signature=cose.raw_to_der(sig)), {}, 5),
            ("protected header re-encoded", _rebuild(doc, protected=bytes.fromhex("a101390022")),
             {}, 5),
            ("protected alg ES256", _rebuild(doc, protected=cbor2.dumps({1: -7})), {}, 1),
            ("protected header with extra parameter",
             _rebuild(doc, protected=cbor2.dumps({1: -35, 4: b"kid"})), {}, 1),
            ("empty protected header", _rebuild(doc, protected=b""), {}, 1),
            ("wrong CBOR tag", _rebuild(doc, tag=98), {}, 1),
            ("trailing bytes", doc + b"\x00", {}, 1),
            ("truncated document", doc[:-10], {}, 1),
            ("empty input", b"", {}, 1),
            ("not bytes", "text", {}, 1),
            ("oversized", doc + bytes(verify.MAX_DOCUMENT_BYTES), {}, 1),
            ("wrong nonce", doc, {"expected_nonce": b"\x02" * 16}, 7),
            ("stale past max-age", doc, {"at_ms": ts + 10 * 60_000, "max_age_ms": 5 * 60_000}, 7),
            ("expected PCR mismatch", doc, {"expected_pcrs": {0: bytes(48)}}, 6),
            ("expected PCR absent", doc, {"expected_pcrs": {20: bytes(48)}}, 6),
            ("before the leaf was issued", doc, {"at_ms": ts - HOUR_MS}, 4),
        ]
        for name, data, kwargs, step in cases:
            with self.subTest(name):
                arguments = {"roots": aws_roots(), "at_ms": AT_DOCUMENT_TIME, **kwargs}
                with self.assertRaises(VerificationError) as ctx:
                    verify_document(data, **arguments)
                self.assertEqual(ctx.exception.step, step, str(ctx.exception))

    def test_messages_say_expected_and_got(self):
        with self.assertRaises(VerificationError) as ctx:
            verify_document(load(PROD), roots=aws_roots(), at_ms=AT_DOCUMENT_TIME,
                            expected_pcrs={0: bytes(48)})
        self.assertIn(f"expected {bytes(48).hex()}, got {PROD_PCRS[0]}", str(ctx.exception))
        self.assertTrue(str(ctx.exception).startswith("step 6 (PCRs): "))


class DevShimCase(unittest.TestCase):
    """A dev-shim source and its root in a temporary state directory."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self._tmp.cleanup)
        self.state_dir = self._tmp.name
        self.root = devpki.load_or_create_root(self.state_dir)
        self.identity = identity.SigningIdentity.generate()
        self.source = attestation.DevShimSource(self.identity, self.root)
        self.service = attestation.AttestationService(
            attestation.Attestation(self.identity, self.source))

    def challenge(self, nonce: bytes, user_data: bytes | None = None) -> dict:
        body = {"nonce": base64.b64encode(nonce).decode()}
        if user_data is not None:
            body["user_data"] = base64.b64encode(user_data).decode()
        req = mock.Mock(json=lambda: body)
        status, answer = challenge(self.service, req)
        self.assertEqual(status, 200)
        return answer


class TestEvidenceAndResponse(DevShimCase):
    def test_challenge_document_and_evidence_verify(self):
        nonce = os.urandom(32)
        answer = self.challenge(nonce, b"hello")
        document = base64.b64decode(answer["document"])
        evidence = base64.b64decode(answer["evidence"])
        doc = verify_document(document, roots=[self.root.cert_der], at_ms=AT_DOCUMENT_TIME,
                              expected_nonce=nonce, evidence=evidence, max_age_ms=60_000)
        self.assertEqual(doc.nonce_bound_by, "document")
        self.assertEqual(doc.user_data, b"hello")
        self.assertEqual(doc.evidence["intent"], nitro_claims.INTENT_CHALLENGE)

    def test_evidence_binds_the_nonce_of_a_static_document(self):
        # A document minted without the nonce (as a static source serves) + evidence.
        document = self.source.document()
        nonce = os.urandom(16)
        evidence = self.identity.sign_claims({
            "intent": nitro_claims.INTENT_CHALLENGE, "nonce": nonce,
            "document_sha384": hashlib.sha384(document).digest(), "timestamp_ms": 1})
        doc = verify_document(document, roots=[self.root.cert_der], at_ms=AT_DOCUMENT_TIME,
                              expected_nonce=nonce, evidence=evidence)
        self.assertEqual(doc.nonce_bound_by, "evidence")
        with self.assertRaises(VerificationError) as ctx:
            verify_document(document, roots=[self.root.cert_der], at_ms=AT_DOCUMENT_TIME,
                            expected_nonce=nonce)
        self.assertEqual(ctx.exception.step, 7)

    def test_evidence_failures(self):
        nonce = os.urandom(32)
        answer = self.challenge(nonce)
        document = base64.b64decode(answer["document"])
        other_document = self.source.document(nonce)
        now_ms = verify_document(document, roots=[self.root.cert_der],
                                 at_ms=AT_DOCUMENT_TIME).timestamp_ms
        stranger = identity.SigningIdentity.generate()

        def claims(**kw):
            base = {"intent": nitro_claims.INTENT_CHALLENGE, "nonce": nonce,
                    "document_sha384": hashlib.sha384(document).digest(), "timestamp_ms": now_ms}
            return {**base, **kw}

        cases = {
            "wrong nonce": self.identity.sign_claims(claims(nonce=b"x" * 32)),
            "signed by another key": stranger.sign_claims(claims()),
            "for another document": self.identity.sign_claims(
                claims(document_sha384=hashlib.sha384(other_document).digest())),
            "wrong intent": self.identity.sign_claims(claims(intent=nitro_claims.INTENT_WATERMARK)),
            "stale": self.identity.sign_claims(claims(timestamp_ms=now_ms - 10 * 60_000)),
            "garbage": b"\x84\x40\xa0\x40\x40",
        }
        for name, evidence in cases.items():
            with self.subTest(name):
                with self.assertRaises(VerificationError) as ctx:
                    verify_document(document, roots=[self.root.cert_der], at_ms=now_ms,
                                    expected_nonce=nonce, evidence=evidence, max_age_ms=60_000)
                self.assertEqual(ctx.exception.step, 8, str(ctx.exception))

    def test_evidence_needs_an_expected_nonce_and_a_key(self):
        answer = self.challenge(os.urandom(16))
        with self.assertRaises(VerificationError) as ctx:
            verify_document(base64.b64decode(answer["document"]), roots=[self.root.cert_der],
                            at_ms=AT_DOCUMENT_TIME,
                            evidence=base64.b64decode(answer["evidence"]))
        self.assertEqual(ctx.exception.step, 8)
        # The real production document's public_key is 1024 bytes of 0x01, not a key.
        with self.assertRaises(VerificationError) as ctx:
            verify_document(load(PROD), roots=aws_roots(), at_ms=AT_DOCUMENT_TIME,
                            expected_nonce=b"\x01" * 1024, evidence=b"\x84")
        self.assertEqual(ctx.exception.step, 8)
        self.assertIn("public key", ctx.exception.message)

    def test_watermark_response(self):
        doc = verify_document(self.source.document(), roots=[self.root.cert_der],
                              at_ms=AT_DOCUMENT_TIME)
        request_body = b'{"text": "hello"}'
        result = {"watermarked": "h\u00e9llo", "score": 0.5, "ids": [3, 1]}
        signature = self.identity.sign_claims({
            "intent": nitro_claims.INTENT_WATERMARK, "timestamp_ms": 1,
            "request_sha256": hashlib.sha256(request_body).digest(),
            "response_sha256": hashlib.sha256(nitro_claims.canonical_json(result)).digest()})
        claims = verify.verify_response(doc, json.loads(json.dumps(result)), signature,
                                        request_body=request_body)
        self.assertEqual(claims["intent"], nitro_claims.INTENT_WATERMARK)
        cases = {
            "tampered result": ({**result, "score": 0.6}, signature, request_body),
            "other request": (result, signature, b"{}"),
            "other signer": (result, identity.SigningIdentity.generate().sign_claims(
                {"intent": nitro_claims.INTENT_WATERMARK}), None),
            "challenge intent": (result, self.identity.sign_claims(
                {"intent": nitro_claims.INTENT_CHALLENGE}), None),
        }
        for name, (res, sig, body) in cases.items():
            with self.subTest(name):
                with self.assertRaises(VerificationError) as ctx:
                    verify.verify_response(doc, res, sig, request_body=body)
                self.assertEqual(ctx.exception.step, 8)

    def test_dev_shim_document_rejected_without_the_dev_root(self):
        with self.assertRaises(VerificationError) as ctx:
            verify_document(self.source.document(), roots=aws_roots(), at_ms=AT_DOCUMENT_TIME)
        self.assertEqual(ctx.exception.step, 3)


class TestCmdVerify(DevShimCase):
    def run_cli(self, *argv, stdin: bytes | None = None):
        parser = argparse.ArgumentParser(prog="verify")
        cmd_verify.add_arguments(parser)
        args = parser.parse_args([str(a) for a in argv])
        out, err = io.StringIO(), io.StringIO()
        patches = [contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)]
        if stdin is not None:
            patches.append(mock.patch("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin))))
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            code = cmd_verify.run(args)
        summary = json.loads(out.getvalue()) if out.getvalue() else None
        return code, summary, err.getvalue()

    def write(self, name: str, data) -> str:
        path = Path(self.state_dir) / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path)

    def test_production_document_in_each_encoding(self):
        doc = load(PROD)
        inputs = {"base64": self.write("d.b64", base64.b64encode(doc)),
                  "hex": self.write("d.hex", doc.hex() + "\n"),
                  "raw": self.write("d.cbor", doc)}
        for name, path in inputs.items():
            with self.subTest(name):
                code, summary, _ = self.run_cli(path, "--at-document-time",
                                                "--pcr", f"0={PROD_PCRS[0]}")
                self.assertEqual(code, 0)
                self.assertTrue(summary["verified"])
                self.assertEqual(summary["module_id"], "i-0a22e5c5f24d22174-enc0191cceb4289903f")
                self.assertEqual(summary["pcrs"]["0"], PROD_PCRS[0])
                self.assertEqual(summary["nonce"], "01" * 1024)
                self.assertFalse(summary["insecure"])
        code, summary, _ = self.run_cli("-", "--at", POSITIVES[PROD],
                                        stdin=base64.b64encode(doc))
        self.assertEqual((code, summary["timestamp_ms"]), (0, POSITIVES[PROD]))

    def test_rejections_exit_1_with_the_step(self):
        cases = [
            ("debug", [self.write("case0", load(DEBUG).hex()), "--at-document-time"], 6),
            ("negative", [self.write("case1", load(NEGATIVE).hex()), "--at-document-time",
                          "--allow-debug"], 5),
            ("expired now", [self.write("case2", load(PROD).hex())], 4),
            ("pcr mismatch", [self.write("case3", load(PROD).hex()), "--at-document-time",
                              "--pcr", f"1={PROD_PCRS[0]}"], 6),
            ("nonce mismatch", [self.write("case4", load(PROD).hex()), "--at-document-time",
                                "--nonce", "00" * 16], 7),
            ("garbage", [self.write("case5", b"not a document at all")], 1),
        ]
        for name, argv, step in cases:
            with self.subTest(name):
                code, summary, _ = self.run_cli(*argv)
                self.assertEqual(code, 1)
                self.assertEqual((summary["verified"], summary["step"]), (False, step))
                self.assertTrue(summary["error"])
        code, summary, _ = self.run_cli(self.write("x", load(DEBUG).hex()),
                                        "--at-document-time", "--allow-debug")
        self.assertEqual((code, summary["debug"]), (0, True))

    def test_usage_errors_exit_2(self):
        doc = self.write("d.hex", load(PROD).hex())
        dev_root = self.write("dev.pem", self.root.cert_pem)
        cases = {
            "missing file": ["/nonexistent/document"],
            "bad pcr": [doc, "--pcr", "zero=00"],
            "pcr index": [doc, "--pcr", "40=00"],
            "bad nonce": [doc, "--nonce", "xyz"],
            "negative time": [doc, "--at=-5"],
            "evidence without nonce": [doc, "--evidence", "AAAA"],
            "max-age at document time": [doc, "--at-document-time", "--max-age", "5"],
            "insecure root without flag": [doc, "--root", dev_root],
            "root not pem": [doc, "--root", doc],
            "no dev root in state dir": [doc, "--allow-insecure-dev", "--state-dir",
                                         str(Path(self.state_dir) / "empty")],
            "request without response": [doc, "--request", doc],
            "bad json answer": [self.write("a.json", '{"no": "document"}')],
        }
        for name, argv in cases.items():
            with self.subTest(name):
                code, summary, err = self.run_cli(*argv)
                self.assertEqual(code, 2)
                self.assertIsNone(summary)
                self.assertTrue(err.startswith("verify: "), err)

    def test_messages(self):
        doc = self.write("m.hex", load(PROD).hex())
        debug = self.write("m-debug.hex", load(DEBUG).hex())
        pcr0 = PROD_PCRS[0]
        # (name, argv, exit code, text the message must hold)
        cases = [
            ("debug document names --allow-debug", [debug, "--at-document-time"], 1,
             "--allow-debug"),
            ("pcr too short", [doc, "--at-document-time", "--pcr", "0=abcd"], 2, "96"),
            ("pcr one digit short", [doc, "--at-document-time", "--pcr", f"0={pcr0[:-1]}"], 2,
             "96"),
            ("pcr too long", [doc, "--at-document-time", "--pcr", f"0={pcr0}00"], 2, "96"),
            ("pcr index out of range", [doc, "--pcr", f"32={pcr0}"], 2, "0..31"),
            ("negative --at says its range", [doc, "--at=-5"], 2, ">= 0"),
            ("negative --max-age says its range", [doc, "--max-age=-1"], 2, ">= 0"),
        ]
        for name, argv, expected_code, text in cases:
            with self.subTest(name):
                code, summary, err = self.run_cli(*argv)
                self.assertEqual(code, expected_code, err)
                shown = summary["error"] if code == 1 else err
                self.assertIn(text, shown)
        code, summary, err = self.run_cli(doc, "--at-document-time", "--pcr", f"0={pcr0.upper()}")
        self.assertEqual(code, 0, err)

    # -- PCR allow-lists: --pcr repeated, --pcrs FILE ------------------------------------
    def pcr_case(self, *argv):
        doc = self.write("pcr-case.hex", load(PROD).hex())
        return self.run_cli(doc, "--at-document-time", *argv)

    def test_repeated_pcr_adds_to_the_allow_list(self):
        other = "ab" * 48
        for order in ((other, PROD_PCRS[0]), (PROD_PCRS[0], other)):
            with self.subTest(order=order):
                code, summary, err = self.pcr_case(*[f"--pcr=0={v}" for v in order])
                self.assertEqual(code, 0, err or summary)
        code, summary, _ = self.pcr_case("--pcr", f"0={other}", "--pcr", f"0={'cd' * 48}")
        self.assertEqual((code, summary["step"]), (1, 6))
        self.assertIn(f"PCR0: expected one of 2 values [{other}, {'cd' * 48}], got "
                      f"{PROD_PCRS[0]}", summary["error"])
        # A repeated identical value is one value, not two.
        code, summary, _ = self.pcr_case("--pcr", f"0={other}", "--pcr", f"0={other.upper()}")
        self.assertEqual((code, summary["step"]), (1, 6))
        self.assertIn(f"PCR0: expected {other}, got", summary["error"])

    def build_output(self, pcrs: dict) -> dict:
        """The shape `nitro-cli build-enclave` prints."""
        return {"Measurements": {"HashAlgorithm": "Sha384 { ... }",
                                 **{f"PCR{i}": v for i, v in pcrs.items()}}}

    def test_pcrs_file_in_each_shape(self):
        real = {i: PROD_PCRS[i] for i in (0, 1, 2)}
        old = {i: f"{i:02x}" * 48 for i in (0, 1, 2)}
        bare = {f"PCR{i}": v for i, v in real.items()}
        accepted = {
            "build output": self.build_output(real),
            "bare map": bare,
            "bare map with HashAlgorithm": {"HashAlgorithm": "Sha384 { ... }", **bare},
            "list: old and new build": [self.build_output(old), self.build_output(real)],
            "list: new build first": [self.build_output(real), self.build_output(old)],
            "list of mixed shapes": [{f"PCR{i}": v for i, v in old.items()},
                                     self.build_output(real)],
            "upper-case hex": {"PCR0": real[0].upper()},
            "one index only": [{"PCR4": PROD_PCRS[4]}],
        }
        for name, content in accepted.items():
            with self.subTest(name):
                path = self.write("pcrs.json", json.dumps(content))
                code, summary, err = self.pcr_case("--pcrs", path)
                self.assertEqual(code, 0, err or summary)
        refused = {
            "build output of another image": self.build_output(old),
            "list without the running image": [self.build_output(old),
                                               self.build_output({0: "ee" * 48})],
            "right PCR0, wrong PCR1": {"PCR0": real[0], "PCR1": old[1]},
        }
        for name, content in refused.items():
            with self.subTest(name):
                path = self.write("pcrs.json", json.dumps(content))
                code, summary, _ = self.pcr_case("--pcrs", path)
                self.assertEqual((code, summary["step"]), (1, 6), summary)

    def test_pcrs_file_mixed_with_pcr_and_other_files(self):
        old = self.write("old.json", json.dumps(self.build_output({0: "aa" * 48})))
        new = self.write("new.json", json.dumps(self.build_output({0: PROD_PCRS[0]})))
        cases = [
            (["--pcrs", old, "--pcr", f"0={PROD_PCRS[0]}"], 0),
            (["--pcr", f"0={PROD_PCRS[0]}", "--pcrs", old], 0),
            (["--pcrs", old, "--pcrs", new], 0),
            (["--pcrs", new, "--pcr", f"1={'aa' * 48}"], 1),  # the file does not lift PCR1
            (["--pcrs", old, "--pcr", f"0={'bb' * 48}"], 1),
        ]
        for argv, expected in cases:
            with self.subTest(argv=argv):
                code, summary, err = self.pcr_case(*argv)
                self.assertEqual(code, expected, err or summary)
                if expected:
                    self.assertEqual(summary["step"], 6)

    def test_malformed_pcr_values_exit_2(self):
        good = PROD_PCRS[0]
        files = {
            "bad hex": ({"PCR0": "zz" * 48}, "hex digits"),
            "95 hex digits": ({"PCR0": good[:-1]}, "got 95"),
            "98 hex digits": (self.build_output({0: good + "00"}), "got 98"),
            "empty value": ({"PCR0": ""}, "got 0"),
            "a number": ({"PCR0": 7}, "hex digits"),
            "a list of values": ({"PCR0": [good]}, "hex digits"),
            "unknown key": ({"PCR0": good, "PCRX": good}, "unknown key 'PCRX'"),
            "lower-case key": ({"pcr0": good}, "unknown key 'pcr0'"),
            "index 32": ({"PCR32": good}, "unknown key 'PCR32'"),
            "leading zero": ({"PCR00": good}, "unknown key 'PCR00'"),
            "key beside Measurements": ({**self.build_output({0: good}), "EifVersion": 4},
                                        "unknown key 'EifVersion'"),
            "Measurements not an object": ({"Measurements": [good]}, "expected a JSON object"),
            "another hash": ({"HashAlgorithm": "Sha256 { ... }", "PCR0": good}, "Sha384"),
            "no PCRs": ({"HashAlgorithm": "Sha384 { ... }"}, "no PCR values"),
            "empty object": ({}, "no PCR values"),
            "empty list": ([], "empty"),
            "a list holding a number": ([{"PCR0": good}, 3], "[1]: expected a JSON object"),
            "a JSON string": (json.dumps(good), "expected a JSON object or list"),
            "not JSON": ("PCR0=" + good, "not a JSON PCR file"),
            "JSON then garbage": ('{"PCR0": "%s"} x' % good, "not a JSON PCR file"),
            "duplicate key": ('{"PCR0": "%s", "PCR0": "%s"}' % ("aa" * 48, good), "duplicate"),
            "NaN": ('{"PCR0": NaN}', "not a JSON PCR file"),
            "not UTF-8": (b"\xff\xfe{}", "not a JSON PCR file"),
        }
        for name, (content, text) in files.items():
            with self.subTest(name):
                if isinstance(content, (dict, list)):
                    content = json.dumps(content)
                path = self.write("bad-pcrs.json", content)
                code, summary, err = self.pcr_case("--pcrs", path, "--pcr", f"0={good}")
                self.assertEqual(code, 2, summary)
                self.assertIsNone(summary)
                self.assertTrue(err.startswith(f"verify: --pcrs {path}"), err)
                self.assertIn(text, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
        arguments = {
            "bad hex": (f"0={'zz' * 48}", "96 hex digits"),
            "wrong length": (f"0={good[:-2]}", "got 94 hex digits"),
            "no index": (good, "N=HEX"),
            "empty": ("0=", "N=HEX"),
        }
        for name, (value, text) in arguments.items():
            with self.subTest(f"--pcr {name}"):
                code, summary, err = self.pcr_case("--pcr", f"0={good}", "--pcr", value)
                self.assertEqual((code, summary), (2, None))
                self.assertIn(text, err)
        code, _, err = self.pcr_case("--pcrs", str(Path(self.state_dir) / "absent.json"))
        self.assertEqual(code, 2)
        self.assertIn("cannot read --pcrs", err)
        code, _, err = self.run_cli("-", "--pcrs", "-", stdin=b"{}")
        self.assertEqual(code, 2)
        self.assertIn("standard input", err)

    def test_argparse_rejects_at_with_at_document_time(self):
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as ctx:
            self.run_cli("x", "--at", "1", "--at-document-time")
        self.assertEqual(ctx.exception.code, 2)

    def test_challenge_answer_with_dev_root(self):
        nonce = os.urandom(32)
        answer = self.write("challenge.json", json.dumps(self.challenge(nonce)))
        code, summary, _ = self.run_cli(answer, "--allow-insecure-dev", "--state-dir",
                                        self.state_dir, "--nonce", nonce.hex(), "--max-age", "60")
        self.assertEqual(code, 0, summary)
        self.assertTrue(summary["insecure"])
        self.assertEqual(summary["evidence"]["intent"], nitro_claims.INTENT_CHALLENGE)
        self.assertEqual(summary["nonce"], nonce.hex())
        code, summary, _ = self.run_cli(answer, "--allow-insecure-dev", "--root",
                                        self.write("dev.pem", self.root.cert_pem))
        self.assertEqual(code, 0)
        self.assertIn("not checked", summary["evidence"])
        code, summary, _ = self.run_cli(answer, "--nonce", nonce.hex())
        self.assertEqual((code, summary["step"]), (1, 3))
        code, summary, _ = self.run_cli(answer, "--allow-insecure-dev", "--state-dir",
                                        self.state_dir, "--nonce", "ab" * 16)
        self.assertEqual((code, summary["step"]), (1, 8))  # the evidence is the nonce's last hope
        self.assertIn("evidence nonce", summary["error"])

    def test_document_answer_and_watermark_response(self):
        status, answer = self.service.document(mock.Mock())
        self.assertEqual(status, 200)
        doc_path = self.write("document.json", json.dumps(answer))
        request_body = b'{"text":"hi"}'
        result = {"mark": "ok", "n": [1, 2]}
        signature = self.identity.sign_claims({
            "intent": nitro_claims.INTENT_WATERMARK, "timestamp_ms": 5,
            "request_sha256": hashlib.sha256(request_body).digest(),
            "response_sha256": hashlib.sha256(nitro_claims.canonical_json(result)).digest()})
        response = self.write("response.json", json.dumps(
            {"result": result, "signature": base64.b64encode(signature).decode()}))
        request = self.write("request.json", request_body)
        base = [doc_path, "--allow-insecure-dev", "--state-dir", self.state_dir]
        code, summary, _ = self.run_cli(*base, "--response", response, "--request", request)
        self.assertEqual(code, 0, summary)
        self.assertTrue(summary["response"]["request_checked"])
        tampered = self.write("tampered.json", json.dumps(
            {"result": {**result, "mark": "forged"},
             "signature": base64.b64encode(signature).decode()}))
        code, summary, _ = self.run_cli(*base, "--response", tampered)
        self.assertEqual((code, summary["step"]), (1, 8))
        code, summary, _ = self.run_cli(*base, "--response", response, "--request",
                                        self.write("other.json", b"{}"))
        self.assertEqual((code, summary["step"]), (1, 8))


if __name__ == "__main__":
    unittest.main()
