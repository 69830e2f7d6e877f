"""The kad-dht protobuf codec against libp2p's generated `kademlia_pb2`: identical bytes
out, the same content in, typed errors for malformed input."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.kad_dht.pb import kademlia_pb2 as pb

from modelnet.identity import PrivateKey
from modelnet.protocols import kad, multiaddr
from modelnet.protocols.errors import LocalProtocolError, RemoteProtocolError
from modelnet.protocols.framing import encode_uvarint
from modelnet.protocols.kad import (
    MAX_ADDR_SIZE,
    MAX_ADDRS,
    MAX_KEY_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_PEER_ADDRS_SIZE,
    MAX_PEER_ID_SIZE,
    MAX_PEERS,
    PROTOCOL_ID,
    ConnectionType,
    KadMessage,
    KadPeer,
    KadRecord,
    MessageType,
    decode_message,
    encode_message,
)

PEER_ID = PrivateKey.from_seed(bytes(range(32))).peer_id


def to_pb(msg: KadMessage) -> pb.Message:
    out = pb.Message(type=int(msg.type), key=msg.key, clusterLevelRaw=msg.cluster_level)
    if msg.record is not None:
        out.record.SetInParent()  # present even when every field is empty
        out.record.key, out.record.value = msg.record.key, msg.record.value
        out.record.timeReceived = msg.record.time_received
    for peers, target in ((msg.closer_peers, out.closerPeers), (msg.provider_peers, out.providerPeers)):
        for peer in peers:
            target.add(id=peer.id, addrs=list(peer.addrs), connection=int(peer.connection))
    return out


def from_pb(m: pb.Message) -> KadMessage:
    def peer(p: pb.Message.Peer) -> KadPeer:
        known = p.connection in set(ConnectionType)
        connection = ConnectionType(p.connection) if known else ConnectionType.NOT_CONNECTED
        return KadPeer(p.id, tuple(p.addrs), connection)

    record = KadRecord(m.record.key, m.record.value, m.record.timeReceived) if m.HasField("record") else None
    return KadMessage(
        type=MessageType(m.type),
        key=m.key,
        record=record,
        closer_peers=tuple(map(peer, m.closerPeers)),
        provider_peers=tuple(map(peer, m.providerPeers)),
        cluster_level=m.clusterLevelRaw,
    )


_peer = st.builds(
    KadPeer,
    id=st.binary(max_size=40),
    addrs=st.lists(st.binary(max_size=24), max_size=4).map(tuple),
    connection=st.sampled_from(ConnectionType),
)
_record = st.builds(
    KadRecord, key=st.binary(max_size=40), value=st.binary(max_size=80), time_received=st.text(max_size=24)
)
_message = st.builds(
    KadMessage,
    type=st.sampled_from(MessageType),
    key=st.binary(max_size=48),
    record=st.none() | _record,
    closer_peers=st.lists(_peer, max_size=4).map(tuple),
    provider_peers=st.lists(_peer, max_size=3).map(tuple),
    cluster_level=st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1)),
)


@settings(max_examples=300)
@given(_message)
def test_encoding_is_byte_identical_to_protobuf_both_ways(msg):
    reference = to_pb(msg).SerializeToString()
    assert encode_message(msg) == reference
    assert decode_message(reference) == msg


def test_exact_bytes_of_a_find_node_answer():
    msg = KadMessage(
        MessageType.FIND_NODE,
        key=b"ab",
        record=KadRecord(b"k", b"", "t"),
        closer_peers=(KadPeer(b"x", (b"", b"a"), ConnectionType.CAN_CONNECT),),
        cluster_level=3,
    )
    expected = b"\x08\x04\x12\x02ab\x1a\x06\n\x01k*\x01tB\n\n\x01x\x12\x00\x12\x01a\x18\x02P\x03"
    assert encode_message(msg) == expected
    assert decode_message(expected) == msg


@pytest.mark.parametrize(
    "msg, data",
    [
        (KadMessage(MessageType.PUT_VALUE), b""),  # every field default: nothing on the wire
        (KadMessage(MessageType.PING, record=KadRecord(b"", b"")), b"\x08\x05\x1a\x00"),  # empty but present
        (KadMessage(MessageType.GET_VALUE, cluster_level=-1), b"\x08\x01P" + b"\xff" * 9 + b"\x01"),
        (KadMessage(MessageType.FIND_NODE, closer_peers=(KadPeer(b""),)), b"\x08\x04B\x00"),
    ],
)
def test_defaults_and_presence(msg, data):
    assert encode_message(msg) == data == to_pb(msg).SerializeToString()
    assert decode_message(data) == msg


def test_protocol_id_is_ours_not_ipfs():
    assert PROTOCOL_ID == "/modelnet/kad/1.0.0"


# ---- decoding: protobuf's leniency where it is safe --------------------------------------

_BASE = encode_message(
    KadMessage(MessageType.GET_PROVIDERS, key=b"key", provider_peers=(KadPeer(b"id", (b"addr",)),))
)


@pytest.mark.parametrize(
    "unknown",
    [
        b"\x58\x96\x01",  # field 11, varint
        b"\x61" + bytes(8),  # field 12, fixed64
        b"\x6a\x03abc",  # field 13, length-delimited
        b"\x73\x08\x01\x7b\x7c\x74",  # field 14, a group holding a varint and a nested group
        b"\x7d" + bytes(4),  # field 15, fixed32
        b"\xf8\xff\xff\xff\x0f\x01",  # the largest field number
    ],
)
@pytest.mark.parametrize("where", [0, 2, len(_BASE)])
def test_unknown_fields_of_every_wire_type_are_skipped(unknown, where):
    data = _BASE[:where] + unknown + _BASE[where:]
    assert decode_message(data) == decode_message(_BASE)
    assert from_pb(pb.Message.FromString(data)) == decode_message(_BASE)


def test_libp2p_extension_fields_are_ignored():
    m = pb.Message(type=pb.Message.FIND_NODE, key=b"k", senderRecord=b"envelope")
    m.record.key, m.record.author, m.record.signature = b"k", b"me", b"sig"
    m.closerPeers.add(id=b"id", addrs=[b"a"], signedRecord=b"envelope")
    assert decode_message(m.SerializeToString()) == KadMessage(
        MessageType.FIND_NODE, key=b"k", record=KadRecord(b"k", b""), closer_peers=(KadPeer(b"id", (b"a",)),)
    )


def test_repeated_singular_fields_follow_protobuf():
    # a sub-message sent twice merges; a scalar sent twice keeps the last value
    data = b"\x1a\x03\x0a\x01a\x1a\x03\x12\x01b" + b"\x12\x01x\x12\x01y" + b"\x08\x01\x08\x04"
    expected = KadMessage(MessageType.FIND_NODE, key=b"y", record=KadRecord(b"a", b"b"))
    assert decode_message(data) == expected == from_pb(pb.Message.FromString(data))


def test_unknown_connection_type_reads_as_not_connected():
    data = b"\x08\x04B\x05\n\x01x\x18\x07"
    assert decode_message(data).closer_peers == (KadPeer(b"x", (), ConnectionType.NOT_CONNECTED),)


# ---- decoding: what is refused ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\x08",  # tag without its value
        b"\x08\x84",  # varint cut short
        b"\x12\x05abc",  # key shorter than its length
        b"\x12",  # length missing
        b"\x61\x00\x00",  # fixed64 cut short
        b"\x6d\x00",  # fixed32 cut short
        b"\x73\x08\x01",  # group never ended
        b"\x74",  # end of a group that never started
        b"\x73\x7c",  # group ended with another field's number
        b"\x73" * 40 + b"\x74" * 40,  # groups nested too deep
        b"\x0e",  # wire type 6
        b"\x0f",  # wire type 7
        b"\x00\x01",  # field number 0
        b"\x0a\x01\x04",  # type as length-delimited
        b"\x10\x01",  # key as a varint
        b"\x1d\x00\x00\x00\x00",  # record as fixed32
        b"\x41" + bytes(8),  # closerPeers as fixed64
        b"\x4a\x00\x4b\x4c",  # providerPeers as a group
        b"\x52\x00",  # clusterLevelRaw as length-delimited
        b"\x1a\x02\x08\x01",  # record key as a varint
        b"\x42\x02\x12\x05",  # a peer whose address is longer than the peer
        b"\x08\x06",  # unknown message type
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # message type -1
        b"\x1a\x03\x2a\x01\xff",  # timeReceived not UTF-8
        b"\x42\x03\x0a\x01",  # peer cut short inside the list
        b"\x08" + b"\xff" * 10 + b"\x01",  # varint past 10 bytes
    ],
)
def test_malformed_input_is_a_remote_error(data):
    with pytest.raises(RemoteProtocolError):
        decode_message(data)


def _peers_field(number: int, peers: int, addrs: int = 0) -> bytes:
    peer = b"\x0a\x01x" + b"\x12\x01a" * addrs
    return (bytes([number << 3 | 2, len(peer)]) + peer) * peers


@pytest.mark.parametrize(
    "data, ok",
    [
        (_peers_field(8, MAX_PEERS), True),
        (_peers_field(8, MAX_PEERS + 1), False),
        (_peers_field(9, MAX_PEERS + 1), False),
        (_peers_field(8, 1, MAX_ADDRS), True),
        (_peers_field(8, 1, MAX_ADDRS + 1), False),
        (b"\x12\x80\x08" + bytes(MAX_KEY_SIZE), True),
        (b"\x12\x81\x08" + bytes(MAX_KEY_SIZE + 1), False),
        (b"\x1a\x84\x08\x0a\x81\x08" + bytes(MAX_KEY_SIZE + 1), False),  # record key
        (b"\x6a\xfc\xff\x3f" + bytes(MAX_MESSAGE_SIZE - 4), True),  # unknown field filling 1 MiB
        (b"\x6a\xfd\xff\x3f" + bytes(MAX_MESSAGE_SIZE - 3), False),
    ],
)
def test_size_caps(data, ok):
    if ok:
        decode_message(data)
        pb.Message.FromString(data)  # the test input itself is valid protobuf
    else:
        pb.Message.FromString(data)
        with pytest.raises(RemoteProtocolError):
            decode_message(data)


# ---- properties over arbitrary bytes ----------------------------------------------------


def _mutations(data: bytes):
    if not data:
        return st.binary(max_size=16)
    return st.one_of(
        st.integers(0, len(data)).map(lambda n: data[:n]),
        st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)).map(
            lambda t: data[: t[0]] + bytes([t[1]]) + data[t[0] + 1 :]
        ),
        st.tuples(st.integers(0, len(data)), st.binary(min_size=1, max_size=6)).map(
            lambda t: data[: t[0]] + t[1] + data[t[0] :]
        ),
    )


_BYTES = st.one_of(st.binary(max_size=80), _message.map(encode_message).flatmap(_mutations))


@settings(max_examples=600)
@given(_BYTES)
def test_any_bytes_decode_like_protobuf_or_fail_typed(data):
    try:
        ours = decode_message(data)
    except RemoteProtocolError:
        ours = None
    try:
        reference = pb.Message.FromString(data)
    except Exception:  # protobuf's DecodeError
        assert ours is None, "we accepted bytes protobuf itself rejects"
        return
    if ours is not None:
        assert ours == from_pb(reference)
        assert decode_message(encode_message(ours)) == ours


# ---- encoding: limits are ours too ------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        KadMessage(MessageType.PING, key=bytes(MAX_KEY_SIZE + 1)),
        KadMessage(MessageType.PUT_VALUE, record=KadRecord(bytes(MAX_KEY_SIZE + 1), b"")),
        KadMessage(MessageType.PUT_VALUE, record=KadRecord(b"k", bytes(MAX_MESSAGE_SIZE))),
        KadMessage(MessageType.FIND_NODE, closer_peers=(KadPeer(b"x"),) * (MAX_PEERS + 1)),
        KadMessage(MessageType.GET_PROVIDERS, provider_peers=(KadPeer(b"x"),) * (MAX_PEERS + 1)),
        KadMessage(MessageType.FIND_NODE, closer_peers=(KadPeer(b"x", (b"a",) * (MAX_ADDRS + 1)),)),
        KadMessage(MessageType.PING, cluster_level=2**31),
        KadMessage(MessageType.PING, cluster_level=-(2**31) - 1),
        KadMessage(6),  # type: ignore[arg-type]
        KadMessage(MessageType.FIND_NODE, closer_peers=(KadPeer(b"x", (), 9),)),  # type: ignore[arg-type]
        KadMessage(MessageType.PING, key="text"),  # type: ignore[arg-type]
        KadMessage(MessageType.FIND_NODE, closer_peers=(KadPeer(b"x", ("/ip4/1.2.3.4",)),)),  # type: ignore[arg-type]
        KadMessage(MessageType.PUT_VALUE, record=KadRecord(b"k", b"v", "\ud800")),
        KadMessage(MessageType.PUT_VALUE, record=KadRecord(b"k", b"v", b"bytes")),  # type: ignore[arg-type]
    ],
)
def test_invalid_messages_are_a_local_error(msg):
    with pytest.raises(LocalProtocolError):
        encode_message(msg)


def test_plain_ints_encode_like_the_enums():
    assert encode_message(KadMessage(4)) == encode_message(KadMessage(MessageType.FIND_NODE))  # type: ignore[arg-type]


# ---- KadPeer <-> PeerID and text multiaddrs -----------------------------------------------


def test_peer_round_trip_through_the_wire():
    addrs = ["/ip4/127.0.0.1/tcp/4001", "/ip6/::1/udp/4001/quic-v1", "/dns4/example.com/tcp/443/wss"]
    peer = KadPeer.from_peer(PEER_ID, addrs, ConnectionType.CONNECTED)
    assert peer.id == PEER_ID.bytes and peer.addrs == tuple(map(multiaddr.to_bytes, addrs))
    msg = decode_message(encode_message(KadMessage(MessageType.FIND_NODE, closer_peers=(peer,))))
    assert msg.closer_peers[0].to_peer() == (PEER_ID, addrs)
    assert msg.closer_peers[0].connection is ConnectionType.CONNECTED


def test_from_peer_skips_bad_addresses_and_keeps_at_most_the_cap():
    good = [f"/ip4/10.0.0.1/tcp/{port}" for port in range(MAX_ADDRS + 5)]
    peer = KadPeer.from_peer(PEER_ID, ["not an address", good[0], "/tcp/99999", *good[1:]])
    assert peer.addrs == tuple(multiaddr.to_bytes(a) for a in good[:MAX_ADDRS])
    encode_message(KadMessage(MessageType.FIND_NODE, closer_peers=(peer,)))  # within the cap


def test_to_peer_drops_undecodable_addresses(caplog):
    peer = KadPeer(PEER_ID.bytes, (b"\x7f", multiaddr.to_bytes("/ip4/1.2.3.4/tcp/1"), b""))
    with caplog.at_level(logging.DEBUG, logger="modelnet.protocols.kad"):
        assert peer.to_peer() == (PEER_ID, ["/ip4/1.2.3.4/tcp/1"])
    assert "dropping an address" in caplog.text


@pytest.mark.parametrize("peer_id", [b"", b"x", b"\x12\x20" + bytes(32), PEER_ID.bytes[:-1]])
def test_to_peer_rejects_a_bad_peer_id(peer_id):
    with pytest.raises(RemoteProtocolError):
        KadPeer(peer_id).to_peer()


# ---- hostile sizes: caps on peer ids and addresses (review finding 1) ----------------------


def _serialize_peer_fields(peer_id: bytes, addrs: list[bytes]) -> bytes:
    m = pb.Message.Peer(id=peer_id, addrs=addrs)
    return m.SerializeToString()


def _find_node_answer(entry: bytes) -> bytes:
    return pb.Message(type=pb.Message.FIND_NODE).SerializeToString() + _length_field(8, entry)


def _length_field(number: int, value: bytes) -> bytes:
    return encode_uvarint(number << 3 | 2) + encode_uvarint(len(value)) + value


_ADDR_1K = b"\x89\x06" + bytes(8)  # /memory/0: 10 bytes; padded below with /p2p-circuit flags
_FLAG = b"\xa2\x02"  # /p2p-circuit


def _addr_of(size: int) -> bytes:
    assert (size - len(_ADDR_1K)) % 2 == 0
    return _ADDR_1K + _FLAG * ((size - len(_ADDR_1K)) // 2)


@pytest.mark.parametrize(
    "peer_id, addrs, ok",
    [
        (bytes(MAX_PEER_ID_SIZE), [], True),
        (bytes(MAX_PEER_ID_SIZE + 1), [], False),
        (b"x", [_addr_of(MAX_ADDR_SIZE)], True),
        (b"x", [_addr_of(MAX_ADDR_SIZE + 2)], False),
        (b"x", [_addr_of(MAX_ADDR_SIZE)] * (MAX_PEER_ADDRS_SIZE // MAX_ADDR_SIZE), True),
        (b"x", [_addr_of(MAX_ADDR_SIZE)] * (MAX_PEER_ADDRS_SIZE // MAX_ADDR_SIZE) + [b"\x06\x00\x01"], False),
    ],
)
def test_peer_size_caps_both_ways(peer_id, addrs, ok):
    data = _find_node_answer(_serialize_peer_fields(peer_id, addrs))
    peer = KadPeer(peer_id, tuple(addrs))
    msg = KadMessage(MessageType.FIND_NODE, closer_peers=(peer,))
    if ok:
        assert decode_message(data) == msg
        assert encode_message(msg) == data
        for addr in addrs:
            multiaddr.from_bytes(addr)  # the test addresses are valid ones
    else:
        with pytest.raises(RemoteProtocolError):
            decode_message(data)
        with pytest.raises(LocalProtocolError):
            encode_message(msg)


def test_a_huge_p2p_value_is_refused_before_base58():
    # review finding 1: a 60 KB /p2p/ multihash in one ADD_PROVIDER froze the event loop
    size = 60_000
    multihash = encode_uvarint(0x12) + encode_uvarint(size) + b"\x07" * size
    addr = encode_uvarint(421) + encode_uvarint(len(multihash)) + multihash
    data = pb.Message(type=pb.Message.ADD_PROVIDER, key=b"k").SerializeToString()
    data += _length_field(9, _serialize_peer_fields(PEER_ID.bytes, [addr]))
    with pytest.raises(RemoteProtocolError):
        decode_message(data)
    with pytest.raises(RemoteProtocolError):
        multiaddr.from_bytes(addr)
    assert KadPeer(PEER_ID.bytes, (addr[:40],)).to_peer() == (PEER_ID, [])  # a bad address alone is dropped


def test_from_peer_keeps_addresses_within_the_byte_cap():
    big = "/dns4/" + "a" * 249 + "/tcp/1"  # 255 bytes: 16 fit, then room for the small one only
    small = "/ip4/1.2.3.4/tcp/1"
    over = "/dns4/" + "a" * 256 + "/tcp/1"  # a name past 255 bytes does not encode
    peer = KadPeer.from_peer(PEER_ID, [over] + [big] * 20 + [small])
    assert sum(map(len, peer.addrs)) <= MAX_PEER_ADDRS_SIZE
    fit = MAX_PEER_ADDRS_SIZE // len(multiaddr.to_bytes(big))
    assert peer.addrs == (multiaddr.to_bytes(big),) * fit + (multiaddr.to_bytes(small),)
    # so any two full lists of such peers still make a message under the limit
    full = KadMessage(MessageType.GET_PROVIDERS, key=bytes(MAX_KEY_SIZE), closer_peers=(peer,) * MAX_PEERS,
                      provider_peers=(peer,) * MAX_PEERS, record=KadRecord(b"k", bytes(64 * 1024)))
    assert len(encode_message(full)) <= MAX_MESSAGE_SIZE


def test_peer_entries_with_big_unknown_fields_decode_but_are_not_memoised():
    entry = _serialize_peer_fields(PEER_ID.bytes, [b"\x06\x00\x01"]) + _length_field(4, bytes(100_000))
    held = len(kad._memo_decode_peer)
    assert decode_message(_find_node_answer(entry)).closer_peers == (KadPeer(PEER_ID.bytes, (b"\x06\x00\x01",)),)
    assert len(kad._memo_decode_peer) == held


def test_memo_is_bounded_in_bytes_and_keeps_no_errors():
    calls = []

    def parse(data: bytes) -> bytes:
        calls.append(data)
        if not data:
            raise RemoteProtocolError("empty")
        return data

    memo = kad._Memo(parse, lambda key, _: len(key), max_bytes=10)
    assert memo(b"aaaa") == b"aaaa" and memo(b"bbbb") == b"bbbb" and memo(b"aaaa") == b"aaaa"
    assert len(calls) == 2  # the third call was a hit
    memo(b"cccc")  # 12 bytes: the least recently used (b"bbbb") goes
    assert memo.bytes == 8 and len(memo) == 2
    memo(b"bbbb")
    assert len(calls) == 4
    for _ in range(2):
        with pytest.raises(RemoteProtocolError):
            memo(b"")
    assert len(calls) == 6 and len(memo) == 2
