"""/metrics passes a strict Prometheus text-format 0.0.4 parser; latencies are histograms.

The parser below enforces what promtool's parser does, and a little more: one HELP and one TYPE
per family, both before the family's samples; no family split across the output; valid metric
and label names; only the three label-value escapes; no duplicate series; histograms with
cumulative `_bucket{le=...}` series ending at `+Inf`, a `_sum`, and a `_count` equal to the
`+Inf` bucket.
"""

import json
import math
import re
import unittest

from enclave.metrics import (HTTP_REQUEST_BUCKETS_SECONDS, UPSTREAM_BUCKETS_SECONDS,
                             UPSTREAM_SECONDS, Metrics)
from tests.stack import LocalStack
from tests.support import http_call

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
SAMPLE = re.compile(r"(?P<name>[^{\s]+)(?:\{(?P<labels>.*)\})? (?P<value>\S+)(?: (?P<ts>-?[0-9]+))?")
LABEL_PAIR = re.compile(r'([^=,"\s]+)="((?:[^"\\]|\\.)*)"')


class ExpositionError(ValueError):
    pass


def _float(text: str, where: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", text):
        raise ExpositionError(f"{where}: {text!r} is not a number")
    return float(text)


def _unescape(text: str, escapes: tuple, where: str) -> str:
    """Label values know \\\\, \\" and \\n; HELP text knows \\\\ and \\n. Nothing else."""
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            nxt = text[i + 1:i + 2]
            if nxt not in escapes:
                raise ExpositionError(f"{where}: invalid escape \\{nxt}")
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        elif char == "\n":
            raise ExpositionError(f"{where}: raw newline")
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _labels(text: str | None, where: str) -> dict:
    if not text:
        return {}
    labels, pos = {}, 0
    while pos < len(text):
        match = LABEL_PAIR.match(text, pos)
        if match is None:
            raise ExpositionError(f"{where}: malformed labels {text!r}")
        name, value = match.group(1), match.group(2)
        if not LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ExpositionError(f"{where}: invalid label name {name!r}")
        if name in labels:
            raise ExpositionError(f"{where}: label {name!r} twice")
        labels[name] = _unescape(value, ("\\", '"', "n"), where)
        pos = match.end()
        if pos < len(text):
            if text[pos] != ",":
                raise ExpositionError(f"{where}: expected ',' in {text!r}")
            pos += 1
            if pos == len(text):  # a trailing comma is allowed by the format
                break
    return labels


def _family_of(name: str, types: dict) -> str:
    """The family a sample belongs to, given the TYPEs declared so far."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[:-len(suffix)]
        if name.endswith(suffix) and types.get(base) == "histogram":
            return base
    for suffix in ("_sum", "_count"):
        base = name[:-len(suffix)]
        if name.endswith(suffix) and types.get(base) == "summary":
            return base
    return name


def parse_exposition(text: str) -> dict:
    """{family: {"type", "help", "samples": [(name, labels, value)]}}, or ExpositionError."""
    if text and not text.endswith("\n"):
        raise ExpositionError("the output must end with a newline")
    families: dict = {}
    types: dict = {}
    finished: set = set()  # families whose samples are over: they may not appear again
    current = None

    def enter(family: str, where: str):
        nonlocal current
        if family != current:
            if family in finished:
                raise ExpositionError(f"{where}: family {family} is split across the output")
            if current is not None:
                finished.add(current)
            current = family
        return families.setdefault(family, {"type": None, "help": None, "samples": []})

    for number, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {number}"
        if line == "":
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not METRIC_NAME.fullmatch(name):
                    raise ExpositionError(f"{where}: invalid metric name {name!r}")
                family = enter(name, where)
                rest = parts[3] if len(parts) == 4 else ""
                if parts[1] == "HELP":
                    if family["help"] is not None:
                        raise ExpositionError(f"{where}: second HELP for {name}")
                    family["help"] = _unescape(rest, ("\\", "n"), where)
                else:
                    if family["type"] is not None:
                        raise ExpositionError(f"{where}: second TYPE for {name}")
                    if family["samples"]:
                        raise ExpositionError(f"{where}: TYPE for {name} after its samples")
                    if rest not in TYPES:
                        raise ExpositionError(f"{where}: unknown type {rest!r}")
                    family["type"] = types[name] = rest
            continue
        match = SAMPLE.fullmatch(line)
        if match is None:
            raise ExpositionError(f"{where}: malformed sample line {line!r}")
        name = match.group("name")
        if not METRIC_NAME.fullmatch(name):
            raise ExpositionError(f"{where}: invalid metric name {name!r}")
        labels = _labels(match.group("labels"), where)
        value = _float(match.group("value"), where)
        family = enter(_family_of(name, types), where)
        key = (name, tuple(sorted(labels.items())))
        if any((s[0], tuple(sorted(s[1].items()))) == key for s in family["samples"]):
            raise ExpositionError(f"{where}: duplicate series {name}{labels}")
        family["samples"].append((name, labels, value))
    for name, family in families.items():
        if family["type"] == "histogram":
            _check_histogram(name, family["samples"])
        if family["type"] == "counter":
            for sample_name, labels, value in family["samples"]:
                if sample_name != name or value < 0 or math.isnan(value):
                    raise ExpositionError(f"counter {name}: bad sample {sample_name} {value}")
    return families


def _check_histogram(name: str, samples: list) -> None:
    series: dict = {}
    for sample_name, labels, value in samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if sample_name == name + "_bucket":
            if "le" not in labels:
                raise ExpositionError(f"{name}_bucket without le")
            entry["buckets"].append((_float(labels["le"], name), value))
        elif sample_name == name + "_sum":
            entry["sum"] = value
        elif sample_name == name + "_count":
            if "le" in labels:
                raise ExpositionError(f"{name}_count with le")
            entry["count"] = value
        else:
            raise ExpositionError(f"histogram {name}: unexpected sample {sample_name}")
    for rest, entry in series.items():
        buckets = entry["buckets"]
        where = f"histogram {name}{dict(rest)}"
        if not buckets or buckets[-1][0] != math.inf:
            raise ExpositionError(f"{where}: buckets must end with le=\"+Inf\"")
        bounds = [b for b, _ in buckets]
        if bounds != sorted(set(bounds)):
            raise ExpositionError(f"{where}: le bounds not strictly increasing: {bounds}")
        counts = [c for _, c in buckets]
        if counts != sorted(counts):
            raise ExpositionError(f"{where}: bucket counts not cumulative: {counts}")
        if entry["sum"] is None or entry["count"] is None:
            raise ExpositionError(f"{where}: _sum and _count are required")
        if entry["count"] != counts[-1]:
            raise ExpositionError(f"{where}: _count {entry['count']} != +Inf bucket {counts[-1]}")


class TheParserIsStrict(unittest.TestCase):
    """The checker itself refuses what it must (so a passing scrape means something)."""

    def test_refusals(self):
        cases = [
            ("second HELP", "# HELP a x\n# HELP a y\na 1\n"),
            ("second TYPE", "# TYPE a gauge\n# TYPE a gauge\na 1\n"),
            ("TYPE after samples", "a 1\n# TYPE a gauge\n"),
            ("split family", "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{x=\"1\"} 2\n"),
            ("bad metric name", "1a 1\n"),
            ("bad label name", "a{1x=\"1\"} 1\n"),
            ("bad escape", "a{x=\"\\t\"} 1\n"),
            ("bad escape in HELP", "# HELP a x \\t\na 1\n"),
            ("duplicate series", "a{x=\"1\"} 1\na{x=\"1\"} 2\n"),
            ("bad value", "a one\n"),
            ("histogram without +Inf", "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n"),
            ("histogram not cumulative", "# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
                                         "h_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n"),
            ("histogram count mismatch", "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\n"
                                         "h_count 2\n"),
            ("no final newline", "a 1"),
        ]
        for name, text in cases:
            with self.subTest(name), self.assertRaises(ExpositionError):
                parse_exposition(text)

    def test_a_good_exposition_parses(self):
        text = ('# HELP h Latency.\n# TYPE h histogram\nh_bucket{r="a\\\\b\\"c\\n",le="0.5"} 1\n'
                'h_bucket{r="a\\\\b\\"c\\n",le="+Inf"} 2\nh_sum{r="a\\\\b\\"c\\n"} 1.5\n'
                'h_count{r="a\\\\b\\"c\\n"} 2\n# TYPE c_total counter\nc_total 3\n')
        families = parse_exposition(text)
        self.assertEqual(families["h"]["samples"][0][1], {"r": 'a\\b"c\n', "le": "0.5"})


class Rendering(unittest.TestCase):
    def test_a_populated_registry_passes_the_parser(self):
        m = Metrics()
        m.describe("enclave_things_total", "counter", "Things, by kind.\nSecond line \\ slash")
        m.inc("enclave_things_total", {"kind": 'quote " back \\ newline \n'})
        m.inc("enclave_things_total", {"kind": "plain"}, 2)
        m.describe("enclave_level", "gauge", "A level")
        m.set("enclave_level", math.inf)
        m.gauge_fn("enclave_computed", lambda: 0.25)
        m.describe(UPSTREAM_SECONDS, "summary", "Latency of upstream calls")  # the older kind
        for seconds in (0.001, 0.07, 0.07, 3.0, 99.0):
            m.observe(UPSTREAM_SECONDS, seconds, {"upstream": "google"})
        m.observe("enclave_undescribed_seconds", 0.2)
        families = parse_exposition(m.render())
        self.assertEqual(families[UPSTREAM_SECONDS]["type"], "histogram")
        samples = {(n, labels.get("le")): v for n, labels, v in families[UPSTREAM_SECONDS]["samples"]}
        self.assertEqual(samples[(UPSTREAM_SECONDS + "_count", None)], 5)
        self.assertAlmostEqual(samples[(UPSTREAM_SECONDS + "_sum", None)], 102.141)
        self.assertEqual(samples[(UPSTREAM_SECONDS + "_bucket", "+Inf")], 5)
        self.assertEqual(samples[(UPSTREAM_SECONDS + "_bucket", "0.1")], 3)
        self.assertEqual(samples[(UPSTREAM_SECONDS + "_bucket", "0.005")], 1)
        bounds = [float(le) for (n, le) in samples if le not in (None, "+Inf")]
        self.assertEqual(sorted(bounds), list(UPSTREAM_BUCKETS_SECONDS))
        self.assertEqual(m.value(UPSTREAM_SECONDS + "_count", {"upstream": "google"}), 5)
        self.assertEqual(families["enclave_level"]["samples"][0][2], math.inf)
        self.assertEqual(families["enclave_undescribed_seconds"]["type"], "histogram")

    def test_an_observation_on_a_bound_falls_in_that_bucket(self):
        m = Metrics()
        m.observe("enclave_x_seconds", UPSTREAM_BUCKETS_SECONDS[0], buckets=UPSTREAM_BUCKETS_SECONDS)
        families = parse_exposition(m.render())
        first = families["enclave_x_seconds"]["samples"][0]
        self.assertEqual((first[1]["le"], first[2]), (repr(UPSTREAM_BUCKETS_SECONDS[0]), 1))

    def test_bucket_bounds_are_increasing_seconds(self):
        for bounds in (HTTP_REQUEST_BUCKETS_SECONDS, UPSTREAM_BUCKETS_SECONDS):
            with self.subTest(bounds=bounds):
                self.assertEqual(list(bounds), sorted(set(bounds)))
                self.assertTrue(all(0 < b < 60 for b in bounds))


class Scrape(unittest.TestCase):
    """The whole runtime's /metrics, after traffic that touches every family."""

    @classmethod
    def setUpClass(cls):
        cls.stack = LocalStack(google=False)

    @classmethod
    def tearDownClass(cls):
        cls.stack.close()

    def scrape(self) -> dict:
        status, headers, body = http_call(self.stack.port, "GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
        return parse_exposition(body.decode("utf-8"))

    def test_the_scrape_is_valid_and_latencies_are_histograms(self):
        self.assertTrue(self.stack.deliver(self.stack.mtls_payload())["ok"])
        body = json.dumps({"document_id": "doc-1"}).encode()
        self.assertEqual(self.stack.call("POST", "/v1/rpc/watermark", body)[0], 200)
        self.assertEqual(self.stack.call("POST", "/v1/rpc/watermark", body, sign=False)[0], 401)
        self.stack.call("GET", "/healthz", sign=False)
        self.stack.call("GET", "/nope", sign=False)
        families = self.scrape()
        families = self.scrape()  # the first scrape is itself counted in the second
        for name in ("enclave_http_request_seconds", UPSTREAM_SECONDS):
            with self.subTest(name):
                self.assertEqual(families[name]["type"], "histogram")
                self.assertTrue(families[name]["samples"])
        requests = families["enclave_http_request_seconds"]["samples"]
        self.assertIn({"route": "/metrics", "le": "+Inf"},
                      [labels for n, labels, _ in requests if n.endswith("_bucket")])
        self.assertIn("enclave_http_requests_total", families)
        self.assertIn("enclave_rpc_auth_failures_total", families)

    def test_one_naming_scheme(self):
        for name, family in self.scrape().items():
            with self.subTest(name):
                self.assertTrue(name.startswith("enclave_"))
                self.assertIsNotNone(family["type"])
                self.assertTrue(family["help"])
                if family["type"] == "counter":
                    self.assertTrue(name.endswith("_total"))
                if family["type"] == "histogram":
                    self.assertTrue(name.endswith("_seconds"))


if __name__ == "__main__":
    unittest.main()
