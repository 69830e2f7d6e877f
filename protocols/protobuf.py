"""The protobuf wire format, by hand: what the kad-dht and circuit-relay codecs share.

Reading is strict about what it reads (varints of at most 10 bytes, field numbers in range,
lengths within the data, groups nested at most :data:`MAX_GROUP_DEPTH` deep) and skips
fields it does not know, as protobuf does. Writing takes ``(field number, value)`` pairs in
field-number order.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from .errors import LocalProtocolError, RemoteProtocolError
from .framing import decode_uvarint, encode_uvarint

VARINT, FIXED64, LEN, START_GROUP, END_GROUP, FIXED32 = range(6)  # wire types
MAX_FIELD_NUMBER = (1 << 29) - 1
MAX_GROUP_DEPTH = 32  # unknown groups nest; bound the recursion that skips them
U64 = (1 << 64) - 1

Value = int | bytes | list[bytes] | None


# ---- writing ----------------------------------------------------------------------------


def encode_fields(fields: Iterable[tuple[int, Value]], *, proto3: bool) -> bytes:
    """Protobuf bytes of ``(field number, value)`` pairs, given in field-number order.

    None is an absent field. An int is a varint (a negative int32 goes out as its 64-bit
    two's complement, as protobuf does), bytes one length-delimited field, a list a repeated
    field or a present sub-message (every item is written). With ``proto3`` a zero int and
    empty bytes are left out, as proto3 singular fields are; otherwise (proto2, explicit
    presence) they are written.
    """
    out = bytearray()
    for number, value in fields:
        if value is None:
            continue
        if isinstance(value, int):
            if value or not proto3:
                out += encode_uvarint(number << 3 | VARINT) + encode_uvarint(value & U64)
            continue
        if isinstance(value, (bytes, bytearray)):
            if not value and proto3:
                continue
            value = [value]
        elif not isinstance(value, list) or not all(isinstance(v, (bytes, bytearray)) for v in value):
            raise LocalProtocolError(f"field {number}: expected bytes, got {value!r:.80}")
        for item in value:
            out += encode_uvarint(number << 3 | LEN) + encode_uvarint(len(item)) + item
    return bytes(out)


# ---- reading ----------------------------------------------------------------------------


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    header = decode_uvarint(data, pos)  # raises RemoteProtocolError past 10 bytes
    if header is None:
        raise RemoteProtocolError("truncated varint")
    value, pos = header
    return value & U64, pos


def _skip_group(data: bytes, pos: int, number: int, depth: int) -> int:
    if depth > MAX_GROUP_DEPTH:
        raise RemoteProtocolError("groups nested too deep")
    while True:
        tag, pos = read_varint(data, pos)
        if tag & 7 == END_GROUP:
            if tag >> 3 != number:
                raise RemoteProtocolError("end of group does not match its start")
            return pos
        _, pos = read_field(data, pos, tag, depth + 1)


def read_field(data: bytes, pos: int, tag: int, depth: int = 0) -> tuple[int | bytes | None, int]:
    """The value of the field with ``tag`` at ``pos`` (None for a group), and the next offset."""
    number, wire = tag >> 3, tag & 7
    if not 1 <= number <= MAX_FIELD_NUMBER:
        raise RemoteProtocolError(f"field number {number} out of range")
    if wire == VARINT:
        return read_varint(data, pos)
    if wire in (FIXED64, FIXED32, LEN):
        if wire == LEN:
            size, pos = read_varint(data, pos)
        else:
            size = 8 if wire == FIXED64 else 4
        if len(data) - pos < size:
            raise RemoteProtocolError(f"field {number} truncated")
        value = data[pos : pos + size]
        return (value if wire == LEN else int.from_bytes(value, "little")), pos + size
    if wire == START_GROUP:
        return None, _skip_group(data, pos, number, depth)
    raise RemoteProtocolError(f"field {number}: unexpected wire type {wire}")


def fields(data: bytes, known: dict[int, int]) -> Iterator[tuple[int, int | bytes]]:
    """``(number, value)`` of each field in ``known`` (number -> wire type); others skipped."""
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        value, pos = read_field(data, pos, tag)
        number = tag >> 3
        if number in known:
            if tag & 7 != known[number]:
                raise RemoteProtocolError(f"field {number} has wire type {tag & 7}, not {known[number]}")
            yield number, value


def int32(value: int) -> int:
    value &= 0xFFFFFFFF  # protobuf reads an int32 varint as its low 32 bits
    return value - (1 << 32) if value >> 31 else value


def capped(what: str, value: bytes, cap: int) -> bytes:
    if len(value) > cap:
        raise RemoteProtocolError(f"{what} of {len(value)} bytes is over the limit of {cap}")
    return value
