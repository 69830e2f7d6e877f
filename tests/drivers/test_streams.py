"""FramedStream: length-prefixed frames over any Stream."""

from __future__ import annotations

from collections import deque

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.errors import ModelNetError
from modelnet.identity import PrivateKey
from modelnet.p2p.errors import ProtocolNotSupported
from modelnet.p2p.host import Stream
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.streams import FramedStream
from modelnet.protocols.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from modelnet.protocols.framing import encode_frame

PEER = PrivateKey.from_seed(b"\x07" * 32).peer_id


class ScriptedStream(Stream):
    """Hands out the given chunks one read at a time, then EOF; records what is written."""

    def __init__(self, chunks: list[bytes] = ()) -> None:
        self.protocol = "/test/1"
        self.remote_peer = PEER
        self.chunks = deque(chunks)
        self.written = bytearray()
        self.closed = False
        self.was_reset = False

    async def read(self, max_bytes: int = 65536) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.chunks:
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
