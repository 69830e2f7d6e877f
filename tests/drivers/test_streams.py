"""FramedStream: length-prefixed frames over any Stream."""

from __future__ import annotations

from collections import deque

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.errors import ModelNetError
from modelnet.identity import PrivateKey
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
