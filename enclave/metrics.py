"""In-process metrics rendered in the Prometheus text format (counters, gauges, summaries)."""

from __future__ import annotations

import threading

UPSTREAM_SECONDS = "enclave_upstream_seconds"  # latency of outbound calls, label `upstream`
MAX_SERIES_PER_METRIC = 512  # bound label cardinality: unknown paths must not grow memory


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _key(labels: dict | None) -> tuple:
    return tuple(sorted((labels or {}).items()))


class Metrics:
    """Thread-safe counters, gauges and latency summaries (count and sum)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple, float]] = {}
        self._gauge_fns: dict[str, object] = {}

    def describe(self, name: str, kind: str, help_text: str) -> None:
        with self._lock:
            self._meta[name] = (kind, help_text)
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

    def add_keyed(self, keys: tuple, values: tuple) -> None:
        """Several counter increments under one lock, with keys from series_keys()."""
        with self._lock:
            for (name, key), value in zip(keys, values):
                series = self._values.setdefault(name, {})
                if key in series or len(series) < MAX_SERIES_PER_METRIC:
                    series[key] = series.get(key, 0.0) + value

    def inc(self, name: str, labels: dict | None = None, value: float = 1.0) -> None:
        self._add(name, labels, value, replace=False)

    def set(self, name: str, value: float, labels: dict | None = None) -> None:
        self._add(name, labels, value, replace=True)

    def gauge_fn(self, name: str, fn) -> None:
        """A gauge computed at render time: fn() -> float | None (None: not shown)."""
        with self._lock:
            self._gauge_fns[name] = fn

    def observe(self, name: str, seconds: float, labels: dict | None = None) -> None:
        self._add(name + "_count", labels, 1.0, replace=False)
        self._add(name + "_sum", labels, seconds, replace=False)

    def value(self, name: str, labels: dict | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_key(labels), 0.0)

    def render(self) -> str:
        with self._lock:
            values = {name: dict(series) for name, series in self._values.items()}
            meta = dict(self._meta)
            fns = dict(self._gauge_fns)
        for name, fn in fns.items():
            try:
                result = fn()
            except Exception:  # a broken gauge must not break /metrics
                result = None
            if result is not None:
                values.setdefault(name, {})[()] = float(result)
        lines = []
        for name in sorted(values):
            base = name[:-6] if name.endswith("_count") else name[:-4] if name.endswith("_sum") else name
            kind, help_text = meta.get(name) or meta.get(base) or ("untyped", "")
            if name in meta or (base in meta and name.endswith("_count")):
                lines.append(f"# HELP {base} {help_text}")
                lines.append(f"# TYPE {base} {kind}")
            for key, value in sorted(values[name].items()):
                label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in key)
                number = repr(float(value)) if value != int(value) else str(int(value))
                lines.append(f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}")
        return "\n".join(lines) + "\n"
