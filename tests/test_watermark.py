"""Watermark RPC end to end: secrets over the listener, mTLS upstream, signed result, rotation."""

import base64
import hashlib
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from enclave.nitro.claims import INTENT_WATERMARK, canonical_json, sha256, verify_claims
from enclave.rpcauth import new_nonce, sign_request
from tests.fakes.pki import TestCA
from tests.stack import LocalStack
from tests.support import scan_later

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"document_id": "doc-42", "user": "alice@example.com"}).encode()


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def raw_rpc(stack, body=BODY):
    """(status, headers, body bytes) of a signed watermark RPC, the body left unparsed."""
    target = "/v1/rpc/watermark"
    headers = {"Content-Type": "application/json",
               **sign_request(stack.secret, "POST", target, body, int(time.time()), new_nonce())}
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.request("POST", target, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def strict_json(data: bytes):
    """What any JSON client accepts: UTF-8 (no lone surrogate) and no NaN/Infinity."""
    return json.loads(data.decode("utf-8"), parse_constant=_no_constant)


class EndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = LocalStack(google=False)

    @classmethod
    def tearDownClass(cls):
        cls.stack.close()

    def setUp(self):
        self.stack.fake_wm.mode = "ok"

    def rpc(self, body=BODY):
        return self.stack.call("POST", "/v1/rpc/watermark", body)

    def test_1_before_secrets_the_rpc_answers_503(self):
        status, body = self.rpc()
        self.assertEqual((status, body["error"]["code"], body["error"]["missing"]),
                         (503, "not_ready", ["mtls"]))
        status, health = self.stack.call("GET", "/healthz?ready=1", sign=False)
        self.assertEqual((status, health["status"], health["ready"]), (503, "degraded", False))

    def test_1b_health_shows_a_delivery_at_once(self):
        self.stack.call("GET", "/healthz", sign=False)  # an answer is cached for this state
        ack = self.stack.deliver(self.stack.mtls_payload())
        self.assertTrue(ack["ok"], ack)
        status, health = self.stack.call("GET", "/healthz?ready=1", sign=False)
        self.assertEqual((status, health["status"], health["ready"]), (200, "ok", True))
        self.assertEqual(health["secrets"]["version"], ack["version"])
        self.assertTrue(health["mtls"]["configured"])
        self.assertIsNotNone(health["mtls"]["not_after"])

    def test_2_delivered_certificates_signed_answer_verified_by_the_cli(self):
        ack = self.stack.deliver(self.stack.mtls_payload())
        self.assertTrue(ack["ok"], ack)
        status, answer = self.rpc()
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["result"]["client"], "enclave-client-1")
        # the signature checks under the attested public key, over the documented claims
        status, doc = self.stack.call("GET", "/v1/attestation/document", sign=False)
        public_key = base64.b64decode(doc["public_key"])
        claims = verify_claims(base64.b64decode(answer["signature"]), public_key, INTENT_WATERMARK)
        self.assertEqual(claims["request_sha256"], sha256(BODY))
        self.assertEqual(claims["response_sha256"], sha256(canonical_json(answer["result"])))
        # and the verify command checks it against the verified dev-shim document
        with tempfile.TemporaryDirectory() as d:
            doc_file, answer_file, request_file = (Path(d, n) for n in ("doc.json", "a.json", "r.json"))
            doc_file.write_text(json.dumps(doc))
            answer_file.write_text(json.dumps(answer))
            request_file.write_bytes(BODY)
            base = [sys.executable, str(ROOT / "enclave.py"), "verify", str(doc_file),
                    "--allow-insecure-dev", "--state-dir", str(self.stack.settings.state_dir),
                    "--response", str(answer_file), "--request", str(request_file)]
            ok = subprocess.run(base, capture_output=True, text=True, timeout=60, cwd=ROOT)
            scan_later(ok.stderr, "enclave.py verify stderr")
            self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
            tampered = dict(answer, result=dict(answer["result"], watermark="0" * 64))
            answer_file.write_text(json.dumps(tampered))
            bad = subprocess.run(base, capture_output=True, text=True, timeout=60, cwd=ROOT)
            scan_later(bad.stderr, "enclave.py verify stderr")
            self.assertEqual(bad.returncode, 1, bad.stdout + bad.stderr)

    def test_3_failure_table(self):
        self.assertTrue(self.stack.deliver(self.stack.mtls_payload())["ok"])
        cases = [
            ("upstream 500", "error500", 502, "upstream_error"),
            ("upstream non-JSON", "non_json", 502, "upstream_invalid_response"),
            ("lone surrogate", "lone_surrogate", 502, "upstream_invalid_response"),
            ("NaN", "nan", 502, "upstream_invalid_response"),
            ("-Infinity", "infinity", 502, "upstream_invalid_response"),
            ("1e999 (parses to inf)", "huge_float", 502, "upstream_invalid_response"),
            ("nesting 100k deep", "deep", 502, "upstream_invalid_response"),
        ]
        for name, mode, status, code in cases:
            with self.subTest(name):
                self.stack.fake_wm.mode = mode
                got, headers, raw = raw_rpc(self.stack)
                body = strict_json(raw)  # always valid JSON, whatever the upstream sent
                self.assertEqual((got, body["error"]["code"]), (status, code))
                if mode == "error500":
                    self.assertEqual(headers.get("X-Upstream-Status"), "500")
                    self.assertEqual(body["error"]["upstream_status"], 500)
        self.stack.fake_wm.mode = "ok"
        with self.subTest("request body that is not JSON"):
            got, body = self.rpc(b"not json")
            self.assertEqual((got, body["error"]["code"]), (400, "malformed_json"))
        with self.subTest("unsigned"):
            got, body = self.stack.call("POST", "/v1/rpc/watermark", BODY, sign=False)
            self.assertEqual((got, body["error"]["code"]), (401, "unauthorized"))
        with self.subTest("body over 1 MiB"):
            got, body = self.rpc(b'{"x": "' + b"a" * (1024 * 1024) + b'"}')
            self.assertEqual((got, body["error"]["code"]), (413, "body_too_large"))
        with self.subTest("a body over 64 KiB but under 1 MiB is accepted"):
            got, body = self.rpc(json.dumps({"x": "a" * 200_000}).encode())
            self.assertEqual(got, 200, body)


class Failures(unittest.TestCase):
    def test_unreachable_upstream_is_upstream_unavailable(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with LocalStack(google=False) as stack:
            payload = stack.mtls_payload(endpoint=f"https://127.0.0.1:{port}")
            self.assertTrue(stack.deliver(payload)["ok"])
            status, _, raw = raw_rpc(stack)
            self.assertEqual((status, strict_json(raw)["error"]["code"]),
                             (502, "upstream_unavailable"))

    def test_no_endpoint_yet(self):
        with LocalStack(google=False) as stack:
            payload = stack.mtls_payload()
            del payload["ECS_WATERMARK_ENDPOINT"]
            self.assertTrue(stack.deliver(payload)["ok"])
            status, body = stack.call("POST", "/v1/rpc/watermark", BODY)
            self.assertEqual((status, body["error"]["code"], body["error"]["missing"]),
                             (503, "not_ready", ["mtls"]))

    def test_wrong_ca_answers_upstream_tls_error(self):
        with LocalStack(google=False) as stack:
            other = TestCA("Some Other CA")
            self.assertTrue(stack.deliver(stack.mtls_payload(ca_pem=other.cert_pem))["ok"])
            status, body = stack.call("POST", "/v1/rpc/watermark", BODY)
            self.assertEqual((status, body["error"]["code"]), (502, "upstream_tls_error"))

    def test_hanging_upstream_answers_504_within_the_deadline(self):
        with LocalStack(google=False) as stack:
            stack.running.runtime.watermark.timeout_s = 1.0
            stack.fake_wm.mode = "hang"
            self.assertTrue(stack.deliver(stack.mtls_payload())["ok"])
            status, body = stack.call("POST", "/v1/rpc/watermark", BODY, timeout=15)
            self.assertEqual((status, body["error"]["code"]), (504, "upstream_timeout"))
            # the server stays responsive
            status, _ = stack.call("GET", "/healthz", sign=False)
            self.assertEqual(status, 200)
            stack.fake_wm.release.set()


class Rotation(unittest.TestCase):
    def test_rotation_to_a_rejected_certificate_and_back_without_restart(self):
        with LocalStack(google=False) as stack:
            good = stack.client
            self.assertTrue(stack.deliver(stack.mtls_payload(good))["ok"])
            status, answer = stack.call("POST", "/v1/rpc/watermark", BODY)
            self.assertEqual((status, answer["result"]["client"]), (200, "enclave-client-1"))

            second = stack.ca.issue("enclave-client-2")
            ack = stack.deliver(stack.mtls_payload(second))
            self.assertTrue(ack["ok"], ack)
            status, answer = stack.call("POST", "/v1/rpc/watermark", BODY)
            self.assertEqual((status, answer["result"]["client"]), (200, "enclave-client-2"))
            second_der = second.cert.public_bytes(serialization.Encoding.DER)
            self.assertEqual(stack.fake_wm.clients[-1][0], hashlib.sha256(second_der).hexdigest())

            # a valid certificate that the service rejects: the delivery is accepted...
            rejected = stack.ca.issue("enclave-client-rejected")
            stack.fake_wm.reject(rejected.cert)
            ack = stack.deliver(stack.mtls_payload(rejected))
            self.assertTrue(ack["ok"], ack)
            # ...but the RPC answers 502 upstream_tls_error
            status, body = stack.call("POST", "/v1/rpc/watermark", BODY)
            self.assertEqual((status, body["error"]["code"]), (502, "upstream_tls_error"))

            # delivering the good one again recovers, with no restart
            self.assertTrue(stack.deliver(stack.mtls_payload(second))["ok"])
            status, answer = stack.call("POST", "/v1/rpc/watermark", BODY)
            self.assertEqual((status, answer["result"]["client"]), (200, "enclave-client-2"))


if __name__ == "__main__":
    unittest.main()
