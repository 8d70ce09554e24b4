"""Signing identity, dev PKI, attestation sources, the factory and the HTTP handlers."""

import base64
import datetime as dt
import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
import unittest
import zipfile
from dataclasses import replace
from email.message import Message
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from enclave import attestation, devpki, identity, nsm
from enclave.nitro import claims as nitro_claims
from enclave.nitro import cose
from enclave.nitro import verifier as verify
from enclave.config import ConfigError, Settings
from enclave.errors import ApiError
from enclave.metrics import Metrics
from enclave.request import Request
from enclave.nitro.verifier import AT_DOCUMENT_TIME, VerificationError, verify_document
from tests.support import challenge, keep_off_console, remember_private_key

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "nitro"
_quiet = []


def setUpModule():
    _quiet.append(keep_off_console("enclave.devpki", "enclave.attestation"))


def tearDownModule():
    while _quiet:
        _quiet.pop()()


def pem(key) -> bytes:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    remember_private_key(data, kind="signing key PEM")
    return data


def request(body=b"", method="POST") -> Request:
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return Request(method, "/v1/attestation/challenge", "/v1/attestation/challenge", {},
                   Message(), body)


class FakeClock:
    def __init__(self, start: float | None = None):
        self.now = start if start is not None else 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class TempStateCase(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.state_dir = Path(tmp.name)


class TestSigningIdentity(unittest.TestCase):
    def test_key_types(self):
        for key, alg in ((ed25519.Ed25519PrivateKey.generate(), cose.ALG_EDDSA),
                         (ec.generate_private_key(ec.SECP384R1()), cose.ALG_ES384)):
            with self.subTest(alg=alg):
                ident = identity.SigningIdentity.from_pem(pem(key))
                self.assertEqual(ident.alg, alg)
                self.assertEqual(ident.public_key_der, key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
                self.assertNotIn("PRIVATE", repr(ident))

    def test_unusable_keys_are_clear_errors(self):
        encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"))
        remember_private_key(encrypted, kind="encrypted private key PEM")
        cases = {
            "rsa": (pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
                    "not supported"),
            "p-256": (pem(ec.generate_private_key(ec.SECP256R1())), "secp256r1"),
            "garbage": (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                        "not a readable PEM"),
            "encrypted": (encrypted, "encrypted keys are not supported"),
        }
        for name, (data, message) in cases.items():
            with self.subTest(name), self.assertRaisesRegex(identity.IdentityError, message):
                identity.SigningIdentity.from_pem(data)

    def test_sign_and_verify_claims(self):
        for kind in ("ed25519", "p384"):
            with self.subTest(kind):
                ident = identity.SigningIdentity.generate(kind)
                signed = ident.sign_claims({"intent": "test/v1", "n": 1})
                self.assertEqual(nitro_claims.verify_claims(signed, ident.public_key_der, "test/v1"),
                                 {"intent": "test/v1", "n": 1})

    def test_verify_claims_failures(self):
        ident = identity.SigningIdentity.generate()
        other = identity.SigningIdentity.generate("p384")
        signed = ident.sign_claims({"intent": "test/v1"})
        prot, unprot, payload, sig = cbor2.loads(signed)
        cases = {
            "wrong intent": (signed, ident.public_key_der, "intent: expected 'other/v1'"),
            "wrong key": (signed, identity.SigningIdentity.generate().public_key_der,
                          "does not verify"),
            "key of another type": (signed, other.public_key_der, "does not match the key"),
            "tampered payload": (cbor2.dumps([prot, unprot, cbor2.dumps({"intent": "other/v1"}),
                                              sig]), ident.public_key_der, "does not verify"),
            "extra protected header": (cbor2.dumps([cbor2.dumps({1: -8, 4: b"k"}), unprot,
                                                    payload, sig]),
                                       ident.public_key_der, "protected header"),
            "not a key": (signed, b"\x01" * 1024, "not a DER SubjectPublicKeyInfo"),
            "not cose": (b"\x00", ident.public_key_der, "expected a 4-element"),
        }
        for name, (data, key, message) in cases.items():
            intent = "other/v1" if name == "wrong intent" else "test/v1"
            with self.subTest(name), self.assertRaisesRegex(nitro_claims.ClaimsError, message):
                nitro_claims.verify_claims(data, key, intent)

    def test_canonical_json(self):
        self.assertEqual(nitro_claims.canonical_json({"b": [1, 2.5], "a": "\u00e9"}),
                         '{"a":"\u00e9","b":[1,2.5]}'.encode("utf-8"))


class TestDevPki(TempStateCase):
    def test_root_is_persistent_private_and_says_insecure(self):
        first = devpki.load_or_create_root(self.state_dir)
        second = devpki.load_or_create_root(self.state_dir)
        self.assertEqual(first.cert_der, second.cert_der)
        directory = self.state_dir / "dev-attestation"
        self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE((directory / "root.key").stat().st_mode), 0o600)
        self.assertIn("INSECURE", first.cert.subject.rfc4514_string())
        self.assertIsInstance(first.key.curve, ec.SECP384R1)
        self.assertEqual(devpki.read_root_pem(self.state_dir), first.cert_pem)

    def test_corrupt_root_is_a_clear_error(self):
        devpki.load_or_create_root(self.state_dir)
        (self.state_dir / "dev-attestation" / "root.key").write_bytes(
            pem(ec.generate_private_key(ec.SECP384R1())))
        with self.assertRaisesRegex(devpki.DevPkiError, "does not match"):
            devpki.load_or_create_root(self.state_dir)

    def test_leaf_looks_like_a_nitro_leaf(self):
        root = devpki.load_or_create_root(self.state_dir)
        moment = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
        leaf = devpki.issue_leaf(root, moment.timestamp())
        cert = leaf.cert
        cert.verify_directly_issued_by(root.cert)
        self.assertEqual(cert.not_valid_after_utc - moment, devpki.LEAF_LIFETIME)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertFalse(bc.value.ca)
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.digital_signature)
        self.assertFalse(ku.key_cert_sign)


class DevShimCase(TempStateCase):
    def setUp(self):
        super().setUp()
        self.clock = FakeClock(dt.datetime.now(dt.timezone.utc).timestamp())
        self.root = devpki.load_or_create_root(self.state_dir)
        self.identity = identity.SigningIdentity.generate()
        self.source = attestation.DevShimSource(self.identity, self.root, clock=self.clock)
        self.metrics = Metrics()
        self.service = attestation.AttestationService(
            attestation.Attestation(self.identity, self.source), self.metrics, clock=self.clock)

    def verify(self, document, **kw):
        kw.setdefault("at_ms", int(self.clock() * 1000))
        return verify_document(document, roots=[self.root.cert_der], **kw)


class TestDevShimSource(DevShimCase):
    def test_exact_nitro_shape(self):
        document = self.source.document(b"n" * 20, b"u")
        self.assertEqual(document[0], 0x84)  # untagged COSE_Sign1 like the NSM's
        protected, unprotected, payload, signature = cbor2.loads(document)
        self.assertEqual((protected, unprotected, len(signature)),
                         (bytes.fromhex("a1013822"), {}, 96))
        fields = cbor2.loads(payload)
        self.assertEqual(cbor2.dumps(fields), payload)  # plain definite-length CBOR map
        self.assertEqual(list(fields), list(verify.DOCUMENT_FIELDS))
        self.assertTrue(fields["module_id"].startswith("dev-shim"))
        self.assertEqual(fields["digest"], "SHA384")
        self.assertEqual(fields["timestamp"], int(self.clock() * 1000))
        self.assertEqual(sorted(fields["pcrs"]), list(range(16)))
        self.assertTrue(all(len(v) == 48 for v in fields["pcrs"].values()))
        self.assertEqual(fields["pcrs"][0], attestation.measure_code())
        self.assertEqual(fields["cabundle"], [self.root.cert_der])
        self.assertEqual(fields["public_key"], self.identity.public_key_der)
        self.assertEqual((fields["nonce"], fields["user_data"]), (b"n" * 20, b"u"))
        self.assertIsNone(cbor2.loads(cbor2.loads(self.source.document())[2])["nonce"])

    def test_round_trip_with_and_without_the_dev_root(self):
        nonce = os.urandom(16)
        doc = self.verify(self.source.document(nonce), expected_nonce=nonce, max_age_ms=1000)
        self.assertEqual(doc.public_key, self.identity.public_key_der)
        with self.assertRaises(VerificationError) as ctx:
            verify_document(self.source.document(nonce), roots=[verify.nitro_root_der()],
                            at_ms=int(self.clock() * 1000))
        self.assertEqual(ctx.exception.step, 3)

    def test_leaf_is_renewed_before_it_expires(self):
        first = cbor2.loads(cbor2.loads(self.source.document())[2])["certificate"]
        self.clock.now += 2.5 * 3600
        document = self.source.document()
        self.assertNotEqual(cbor2.loads(cbor2.loads(document)[2])["certificate"], first)
        self.verify(document)  # verifiable at the (advanced) current time

    def test_code_measurement_of_a_source_tree(self):
        package = self.state_dir / "pkg"
        (package / "sub").mkdir(parents=True)
        (package / "b.py").write_bytes(b"b = 2\n")
        (package / "sub" / "a.py").write_bytes(b"a = 1\n")
        (package / "data.pem").write_bytes(b"not code")
        digest = hashlib.sha384()
        for name, content in ((b"pkg/b.py", b"b = 2\n"), (b"pkg/sub/a.py", b"a = 1\n")):
            digest.update(len(name).to_bytes(8, "big") + name)
            digest.update(len(content).to_bytes(8, "big") + content)
        self.assertEqual(attestation.measure_tree(package), digest.digest())
        self.assertEqual(len(attestation.measure_code()), 48)  # this checkout, once per process

    def test_zipapp_measures_itself_and_reads_the_bundled_root(self):
        archive = self.state_dir / "enclave.pyz"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted((ROOT / "enclave").rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    zf.write(path, path.relative_to(ROOT).as_posix())
        script = ("import sys; sys.path.insert(0, sys.argv[1]); "
                  "from enclave import attestation; from enclave.nitro import verifier as verify; "
                  "print(attestation.measure_code().hex(), verify.nitro_root_der().hex())")
        out = subprocess.run([sys.executable, "-c", script, str(archive)], cwd=self.state_dir,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        measured, root = out.split()
        self.assertEqual(measured, hashlib.sha384(archive.read_bytes()).hexdigest())
        self.assertEqual(bytes.fromhex(root), verify.nitro_root_der())


class TestStaticSource(DevShimCase):
    def test_matching_key_constructs(self):
        document = self.source.document()
        for origin, make in (
                ("inline", lambda: attestation.StaticSource.from_base64(
                    base64.b64encode(document).decode(), self.identity)),
                ("raw file", lambda: attestation.StaticSource.from_file(
                    self.write("doc.cbor", document), self.identity)),
                ("base64 file", lambda: attestation.StaticSource.from_file(
                    self.write("doc.b64", base64.b64encode(document) + b"\n"), self.identity))):
            with self.subTest(origin):
                source = make()
                self.assertEqual((source.name, source.nonce_bound, source.insecure),
                                 ("static", False, True))
                self.assertEqual(source.document(b"ignored" * 4), document)

    def write(self, name, data: bytes) -> str:
        path = self.state_dir / name
        path.write_bytes(data)
        return str(path)

    def test_mismatching_key_raises(self):
        real = (DATA / "blocky_nitrite_nitro_attestation.b64").read_text()
        cases = {
            "other identity": lambda: attestation.StaticSource(
                self.source.document(), identity.SigningIdentity.generate()),
            "real Nitro document": lambda: attestation.StaticSource.from_base64(
                real, self.identity),
            "not base64": lambda: attestation.StaticSource.from_base64("%%%", self.identity),
            "not a document": lambda: attestation.StaticSource(b"\x84\x01", self.identity),
            "missing file": lambda: attestation.StaticSource.from_file("/nonexistent",
                                                                       self.identity),
        }
        for name, make in cases.items():
            with self.subTest(name), self.assertRaises(attestation.AttestationConfigError) as ctx:
                make()
            self.assertIsInstance(ctx.exception, ConfigError)
        with self.assertRaisesRegex(attestation.AttestationConfigError, "does not match"):
            attestation.StaticSource.from_base64(real, self.identity)


class TestBuildAttestation(TempStateCase):
    def settings(self, **kw) -> Settings:
        return replace(Settings(state_dir=self.state_dir), **kw)

    def test_dev_shim_default(self):
        att = attestation.build_attestation(self.settings())
        self.assertEqual((att.name, att.insecure), ("dev-shim", True))
        self.assertTrue(att.identity.generated)
        root = devpki.load_or_create_root(self.state_dir)
        verify_document(att.source.document(), roots=[root.cert_der], at_ms=AT_DOCUMENT_TIME)

    def test_configured_key_is_used(self):
        key = ec.generate_private_key(ec.SECP384R1())
        att = attestation.build_attestation(self.settings(signing_private_key_pem=pem(key)))
        self.assertEqual(att.identity.alg, cose.ALG_ES384)
        self.assertFalse(att.identity.generated)

    def test_static_document(self):
        key = ed25519.Ed25519PrivateKey.generate()
        shim = attestation.build_attestation(self.settings(signing_private_key_pem=pem(key)))
        path = self.state_dir / "doc.b64"
        path.write_bytes(base64.b64encode(shim.source.document()))
        settings = self.settings(mode="remote", signing_private_key_pem=pem(key),
                                 attestation_document_path=str(path))
        self.assertEqual(attestation.build_attestation(settings).name, "static")
        with self.assertRaisesRegex(attestation.AttestationConfigError, "rejected: step 3"):
            attestation.build_attestation(replace(settings, attestation_required=True,
                                                  allow_insecure_dev_attestation=False))
        with self.assertRaisesRegex(attestation.AttestationConfigError, "does not match"):
            attestation.build_attestation(replace(settings, signing_private_key_pem=None))

    def test_misconfigurations(self):
        cases = {
            "disabled": (self.settings(mode="disabled"), "disabled"),
            "remote without a document": (self.settings(mode="remote"), "requires"),
            "dev-shim with attestation required": (self.settings(attestation_required=True),
                                                   "dev-shim requires"),
            "unusable key": (self.settings(signing_private_key_pem=b"nope"), "not a readable"),
            "no nsm device": (self.settings(mode="remote", attestation_document_path="/dev/nsm"),
                              "cannot open"),
        }
        for name, (settings, message) in cases.items():
            with self.subTest(name):
                with self.assertRaisesRegex(attestation.AttestationConfigError, message):
                    attestation.build_attestation(
                        settings, nsm_open=lambda p: nsm.NsmDevice("/nonexistent/nsm"))


class TestAttestationService(DevShimCase):
    def test_document_endpoint_shape_and_cache(self):
        status, body = self.service.document(request(method="GET"))
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"format", "document", "public_key", "module_id",
                                     "timestamp_ms", "pcrs", "insecure"})
        self.assertEqual((body["format"], body["insecure"]), ("dev-shim", True))
        self.assertEqual(base64.b64decode(body["public_key"]), self.identity.public_key_der)
        self.assertEqual(sorted(body["pcrs"], key=int), [str(i) for i in range(16)])
        self.assertEqual(body["pcrs"]["0"], attestation.measure_code().hex())
        doc = self.verify(base64.b64decode(body["document"]))
        self.assertEqual((doc.module_id, doc.timestamp_ms), (body["module_id"],
                                                             body["timestamp_ms"]))
        self.clock.now += 1
        self.assertEqual(self.service.document(request(method="GET"))[1], body)  # cached
        self.clock.now += attestation.DOCUMENT_CACHE_SECONDS
        fresh = self.service.document(request(method="GET"))[1]
        self.assertGreater(fresh["timestamp_ms"], body["timestamp_ms"])
        self.assertEqual(self.metrics.value("enclave_attestation_documents_total", {
            "endpoint": "document", "source": "dev-shim", "outcome": "cached"}), 1)

    def test_challenge(self):
        nonce = os.urandom(32)
        status, body = challenge(self.service, request(
            {"nonce": base64.b64encode(nonce).decode(), "user_data": "aGk="}))
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"nonce", "document", "nonce_bound_document", "evidence",
                                     "public_key"})
        self.assertEqual(base64.b64decode(body["nonce"]), nonce)
        self.assertTrue(body["nonce_bound_document"])
        doc = self.verify(base64.b64decode(body["document"]), expected_nonce=nonce,
                          evidence=base64.b64decode(body["evidence"]), max_age_ms=1000)
        self.assertEqual(doc.user_data, b"hi")
        self.assertEqual(doc.evidence["timestamp_ms"], int(self.clock() * 1000))

    def test_challenge_bad_input(self):
        b64 = (lambda n: base64.b64encode(bytes(n)).decode())
        cases = {
            "missing nonce": ({}, "invalid_nonce"),
            "nonce not a string": ({"nonce": 5}, "invalid_nonce"),
            "nonce not base64": ({"nonce": "!!!!" * 8}, "invalid_nonce"),
            "nonce too short": ({"nonce": b64(15)}, "invalid_nonce"),
            "nonce too long": ({"nonce": b64(65)}, "invalid_nonce"),
            "user_data too long": ({"nonce": b64(16), "user_data": b64(513)},
                                   "invalid_user_data"),
            "user_data not base64": ({"nonce": b64(16), "user_data": "@"}, "invalid_user_data"),
            "malformed json": (b"{", "malformed_json"),
            "not an object": (b"[]", "invalid_request"),
        }
        for name, (body, code) in cases.items():
            with self.subTest(name), self.assertRaises(ApiError) as ctx:
                challenge(self.service, request(body))
            self.assertEqual((ctx.exception.status, ctx.exception.code), (400, code))

    def test_static_source_challenge_binds_the_nonce_in_the_evidence(self):
        static = attestation.StaticSource(self.source.document(), self.identity)
        service = attestation.AttestationService(attestation.Attestation(self.identity, static),
                                                 clock=self.clock)
        nonce = os.urandom(16)
        _, body = challenge(service, request({"nonce": base64.b64encode(nonce).decode()}))
        self.assertFalse(body["nonce_bound_document"])
        doc = self.verify(base64.b64decode(body["document"]), expected_nonce=nonce,
                          evidence=base64.b64decode(body["evidence"]))
        self.assertEqual(doc.nonce_bound_by, "evidence")
        self.assertEqual(service.document(request(method="GET"))[1]["format"], "dev-shim")
        self.assertEqual(service.health(), {"source": "static", "insecure": True})

    def test_static_source_binds_user_data_in_the_evidence(self):
        static = attestation.StaticSource(self.source.document(), self.identity)
        service = attestation.AttestationService(attestation.Attestation(self.identity, static),
                                                 clock=self.clock)
        b64 = (lambda b: base64.b64encode(b).decode())
        # (name, user_data sent, user_data the verified evidence must carry)
        cases = [("given", b"bind me to this challenge", b"bind me to this challenge"),
                 ("empty", b"", b""), ("absent", None, None)]
        for name, sent, bound in cases:
            with self.subTest(name):
                nonce = os.urandom(16)
                body = {"nonce": b64(nonce)}
                if sent is not None:
                    body["user_data"] = b64(sent)
                status, answer = challenge(service, request(body))
                self.assertEqual(status, 200)
                self.assertFalse(answer["nonce_bound_document"])
                doc = self.verify(base64.b64decode(answer["document"]), expected_nonce=nonce,
                                  evidence=base64.b64decode(answer["evidence"]))
                self.assertIsNone(doc.user_data)  # the static document itself binds nothing
                self.assertEqual(doc.evidence.get("user_data"), bound)
                shown = doc.summary()["evidence"]["user_data"]
                self.assertEqual(shown, None if bound is None else b64(bound))

    def test_evidence_user_data_must_be_bytes(self):
        document = self.source.document()
        nonce = os.urandom(16)
        for name, value in (("not bytes", "text"), ("too long", b"u" * 1025)):
            with self.subTest(name):
                evidence = self.identity.sign_claims({
                    "intent": nitro_claims.INTENT_CHALLENGE, "nonce": nonce,
                    "document_sha384": hashlib.sha384(document).digest(),
                    "timestamp_ms": int(self.clock() * 1000), "user_data": value})
                with self.assertRaises(VerificationError) as ctx:
                    self.verify(document, expected_nonce=nonce, evidence=evidence)
                self.assertEqual(ctx.exception.step, 8)
                self.assertIn("user_data", str(ctx.exception))

    def test_source_failure_is_503(self):
        class Broken(attestation.AttestationSource):
            name, nonce_bound = "nsm", True

            def document(self, nonce=None, user_data=None):
                raise attestation.AttestationError("NSM answered Error: 'InternalError'")

            def ready(self):
                return False

        service = attestation.AttestationService(attestation.Attestation(self.identity, Broken()),
                                                 self.metrics)
        for call in (lambda: service.document(request(method="GET")),
                     lambda: challenge(service, request({"nonce": "A" * 24}))):
            with self.assertRaises(ApiError) as ctx, self.assertLogs("enclave.attestation"):
                call()
            self.assertEqual((ctx.exception.status, ctx.exception.code),
                             (503, "attestation_unavailable"))
        self.assertFalse(service.ready())
        self.assertEqual(self.metrics.value("enclave_attestation_documents_total", {
            "endpoint": "challenge", "source": "nsm", "outcome": "error"}), 1)

    def test_health_and_ready(self):
        self.assertEqual(self.service.health(), {"source": "dev-shim", "insecure": True})
        self.assertTrue(self.service.ready())


if __name__ == "__main__":
    unittest.main()
