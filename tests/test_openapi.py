"""docs/openapi.json cannot drift: its paths and methods are the route table's, the RPC routes
(and only those) require the HMAC headers, its error codes are README's error table, its body
limits and field bounds are the code's, and every $ref resolves. A structural check, without an
OpenAPI validator package (the runtime depends only on cryptography and cbor2)."""

import json
import re
import unittest
from pathlib import Path

from enclave import google, rpcauth, sealing
from enclave.app import Runtime
from enclave.config import Settings
from enclave.metrics import Metrics
from tests.sealing_vectors import V1_SEALED as SEALED_V1_VECTOR
from tests.test_errors import readme_codes

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "openapi.json"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
HMAC_SCHEMES = {"EnclaveTimestamp": rpcauth.HEADER_TIMESTAMP, "EnclaveNonce": rpcauth.HEADER_NONCE,
                "EnclaveSignature": rpcauth.HEADER_SIGNATURE}


class _Stub:
    """Any handler: the route table is only read here, never served."""

    def __getattr__(self, name):
        return lambda req: (200, {})


def route_table() -> dict[tuple[str, str], object]:
    """{(path, METHOD): Route} of a runtime with every part present."""
    runtime = Runtime(Settings(), metrics=Metrics(), attestation=_Stub(), store=_Stub(),
                      google=_Stub(), watermark=_Stub(), authenticator=_Stub())
    table = runtime.router()._routes  # path -> {method: Route}
    return {(path, method): route for path, by_method in table.items()
            for method, route in by_method.items()}


def operations(spec: dict) -> dict[tuple[str, str], dict]:
    return {(path, method.upper()): op for path, item in spec["paths"].items()
            for method, op in item.items() if method in HTTP_METHODS}


def walk(node, where="#"):
    """Every (json pointer, node) in the document."""
    yield where, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{where}/{i}")


def resolve(spec: dict, ref: str):
    if not ref.startswith("#/"):
        raise KeyError(f"{ref}: only local references are used")
    node = spec
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


class OpenApiTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.spec = json.loads(SPEC.read_text(encoding="utf-8"))
        cls.routes = route_table()
        cls.ops = operations(cls.spec)

    def test_an_openapi_3_1_document(self):
        spec = self.spec
        self.assertRegex(spec["openapi"], r"^3\.1\.\d+$")
        self.assertTrue(spec["info"]["title"] and spec["info"]["version"])
        self.assertEqual(spec["servers"][0]["url"], "http://127.0.0.1:8181")
        ids = [op["operationId"] for op in self.ops.values()]
        self.assertEqual(len(ids), len(set(ids)), ids)
        for (path, method), op in self.ops.items():
            with self.subTest(f"{method} {path}"):
                self.assertTrue(path.startswith("/"))
                responses = op["responses"]
                self.assertTrue(any(re.fullmatch(r"2\d\d", s) for s in responses), responses)
                self.assertIn("default", responses)
                for status, response in responses.items():
                    self.assertRegex(status, r"^([1-5]\d\d|default)$")
                    if "$ref" not in response:
                        self.assertTrue(response.get("description"), status)

    def test_paths_and_methods_are_the_route_table(self):
        self.assertEqual(sorted(self.ops), sorted(self.routes))

    def test_rpc_routes_and_only_those_require_the_hmac_headers(self):
        schemes = self.spec["components"]["securitySchemes"]
        for name, header in HMAC_SCHEMES.items():
            with self.subTest(name):
                self.assertEqual((schemes[name]["type"], schemes[name]["in"],
                                  schemes[name]["name"]), ("apiKey", "header", header))
        signature = schemes["EnclaveSignature"]["description"]
        self.assertIn(rpcauth.SCHEME, signature)
        self.assertIn("SHA-256 of the raw body", signature)
        self.assertNotIn("security", self.spec)  # nothing is authenticated by default
        everything = [{name: [] for name in HMAC_SCHEMES}]  # one requirement: all three headers
        for key, route in self.routes.items():
            with self.subTest(f"{key[1]} {key[0]}"):
                security = self.ops[key].get("security", [])
                self.assertEqual(security, everything if route.auth else [])
                self.assertEqual(route.auth, key[0].startswith("/v1/rpc/"))
                if route.auth:
                    self.assertIn("401", self.ops[key]["responses"])

    def test_body_limits_are_the_routes(self):
        for key, route in self.routes.items():
            if key[1] != "POST":
                continue
            with self.subTest(f"{key[1]} {key[0]}"):
                op = self.ops[key]
                self.assertEqual(op["x-max-body-bytes"], route.max_body)
                self.assertTrue(op["requestBody"]["required"])
                self.assertIn("application/json", op["requestBody"]["content"])
                self.assertIn("413", op["responses"])

    def test_field_bounds_are_the_codes(self):
        schemas = self.spec["components"]["schemas"]
        exchange = schemas["ExchangeRequest"]["properties"]
        self.assertEqual(exchange["code"]["maxLength"], google.MAX_CODE_CHARS)
        self.assertEqual(exchange["redirect_uri"]["maxLength"], google.MAX_REDIRECT_URI_CHARS)
        self.assertEqual(schemas["SealedRefreshToken"]["maxLength"], sealing.MAX_SEALED_CHARS)
        token = schemas["RevokeRequest"]["oneOf"][1]["properties"]["token"]
        self.assertEqual(token["maxLength"], google.MAX_TOKEN_CHARS)
        self.assertRegex(sealing.seal(sealing.Keyring(bytes(32)), "a-refresh-token", "client"),
                         schemas["SealedRefreshToken"]["pattern"])
        self.assertRegex(SEALED_V1_VECTOR, schemas["SealedRefreshToken"]["pattern"])

    def test_error_codes_are_the_readme_table(self):
        table = readme_codes()
        listed = {entry["code"]: entry["status"] for entry in self.spec["x-error-codes"]}
        self.assertEqual(len(listed), len(self.spec["x-error-codes"]), "a code listed twice")
        self.assertEqual(listed, table)
        pattern = self.spec["components"]["schemas"]["ErrorCode"]["pattern"]
        for code in listed:
            self.assertRegex(code, pattern)
        for entry in self.spec["x-error-codes"]:
            self.assertTrue(entry["description"], entry["code"])

    def test_codes_named_in_responses_are_known_with_that_status(self):
        listed = {entry["code"]: entry["status"] for entry in self.spec["x-error-codes"]}
        google_codes = {"invalid_grant", "redirect_uri_mismatch"}  # Google's own, passed on
        for pointer, node in walk(self.spec):
            match = re.search(r"/responses/(\d{3})$", pointer)
            if not match or not isinstance(node, dict) or "description" not in node:
                continue
            named = re.search(r"Codes: ([a-z_, ]+)\.", node["description"])
            for code in (named[1].split(", ") if named else []):
                with self.subTest(pointer=pointer, code=code):
                    if code in google_codes:
                        self.assertEqual(match[1], "400")
                    else:
                        self.assertEqual(listed.get(code), int(match[1]))

    def test_every_ref_resolves_and_every_component_is_used(self):
        refs = [(pointer, node["$ref"]) for pointer, node in walk(self.spec)
                if isinstance(node, dict) and "$ref" in node]
        self.assertTrue(refs)
        for pointer, ref in refs:
            with self.subTest(pointer=pointer):
                self.assertIsInstance(resolve(self.spec, ref), dict)
        used = {ref for _, ref in refs}
        for kind in ("schemas", "responses"):
            for name in self.spec["components"][kind]:
                with self.subTest(f"{kind}/{name}"):
                    self.assertIn(f"#/components/{kind}/{name}", used)


if __name__ == "__main__":
    unittest.main()
