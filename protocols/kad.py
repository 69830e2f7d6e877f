"""The libp2p Kademlia wire format (libp2p/specs kad-dht), as a hand-written protobuf codec.

```
message Record { bytes key = 1; bytes value = 2; string timeReceived = 5; }
message Message {
  enum MessageType { PUT_VALUE = 0; GET_VALUE = 1; ADD_PROVIDER = 2; GET_PROVIDERS = 3;
                     FIND_NODE = 4; PING = 5; }
  enum ConnectionType { NOT_CONNECTED = 0; CONNECTED = 1; CAN_CONNECT = 2; CANNOT_CONNECT = 3; }
  message Peer { bytes id = 1; repeated bytes addrs = 2; ConnectionType connection = 3; }
  MessageType type = 1; int32 clusterLevelRaw = 10; bytes key = 2; Record record = 3;
  repeated Peer closerPeers = 8; repeated Peer providerPeers = 9;
}
```

Encoding is byte-identical to protobuf's own (proto3: defaults left out, fields in number
order), so go-, js- and rust-libp2p nodes speak to us unchanged; each message travels in
one :mod:`~modelnet.protocols.framing` frame. Decoding follows protobuf where it is safe
(unknown fields of every wire type skipped, a repeated sub-message merged, last scalar
wins) and is stricter where leniency would only hide a broken peer: a known field with the
wrong wire type, an unknown message type, invalid UTF-8, and sizes past the caps below are
:class:`RemoteProtocolError`. We run on ``/modelnet/kad/1.0.0``, never IPFS's DHT.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterable, TypeVar

from modelnet.identity import IdentityError, PeerID

from . import multiaddr
from .errors import LocalProtocolError, RemoteProtocolError
from .protobuf import LEN, VARINT, capped, encode_fields, fields, int32

log = logging.getLogger(__name__)

PROTOCOL_ID = "/modelnet/kad/1.0.0"
MAX_MESSAGE_SIZE = 1 << 20  # bytes; also the frame limit the driver should use
MAX_PEERS = 100  # per closerPeers / providerPeers list (a FIND_NODE answer carries K = 20)
MAX_ADDRS = 32  # per peer
MAX_KEY_SIZE = 1024  # bytes, for Message.key and Record.key
MAX_PEER_ID_SIZE = multiaddr.MAX_MULTIHASH_SIZE  # bytes of Peer.id, a multihash like a /p2p/ value
MAX_ADDR_SIZE = multiaddr.MAX_ADDR_SIZE  # bytes of one of Peer.addrs
MAX_PEER_ADDRS_SIZE = 4096  # bytes of all of one peer's addrs together
# The largest Peer entry that holds only the fields above (tags, length varints, connection).
# With both lists full that is 2 * MAX_PEERS * ~4.2 KiB ~ 840 KiB: any answer fits
# MAX_MESSAGE_SIZE, with room for a key and a value record of the store's 64 KiB.
_MAX_PEER_ENTRY = 2 + MAX_PEER_ID_SIZE + MAX_ADDRS * 3 + MAX_PEER_ADDRS_SIZE + 11



class MessageType(enum.IntEnum):
    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


class ConnectionType(enum.IntEnum):
    NOT_CONNECTED = 0
    CONNECTED = 1
    CAN_CONNECT = 2
    CANNOT_CONNECT = 3


_CONNECTION_VALUES = frozenset(ConnectionType)


@dataclasses.dataclass(frozen=True, slots=True)
class KadPeer:
    """``Message.Peer``: a peer id (multihash bytes) and its binary multiaddrs."""

    id: bytes
    addrs: tuple[bytes, ...] = ()
    connection: ConnectionType = ConnectionType.NOT_CONNECTED

    @classmethod
    def from_peer(
        cls,
        peer: PeerID,
        addrs: Iterable[str],
        connection: ConnectionType = ConnectionType.NOT_CONNECTED,
    ) -> KadPeer:
        """Text multiaddrs are encoded; ones that don't encode, and any past MAX_ADDRS or
        MAX_PEER_ADDRS_SIZE, are left out, so the peer always fits an answer."""
        encoded: list[bytes] = []
        total = 0
        for addr in addrs:
            if len(encoded) == MAX_ADDRS:
                log.debug("leaving out addresses of %s past %d", peer, MAX_ADDRS)
                break
            try:
                data = multiaddr.to_bytes(addr)
            except LocalProtocolError as exc:
                log.debug("leaving out address %.80r of %s: %s", addr, peer, exc)
                continue
            if total + len(data) > MAX_PEER_ADDRS_SIZE:
                log.debug("leaving out address %.80r of %s: past %d bytes", addr, peer, MAX_PEER_ADDRS_SIZE)
                continue
            encoded.append(data)
            total += len(data)
        return cls(peer.bytes, tuple(encoded), connection)

    def to_peer(self) -> tuple[PeerID, list[str]]:
        """The peer id and text multiaddrs; undecodable addresses are dropped, not fatal."""
        try:
            peer = PeerID.from_bytes(self.id)
        except IdentityError as exc:
            raise RemoteProtocolError(f"kad peer with a bad id: {exc}") from None
        addrs = []
        for data in self.addrs:
            try:
                addrs.append(multiaddr.from_bytes(data))
            except RemoteProtocolError as exc:
                log.debug("dropping an address of %s: %s", peer, exc)
        return peer, addrs


@dataclasses.dataclass(frozen=True, slots=True)
class KadRecord:
    key: bytes
    value: bytes
    time_received: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class KadMessage:
    type: MessageType
    key: bytes = b""
    record: KadRecord | None = None
    closer_peers: tuple[KadPeer, ...] = ()
    provider_peers: tuple[KadPeer, ...] = ()
    cluster_level: int = 0


# ---- writing ----------------------------------------------------------------------------


def _check_size(what: str, size: int, cap: int) -> None:
    if size > cap:
        raise LocalProtocolError(f"{what}: {size} is over the limit of {cap}")


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class _Memo(Generic[_K, _V]):
    """A least-recently-used memo of a pure function, bounded in bytes (``cost`` estimates
    an entry's key plus value) rather than only in entries; exceptions are not memoised."""

    def __init__(self, function: Callable[[_K], _V], cost: Callable[[_K, _V], int], max_bytes: int) -> None:
        self._function, self._cost, self.max_bytes = function, cost, max_bytes
        self._entries: OrderedDict[_K, tuple[_V, int]] = OrderedDict()
        self.bytes = 0

    def __call__(self, arg: _K) -> _V:
        hit = self._entries.get(arg)
        if hit is not None:
            self._entries.move_to_end(arg)
            return hit[0]
        value = self._function(arg)
        size = self._cost(arg, value)
        self._entries[arg] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
        return value

    def __len__(self) -> int:
        return len(self._entries)


# Peer entries repeat across nearly every answer a node sends and receives (the same
# contacts, the same addresses): memoising the pure per-peer codec halves lookup CPU. One
# memo per direction; the caps make an entry at most ~2 * 4.3 KiB (an honest one ~0.3 KiB),
# and each memo holds at most _MEMO_BYTES (~16 MiB; ~50,000 honest entries).
_MEMO_BYTES = 16 << 20
_ENTRY_OVERHEAD = 200  # bytes of Python objects around an entry's key and value, roughly


def _check_peer(peer: KadPeer) -> None:
    _check_size("peer id size", len(peer.id), MAX_PEER_ID_SIZE)
    _check_size("addresses of a peer", len(peer.addrs), MAX_ADDRS)
    for addr in peer.addrs:
        _check_size("address size", len(addr), MAX_ADDR_SIZE)
    _check_size("address bytes of a peer", sum(map(len, peer.addrs)), MAX_PEER_ADDRS_SIZE)


def _serialize_peer(peer: KadPeer) -> bytes:
    _check_peer(peer)
    return encode_fields([(1, peer.id), (2, list(peer.addrs)), (3, ConnectionType(peer.connection))], proto3=True)


_encode_peer = _Memo(_serialize_peer, lambda _, data: 2 * len(data) + _ENTRY_OVERHEAD, _MEMO_BYTES)


def _encode_peers(what: str, peers: tuple[KadPeer, ...]) -> list[bytes]:
    _check_size(what, len(peers), MAX_PEERS)
    return [_encode_peer(peer) for peer in peers]


def _encode_record(record: KadRecord) -> bytes:
    _check_size("record key size", len(record.key), MAX_KEY_SIZE)
    try:
        time_received = record.time_received.encode("utf-8")
    except (AttributeError, UnicodeEncodeError) as exc:
        raise LocalProtocolError(f"time_received is not text: {exc}") from None
    return encode_fields([(1, record.key), (2, record.value), (5, time_received)], proto3=True)


def encode_message(msg: KadMessage) -> bytes:
    """The protobuf bytes of ``msg``; :class:`LocalProtocolError` if it breaks a limit."""
    _check_size("key size", len(msg.key), MAX_KEY_SIZE)
    if not -(1 << 31) <= msg.cluster_level < 1 << 31:
        raise LocalProtocolError(f"cluster_level {msg.cluster_level} is not an int32")
    try:
        data = encode_fields(
            [
                (1, MessageType(msg.type)),
                (2, msg.key),
                (3, [] if msg.record is None else [_encode_record(msg.record)]),
                (8, _encode_peers("closer peers", msg.closer_peers)),
                (9, _encode_peers("provider peers", msg.provider_peers)),
                (10, msg.cluster_level),
            ],
            proto3=True,
        )
    except ValueError as exc:  # an int that is no MessageType / ConnectionType
        raise LocalProtocolError(str(exc)) from None
    _check_size("message size", len(data), MAX_MESSAGE_SIZE)
    return data


# ---- reading ----------------------------------------------------------------------------


def _parse_peer(data: bytes) -> KadPeer:
    peer_id, addrs, connection = b"", [], ConnectionType.NOT_CONNECTED
    addrs_size = 0
    for number, value in fields(data, {1: LEN, 2: LEN, 3: VARINT}):
        if number == 1:
            peer_id = capped("peer id", value, MAX_PEER_ID_SIZE)
        elif number == 2:
            if len(addrs) == MAX_ADDRS:
                raise RemoteProtocolError(f"a peer with more than {MAX_ADDRS} addresses")
            addrs_size += len(capped("peer address", value, MAX_ADDR_SIZE))
            if addrs_size > MAX_PEER_ADDRS_SIZE:
                raise RemoteProtocolError(f"a peer with more than {MAX_PEER_ADDRS_SIZE} bytes of addresses")
            addrs.append(value)
        else:
            # only a hint: a value from a newer spec is read as "don't know", not an error
            value = int32(value)
            known = value in _CONNECTION_VALUES
            connection = ConnectionType(value) if known else ConnectionType.NOT_CONNECTED
    return KadPeer(peer_id, tuple(addrs), connection)


_memo_decode_peer = _Memo(_parse_peer, lambda data, _: 2 * len(data) + _ENTRY_OVERHEAD, _MEMO_BYTES)


def _decode_peer(data: bytes) -> KadPeer:
    # unknown fields (e.g. libp2p's signedRecord) can make an entry big: decode it, don't keep it
    return _parse_peer(data) if len(data) > _MAX_PEER_ENTRY else _memo_decode_peer(data)


def _decode_record(parts: list[bytes]) -> KadRecord:
    key, value, time_received = b"", b"", ""
    for part in parts:  # a sub-message sent twice is merged, later fields winning, as protobuf does
        for number, field in fields(part, {1: LEN, 2: LEN, 5: LEN}):
            if number == 1:
                key = capped("record key", field, MAX_KEY_SIZE)
            elif number == 2:
                value = field
            else:
                try:
                    time_received = field.decode("utf-8")
                except UnicodeDecodeError:
                    raise RemoteProtocolError("timeReceived is not UTF-8") from None
    return KadRecord(key, value, time_received)


def decode_message(data: bytes) -> KadMessage:
    """A :class:`KadMessage` from protobuf bytes; :class:`RemoteProtocolError` if malformed."""
    data = bytes(data)
    capped("message", data, MAX_MESSAGE_SIZE)
    msg_type, key, cluster_level = MessageType.PUT_VALUE, b"", 0
    record_parts: list[bytes] = []  # non-empty iff a record was sent, even an empty one
    peers: dict[int, list[KadPeer]] = {8: [], 9: []}
    for number, value in fields(data, {1: VARINT, 2: LEN, 3: LEN, 8: LEN, 9: LEN, 10: VARINT}):
        if number == 1:
            try:
                msg_type = MessageType(int32(value))
            except ValueError:
                raise RemoteProtocolError(f"unknown message type {int32(value)}") from None
        elif number == 2:
            key = capped("key", value, MAX_KEY_SIZE)
        elif number == 3:
            record_parts.append(value)
        elif number == 10:
            cluster_level = int32(value)
        else:
            if len(peers[number]) == MAX_PEERS:
                raise RemoteProtocolError(f"more than {MAX_PEERS} peers in one list")
            peers[number].append(_decode_peer(value))
    return KadMessage(
        type=msg_type,
        key=key,
        record=_decode_record(record_parts) if record_parts else None,
        closer_peers=tuple(peers[8]),
        provider_peers=tuple(peers[9]),
        cluster_level=cluster_level,
    )
