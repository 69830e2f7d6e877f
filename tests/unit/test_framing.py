"""Length-prefixed framing: the one decoder every protocol's bytes go through."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.protocols.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from modelnet.protocols.framing import FrameDecoder, decode_uvarint, encode_frame, encode_uvarint


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_uvarint_round_trips(value):
    encoded = encode_uvarint(value)
    assert decode_uvarint(encoded) == (value, len(encoded))
    assert decode_uvarint(encoded[:-1]) is None  # cut short: wait for more


def test_known_uvarint_bytes():
    # the multiformats unsigned-varint examples
    assert encode_uvarint(1) == b"\x01"
    assert encode_uvarint(127) == b"\x7f"
    assert encode_uvarint(128) == b"\x80\x01"
    assert encode_uvarint(300) == b"\xac\x02"
    assert encode_uvarint(16384) == b"\x80\x80\x01"


def test_negative_varint_is_our_bug():
    with pytest.raises(LocalProtocolError):
        encode_uvarint(-1)


@given(st.lists(st.binary(max_size=300), max_size=8), st.data())
@settings(max_examples=200)
def test_frames_survive_any_split_of_the_byte_stream(payloads, data):
    stream = b"".join(encode_frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    out = []
    for start, end in zip([0] + cuts, cuts + [len(stream)]):
        decoder.receive_data(stream[start:end])
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert out == payloads
    assert decoder.pending_bytes == 0


def test_a_frame_over_the_limit_is_refused_before_it_is_buffered():
    decoder = FrameDecoder(max_size=10)
    with pytest.raises(FrameTooLarge):
        decoder.receive_data(encode_uvarint(11))  # the header alone is enough to refuse
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * 11, max_size=10)


def test_a_varint_longer_than_ten_bytes_is_garbage():
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().receive_data(b"\x80" * 11)


def test_truncated_frame_is_visible_at_end_of_stream():
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"hello")[:-2])
    assert decoder.next_frame() is None
    assert decoder.pending_bytes > 0


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_any_bytes_give_frames_or_a_typed_error(data):
    decoder = FrameDecoder(max_size=512)
    try:
        decoder.receive_data(data)
    except RemoteProtocolError:
        return
    taken = 0
    while (frame := decoder.next_frame()) is not None:
        assert len(frame) <= 512
        taken += len(frame)
    # Every byte is either in a frame, in a (possibly non-minimal) header, or pending.
    assert taken + decoder.pending_bytes <= len(data)
