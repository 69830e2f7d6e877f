"""Circuit relay v2 messages (libp2p/specs relay/circuit-v2.md), as a hand-written protobuf codec.

```
message HopMessage  { enum Type { RESERVE = 0; CONNECT = 1; STATUS = 2; }
                      Type type = 1; Peer peer = 2; Reservation reservation = 3;
                      Limit limit = 4; Status status = 5; }
message StopMessage { enum Type { CONNECT = 0; STATUS = 1; }
                      Type type = 1; Peer peer = 2; Limit limit = 3; Status status = 4; }
message Peer        { bytes id = 1; repeated bytes addrs = 2; }
message Reservation { uint64 expire = 1; repeated bytes addrs = 2; bytes voucher = 3; }
message Limit       { uint32 duration = 1; uint64 data = 2; }
```

The fields are ``optional`` (proto2 / proto3 with presence): a set field is written even
when zero, so ``type = RESERVE`` (0) goes on the wire as go- and js-libp2p expect. Each
message travels uvarint-length-delimited (:mod:`~modelnet.protocols.framing`), at most
:data:`MAX_MESSAGE_SIZE` bytes, on the stream of its protocol:

- ``/libp2p/circuit/relay/0.2.0/hop`` (client -> relay): RESERVE a slot, or CONNECT to a
  peer holding one; the relay answers STATUS (with the reservation or the circuit's limit);
- ``/libp2p/circuit/relay/0.2.0/stop`` (relay -> reserved peer): CONNECT from a source
  peer; the peer answers STATUS. After two OKs the relay splices the streams: from then
  on they carry the relayed connection's bytes (Noise + Yamux over libp2p).

Decoding skips unknown fields, and is strict on what would hide a broken peer: a known
field with the wrong wire type, an unknown message type, a missing status in a STATUS
message and sizes past the caps are :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import dataclasses
import enum

from modelnet.identity import IdentityError, PeerID

from . import multiaddr
from .errors import LocalProtocolError, RemoteProtocolError
from .protobuf import LEN, U64, VARINT, capped, encode_fields, fields, int32

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"
MAX_MESSAGE_SIZE = 4096  # the spec's limit for one message
MAX_ADDRS = 16  # per peer or reservation; a relay listens on a few
_U32 = (1 << 32) - 1


class Status(enum.IntEnum):
    OK = 100
    RESERVATION_REFUSED = 200
    RESOURCE_LIMIT_EXCEEDED = 201
    PERMISSION_DENIED = 202
    CONNECTION_FAILED = 203
    NO_RESERVATION = 204
    MALFORMED_MESSAGE = 400
    UNEXPECTED_MESSAGE = 401


class HopType(enum.IntEnum):
    RESERVE = 0
    CONNECT = 1
    STATUS = 2


class StopType(enum.IntEnum):
    CONNECT = 0
    STATUS = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    peer_id: PeerID
    addrs: tuple[str, ...] = ()  # text multiaddrs


@dataclasses.dataclass(frozen=True, slots=True)
class Reservation:
    expire: int  # UNIX seconds
    addrs: tuple[str, ...] = ()  # the relay's own addresses, ending in /p2p/<relay>
    voucher: bytes = b""  # a signed envelope in the spec; kept opaque here


@dataclasses.dataclass(frozen=True, slots=True)
class Limit:
    duration: int = 0  # seconds a circuit may stay up; 0: no limit
    data: int = 0  # bytes allowed in each direction; 0: no limit


@dataclasses.dataclass(frozen=True, slots=True)
class HopMessage:
    type: HopType
    peer: Peer | None = None
    reservation: Reservation | None = None
    limit: Limit | None = None
    status: Status | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class StopMessage:
    type: StopType
    peer: Peer | None = None
    limit: Limit | None = None
    status: Status | None = None


# ---- writing ----------------------------------------------------------------------------


def _addrs_to_bytes(addrs: tuple[str, ...]) -> list[bytes]:
    if len(addrs) > MAX_ADDRS:
        raise LocalProtocolError(f"{len(addrs)} addresses: at most {MAX_ADDRS}")
    return [multiaddr.to_bytes(a) for a in addrs]


def _peer_bytes(peer: Peer | None) -> bytes | None:
    return None if peer is None else encode_fields([(1, peer.peer_id.bytes), (2, _addrs_to_bytes(peer.addrs))], proto3=False)


def _limit_bytes(limit: Limit | None) -> bytes | None:
    if limit is None:
        return None
    if not 0 <= limit.duration <= _U32 or not 0 <= limit.data <= U64:
        raise LocalProtocolError(f"limit out of range: {limit}")
    return encode_fields([(1, limit.duration or None), (2, limit.data or None)], proto3=False)


def _finish(data: bytes) -> bytes:
    if len(data) > MAX_MESSAGE_SIZE:
        raise LocalProtocolError(f"relay message of {len(data)} bytes is over {MAX_MESSAGE_SIZE}")
    return data


def encode_hop(msg: HopMessage) -> bytes:
    reservation = None
    if msg.reservation is not None:
        r = msg.reservation
        reservation = encode_fields([(1, r.expire), (2, _addrs_to_bytes(r.addrs)), (3, r.voucher or None)], proto3=False)
    return _finish(
        encode_fields(
            [
                (1, int(msg.type)),
                (2, _peer_bytes(msg.peer)),
                (3, reservation),
                (4, _limit_bytes(msg.limit)),
                (5, None if msg.status is None else int(msg.status)),
            ],
            proto3=False,
        )
    )


def encode_stop(msg: StopMessage) -> bytes:
    return _finish(
        encode_fields(
            [
                (1, int(msg.type)),
                (2, _peer_bytes(msg.peer)),
                (3, _limit_bytes(msg.limit)),
                (4, None if msg.status is None else int(msg.status)),
            ],
            proto3=False,
        )
    )


# ---- reading ----------------------------------------------------------------------------


def _addrs_from_bytes(values: list[bytes]) -> tuple[str, ...]:
    """Text addresses; one that does not decode is dropped, not fatal (as kad does)."""
    out = []
    for value in values:
        try:
            out.append(multiaddr.from_bytes(value))
        except RemoteProtocolError:
            continue
    return tuple(out)


def _decode_peer(data: bytes) -> Peer:
    peer_id, addrs = b"", []
    for number, value in fields(data, {1: LEN, 2: LEN}):
        if number == 1:
            peer_id = capped("peer id", value, multiaddr.MAX_MULTIHASH_SIZE)
        else:
            if len(addrs) == MAX_ADDRS:
                raise RemoteProtocolError(f"a peer with more than {MAX_ADDRS} addresses")
            addrs.append(value)
    try:
        return Peer(PeerID.from_bytes(peer_id), _addrs_from_bytes(addrs))
    except IdentityError as exc:
        raise RemoteProtocolError(f"relay message with a bad peer id: {exc}") from None


def _decode_reservation(data: bytes) -> Reservation:
    expire, addrs, voucher = 0, [], b""
    for number, value in fields(data, {1: VARINT, 2: LEN, 3: LEN}):
        if number == 1:
            expire = value
        elif number == 2:
            if len(addrs) == MAX_ADDRS:
                raise RemoteProtocolError(f"a reservation with more than {MAX_ADDRS} addresses")
            addrs.append(value)
        else:
            voucher = value
    return Reservation(expire, _addrs_from_bytes(addrs), voucher)


def _decode_limit(data: bytes) -> Limit:
    duration = data_limit = 0
    for number, value in fields(data, {1: VARINT, 2: VARINT}):
        if number == 1:
            duration = value & _U32
        else:
            data_limit = value
    return Limit(duration, data_limit)


def _enum(kind: type[enum.IntEnum], value: int, what: str):
    try:
        return kind(int32(value))
    except ValueError:
        raise RemoteProtocolError(f"unknown {what} {int32(value)}") from None


def _decode(data: bytes, numbers: dict[str, int]) -> dict[str, object]:
    """The fields of a Hop or Stop message by name; ``numbers`` maps names to field numbers."""
    data = capped("relay message", bytes(data), MAX_MESSAGE_SIZE)
    wire = {n: (VARINT if name in ("type", "status") else LEN) for name, n in numbers.items()}
    names = {n: name for name, n in numbers.items()}
    out: dict[str, object] = {}
    for number, value in fields(data, wire):
        out[names[number]] = value
    if "type" not in out:
        raise RemoteProtocolError("relay message without a type")
    return out


def _parts(raw: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    if "peer" in raw:
        out["peer"] = _decode_peer(raw["peer"])
    if "limit" in raw:
        out["limit"] = _decode_limit(raw["limit"])
    if "status" in raw:
        out["status"] = _enum(Status, raw["status"], "status")
    return out


def decode_hop(data: bytes) -> HopMessage:
    """A :class:`HopMessage`; :class:`RemoteProtocolError` if malformed."""
    raw = _decode(data, {"type": 1, "peer": 2, "reservation": 3, "limit": 4, "status": 5})
    msg = HopMessage(_enum(HopType, raw["type"], "hop message type"), **_parts(raw))
    if "reservation" in raw:
        msg = dataclasses.replace(msg, reservation=_decode_reservation(raw["reservation"]))
    _check(msg.type.name, msg.peer, msg.status)
    return msg


def decode_stop(data: bytes) -> StopMessage:
    """A :class:`StopMessage`; :class:`RemoteProtocolError` if malformed."""
    raw = _decode(data, {"type": 1, "peer": 2, "limit": 3, "status": 4})
    msg = StopMessage(_enum(StopType, raw["type"], "stop message type"), **_parts(raw))
    _check(msg.type.name, msg.peer, msg.status)
    return msg


def _check(kind: str, peer: Peer | None, status: Status | None) -> None:
    if kind == "CONNECT" and peer is None:
        raise RemoteProtocolError("CONNECT without a peer")
    if kind == "STATUS" and status is None:
        raise RemoteProtocolError("STATUS without a status")
