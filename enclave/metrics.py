"""In-process metrics in the Prometheus text format 0.0.4: counters, gauges and histograms.

Names: prefix `enclave_`, base units, `_total` for counters, `_seconds` for durations. Each
family is rendered once, HELP and TYPE first, then all its samples.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left

UPSTREAM_SECONDS = "enclave_upstream_seconds"  # latency of outbound calls, label `upstream`
MAX_SERIES_PER_METRIC = 512  # bound label cardinality: unknown paths must not grow memory

# Histogram bucket upper bounds, in seconds (`le`; +Inf is implicit).
# Handling one request inside the runtime: /healthz takes well under a millisecond, a
# signature a few milliseconds, an RPC up to the 10 s upstream timeout.
HTTP_REQUEST_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                0.5, 1.0, 2.5, 5.0, 10.0)
# One outbound call (Google, the watermark service) through the parent's proxy: tens to
# hundreds of milliseconds when healthy, 10 s at the timeout.
UPSTREAM_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_BUCKETS_SECONDS = HTTP_REQUEST_BUCKETS_SECONDS
_KNOWN_BUCKETS = {UPSTREAM_SECONDS: UPSTREAM_BUCKETS_SECONDS}
# Latency families used to be summaries (count and sum); observe() now records histograms.
_KIND_ALIASES = {"summary": "histogram"}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _key(labels: dict | None) -> tuple:
    return tuple(sorted((labels or {}).items()))


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class Histogram:
    """One histogram series: a count per bucket (not cumulative), the sum and the count.

    Mutated only under the owning Metrics' lock.
    """

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value on a bound is inside
        self.sum += value
        self.count += 1

    def copy(self) -> "Histogram":
        other = Histogram(self.bounds)
        other.counts, other.sum, other.count = list(self.counts), self.sum, self.count
        return other


class Metrics:
    """Thread-safe counters, gauges and latency histograms."""

    def __init__(self):
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}
        self._buckets: dict[str, tuple] = {}
        self._values: dict[str, dict[tuple, float]] = {}
        self._histograms: dict[str, dict[tuple, Histogram]] = {}
        self._gauge_fns: dict[str, object] = {}

    def describe(self, name: str, kind: str, help_text: str, *, buckets: tuple | None = None) -> None:
        """Declare a family: kind counter, gauge or histogram ("summary" means histogram)."""
        kind = _KIND_ALIASES.get(kind, kind)
        with self._lock:
            self._meta[name] = (kind, help_text)
            if buckets is not None:
                self._buckets[name] = tuple(buckets)
            if kind != "histogram":
                self._values.setdefault(name, {})

    def _add(self, name: str, labels: dict | None, value: float, replace: bool) -> None:
        key = _key(labels)
        with self._lock:
            series = self._values.setdefault(name, {})
            if key not in series and len(series) >= MAX_SERIES_PER_METRIC:
                return
            series[key] = value if replace else series.get(key, 0.0) + value

    @staticmethod
    def series_keys(items) -> tuple:
        """Prebuilt keys for add_keyed: [(name, labels), ...] -> ((name, key), ...)."""
        return tuple((name, _key(labels)) for name, labels in items)

    def histogram(self, name: str, labels: dict | None = None,
                  buckets: tuple | None = None) -> Histogram | None:
        """The series for `labels`, created if needed (None beyond MAX_SERIES_PER_METRIC)."""
        with self._lock:
            return self._histogram(name, _key(labels), buckets)

    def _histogram(self, name: str, key: tuple, buckets: tuple | None) -> Histogram | None:
        series = self._histograms.setdefault(name, {})
        hist = series.get(key)
        if hist is None:
            if len(series) >= MAX_SERIES_PER_METRIC:
                return None
            bounds = (self._buckets.get(name) or buckets or _KNOWN_BUCKETS.get(name)
                      or DEFAULT_BUCKETS_SECONDS)
            hist = series[key] = Histogram(bounds)
        return hist

    def add_keyed(self, keys: tuple, values: tuple, histogram: Histogram | None = None,
                  seconds: float = 0.0) -> None:
        """Counter increments with keys from series_keys(), and optionally one observation on
        a series from histogram(), all under one lock."""
        with self._lock:
            for (name, key), value in zip(keys, values):
                series = self._values.setdefault(name, {})
                if key in series or len(series) < MAX_SERIES_PER_METRIC:
                    series[key] = series.get(key, 0.0) + value
            if histogram is not None:
                histogram.observe(seconds)

    def inc(self, name: str, labels: dict | None = None, value: float = 1.0) -> None:
        self._add(name, labels, value, replace=False)

    def set(self, name: str, value: float, labels: dict | None = None) -> None:
        self._add(name, labels, value, replace=True)

    def gauge_fn(self, name: str, fn) -> None:
        """A gauge computed at render time: fn() -> float | None (None: not shown)."""
        with self._lock:
            self._gauge_fns[name] = fn

    def observe(self, name: str, seconds: float, labels: dict | None = None, *,
                buckets: tuple | None = None) -> None:
        """One observation on histogram `name` (bounds: describe()'s, else `buckets`)."""
        with self._lock:
            hist = self._histogram(name, _key(labels), buckets)
            if hist is not None:
                hist.observe(seconds)

    def value(self, name: str, labels: dict | None = None) -> float:
        """A counter or gauge; for a histogram `x`, also `x_count` and `x_sum`."""
        key = _key(labels)
        with self._lock:
            series = self._values.get(name)
            if series is not None and key in series:
                return series[key]
            for suffix in ("_count", "_sum"):
                if name.endswith(suffix):
                    hist = self._histograms.get(name[:-len(suffix)], {}).get(key)
                    if hist is not None:
                        return float(hist.count if suffix == "_count" else hist.sum)
            return 0.0

    def render(self) -> str:
        with self._lock:
            values = {name: dict(series) for name, series in self._values.items()}
            histograms = {name: {key: h.copy() for key, h in series.items()}
                          for name, series in self._histograms.items()}
            meta = dict(self._meta)
            fns = dict(self._gauge_fns)
        for name, fn in fns.items():
            try:
                result = fn()
            except Exception:  # a broken gauge must not break /metrics
                result = None
            if result is not None:
                values.setdefault(name, {})[()] = float(result)
        lines: list[str] = []
        for name in sorted(set(values) | set(histograms) | set(meta)):
            kind, help_text = meta.get(name) or (
                "histogram" if name in histograms else "untyped", "")
            if help_text:
                lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            for key, value in sorted(values.get(name, {}).items()):
                lines.append(f"{name}{_labels(key)} {_number(value)}")
            for key, hist in sorted(histograms.get(name, {}).items()):
                _render_histogram(lines, name, key, hist)
        return "\n".join(lines) + "\n"


def _labels(key: tuple, extra: str = "") -> str:
    parts = [f'{k}="{_escape(str(v))}"' for k, v in key]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _render_histogram(lines: list[str], name: str, key: tuple, hist: Histogram) -> None:
    cumulative = 0
    for bound, count in zip(hist.bounds + (math.inf,), hist.counts):
        cumulative += count
        le_label = 'le="+Inf"' if bound == math.inf else f'le="{float(bound)!r}"'
        lines.append(f"{name}_bucket{_labels(key, le_label)} {cumulative}")
    lines.append(f"{name}_sum{_labels(key)} {_number(hist.sum)}")
    lines.append(f"{name}_count{_labels(key)} {hist.count}")
