"""RPC authentication (docs/DESIGN.md §7): headers, formats, skew, MAC, secrets, replay cache."""

import json
import unittest
from email.message import Message

from enclave.errors import RpcSecretNotReady
from enclave.rpcauth import LOCAL_DEFAULT_RPC_SECRET
from enclave.errors import ApiError
from enclave.metrics import Metrics
from enclave.rpcauth import (AUTH_FAILURES_METRIC, HEADER_NONCE, HEADER_SIGNATURE,
                             HEADER_TIMESTAMP, AuthError, ReplayCacheFull, RpcAuthenticator,
                             new_nonce, sign_request, string_to_sign)
from tests.support import remember_secret

SECRET = "test-secret-0123456789abcdef0123456789"
OLD_SECRET = "old-secret-0123456789abcdef0123456789a"
remember_secret(SECRET, OLD_SECRET, "another-secret-" + "x" * 32, "wrong-" + "y" * 40,
                kind="rpc shared secret")
NOW = 1_700_000_000
SKEW = 30
GRACE_S = 300
TARGET = "/v1/rpc/google/token/exchange?x=1"
BODY = b'{"code":"abc"}'

# Known answer computed with the openssl CLI, independently of this code:
#   h=$(printf '{"code":"abc"}' | openssl dgst -sha256 -r | cut -d' ' -f1)
#   printf '%s\n%s\n%s\n%s\n%s\n%s' ENCLAVE-HMAC-SHA256 POST '/v1/rpc/google/token/exchange?x=1' \
#       1700000000 AAAAAAAAAAAAAAAAAAAAAA "$h" | openssl dgst -sha256 -hmac "$SECRET" -r
VECTOR_BODY_SHA256 = "18a0e82f72676e2882adfdeec381a71361ae009bf222d2311ddc40f5ae2c7424"
VECTOR_SIGNATURE = "5ba31cf683a87e9cdd3f385ffad26c81a63420845a4987a662d468fdd2b97e53"


def message(pairs) -> Message:
    """Headers as the server sees them (email.message.Message keeps duplicates)."""
    msg = Message()
    for name, value in pairs:
        msg[name] = value
    return msg


def signed_pairs(method="POST", target=TARGET, body=BODY, ts=NOW, nonce=None, secret=SECRET):
    return list(sign_request(secret, method, target, body, ts, nonce or new_nonce()).items())


class Fixture(unittest.TestCase):
    def setUp(self):
        self.metrics = Metrics()
        self.rotated_at = None  # when set: OLD_SECRET valid until rotated_at + GRACE_S
        self.auth = RpcAuthenticator(self.secrets, SKEW, self.metrics)

    def secrets(self, now):
        out = [SECRET]
        if self.rotated_at is not None and now < self.rotated_at + GRACE_S:
            out.append(OLD_SECRET)
        return out

    def check(self, pairs, method="POST", target=TARGET, body=BODY, now=NOW, auth=None):
        auth = auth or self.auth
        pending = auth.precheck(method, target, message(pairs), now)
        auth.finish(pending, body, now)

    def assertRejected(self, reason, pairs, **kwargs):
        with self.assertRaises(ApiError) as ctx:
            self.check(pairs, **kwargs)
        exc = ctx.exception
        # Every rejection is the same type and the same answer; only the reason differs.
        self.assertIs(type(exc), AuthError)
        self.assertEqual((exc.status, exc.body()),
                         (401, {"error": {"code": "unauthorized",
                                          "message": "request authentication failed"}}))
        self.assertEqual(exc.reason, reason)


class StringToSignTest(unittest.TestCase):
    def test_known_answer_from_openssl(self):
        text = string_to_sign("POST", TARGET, NOW, "A" * 22, BODY)
        self.assertEqual(text, "\n".join(["ENCLAVE-HMAC-SHA256", "POST", TARGET, str(NOW),
                                          "A" * 22, VECTOR_BODY_SHA256]))
        headers = sign_request(SECRET, "POST", TARGET, BODY, NOW, "A" * 22)
        self.assertEqual(headers, {HEADER_TIMESTAMP: str(NOW), HEADER_NONCE: "A" * 22,
                                   HEADER_SIGNATURE: "v1=" + VECTOR_SIGNATURE})

    def test_new_nonce_format(self):
        nonce = new_nonce()
        self.assertRegex(nonce, r"^[A-Za-z0-9_-]{22,64}$")
        self.assertNotEqual(nonce, new_nonce())


class HeaderTableTest(Fixture):
    def test_rejections(self):
        good = dict(signed_pairs(nonce="N" * 22))
        sig = good[HEADER_SIGNATURE]

        def without(name):
            return [(k, v) for k, v in good.items() if k != name]

        def replaced(name, value):
            return [(k, value if k == name else v) for k, v in good.items()]

        def doubled(name):
            return list(good.items()) + [(name, good[name])]

        cases = [
            ("missing timestamp", "missing_header", without(HEADER_TIMESTAMP)),
            ("missing nonce", "missing_header", without(HEADER_NONCE)),
            ("missing signature", "missing_header", without(HEADER_SIGNATURE)),
            ("no headers at all", "missing_header", []),
            ("duplicated timestamp", "duplicate_header", doubled(HEADER_TIMESTAMP)),
            ("duplicated nonce", "duplicate_header", doubled(HEADER_NONCE)),
            ("duplicated signature", "duplicate_header", doubled(HEADER_SIGNATURE)),
            ("timestamp letters", "malformed_timestamp", replaced(HEADER_TIMESTAMP, "abc")),
            ("timestamp negative", "malformed_timestamp", replaced(HEADER_TIMESTAMP, "-1700000000")),
            ("timestamp fraction", "malformed_timestamp", replaced(HEADER_TIMESTAMP, "1700000000.5")),
            ("timestamp 13 digits", "malformed_timestamp", replaced(HEADER_TIMESTAMP, "1" * 13)),
            ("timestamp empty", "malformed_timestamp", replaced(HEADER_TIMESTAMP, "")),
            ("timestamp non-ASCII digits", "malformed_timestamp",
             replaced(HEADER_TIMESTAMP, "١٧٠٠٠٠٠٠٠٠")),
            ("timestamp in milliseconds", "malformed_timestamp",
             replaced(HEADER_TIMESTAMP, str(NOW * 1000))),
            ("timestamp far future", "future", replaced(HEADER_TIMESTAMP, "9" * 12)),
            ("nonce 21 chars", "malformed_nonce", replaced(HEADER_NONCE, "N" * 21)),
            ("nonce 65 chars", "malformed_nonce", replaced(HEADER_NONCE, "N" * 65)),
            ("nonce base64 padding", "malformed_nonce", replaced(HEADER_NONCE, "N" * 22 + "==")),
            ("nonce plus and slash", "malformed_nonce", replaced(HEADER_NONCE, "N" * 20 + "+/")),
            ("nonce inner space", "malformed_nonce", replaced(HEADER_NONCE, "N" * 11 + " " + "N" * 11)),
            ("signature upper-case hex", "malformed_signature",
             replaced(HEADER_SIGNATURE, "v1=" + sig[3:].upper())),
            ("signature v2", "malformed_signature", replaced(HEADER_SIGNATURE, "v2" + sig[2:])),
            ("signature no version", "malformed_signature", replaced(HEADER_SIGNATURE, sig[3:])),
            ("signature 63 hex", "malformed_signature", replaced(HEADER_SIGNATURE, sig[:-1])),
            ("signature 65 hex", "malformed_signature", replaced(HEADER_SIGNATURE, sig + "0")),
            ("signature base64", "malformed_signature",
             replaced(HEADER_SIGNATURE, "v1=" + "A" * 43 + "=")),
            ("signature two values", "malformed_signature",
             replaced(HEADER_SIGNATURE, sig + ",v1=" + "0" * 64)),
        ]
        for name, reason, pairs in cases:
            with self.subTest(name):
                self.assertRejected(reason, pairs)

    def test_header_names_are_case_insensitive_and_ows_is_ignored(self):
        pairs = [(k.lower(), f" {v} ") for k, v in signed_pairs()]
        self.check(pairs)

    def test_plain_mapping_headers_are_accepted(self):
        headers = dict(signed_pairs())
        pending = self.auth.precheck("POST", TARGET, headers, NOW)
        self.auth.finish(pending, BODY, NOW)


class SkewTest(Fixture):
    def test_skew_window(self):
        cases = [
            ("31 s in the past", NOW - 31, "stale"),
            ("31 s in the future", NOW + 31, "future"),
            ("an hour in the past", NOW - 3600, "stale"),
            ("29 s in the past", NOW - 29, None),
            ("29 s in the future", NOW + 29, None),
            ("exactly 30 s in the past", NOW - 30, None),
            ("exactly 30 s in the future", NOW + 30, None),
        ]
        for name, ts, reason in cases:
            with self.subTest(name):
                pairs = signed_pairs(ts=ts)
                if reason is None:
                    self.check(pairs)
                else:
                    self.assertRejected(reason, pairs)

    def test_fractional_now(self):
        self.assertRejected("stale", signed_pairs(ts=NOW - 30), now=NOW + 0.5)
        self.check(signed_pairs(ts=NOW - 30), now=NOW + 0.0)


class MacTest(Fixture):
    def test_tampering(self):
        body_obj = {"code": "abc", "redirect_uri": "https://app.example/cb"}
        sent = json.dumps(body_obj).encode()
        cases = [
            ("method", dict(method="PUT")),
            ("path", dict(target="/v1/rpc/google/token/revoke?x=1")),
            ("query", dict(target="/v1/rpc/google/token/exchange?x=2")),
            ("query removed", dict(target="/v1/rpc/google/token/exchange")),
            ("path case", dict(target=TARGET.upper())),
            ("body", dict(body=b'{"code":"abd"}')),
            ("body trailing newline", dict(body=BODY + b"\n")),
            ("body empty", dict(body=b"")),
        ]
        for name, changes in cases:
            with self.subTest(name):
                self.assertRejected("bad_signature", signed_pairs(), **changes)
        with self.subTest("wrong secret"):
            self.assertRejected("bad_signature", signed_pairs(secret="another-secret-" + "x" * 32))
        with self.subTest("signature over a re-serialized body"):
            reserialized = json.dumps(json.loads(sent), separators=(",", ":")).encode()
            self.assertNotEqual(reserialized, sent)
            self.assertRejected("bad_signature", signed_pairs(body=reserialized), body=sent)
        with self.subTest("same body bytes accepted"):
            self.check(signed_pairs(body=sent), body=sent)

    def test_previous_secret_during_grace_only(self):
        self.rotated_at = NOW
        with self.subTest("current secret"):
            self.check(signed_pairs())
        with self.subTest("previous secret inside the grace period"):
            later = NOW + GRACE_S - 1
            self.check(signed_pairs(secret=OLD_SECRET, ts=later), now=later)
        with self.subTest("previous secret after the grace period"):
            after = NOW + GRACE_S
            self.assertRejected("bad_signature", signed_pairs(secret=OLD_SECRET, ts=after),
                                now=after)
        with self.subTest("current secret after the grace period"):
            self.check(signed_pairs(ts=NOW + GRACE_S), now=NOW + GRACE_S)

    def test_local_default_secret_only_when_allowed(self):
        local_pairs = signed_pairs(secret=LOCAL_DEFAULT_RPC_SECRET)
        strict = RpcAuthenticator(lambda now: [LOCAL_DEFAULT_RPC_SECRET], SKEW)
        with self.assertRaises(RpcSecretNotReady) as ctx:  # the default is no secret at all
            self.check(local_pairs, auth=strict)
        self.assertEqual(ctx.exception.body()["error"]["missing"], ["rpc_secret"])
        local = RpcAuthenticator(lambda now: [LOCAL_DEFAULT_RPC_SECRET], SKEW,
                                 allow_local_default_secret=True)
        self.check(local_pairs, auth=local)

    def test_no_secret_fails_closed_as_not_ready(self):
        for name, secrets in (("empty list", []), ("None", None), ("empty string", [""])):
            with self.subTest(name):
                auth = RpcAuthenticator(lambda now, s=secrets: s, SKEW)
                with self.assertRaises(RpcSecretNotReady) as ctx:
                    self.check(signed_pairs(), auth=auth)
                self.assertEqual((ctx.exception.status, ctx.exception.code), (503, "not_ready"))

    def test_a_secret_cleared_between_precheck_and_finish_is_not_ready(self):
        current = [SECRET]
        auth = RpcAuthenticator(lambda now: list(current), SKEW)
        pairs = signed_pairs()
        pending = auth.precheck("POST", TARGET, message(pairs), NOW)
        current.clear()
        with self.assertRaises(RpcSecretNotReady):
            auth.finish(pending, BODY, NOW)


class ReplayTest(Fixture):
    def test_replayed_nonce(self):
        pairs = signed_pairs()
        self.check(pairs)
        self.assertRejected("replay", pairs)
        self.assertRejected("replay", pairs, now=NOW + SKEW)

    def test_nonce_recorded_only_after_a_valid_mac(self):
        nonce = new_nonce()
        self.assertRejected("bad_signature", signed_pairs(nonce=nonce, secret="x" * 40))
        self.check(signed_pairs(nonce=nonce))

    def test_nonce_kept_two_skews_then_forgotten(self):
        pairs = signed_pairs()
        self.check(pairs)
        # Still inside the window a replay is refused; after 2 x skew the timestamp is stale anyway.
        self.assertRejected("replay", pairs, now=NOW + SKEW)
        self.assertRejected("stale", pairs, now=NOW + 2 * SKEW + 1)
        self.assertEqual(len(self.auth.replay_cache), 1)
        self.check(signed_pairs(ts=NOW + 2 * SKEW + 1), now=NOW + 2 * SKEW + 1)
        self.assertEqual(len(self.auth.replay_cache), 1)  # the first nonce was evicted

    def test_full_cache_refuses_with_503_never_accepts(self):
        auth = RpcAuthenticator(self.secrets, SKEW, self.metrics, replay_capacity=3)
        for _ in range(3):
            self.check(signed_pairs(), auth=auth)
        with self.assertRaises(ReplayCacheFull) as ctx:
            self.check(signed_pairs(), auth=auth)
        self.assertNotIsInstance(ctx.exception, AuthError)
        self.assertEqual((ctx.exception.status, ctx.exception.code), (503, "replay_cache_full"))
        self.assertIn("Retry-After", ctx.exception.headers)
        # Once the window has passed, room comes back.
        later = NOW + 2 * SKEW + 1
        self.check(signed_pairs(ts=later), auth=auth, now=later)

    def test_time_going_backwards_never_shortens_retention(self):
        pairs = signed_pairs(ts=NOW)
        self.check(pairs, now=NOW + 10)
        self.check(signed_pairs(ts=NOW), now=NOW - 10)
        self.assertRejected("replay", pairs, now=NOW + 29)


class MetricsTest(Fixture):
    def test_failures_counted_by_reason(self):
        for pairs in ([], [], signed_pairs(ts=NOW - 100)):
            with self.assertRaises(AuthError):
                self.check(pairs)
        self.assertEqual(self.metrics.value(AUTH_FAILURES_METRIC, {"reason": "missing_header"}), 2)
        self.assertEqual(self.metrics.value(AUTH_FAILURES_METRIC, {"reason": "stale"}), 1)
        self.assertIn('enclave_rpc_auth_failures_total{reason="stale"} 1', self.metrics.render())

    def test_logs_name_the_reason_not_the_signature(self):
        pairs = signed_pairs(secret="wrong-" + "y" * 40)
        with self.assertLogs("enclave.rpcauth", "WARNING") as logs:
            with self.assertRaises(AuthError):
                self.check(pairs)
        text = "\n".join(logs.output)
        self.assertIn("bad_signature", text)
        self.assertNotIn(dict(pairs)[HEADER_SIGNATURE][3:], text)
        self.assertNotIn("x=1", text)  # the query string is not logged


if __name__ == "__main__":
    unittest.main()
