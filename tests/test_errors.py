"""One error map: each error class carries its status and code, and README's table lists every
code the HTTP API can answer, with that status."""

import inspect
import re
import unittest
from pathlib import Path

from enclave import errors, outbound

ROOT = Path(__file__).resolve().parent.parent
# `ApiError(503, "code", ...`, `BadRequest(400, "code", ...`, `_send(404, error_body("code", ...`
_LITERAL = re.compile(r'(?:ApiError|BadRequest)\(\s*(\d{3}),\s*"([a-z_]+)"'
                      r'|_send\((\d{3}), error_body\("([a-z_]+)"'
                      r'|_encode\((\d{3}), error_body\("([a-z_]+)"')
_ROW = re.compile(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \| (\d{3}) \|", re.MULTILINE)


def readme_codes() -> dict[str, int]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = {}
    for codes, status in _ROW.findall(text):
        for code in re.findall(r"`([a-z_]+)`", codes):
            table[code] = int(status)
    return table


def classified() -> list[type]:
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.ClassifiedError) and cls is not errors.ClassifiedError]


class ErrorMapTest(unittest.TestCase):
    def test_every_class_answers_its_own_status_and_code(self):
        for cls in classified():
            with self.subTest(cls.__name__):
                error = cls("a sentence")
                self.assertEqual((error.status, error.code), (cls.status, cls.code))
                self.assertEqual({k: error.body()["error"][k] for k in ("code", "message")},
                                 {"code": cls.code, "message": "a sentence"})

    def test_codes_are_distinct_per_class(self):
        concrete = [cls for cls in classified() if not issubclass(cls, errors.NotReady)]
        codes = [cls.code for cls in concrete]
        self.assertEqual(len(codes), len(set(codes)), codes)

    def test_not_ready_names_what_is_missing(self):
        for cls in classified():
            if issubclass(cls, errors.NotReady) and cls is not errors.NotReady:
                with self.subTest(cls.__name__):
                    body = cls("a sentence").body()["error"]
                    self.assertEqual((cls.status, body["code"]), (503, "not_ready"))
                    self.assertTrue(body["missing"])
                    self.assertTrue(set(body["missing"]) <= {"rpc_secret", "sealing_key",
                                                             "google_credentials", "mtls"})

    def test_upstream_vocabulary(self):
        expected = {
            errors.UpstreamError: (502, "upstream_error"),
            errors.UpstreamUnavailable: (502, "upstream_unavailable"),
            errors.UpstreamTLSError: (502, "upstream_tls_error"),
            errors.UpstreamTimeout: (504, "upstream_timeout"),
            errors.UpstreamInvalidResponse: (502, "upstream_invalid_response"),
            errors.UpstreamAuthFailed: (502, "upstream_auth_failed"),
        }
        for cls, (status, code) in expected.items():
            with self.subTest(cls.__name__):
                self.assertEqual((cls.status, cls.code), (status, code))
                self.assertTrue(issubclass(cls, errors.UpstreamError))
        # the outbound client raises these very classes: nothing maps them a second time
        self.assertIs(outbound.OutboundError, errors.UpstreamError)
        for name in ("UpstreamUnavailable", "UpstreamTLSError", "UpstreamTimeout",
                     "UpstreamInvalidResponse"):
            self.assertIs(getattr(outbound, name), getattr(errors, name))

    def test_upstream_status_goes_to_the_header_and_body(self):
        error = errors.UpstreamError("the service answered HTTP 503", upstream_status=503)
        self.assertEqual(error.headers, {"X-Upstream-Status": "503"})
        self.assertEqual(error.body()["error"]["upstream_status"], 503)
        self.assertNotIn("upstream_status", errors.UpstreamError("x").body()["error"])

    def test_readme_lists_every_code_with_its_status(self):
        table = readme_codes()
        found = {cls.code: cls.status for cls in classified()}
        for path in sorted((ROOT / "enclave").glob("*.py")):
            for match in _LITERAL.finditer(path.read_text(encoding="utf-8")):
                status, code = [g for g in match.groups() if g]
                found[code] = int(status)
        found.update({"unauthorized": 401, "replay_cache_full": 503,  # enclave.rpcauth
                      "invalid_nonce": 400, "invalid_user_data": 400})  # enclave.attestation
        self.assertGreater(len(found), 25)
        for code, status in sorted(found.items()):
            with self.subTest(code):
                self.assertEqual(table.get(code), status, f"README error table: {code}")


if __name__ == "__main__":
    unittest.main()
