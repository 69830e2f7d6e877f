"""Canonical msgpack: one byte string per value, so signatures can be recomputed.

``encode`` writes maps with their (str) keys sorted, tuples as arrays, ints in their
smallest form and floats as float64 (msgpack-python's defaults). ``decode`` is strict: it
accepts only the types ``encode`` writes, rejects ext types (including msgpack's timestamp),
duplicate or non-str map keys, NaN, trailing bytes, and anything over ``max_size``.
Everything ``decode`` returns, ``encode`` accepts.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from .errors import CanonicalEncodingError, MalformedRecord

MAX_DEPTH = 32  # arrays/maps nested deeper than this are refused both ways
DEFAULT_MAX_SIZE = 1 << 20
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1  # msgpack's uint64


def encode(obj: Any, *, max_depth: int = MAX_DEPTH) -> bytes:
    """Deterministic msgpack of ``obj``; :class:`CanonicalEncodingError` if it has none."""
    normal = _normalize(obj, max_depth)
    try:
        return msgpack.packb(normal, use_bin_type=True)
    except (ValueError, OverflowError) as exc:  # e.g. a str with lone surrogates
        raise CanonicalEncodingError(f"cannot encode: {exc}") from None


def _normalize(obj: Any, depth: int) -> Any:
    # bool before int: bool is an int subclass
    if obj is None or isinstance(obj, (bool, str, bytes)):
        return obj
    if isinstance(obj, int):
        if not _INT_MIN <= obj <= _INT_MAX:
            raise CanonicalEncodingError(f"integer {obj} is outside the 64-bit range")
        return int(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            raise CanonicalEncodingError("NaN has no canonical encoding")
        return float(obj)
    if isinstance(obj, bytearray):
        return bytes(obj)
    if depth <= 0 and isinstance(obj, (list, tuple, dict)):
        raise CanonicalEncodingError("nested deeper than the limit")
    if isinstance(obj, (list, tuple)):
        return [_normalize(item, depth - 1) for item in obj]
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise CanonicalEncodingError(f"map key {key!r} is not a str")
        return {str(key): _normalize(obj[key], depth - 1) for key in sorted(obj)}
    raise CanonicalEncodingError(f"type {type(obj).__name__} has no canonical encoding")


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise MalformedRecord(f"map key {key!r} is not a str")
        if key in out:
            raise MalformedRecord(f"duplicate map key {key!r}")
        out[key] = value
    return out


def _refuse_ext(code: int, data: bytes) -> None:
    raise MalformedRecord(f"msgpack ext type {code} is not accepted")


def _check_decoded(obj: Any, depth: int) -> None:
    if isinstance(obj, list):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, float):
        if math.isnan(obj):
            raise MalformedRecord("NaN is not accepted")
        return
    elif obj is None or isinstance(obj, (bool, int, str, bytes)):
        return
    else:  # msgpack's Timestamp, decoded internally without calling ext_hook
        raise MalformedRecord(f"type {type(obj).__name__} is not accepted")
    if depth <= 0:
        raise MalformedRecord("nested deeper than the limit")
    for item in items:
        _check_decoded(item, depth - 1)


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = MAX_DEPTH) -> Any:
    """Decode exactly one canonical value from ``data``; :class:`MalformedRecord` otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedRecord(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise MalformedRecord(f"{len(data)} bytes exceed the limit of {max_size}")
    try:
        obj = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_pairs_to_dict,
            ext_hook=_refuse_ext,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MalformedRecord(f"not canonical msgpack: {exc or type(exc).__name__}") from None
    _check_decoded(obj, max_depth)
    return obj
