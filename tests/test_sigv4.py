"""AWS Signature Version 4: every case of the AWS test suite, a KMS Decrypt call, refusals."""

import datetime
import hashlib
import importlib.util
import json
import pathlib
import unittest
from unittest import mock

from enclave import sigv4
from enclave.sigv4 import SigV4Error

SUITE = pathlib.Path(__file__).parent / "data" / "sigv4"
SUITE_CASES = 34  # every folder holding a NAME.req (24 top-level, 8 normalize-path, 2 post-sts)
# The suite's fixed inputs (tests/data/sigv4/README.md).
ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
SERVICE = "service"
SUITE_TIME = datetime.datetime(2015, 8, 30, 12, 36, tzinfo=datetime.timezone.utc).timestamp()
SUITE_AMZ_DATE = "20150830T123600Z"
TOKEN_HEADER = "x-amz-security-token"
# post-sts-header-after adds the token AFTER signing (unsigned); sign() always signs a session
# token, as KMS requires, so that case signs without one and its .authz must still match.
UNSIGNED_TOKEN_CASES = {"post-sts-header-after"}


def parse_request(text: str):
    """(method, path, query, header pairs, body) of a suite .req file.

    The request line's target may hold a raw space (normalize-path/get-space), so the method is
    the first word and the version the last. A header line starting with a space or tab
    continues the previous value (obs-fold, get-header-value-multiline): the line break becomes
    one space, as RFC 9112 section 5.2 lets a recipient do. The signer itself refuses CR/LF.
    """
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.rpartition(" ")
    assert version == "HTTP/1.1", lines[0]
    headers: list[list[str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            headers[-1][1] += " " + line
        elif line:
            name, _, value = line.partition(":")
            headers.append([name, value])
    path, _, query = target.partition("?")
    return method, path, query, [(n, v) for n, v in headers], body.encode("utf-8")


def header_value(text: str, name: str) -> str | None:
    for line in text.split("\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def suite_cases():
    for req in sorted(SUITE.rglob("*.req")):
        stem = req.with_suffix("")
        yield req.stem, {ext: stem.with_suffix(f".{ext}").read_text(encoding="utf-8")
                         for ext in ("req", "creq", "sts", "authz", "sreq")}


class SuiteTest(unittest.TestCase):
    """Every case; nothing is skipped. Lower-level functions and sign() both checked."""

    def test_every_case_is_present(self):
        self.assertEqual(len(list(suite_cases())), SUITE_CASES)

    def test_canonical_request_string_to_sign_and_authorization(self):
        for name, files in suite_cases():
            with self.subTest(name):
                method, path, query, headers, body = parse_request(files["req"])
                token = header_value(files["sreq"], TOKEN_HEADER)
                if token and name not in UNSIGNED_TOKEN_CASES and not any(
                        n.lower() == TOKEN_HEADER for n, _ in headers):
                    headers.append(("X-Amz-Security-Token", token))  # signed, as in the .creq
                creq = sigv4.canonical_request(method, path, query, headers,
                                               hashlib.sha256(body).hexdigest())
                self.assertEqual(creq, files["creq"])
                sts = sigv4.string_to_sign(creq, SUITE_AMZ_DATE, REGION, SERVICE)
                self.assertEqual(sts, files["sts"])
                key = sigv4.signing_key(SECRET_KEY, SUITE_AMZ_DATE[:8], REGION, SERVICE)
                signed = creq.split("\n")[-2]
                scope = sigv4.credential_scope(SUITE_AMZ_DATE[:8], REGION, SERVICE)
                authz = (f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope}, "
                         f"SignedHeaders={signed}, Signature={sigv4.signature(key, sts)}")
                self.assertEqual(authz, files["authz"])

    def test_sign_matches_every_authorization(self):
        for name, files in suite_cases():
            with self.subTest(name):
                method, path, query, headers, body = parse_request(files["req"])
                given = [(n, v) for n, v in headers
                         if n.lower() not in ("x-amz-date", TOKEN_HEADER)]
                token = None
                if name not in UNSIGNED_TOKEN_CASES:
                    token = header_value(files["sreq"], TOKEN_HEADER)
                target = path + ("?" + query if query else "")
                added = sigv4.sign(method, target, given, body, access_key=ACCESS_KEY,
                                   secret_key=SECRET_KEY, session_token=token, region=REGION,
                                   service=SERVICE, now=SUITE_TIME)
                self.assertEqual(added["Authorization"], files["authz"])
                self.assertEqual(added["X-Amz-Date"], SUITE_AMZ_DATE)
                self.assertEqual(added.get("X-Amz-Security-Token"), token)
                self.assertNotIn("Host", added)  # the .req gives one


KMS_HOST = "kms.eu-west-1.amazonaws.com"
KMS_ACCESS_KEY = "ASIAEXAMPLEEXAMPLE01"
KMS_SECRET = "kmsTESTsecretEXAMPLEKEYwJalrXUtnFEMIK7MDENG"
KMS_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE//session+token/EXAMPLE=="
KMS_DATETIME = datetime.datetime(2026, 5, 9, 7, 35, 25, tzinfo=datetime.timezone.utc)
KMS_TIME = KMS_DATETIME.timestamp()  # sign() takes Unix seconds
KMS_BODY = json.dumps({"CiphertextBlob": "AQIDAHhEXAMPLE", "KeyId": "arn:aws:kms:eu-west-1:"
                       "111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                       "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}).encode()
KMS_HEADERS = {"Host": KMS_HOST, "Content-Type": "application/x-amz-json-1.1",
               "X-Amz-Target": "TrentService.Decrypt"}


def kms_sign(**changes):
    args = dict(access_key=KMS_ACCESS_KEY, secret_key=KMS_SECRET, session_token=KMS_TOKEN,
                region="eu-west-1", service="kms", now=KMS_TIME)
    args.update(changes)
    return sigv4.sign("POST", "/", KMS_HEADERS, KMS_BODY, **args)


class KmsDecryptTest(unittest.TestCase):
    def test_session_token_is_signed(self):
        added = kms_sign()
        self.assertEqual(added["X-Amz-Date"], "20260509T073525Z")
        self.assertEqual(added["X-Amz-Security-Token"], KMS_TOKEN)
        # The canonical request, written out by hand from the SigV4 rules.
        expected_creq = (
            "POST\n/\n\n"
            "content-type:application/x-amz-json-1.1\n"
            f"host:{KMS_HOST}\n"
            "x-amz-date:20260509T073525Z\n"
            f"x-amz-security-token:{KMS_TOKEN}\n"
            "x-amz-target:TrentService.Decrypt\n\n"
            "content-type;host;x-amz-date;x-amz-security-token;x-amz-target\n"
            + hashlib.sha256(KMS_BODY).hexdigest())
        sent = {**KMS_HEADERS, "X-Amz-Date": added["X-Amz-Date"],
                "X-Amz-Security-Token": KMS_TOKEN}
        creq = sigv4.canonical_request("POST", "/", "", sent, hashlib.sha256(KMS_BODY).hexdigest())
        self.assertEqual(creq, expected_creq)
        sts = sigv4.string_to_sign(creq, "20260509T073525Z", "eu-west-1", "kms")
        self.assertEqual(sts.split("\n")[2], "20260509/eu-west-1/kms/aws4_request")
        key = sigv4.signing_key(KMS_SECRET, "20260509", "eu-west-1", "kms")
        self.assertEqual(
            added["Authorization"],
            f"AWS4-HMAC-SHA256 Credential={KMS_ACCESS_KEY}/20260509/eu-west-1/kms/aws4_request, "
            "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target, "
            f"Signature={sigv4.signature(key, sts)}")

    def test_every_input_changes_the_signature(self):
        base = kms_sign()["Authorization"]
        for label, changes in (("token", {"session_token": KMS_TOKEN + "x"}),
                               ("no token", {"session_token": None}),
                               ("secret", {"secret_key": KMS_SECRET + "x"}),
                               ("region", {"region": "us-east-1"}),
                               ("time", {"now": KMS_TIME + 1})):
            with self.subTest(label):
                self.assertNotEqual(kms_sign(**changes)["Authorization"], base)
        other_body = sigv4.sign("POST", "/", KMS_HEADERS, KMS_BODY + b" ",
                                access_key=KMS_ACCESS_KEY, secret_key=KMS_SECRET,
                                session_token=KMS_TOKEN, region="eu-west-1", service="kms",
                                now=KMS_TIME)
        self.assertNotEqual(other_body["Authorization"], base)

    def test_full_url_supplies_host(self):
        headers = {k: v for k, v in KMS_HEADERS.items() if k != "Host"}
        added = sigv4.sign("POST", f"https://{KMS_HOST}/", headers, KMS_BODY,
                           access_key=KMS_ACCESS_KEY, secret_key=KMS_SECRET,
                           session_token=KMS_TOKEN, region="eu-west-1", service="kms",
                           now=KMS_TIME)
        self.assertEqual(added.pop("Host"), KMS_HOST)
        self.assertEqual(added, kms_sign())

    @unittest.skipUnless(importlib.util.find_spec("botocore"), "botocore is not installed")
    def test_matches_botocore(self):
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        request = AWSRequest(method="POST", url=f"https://{KMS_HOST}/", data=KMS_BODY,
                             headers={k: v for k, v in KMS_HEADERS.items() if k != "Host"})
        auth = SigV4Auth(Credentials(KMS_ACCESS_KEY, KMS_SECRET, KMS_TOKEN), "kms", "eu-west-1")
        # botocore reads the clock itself: hand it the suite's fixed time.
        fixed = KMS_DATETIME.replace(tzinfo=None)
        with mock.patch("botocore.auth.get_current_datetime", return_value=fixed):
            auth.add_auth(request)
        self.assertEqual(request.headers["Authorization"], kms_sign()["Authorization"])


class RefusalTest(unittest.TestCase):
    def test_bad_inputs_raise_the_one_error(self):
        naive = datetime.datetime(2026, 5, 9, 7, 35, 25)
        cases = {
            "naive datetime": dict(now=naive),
            "aware datetime": dict(now=KMS_DATETIME),
            "time as text": dict(now="20260509T073525Z"),
            "time as a bool": dict(now=True),
            "empty secret": dict(secret_key=""),
            "access key with slash": dict(access_key="AKID/EXAMPLE"),
            "empty token": dict(session_token=""),
            "token with newline": dict(session_token="abc\r\nX-Evil: 1"),
            "region upper case": dict(region="EU-WEST-1"),
            "service with slash": dict(service="kms/x"),
        }
        for label, changes in cases.items():
            with self.subTest(label), self.assertRaises(SigV4Error):
                kms_sign(**changes)

    def test_bad_requests_raise_the_one_error(self):
        creds = dict(access_key=KMS_ACCESS_KEY, secret_key=KMS_SECRET, region="eu-west-1",
                     service="kms", now=KMS_TIME)
        no_host = {k: v for k, v in KMS_HEADERS.items() if k != "Host"}
        cases = {
            "lower-case method": ("post", "/", KMS_HEADERS, KMS_BODY),
            "relative path": ("POST", "x", KMS_HEADERS, KMS_BODY),
            "fragment": ("POST", "/#x", KMS_HEADERS, KMS_BODY),
            "control char in path": ("POST", "/a\nb", KMS_HEADERS, KMS_BODY),
            "ftp URL": ("POST", f"ftp://{KMS_HOST}/", no_host, KMS_BODY),
            "userinfo in URL": ("POST", f"https://u@{KMS_HOST}/", no_host, KMS_BODY),
            "no host anywhere": ("POST", "/", no_host, KMS_BODY),
            "host differs from URL": ("POST", "https://evil.example/", KMS_HEADERS, KMS_BODY),
            "CRLF in header value": ("POST", "/", {**KMS_HEADERS, "X-A": "1\r\nX-B: 2"}, KMS_BODY),
            "bad header name": ("POST", "/", {**KMS_HEADERS, "X A": "1"}, KMS_BODY),
            "caller sets X-Amz-Date": ("POST", "/", {**KMS_HEADERS, "x-amz-date": "1"}, KMS_BODY),
            "caller sets Authorization": ("POST", "/", {**KMS_HEADERS, "Authorization": "x"},
                                          KMS_BODY),
            "body not bytes": ("POST", "/", KMS_HEADERS, "{}"),
            "lone surrogate in path": ("POST", "/\udc80", KMS_HEADERS, KMS_BODY),
            "headers not pairs": ("POST", "/", ["Host"], KMS_BODY),
        }
        for label, (method, target, headers, body) in cases.items():
            with self.subTest(label), self.assertRaises(SigV4Error):
                sigv4.sign(method, target, headers, body, **creds)

    def test_lower_level_refusals(self):
        digest = sigv4.EMPTY_SHA256
        with self.assertRaises(SigV4Error):
            sigv4.canonical_request("GET", "/", "", {"X-A": "1"}, digest)  # host unsigned
        with self.assertRaises(SigV4Error):
            sigv4.canonical_request("GET", "/", "", {"Host": "h"}, digest.upper())
        with self.assertRaises(SigV4Error):
            sigv4.string_to_sign("x", "2015-08-30T12:36:00Z", REGION, SERVICE)
        with self.assertRaises(SigV4Error):
            sigv4.signing_key(SECRET_KEY, "2015083", REGION, SERVICE)


class CanonicalFormTest(unittest.TestCase):
    def test_paths(self):
        for path, expected in (("/", "/"), ("/a/b/..", "/a/"), ("/a/./b", "/a/b"),
                               ("/../a", "/a"), ("/a%20b", "/a%2520b"), ("/a+b=c", "/a%2Bb%3Dc"),
                               ("//a///b//", "/a/b/"), ("/a/.", "/a/")):
            with self.subTest(path):
                self.assertEqual(sigv4.canonical_uri(path), expected)

    def test_queries(self):
        for query, expected in (("", ""), ("b=2&a=1", "a=1&b=2"), ("a", "a="), ("a=1&&b", "a=1&b="),
                                ("a=x+y", "a=x%2By"), ("a=%7e%2f", "a=~%2F"), ("a=b=c", "a=b%3Dc")):
            with self.subTest(query):
                self.assertEqual(sigv4.canonical_query(query), expected)


if __name__ == "__main__":
    unittest.main()
