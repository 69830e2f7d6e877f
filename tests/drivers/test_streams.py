"""FramedStream: length-prefixed frames over any Stream."""

from __future__ import annotations

from collections import deque

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.errors import ModelNetError
from modelnet.identity import PrivateKey
from modelnet.p2p.errors import DialError, HostClosed, ProtocolNotSupported, StreamReset
from modelnet.p2p.host import Stream
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.streams import MAX_ADDR_LENGTH, AddressBook, FramedStream, dial_in_order
from modelnet.protocols.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from modelnet.protocols.framing import encode_frame

PEER = PrivateKey.from_seed(b"\x07" * 32).peer_id


class ScriptedStream(Stream):
    """Hands out the given chunks one read at a time, then EOF; records what is written."""

    def __init__(self, chunks: list[bytes] = (), then_reset: bool = False) -> None:
        self.protocol = "/test/1"
        self.remote_peer = PEER
        self.chunks = deque(chunks)
        self.then_reset = then_reset  # end in a reset instead of EOF
        self.written = bytearray()
        self.closed = False
        self.was_reset = False

    async def read(self, max_bytes: int = 65536) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.chunks:
            if self.then_reset:
                raise StreamReset("scripted reset")
            return b""
        chunk = self.chunks.popleft()
        if len(chunk) > max_bytes:
            self.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written += data

    async def close(self) -> None:
        self.closed = True

    async def reset(self) -> None:
        self.was_reset = True


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


async def receive_all(framed: FramedStream) -> list[bytes]:
    frames = []
    while (frame := await framed.receive()) is not None:
        frames.append(frame)
    return frames


async def test_frames_across_chunk_boundaries():
    payloads = [b"", b"a", b"x" * 300, bytes(range(256)) * 5]
    wire = b"".join(encode_frame(p) for p in payloads)
    # one byte per read: every header and body is cut everywhere possible
    framed = FramedStream(ScriptedStream([wire[i : i + 1] for i in range(len(wire))]))
    assert await receive_all(framed) == payloads
    # all at once
    framed = FramedStream(ScriptedStream([wire]))
    assert await receive_all(framed) == payloads
    assert await framed.receive() is None  # EOF stays EOF


async def test_eof_inside_a_frame_is_a_remote_error():
    wire = encode_frame(b"hello world")
    for cut in (1, 5, len(wire) - 1):
        framed = FramedStream(ScriptedStream([encode_frame(b"ok"), wire[:cut]]))
        assert await framed.receive() == b"ok"
        with pytest.raises(RemoteProtocolError, match="inside a frame"):
            await framed.receive()


async def test_eof_inside_a_length_prefix_is_a_remote_error():
    framed = FramedStream(ScriptedStream([b"\x80"]))  # a varint that promises more bytes
    with pytest.raises(RemoteProtocolError):
        await framed.receive()


async def test_oversize_frames():
    framed = FramedStream(ScriptedStream([encode_frame(b"x" * 11, max_size=100)]), max_frame=10)
    with pytest.raises(FrameTooLarge):
        await framed.receive()
    sender = ScriptedStream()
    framed = FramedStream(sender, max_frame=10)
    with pytest.raises(LocalProtocolError):
        await framed.send(b"x" * 11)
    await framed.send(b"x" * 10)
    assert bytes(sender.written) == encode_frame(b"x" * 10)


async def test_context_manager_closes_or_resets():
    stream = ScriptedStream()
    async with FramedStream(stream) as framed:
        await framed.send(b"hi")
        assert framed.remote_peer == PEER
        assert framed.protocol == "/test/1"
    assert stream.closed and not stream.was_reset

    stream = ScriptedStream()
    with pytest.raises(ValueError):
        async with FramedStream(stream):
            raise ValueError("caller bug")
    assert stream.was_reset and not stream.closed


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0), max_size=8))
async def test_any_bytes_give_frames_or_a_typed_error(data, cuts):
    framed = FramedStream(ScriptedStream(split(data, cuts)), max_frame=64)
    try:
        frames = await receive_all(framed)
    except ModelNetError as exc:
        assert isinstance(exc, RemoteProtocolError)
    else:
        assert all(len(f) <= 64 for f in frames)
        assert b"".join(encode_frame(f) for f in frames) == data


@settings(max_examples=60, deadline=None)
@given(payloads=st.lists(st.binary(max_size=200), max_size=12), cuts=st.lists(st.integers(min_value=0), max_size=10))
async def test_round_trip_any_split(payloads, cuts):
    sender = ScriptedStream()
    framed = FramedStream(sender, max_frame=200)
    for payload in payloads:
        await framed.send(payload)
    receiver = FramedStream(ScriptedStream(split(bytes(sender.written), cuts)), max_frame=200)
    assert await receive_all(receiver) == payloads


async def test_over_a_memory_network():
    async def serve(stream: Stream) -> None:
        async with FramedStream(stream) as framed:
            while (frame := await framed.receive()) is not None:
                await framed.send(frame[::-1])

    net = MemoryNetwork(latency=0.001)
    async with net.open_host(PrivateKey.from_seed(b"\x01" * 32)) as a:
        async with net.open_host(PrivateKey.from_seed(b"\x02" * 32)) as b:
            b.set_stream_handler("/rev/1", serve)
            a.add_addrs(b.peer_id, b.listen_addrs())
            async with FramedStream(await a.new_stream(b.peer_id, ["/rev/1"])) as framed:
                for payload in (b"abc", b"", b"z" * 100_000):
                    await framed.send(payload)
                    assert await framed.receive() == payload[::-1]
                await framed.stream.close()
                assert await framed.receive() is None


# -- the libp2p host's own decoders: multistream-select negotiation and identify ----------

SUPPORTED = ("/a/1.0.0", "/b/2.0.0")


class FakeNetStream:
    """Enough of a libp2p NetStream for the negotiation code: scripted reads, recorded writes."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = deque(chunks)
        self.written = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.popleft() if self.chunks else b""

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written += data


def delimited(message: bytes) -> bytes:
    from modelnet.protocols.framing import encode_uvarint

    return encode_uvarint(len(message)) + message


MULTISTREAM = delimited(b"/multistream/1.0.0\n")


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=6))
async def test_accept_any_bytes(data, cuts):
    from modelnet.p2p.libp2p_host import _accept

    try:
        protocol, rest = await _accept(FakeNetStream(split(data, cuts)), SUPPORTED)
    except ModelNetError as exc:
        assert isinstance(exc, RemoteProtocolError)
    else:
        assert protocol in SUPPORTED and data.endswith(rest)


@settings(max_examples=60, deadline=None)
@given(
    refused=st.lists(st.text(min_size=1, max_size=12).map(lambda t: "/" + t.replace("\n", "")), max_size=3),
    pick=st.sampled_from(SUPPORTED),
    payload=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
async def test_accept_round_trip(refused, pick, payload, cuts):
    from modelnet.p2p.libp2p_host import _accept

    refused = [r for r in refused if r not in SUPPORTED]
    script = MULTISTREAM + b"".join(delimited(r.encode() + b"\n") for r in refused)
    script += delimited(pick.encode() + b"\n") + payload
    stream = FakeNetStream(split(script, cuts))
    protocol, rest = await _accept(stream, SUPPORTED)
    assert protocol == pick
    assert rest + b"".join(stream.chunks) == payload  # nothing past the negotiation is lost
    expected = MULTISTREAM + delimited(b"na\n") * len(refused) + delimited(pick.encode() + b"\n")
    assert bytes(stream.written) == expected


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=6))
async def test_negotiate_any_answer(data, cuts):
    from modelnet.p2p.libp2p_host import _negotiate

    stream = FakeNetStream(split(data, cuts))
    try:
        protocol, rest = await _negotiate(stream, SUPPORTED)
    except ModelNetError as exc:
        assert isinstance(exc, (RemoteProtocolError, ProtocolNotSupported))
    else:
        assert protocol in SUPPORTED and data.endswith(rest)


async def test_negotiate_pipelines_and_falls_back():
    from modelnet.p2p.libp2p_host import _negotiate

    answers = MULTISTREAM + delimited(b"na\n") + delimited(b"/b/2.0.0\n") + b"early"
    stream = FakeNetStream([answers])
    assert await _negotiate(stream, SUPPORTED) == ("/b/2.0.0", b"early")
    # handshake and first proposal in one write, then the second proposal
    assert bytes(stream.written) == MULTISTREAM + delimited(b"/a/1.0.0\n") + delimited(b"/b/2.0.0\n")
    with pytest.raises(ProtocolNotSupported):
        await _negotiate(FakeNetStream([MULTISTREAM + delimited(b"na\n") * 2]), SUPPORTED)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300))
def test_identify_any_bytes(data):
    from modelnet.p2p.libp2p_host import _parse_identify

    try:
        info = _parse_identify(PEER, data)
    except ModelNetError as exc:
        assert isinstance(exc, RemoteProtocolError)
    else:
        assert info.peer_id == PEER
        assert all(isinstance(a, str) and a.startswith("/") for a in info.addrs)


def test_identify_round_trip():
    from libp2p.identity.identify.pb.identify_pb2 import Identify
    from multiaddr import Multiaddr

    from modelnet.p2p.libp2p_host import _parse_identify

    message = Identify(
        listen_addrs=[Multiaddr("/ip4/10.0.0.1/tcp/4001").to_bytes(), b"\xff\xffgarbage"],
        protocols=["/a/1.0.0", "/ipfs/id/1.0.0"],
    )
    info = _parse_identify(PEER, message.SerializeToString())
    assert info.addrs == ("/ip4/10.0.0.1/tcp/4001",)  # the malformed one is skipped
    assert info.protocols == frozenset({"/a/1.0.0", "/ipfs/id/1.0.0"})


async def test_a_reset_is_not_the_end_of_the_frames():
    wire = encode_frame(b"one") + encode_frame(b"two")
    for cut in (len(encode_frame(b"one")), len(wire) - 1):  # at a boundary, inside a frame
        framed = FramedStream(ScriptedStream([wire[:cut]], then_reset=True))
        assert await framed.receive() == b"one"
        with pytest.raises(StreamReset):
            await framed.receive()


async def test_a_reset_over_a_memory_network_reaches_receive():
    async def hang_up(stream: Stream) -> None:
        async with FramedStream(stream) as framed:
            await framed.send(b"first")
            await framed.reset()

    net = MemoryNetwork()
    async with net.open_host(PrivateKey.from_seed(b"\x01" * 32)) as a:
        async with net.open_host(PrivateKey.from_seed(b"\x02" * 32)) as b:
            b.set_stream_handler("/hang-up/1", hang_up)
            a.add_addrs(b.peer_id, b.listen_addrs())
            framed = FramedStream(await a.new_stream(b.peer_id, ["/hang-up/1"]))
            with pytest.raises(StreamReset):  # the reset overtakes what was in flight
                while await framed.receive() is not None:
                    pass


# -- the address book ---------------------------------------------------------------

OWNER = PrivateKey.from_seed(b"\x0a" * 32).peer_id
PEERS = [PrivateKey.from_seed(bytes([0x20 + i]) * 32).peer_id for i in range(6)]


def tcp(i: int) -> str:
    return f"/ip4/10.0.0.{i}/tcp/4001"


def test_address_book_caps_addresses_per_peer():
    book = AddressBook(OWNER, max_addrs=3)
    book.add(PEERS[0], [tcp(1), tcp(1), "/dns4/" + "x" * MAX_ADDR_LENGTH + "/tcp/1", tcp(2)])
    book.add(PEERS[0], [tcp(3), tcp(4), tcp(5)])
    assert book.addrs(PEERS[0]) == [tcp(1), tcp(2), tcp(3)]  # first come; overlong dropped
    book.add(OWNER, [tcp(9)])
    assert book.addrs(OWNER) == []
    book.add(PEERS[1], [])
    assert len(book) == 1


def test_address_book_own_addresses_outrank_hearsay():
    book = AddressBook(OWNER, max_addrs=3)
    book.add(PEERS[0], [tcp(1), tcp(2), tcp(3)])  # hearsay fills the peer's slots
    book.add(PEERS[0], [tcp(7), tcp(8)], own=True)  # identify: the peer's own word
    assert book.addrs(PEERS[0]) == [tcp(7), tcp(8), tcp(1)]
    book.add(PEERS[0], [tcp(4)])  # hearsay cannot displace them
    book.add(PEERS[0], [tcp(5), tcp(6)])
    assert book.addrs(PEERS[0]) == [tcp(7), tcp(8), tcp(1)]
    book.worked(PEERS[0], tcp(1))  # a dial proved it
    assert book.addrs(PEERS[0]) == [tcp(1), tcp(7), tcp(8)]
    assert book.dial_order(PEERS[0], [tcp(9), tcp(7)]) == [tcp(9), tcp(7), tcp(1), tcp(8)]


def test_address_book_failures():
    book = AddressBook(OWNER)
    book.add(PEERS[0], [tcp(1)], own=True)
    book.add(PEERS[0], [tcp(2), tcp(3)])
    book.failed(PEERS[0], tcp(2))  # hearsay that fails is forgotten
    assert book.addrs(PEERS[0]) == [tcp(1), tcp(3)]
    book.failed(PEERS[0], tcp(1))  # the peer's own goes last: it may come back
    assert book.addrs(PEERS[0]) == [tcp(3), tcp(1)]
    book.failed(PEERS[0], tcp(3))
    book.failed(PEERS[1], tcp(3))  # unknown peer: nothing to do
    assert book.addrs(PEERS[0]) == [tcp(1)]
    book.add(PEERS[1], [tcp(4)])
    book.failed(PEERS[1], tcp(4))
    assert book.addrs(PEERS[1]) == [] and len(book) == 1  # a peer with no address is dropped


def test_address_book_drops_hearsay_peers_first_least_recently_used_first():
    book = AddressBook(OWNER, max_peers=3)
    book.add(PEERS[0], [tcp(0)], own=True)
    book.add(PEERS[1], [tcp(1)])
    book.add(PEERS[2], [tcp(2)])
    book.add(PEERS[1], [tcp(11)])  # used again: now PEERS[2] is the stalest hearsay
    book.add(PEERS[3], [tcp(3)])
    assert [book.addrs(p) != [] for p in PEERS[:4]] == [True, True, False, True]
    for i in (4, 5):  # a flood of hearsay peers churns only hearsay
        book.add(PEERS[i], [tcp(i)])
    assert book.addrs(PEERS[0]) == [tcp(0)] and len(book) == 3
    book.worked(PEERS[5], tcp(5))
    book.worked(PEERS[4], tcp(4))
    book.add(PEERS[1], [tcp(1)], own=True)  # all vouched: the least recently used goes
    assert [book.addrs(p) != [] for p in (PEERS[0], PEERS[1], PEERS[4], PEERS[5])] == [False, True, True, True]


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "own", "worked", "failed"]),
            st.integers(min_value=0, max_value=5),
            st.lists(st.integers(min_value=0, max_value=12), max_size=5),
        ),
        max_size=40,
    )
)
def test_address_book_bounds_hold_under_any_operations(ops):
    book = AddressBook(OWNER, max_addrs=4, max_peers=3)
    for op, peer_index, addr_numbers in ops:
        peer, addrs = PEERS[peer_index], [tcp(n) for n in addr_numbers]
        before = book.addrs(peer)
        if op in ("add", "own"):
            book.add(peer, addrs, own=op == "own")
        else:
            for addr in addrs:
                getattr(book, op)(peer, addr)
        after = book.addrs(peer)
        assert len(book) <= 3
        assert len(after) <= 4 and len(set(after)) == len(after)
        if op == "add":  # hearsay only ever appends
            assert after[: len(before)] == before
    assert sum(1 for p in PEERS if book.addrs(p)) == len(book)


# -- the dial loop both hosts share ---------------------------------------------------


async def test_dial_in_order_tries_each_address_and_tells_the_book():
    tried = []
    outcomes: dict[str, BaseException] = {}  # by address; any other address connects

    async def attempt(addr: str) -> str:
        await trio.lowlevel.checkpoint()
        tried.append(addr)
        if addr in outcomes:
            raise outcomes[addr]
        return "connection"

    book = AddressBook(OWNER)
    book.add(PEERS[0], [tcp(2), tcp(3)])
    outcomes.update({tcp(1): DialError("refused"), tcp(2): DialError("refused")})
    assert await dial_in_order(book, PEERS[0], [tcp(1)], attempt) == "connection"
    assert tried == [tcp(1), tcp(2), tcp(3)]
    assert book.addrs(PEERS[0]) == [tcp(3)]  # the one that worked; failed hearsay forgotten

    with pytest.raises(DialError, match=r"could not reach .*10\.0\.0\.1.*refused.*10\.0\.0\.2.*refused"):
        await dial_in_order(AddressBook(OWNER), PEERS[1], [tcp(1), tcp(2)], attempt)
    with pytest.raises(DialError, match="no known address"):
        await dial_in_order(AddressBook(OWNER), PEERS[1], [], attempt)

    # any other error ends the loop at once and is not held against the address
    tried.clear()
    outcomes[tcp(4)] = HostClosed("closing")
    book.add(PEERS[2], [tcp(4), tcp(5)])
    with pytest.raises(HostClosed):
        await dial_in_order(book, PEERS[2], [], attempt)
    assert tried == [tcp(4)]
    assert book.addrs(PEERS[2]) == [tcp(4), tcp(5)]


# -- multistream-select strictness -------------------------------------------------------


async def test_accept_resets_a_message_without_a_newline():
    from modelnet.p2p.libp2p_host import _accept

    for message in (b"/a/1.0.0", b"", b"ls"):
        stream = FakeNetStream([MULTISTREAM + delimited(message)])
        with pytest.raises(RemoteProtocolError, match="newline"):
            await _accept(stream, SUPPORTED)
        assert b"na" not in bytes(stream.written)


async def test_accept_answers_ls_with_na():
    from modelnet.p2p.libp2p_host import _accept

    stream = FakeNetStream([MULTISTREAM + delimited(b"ls\n") + delimited(b"/b/2.0.0\n")])
    assert await _accept(stream, SUPPORTED) == ("/b/2.0.0", b"")
    assert bytes(stream.written) == MULTISTREAM + delimited(b"na\n") + delimited(b"/b/2.0.0\n")
