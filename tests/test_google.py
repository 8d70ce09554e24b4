"""Google OAuth handlers (docs/DESIGN.md §9) called directly, against the fake Google over HTTPS.

Every log record emitted while this module runs (all loggers, DEBUG) is captured; at the end no
authorization code, token, client secret, code verifier or sealed value may appear in it.
"""

import base64
import hashlib
import json
import logging
import os
import tempfile
import unittest
from email.message import Message

from enclave import sealing
from enclave.errors import ApiError
from enclave.google import GoogleOAuth, OUTCOME_METRIC
from enclave.metrics import UPSTREAM_SECONDS as UPSTREAM_METRIC
from enclave.metrics import Metrics
from enclave.outbound import OutboundClient
from enclave.request import Request
from enclave.sealing import Keyring
from enclave.server import json_bytes
from tests.fakes.fake_google import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeGoogle
from tests.fakes.pki import TestCA
from tests.sealing_vectors import seal_v1
from tests.support import remember_secret

REDIRECT = "https://app.example/oauth/callback"
HANG_DEADLINE_S = 1.0
SECRET_VALUES: set[str] = set()  # everything that must never reach a log line


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def setUpModule():
    global CA, TMP, CA_FILE, FAKE, CLIENT, CAPTURE, _ROOT_LEVEL
    CAPTURE = _Capture()
    CAPTURE.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    _ROOT_LEVEL = root.level
    root.addHandler(CAPTURE)
    root.setLevel(logging.DEBUG)
    CA = TestCA()
    TMP = tempfile.TemporaryDirectory(prefix="google-test-")
    CA_FILE = CA.write(TMP.name)
    FAKE = FakeGoogle(CA).start()
    CLIENT = OutboundClient(ca_file=CA_FILE)
    SECRET_VALUES.add(DEFAULT_CLIENT_SECRET)


def tearDownModule():
    CLIENT.close()
    FAKE.stop()
    TMP.cleanup()
    root = logging.getLogger()
    root.removeHandler(CAPTURE)
    root.setLevel(_ROOT_LEVEL)
    _collect_fake_secrets()
    leaks = [value for value in SECRET_VALUES if any(value in line for line in CAPTURE.lines)]
    if leaks:
        raise AssertionError(f"{len(leaks)} secret value(s) appeared in the logs")


def _collect_fake_secrets():
    state = FAKE.state
    SECRET_VALUES.update(state.codes, state.refresh_tokens, state.access_tokens)


def new_sealing_key() -> bytes:
    key = os.urandom(32)
    remember_secret(key, kind="token sealing key")
    return key


def request(body, path="/v1/rpc/google/token/exchange") -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = Message()
    headers["Content-Type"] = "application/json"
    return Request(method="POST", target=path, path=path, query={}, headers=headers, body=raw)


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes):
    """What any JSON client accepts: UTF-8 (no lone surrogate) and no NaN/Infinity."""
    return json.loads(data.decode("utf-8"), parse_constant=_no_constant)


def pkce_pair():
    verifier = base64.urlsafe_b64encode(os.urandom(48)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()) \
        .rstrip(b"=").decode()
    SECRET_VALUES.add(verifier)
    remember_secret(verifier, kind="pkce code verifier")
    return verifier, challenge


class GoogleTestCase(unittest.TestCase):
    def setUp(self):
        FAKE.set_mode("normal")
        self.addCleanup(FAKE.set_mode, "normal")
        self.keyring = Keyring(new_sealing_key())
        self.creds = (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)
        self.metrics = Metrics()
        self.google = GoogleOAuth(lambda: self.creds, lambda: self.keyring, CLIENT,
                                  FAKE.token_url, FAKE.revoke_url, self.metrics,
                                  timeout_s=HANG_DEADLINE_S)

    def mint(self, **kwargs):
        code = FAKE.mint_code(kwargs.pop("redirect_uri", REDIRECT), **kwargs)
        SECRET_VALUES.add(code)
        return code

    def call(self, handler, body):
        status, answer = handler(request(body))
        for name in ("access_token", "id_token", "sealed_refresh_token"):
            if name in answer:
                SECRET_VALUES.add(answer[name])
                remember_secret(answer[name], kind=name.replace("_", " "))
        return status, answer

    def assertApiError(self, status, code, handler, body):
        with self.assertRaises(ApiError) as ctx:
            self.call(handler, body)
        self.assertEqual((ctx.exception.status, ctx.exception.code), (status, code),
                         ctx.exception.message)
        # the answer the server builds from it is valid JSON with that code
        answer = strict_json(json_bytes(ctx.exception.body()))
        self.assertEqual(answer["error"]["code"], code)
        return ctx.exception

    def exchange_sealed(self):
        status, answer = self.call(self.google.exchange,
                                   {"code": self.mint(), "redirect_uri": REDIRECT})
        self.assertEqual(status, 200)
        return answer["sealed_refresh_token"]


class ExchangeTest(GoogleTestCase):
    def test_exchange_answers_tokens_and_seals_the_refresh_token(self):
        status, answer = self.call(self.google.exchange,
                                   {"code": self.mint(), "redirect_uri": REDIRECT})
        self.assertEqual(status, 200)
        self.assertEqual(set(answer), {"access_token", "expires_in", "token_type", "scope",
                                       "id_token", "sealed_refresh_token"})
        self.assertEqual((answer["token_type"], answer["expires_in"]), ("Bearer", 3599))
        self.assertNotIn("refresh_token", answer)
        raw = sealing.unseal(self.keyring, answer["sealed_refresh_token"], DEFAULT_CLIENT_ID)[0]
        self.assertIn(raw, FAKE.state.refresh_tokens)
        self.assertNotIn(raw, json.dumps(answer))
        self.assertEqual(self.metrics.value(OUTCOME_METRIC,
                                            {"operation": "exchange", "outcome": "ok"}), 1)
        self.assertEqual(self.metrics.value(UPSTREAM_METRIC + "_count",
                                            {"upstream": "google_token"}), 1)

    def test_exchange_with_pkce(self):
        verifier, challenge = pkce_pair()
        code = self.mint(code_challenge=challenge)
        with self.subTest("missing verifier"):
            self.assertApiError(400, "invalid_grant", self.google.exchange,
                                {"code": code, "redirect_uri": REDIRECT})
        with self.subTest("wrong verifier"):
            other, _ = pkce_pair()
            self.assertApiError(400, "invalid_grant", self.google.exchange,
                                {"code": code, "redirect_uri": REDIRECT, "code_verifier": other})
        with self.subTest("right verifier"):
            status, answer = self.call(self.google.exchange, {
                "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier})
            self.assertEqual(status, 200)
            self.assertIn("sealed_refresh_token", answer)

    def test_no_refresh_token_without_offline_access(self):
        status, answer = self.call(self.google.exchange, {
            "code": self.mint(offline=False, scope="email"), "redirect_uri": REDIRECT})
        self.assertEqual(status, 200)
        self.assertNotIn("sealed_refresh_token", answer)
        self.assertNotIn("id_token", answer)

    def test_postmessage_redirect(self):
        code = self.mint(redirect_uri="postmessage")
        status, _ = self.call(self.google.exchange, {"code": code, "redirect_uri": "postmessage"})
        self.assertEqual(status, 200)

    def test_used_code_is_invalid_grant_and_never_retried(self):
        code = self.mint()
        self.call(self.google.exchange, {"code": code, "redirect_uri": REDIRECT})
        before = FAKE.state.token_requests
        error = self.assertApiError(400, "invalid_grant", self.google.exchange,
                                    {"code": code, "redirect_uri": REDIRECT})
        self.assertEqual(FAKE.state.token_requests - before, 1)
        self.assertIn("invalid_grant", error.message)

    def test_google_errors_are_mapped(self):
        cases = [
            ("unknown code", {}, "nope-" + "x" * 20, REDIRECT, 400, "invalid_grant"),
            ("redirect mismatch", {}, None, "https://app.example/other", 400,
             "redirect_uri_mismatch"),
            ("wrong client secret", {"creds": (DEFAULT_CLIENT_ID, "wrong-secret")}, None, REDIRECT,
             502, "upstream_auth_failed"),
            ("unknown client", {"creds": ("someone-else", DEFAULT_CLIENT_SECRET)}, None, REDIRECT,
             502, "upstream_auth_failed"),
            ("Google 500", {"mode": "error500"}, None, REDIRECT, 502, "upstream_error"),
        ]
        for name, setup, code, redirect, status, error in cases:
            with self.subTest(name):
                self.creds = setup.get("creds", (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET))
                FAKE.set_mode(setup.get("mode", "normal"))
                self.assertApiError(status, error, self.google.exchange,
                                    {"code": code or self.mint(), "redirect_uri": redirect})
                FAKE.set_mode("normal")

    def test_hanging_google_answers_504_within_the_deadline(self):
        FAKE.set_mode("hang")
        error = self.assertApiError(504, "upstream_timeout", self.google.exchange,
                                    {"code": self.mint(), "redirect_uri": REDIRECT})
        self.assertEqual(error.body()["error"]["code"], "upstream_timeout")
        self.assertEqual(self.metrics.value(OUTCOME_METRIC,
                                            {"operation": "exchange",
                                             "outcome": "upstream_timeout"}), 1)

    def test_not_configured(self):
        before = FAKE.state.token_requests
        for creds in (None, ("", ""), (DEFAULT_CLIENT_ID, "")):
            with self.subTest(creds=creds is not None):
                self.creds = creds
                exc = self.assertApiError(503, "not_ready", self.google.exchange,
                                          {"code": self.mint(), "redirect_uri": REDIRECT})
                self.assertEqual(exc.body()["error"]["missing"], ["google_credentials"])
        self.creds = (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)
        self.keyring = None
        exc = self.assertApiError(503, "not_ready", self.google.exchange,
                                  {"code": self.mint(), "redirect_uri": REDIRECT})
        self.assertEqual(exc.body()["error"]["missing"], ["sealing_key"])
        self.assertEqual(FAKE.state.token_requests, before)  # Google never called

    def test_request_validation(self):
        good = {"code": "4/0Aabc", "redirect_uri": REDIRECT}
        cases = [
            ("not JSON", b"{", "malformed_json"),
            ("not an object", [good], "invalid_request"),
            ("missing code", {"redirect_uri": REDIRECT}, "invalid_request"),
            ("code not a string", {**good, "code": 12}, "invalid_request"),
            ("empty code", {**good, "code": ""}, "invalid_request"),
            ("code with a space", {**good, "code": "a b"}, "invalid_request"),
            ("code with a newline", {**good, "code": "a\nb"}, "invalid_request"),
            ("code too long", {**good, "code": "a" * 5000}, "invalid_request"),
            ("missing redirect_uri", {"code": "x"}, "invalid_request"),
            ("redirect_uri not a URL", {**good, "redirect_uri": "app.example/cb"}, "invalid_request"),
            ("redirect_uri javascript", {**good, "redirect_uri": "javascript:alert(1)"},
             "invalid_request"),
            ("verifier too short", {**good, "code_verifier": "a" * 42}, "invalid_request"),
            ("verifier too long", {**good, "code_verifier": "a" * 129}, "invalid_request"),
            ("verifier bad characters", {**good, "code_verifier": "a" * 42 + "+"},
             "invalid_request"),
            ("verifier null", {**good, "code_verifier": None}, None),
            ("unexpected field", {**good, "client_secret": "x"}, "invalid_request"),
        ]
        before = FAKE.state.token_requests
        for name, body, code in cases:
            with self.subTest(name):
                if code is None:  # null verifier means "no verifier": Google says the code is bad
                    self.assertApiError(400, "invalid_grant", self.google.exchange, body)
                    continue
                error = self.assertApiError(400, code, self.google.exchange, body)
                self.assertTrue(error.message)
        self.assertEqual(FAKE.state.token_requests - before, 1)

    def test_connections_are_reused_across_requests(self):
        self.call(self.google.exchange, {"code": self.mint(), "redirect_uri": REDIRECT})
        before = FAKE.tls_connections
        for _ in range(5):
            self.call(self.google.exchange, {"code": self.mint(), "redirect_uri": REDIRECT})
        self.assertEqual(FAKE.tls_connections, before)


class OddAnswerTest(GoogleTestCase):
    """Answers a broken or hostile upstream could send: mapped to 502s, never a 500."""

    def test_odd_answers_are_mapped(self):
        cases = [
            # mode, status, code
            ("deep_error", 502, "upstream_error"),  # a 400 we cannot read: unmapped non-2xx
            ("deep_error_401", 502, "upstream_auth_failed"),  # the status alone decides
            ("html_502", 502, "upstream_error"),
            ("lone_surrogate_token", 502, "upstream_invalid_response"),
            ("nan_expiry", 502, "upstream_invalid_response"),
            ("non_json", 502, "upstream_invalid_response"),
            ("oversize", 502, "upstream_invalid_response"),
        ]
        for mode, status, code in cases:
            with self.subTest(mode):
                FAKE.set_mode(mode)
                self.assertApiError(status, code, self.google.exchange,
                                    {"code": self.mint(), "redirect_uri": REDIRECT})
                FAKE.set_mode("normal")

    def test_deep_error_body_on_refresh_and_revoke(self):
        sealed = self.exchange_sealed()
        FAKE.set_mode("deep_error")
        self.assertApiError(502, "upstream_error", self.google.refresh,
                            {"sealed_refresh_token": sealed})
        self.assertApiError(502, "upstream_error", self.google.revoke, {"token": "ya29.x"})

    def test_unmapped_status_carries_the_upstream_status(self):
        FAKE.set_mode("html_502")
        error = self.assertApiError(502, "upstream_error", self.google.exchange,
                                    {"code": self.mint(), "redirect_uri": REDIRECT})
        self.assertEqual(error.headers.get("X-Upstream-Status"), "502")
        self.assertEqual(error.body()["error"]["upstream_status"], 502)
        self.assertIn("502", error.message)

    def test_refresh_token_sizes(self):
        self.addCleanup(setattr, FAKE.state, "refresh_token_chars", None)
        limit = sealing.MAX_TOKEN_BYTES
        # Google documents refresh tokens up to 512 bytes; 4 KiB must fit with room to spare.
        for chars in (512, 3000, 4096, limit):
            with self.subTest(chars=chars):
                FAKE.state.refresh_token_chars = chars
                status, answer = self.call(self.google.exchange,
                                           {"code": self.mint(), "redirect_uri": REDIRECT})
                self.assertEqual(status, 200)
                raw, _ = sealing.unseal(self.keyring, answer["sealed_refresh_token"],
                                        DEFAULT_CLIENT_ID)
                self.assertEqual(len(raw), chars)
                # and the sealed value is accepted back by refresh
                status, _ = self.call(self.google.refresh,
                                      {"sealed_refresh_token": answer["sealed_refresh_token"]})
                self.assertEqual(status, 200)
        with self.subTest("over the limit: a clear 502, never a 500"):
            FAKE.state.refresh_token_chars = limit + 1
            error = self.assertApiError(502, "upstream_invalid_response", self.google.exchange,
                                        {"code": self.mint(), "redirect_uri": REDIRECT})
            self.assertIn(f"{limit} bytes", error.message)
            self.assertIn("revoked", error.message)
            self.assertEqual(self.metrics.value(OUTCOME_METRIC, {
                "operation": "exchange", "outcome": "upstream_invalid_response"}), 1)
            # no grant is left behind that nobody holds
            oversized = [t for t in FAKE.state.refresh_tokens if len(t) == limit + 1]
            self.assertEqual(len(oversized), 1)
            self.assertTrue(FAKE.is_revoked(oversized[0]))

    def test_google_unreachable_is_upstream_unavailable(self):
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        google = GoogleOAuth(lambda: self.creds, lambda: self.keyring, CLIENT,
                             f"https://127.0.0.1:{port}/token", f"https://127.0.0.1:{port}/revoke",
                             self.metrics, timeout_s=HANG_DEADLINE_S)
        self.assertApiError(502, "upstream_unavailable", google.exchange,
                            {"code": self.mint(), "redirect_uri": REDIRECT})
        self.assertApiError(502, "upstream_unavailable", google.revoke, {"token": "ya29.x"})


class RefreshTest(GoogleTestCase):
    def test_refresh(self):
        sealed = self.exchange_sealed()
        status, answer = self.call(self.google.refresh, {"sealed_refresh_token": sealed})
        self.assertEqual(status, 200)
        self.assertEqual(set(answer), {"access_token", "expires_in", "token_type", "scope",
                                       "id_token"})

    def test_sealed_token_refused_under_another_key_or_when_changed(self):
        sealed = self.exchange_sealed()
        before = FAKE.state.token_requests
        with self.subTest("another key"):
            self.keyring = Keyring(new_sealing_key())
            self.assertApiError(400, "invalid_sealed_token", self.google.refresh,
                                {"sealed_refresh_token": sealed})
        self.keyring = Keyring(new_sealing_key())
        remember_secret("1//0g-some-token", kind="google refresh token")
        resealed = sealing.seal(self.keyring, "1//0g-some-token", DEFAULT_CLIENT_ID)
        SECRET_VALUES.add(resealed)
        remember_secret(resealed, kind="sealed refresh token")
        for index in range(len(resealed)):
            changed = resealed[:index] + ("A" if resealed[index] != "A" else "B") + resealed[index + 1:]
            with self.subTest(changed_index=index):
                self.assertApiError(400, "invalid_sealed_token", self.google.refresh,
                                    {"sealed_refresh_token": changed})
        with self.subTest("sealed for another client"):
            other = sealing.seal(self.keyring, "1//0g-some-token", "other-client")
            remember_secret(other, kind="sealed refresh token")
            self.assertApiError(400, "invalid_sealed_token", self.google.refresh,
                                {"sealed_refresh_token": other})
        self.assertEqual(FAKE.state.token_requests, before)  # Google never called

    def test_revoked_refresh_token_is_invalid_grant(self):
        sealed = self.exchange_sealed()
        self.call(self.google.revoke, {"sealed_refresh_token": sealed})
        before = FAKE.state.token_requests
        self.assertApiError(400, "invalid_grant", self.google.refresh,
                            {"sealed_refresh_token": sealed})
        self.assertEqual(FAKE.state.token_requests - before, 1)  # not retried

    def test_refresh_errors_are_mapped(self):
        sealed = self.exchange_sealed()
        for mode, status, code in (("error500", 502, "upstream_error"),
                                   ("hang", 504, "upstream_timeout")):
            with self.subTest(mode):
                FAKE.set_mode(mode)
                self.assertApiError(status, code, self.google.refresh,
                                    {"sealed_refresh_token": sealed})
                FAKE.set_mode("normal")
        with self.subTest("wrong client secret"):
            self.creds = (DEFAULT_CLIENT_ID, "wrong")
            self.assertApiError(502, "upstream_auth_failed", self.google.refresh,
                                {"sealed_refresh_token": sealed})

    def test_refresh_validation(self):
        for name, body in (("missing", {}), ("not a string", {"sealed_refresh_token": 5}),
                           ("extra field", {"sealed_refresh_token": "v1.a.b", "x": 1}),
                           ("too long", {"sealed_refresh_token": "v1." + "A" * 10_000})):
            with self.subTest(name):
                self.assertApiError(400, "invalid_request", self.google.refresh, body)
        self.creds = None
        self.assertApiError(503, "not_ready", self.google.refresh,
                            {"sealed_refresh_token": "v1.a.b"})


class KeyRotationTest(GoogleTestCase):
    """Tokens sealed under a previous key (or in v1) keep working; refresh migrates them."""

    def rotate(self, *previous: bytes) -> bytes:
        """Make a new key current, keeping `previous` keys (newest first); returns the new key."""
        key = new_sealing_key()
        self.keyring = Keyring(key, previous)
        return key

    def assertSealedUnder(self, sealed: str, key: bytes) -> str:
        """`sealed` is a v2 token under `key` alone; returns the raw refresh token."""
        self.assertTrue(sealed.startswith(f"v2.{sealing.key_id(key)}."), "not under that key")
        raw, kid = sealing.unseal(Keyring(key), sealed, DEFAULT_CLIENT_ID)
        self.assertEqual(kid, sealing.key_id(key))
        return raw

    def test_refresh_reseals_a_token_under_a_previous_key(self):
        old_key = self.keyring.current
        sealed = self.exchange_sealed()
        raw = sealing.unseal(self.keyring, sealed, DEFAULT_CLIENT_ID)[0]
        new_key = self.rotate(old_key)
        status, answer = self.call(self.google.refresh, {"sealed_refresh_token": sealed})
        self.assertEqual(status, 200)
        self.assertEqual(self.assertSealedUnder(answer["sealed_refresh_token"], new_key), raw)
        # The migrated token refreshes without another re-seal.
        status, again = self.call(self.google.refresh,
                                  {"sealed_refresh_token": answer["sealed_refresh_token"]})
        self.assertEqual(status, 200)
        self.assertNotIn("sealed_refresh_token", again)

    def test_refresh_reseals_a_v1_token(self):
        raw = sealing.unseal(self.keyring, self.exchange_sealed(), DEFAULT_CLIENT_ID)[0]
        old_key = self.keyring.current
        v1 = seal_v1(old_key, raw, DEFAULT_CLIENT_ID)
        remember_secret(v1, kind="sealed refresh token")
        for name, previous in (("v1 under the current key", None),
                               ("v1 under a previous key", old_key)):
            with self.subTest(name):
                current = old_key if previous is None else self.rotate(previous)
                status, answer = self.call(self.google.refresh, {"sealed_refresh_token": v1})
                self.assertEqual(status, 200)
                self.assertEqual(self.assertSealedUnder(answer["sealed_refresh_token"], current),
                                 raw)

    def test_a_token_google_rotated_is_sealed_under_the_current_key(self):
        old_key = self.keyring.current
        sealed = self.exchange_sealed()
        raw = sealing.unseal(self.keyring, sealed, DEFAULT_CLIENT_ID)[0]
        FAKE.state.rotate_refresh_tokens = True
        self.addCleanup(setattr, FAKE.state, "rotate_refresh_tokens", False)
        for name, rotate in (("same key", False), ("after a key rotation", True)):
            with self.subTest(name):
                current = self.rotate(old_key) if rotate else old_key
                status, answer = self.call(self.google.refresh, {"sealed_refresh_token": sealed})
                self.assertEqual(status, 200)
                rotated = self.assertSealedUnder(answer["sealed_refresh_token"], current)
                self.assertNotEqual(rotated, raw)
                self.assertIn(rotated, FAKE.state.refresh_tokens)

    def test_a_failed_refresh_answers_no_token(self):
        old_key = self.keyring.current
        sealed = self.exchange_sealed()
        self.rotate(old_key)
        FAKE.set_mode("error500")
        error = self.assertApiError(502, "upstream_error", self.google.refresh,
                                    {"sealed_refresh_token": sealed})
        self.assertNotIn("sealed_refresh_token", json.dumps(error.body()))

    def test_a_dropped_key_is_invalid_sealed_token(self):
        sealed = self.exchange_sealed()
        self.rotate()  # the old key is not kept
        before = FAKE.state.token_requests
        for handler in (self.google.refresh, self.google.revoke):
            with self.subTest(handler.__name__):
                error = self.assertApiError(400, "invalid_sealed_token", handler,
                                            {"sealed_refresh_token": sealed})
                self.assertIn("no longer holds", error.message)
        self.assertEqual(FAKE.state.token_requests, before)  # Google never called

    def test_revoke_accepts_any_held_key(self):
        for name, make in (("v2 under a previous key", lambda key, raw: None),
                           ("v1 under a previous key",
                            lambda key, raw: seal_v1(key, raw, DEFAULT_CLIENT_ID))):
            with self.subTest(name):
                self.keyring = Keyring(new_sealing_key())
                old_key = self.keyring.current
                sealed = self.exchange_sealed()
                raw = sealing.unseal(self.keyring, sealed, DEFAULT_CLIENT_ID)[0]
                sealed = make(old_key, raw) or sealed
                remember_secret(sealed, kind="sealed refresh token")
                self.rotate(old_key)
                status, answer = self.call(self.google.revoke, {"sealed_refresh_token": sealed})
                self.assertEqual((status, answer), (200, {"revoked": True}))
                self.assertTrue(FAKE.is_revoked(raw))


class RevokeTest(GoogleTestCase):
    def test_revoke_sealed_then_already_invalid(self):
        sealed = self.exchange_sealed()
        raw = sealing.unseal(self.keyring, sealed, DEFAULT_CLIENT_ID)[0]
        status, answer = self.call(self.google.revoke, {"sealed_refresh_token": sealed})
        self.assertEqual((status, answer), (200, {"revoked": True}))
        self.assertTrue(FAKE.is_revoked(raw))
        status, answer = self.call(self.google.revoke, {"sealed_refresh_token": sealed})
        self.assertEqual((status, answer), (200, {"revoked": True, "already_invalid": True}))
        self.assertEqual(self.metrics.value(UPSTREAM_METRIC + "_count",
                                            {"upstream": "google_revoke"}), 2)

    def test_revoke_raw_access_token(self):
        _, answer = self.call(self.google.exchange, {"code": self.mint(), "redirect_uri": REDIRECT})
        status, result = self.call(self.google.revoke, {"token": answer["access_token"]})
        self.assertEqual((status, result), (200, {"revoked": True}))
        self.assertTrue(FAKE.is_revoked(answer["access_token"]))

    def test_unknown_token_is_already_invalid(self):
        status, answer = self.call(self.google.revoke, {"token": "ya29.unknown-token"})
        self.assertEqual((status, answer), (200, {"revoked": True, "already_invalid": True}))

    def test_revoke_validation_and_errors(self):
        sealed = self.exchange_sealed()
        for name, body in (("neither", {}), ("both", {"token": "a", "sealed_refresh_token": sealed}),
                           ("empty token", {"token": ""}), ("extra", {"token": "a", "x": 1})):
            with self.subTest(name):
                self.assertApiError(400, "invalid_request", self.google.revoke, body)
        with self.subTest("sealed under another key"):
            self.keyring = Keyring(new_sealing_key())
            self.assertApiError(400, "invalid_sealed_token", self.google.revoke,
                                {"sealed_refresh_token": sealed})
        for mode, status, code in (("error500", 502, "upstream_error"),
                                   ("hang", 504, "upstream_timeout")):
            with self.subTest(mode):
                FAKE.set_mode(mode)
                self.assertApiError(status, code, self.google.revoke, {"token": "ya29.x"})
                FAKE.set_mode("normal")
        with self.subTest("not configured"):
            self.creds = None
            self.assertApiError(503, "not_ready", self.google.revoke,
                                {"token": "ya29.x"})


class LogScanTest(GoogleTestCase):
    """A complete run of every flow, then a scan of what it logged (the module scan covers all)."""

    def test_no_secret_in_logs(self):
        capture = _Capture()
        capture.setFormatter(logging.Formatter("%(name)s %(message)s %(args)s"))
        logging.getLogger().addHandler(capture)
        try:
            verifier, challenge = pkce_pair()
            code = self.mint(code_challenge=challenge)
            _, answer = self.call(self.google.exchange, {
                "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier})
            sealed = answer["sealed_refresh_token"]
            self.call(self.google.refresh, {"sealed_refresh_token": sealed})
            for body in ({"code": code, "redirect_uri": REDIRECT},  # used code
                         {"code": self.mint(), "redirect_uri": "https://wrong.example/cb"}):
                with self.assertRaises(ApiError):
                    self.call(self.google.exchange, body)
            self.creds = (DEFAULT_CLIENT_ID, "wrong-" + DEFAULT_CLIENT_SECRET)
            with self.assertRaises(ApiError):
                self.call(self.google.refresh, {"sealed_refresh_token": sealed})
            self.creds = (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)
            FAKE.set_mode("hang")
            with self.assertRaises(ApiError):
                self.call(self.google.refresh, {"sealed_refresh_token": sealed})
            FAKE.set_mode("normal")
            self.call(self.google.revoke, {"sealed_refresh_token": sealed})
            self.call(self.google.revoke, {"sealed_refresh_token": sealed})
            # Positive control: a value passed as a %-argument at DEBUG is seen by the scan.
            logging.getLogger("tests.canary").debug("canary %s", "canary-value-7f3a")
        finally:
            logging.getLogger().removeHandler(capture)
        _collect_fake_secrets()
        self.assertTrue(any("canary-value-7f3a" in line for line in capture.lines))
        secrets = SECRET_VALUES | {code, verifier, sealed, answer["access_token"],
                                   sealing.unseal(self.keyring, sealed, DEFAULT_CLIENT_ID)[0]}
        for value in secrets:
            for line in capture.lines:
                self.assertNotIn(value, line)


if __name__ == "__main__":
    unittest.main()
