"""Canonical msgpack: deterministic encoding, strict decoding."""

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import modelnet.identity as identity
from modelnet.errors import ModelNetError
from modelnet.identity import CanonicalEncodingError, MalformedRecord, canonical

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
# everything canonical.decode can return (lists, str-keyed dicts)
canonical_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def test_map_keys_are_written_sorted_whatever_the_insertion_order():
    assert canonical.encode({"b": 1, "a": 2}) == canonical.encode({"a": 2, "b": 1})
    assert canonical.encode({"b": 1, "a": 2}) == b"\x82\xa1a\x02\xa1b\x01"


def test_tuples_are_arrays_and_bytes_are_bin():
    assert canonical.encode((1, b"x")) == canonical.encode([1, b"x"]) == b"\x92\x01\xc4\x01x"
    assert canonical.encode(bytearray(b"x")) == canonical.encode(b"x")


def test_ints_take_their_smallest_form_and_floats_are_float64():
    assert canonical.encode(1) == b"\x01"
    assert canonical.encode(1.0) == b"\xcb\x3f\xf0" + b"\x00" * 6


def test_infinity_round_trips():
    assert canonical.decode(canonical.encode(math.inf)) == math.inf


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        object(),
        {1: "int key"},
        {b"k": "bytes key"},
        1 << 64,
        -(1 << 63) - 1,
        math.nan,
        ["\udc80"],  # a lone surrogate is not UTF-8
    ],
)
def test_encode_refuses_values_without_a_canonical_form(value):
    with pytest.raises(CanonicalEncodingError):
        canonical.encode(value)


def test_encode_refuses_nesting_beyond_the_limit():
    deep: list = []
    for _ in range(canonical.MAX_DEPTH):
        deep = [deep]
    with pytest.raises(CanonicalEncodingError):
        canonical.encode(deep)
    assert canonical.decode(canonical.encode(deep[0])) == deep[0]
    with pytest.raises(CanonicalEncodingError):
        canonical.encode([[1]], max_depth=1)


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing
        b"\x01\x02",  # two objects
        b"\x92\x01",  # truncated array
        b"\xc1",  # never-used byte
        b"\xd4\x05\x00",  # ext type 5
        b"\xd6\xff\x00\x00\x00\x01",  # msgpack timestamp ext
        b"\x81\xc4\x01k\x01",  # bytes map key
        b"\x81\x01\x01",  # int map key
        b"\x82\xa1a\x01\xa1a\x02",  # duplicate key
        b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
        b"\xa1\xff",  # invalid UTF-8
        b"\x91" * 40 + b"\xc0",  # nested beyond MAX_DEPTH
        b"\x91" * 2000 + b"\xc0",  # beyond msgpack's own stack
    ],
)
def test_decode_refuses_anything_not_canonical(data):
    with pytest.raises(MalformedRecord):
        canonical.decode(data)


def test_decode_enforces_the_size_cap_and_type():
    value = canonical.encode(b"x" * 100)
    assert canonical.decode(value, max_size=len(value)) == b"x" * 100
    with pytest.raises(MalformedRecord):
        canonical.decode(value, max_size=len(value) - 1)
    with pytest.raises(MalformedRecord):
        canonical.decode("not bytes")  # type: ignore[arg-type]


def test_decode_refuses_declared_lengths_beyond_the_cap():
    # a bin header announcing 1 MiB with nothing behind it is refused, not waited for
    with pytest.raises(MalformedRecord):
        canonical.decode(b"\xc6\x00\x10\x00\x00", max_size=64)


def test_canonical_errors_are_modelnet_errors_and_exported():
    assert issubclass(CanonicalEncodingError, identity.IdentityError)
    assert issubclass(MalformedRecord, ModelNetError)
    assert identity.canonical is canonical
    assert {"SignedRecord", "open_record", "save_key", "load_key", "load_or_create_key"} <= set(identity.__all__)


@settings(max_examples=200)
@given(canonical_values)
def test_round_trip(value):
    data = canonical.encode(value)
    assert canonical.decode(data) == value
    assert canonical.encode(canonical.decode(data)) == data


@settings(max_examples=100)
@given(st.dictionaries(st.text(max_size=8), scalars, max_size=6))
def test_encoding_ignores_insertion_order(value):
    reordered = dict(reversed(list(value.items())))
    assert canonical.encode(reordered) == canonical.encode(value)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_any_bytes_decode_to_a_value_that_re_encodes_or_raise_malformed(data):
    try:
        value = canonical.decode(data)
    except MalformedRecord:
        return
    assert canonical.decode(canonical.encode(value)) == value


@settings(max_examples=200)
@given(canonical_values)
def test_non_canonical_msgpack_of_a_value_still_decodes_to_it(value):
    # another encoder's byte choices (unsorted keys, wider ints) must not change the value
    data = msgpack.packb(value, use_bin_type=True, use_single_float=False)
    assert canonical.decode(data) == value
