"""Strict JSON for what peers hand us (deliveries, envelopes, allow-list files): one decoder that
refuses duplicate keys (which one would win is a parser's choice) and NaN/Infinity (not JSON)."""

from __future__ import annotations

import json


def no_duplicates(pairs: list) -> dict:
    """object_pairs_hook: a JSON object, or ValueError on a key seen twice."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key")
        out[key] = value
    return out


def refuse_constant(name: str):
    """parse_constant: NaN, Infinity and -Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=no_duplicates, parse_constant=refuse_constant)


def loads(text: str):
    """Decode one JSON document strictly; ValueError (json.JSONDecodeError for syntax) or
    RecursionError (nesting too deep) otherwise."""
    return _DECODER.decode(text)
