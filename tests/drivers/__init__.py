"""Tier 2: drivers over in-memory streams. Helpers here serve the loopback host tests too."""

from __future__ import annotations

from typing import Callable

import pytest
import trio

from modelnet.identity import PeerID
from modelnet.p2p.errors import StreamReset
from modelnet.p2p.host import Host, PeerInfo, Stream

ECHO = "/test/echo/1.0.0"


async def echo(stream: Stream) -> None:
    while data := await stream.read():
        await stream.write(data)


async def read_all(stream: Stream) -> bytes:
    out = bytearray()
    while data := await stream.read():
        out += data
    return bytes(out)


async def request(host: Host, peer: PeerID, payload: bytes, protocol: str = ECHO) -> bytes:
    """One exchange on a new stream: write, close our side, read to the end."""
    stream = await host.new_stream(peer, [protocol])
    await stream.write(payload)
    await stream.close()
    return await read_all(stream)


class Recorder:
    """A peer listener that remembers what it was told, and lets a test wait for it."""

    def __init__(self) -> None:
        self.peers: list[PeerInfo] = []
        self.gone: list[PeerID] = []
        self._changed = trio.Event()

    def on_peer(self, info: PeerInfo) -> None:
        self.peers.append(info)
        self._changed.set()

    def on_disconnect(self, peer: PeerID) -> None:
        self.gone.append(peer)
        self._changed.set()

    def info(self, peer: PeerID) -> PeerInfo | None:
        return next((info for info in reversed(self.peers) if info.peer_id == peer), None)

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed = trio.Event()
            await self._changed.wait()


class EndRecorder:
    """A handler that reads to the end and reports how the stream ended: a clean EOF
    (then it answers) or a reset."""

    def __init__(self) -> None:
        self._send, self.ends = trio.open_memory_channel[tuple[str, bytes]](16)

    async def __call__(self, stream: Stream) -> None:
        data = b""
        try:
            while chunk := await stream.read():
                data += chunk
        except StreamReset:
            await self._send.send(("reset", data))
            return
        await self._send.send(("eof", data))
        await stream.write(b"answer to " + data)


async def check_eof_and_reset(client: Host, server: Host) -> None:
    """The read contract every host keeps: ``b""`` only at a clean end, StreamReset for a
    reset or a lost connection, on both sides of a stream. Leaves them disconnected."""
    ends = EndRecorder()
    server.set_stream_handler("/test/ends/1", ends)
    client.add_addrs(server.peer_id, server.listen_addrs())

    # a half-closing client (CloseWrite after its request): a clean end, answered
    stream = await client.new_stream(server.peer_id, ["/test/ends/1"])
    await stream.write(b"request")
    await stream.close()
    assert await ends.ends.receive() == ("eof", b"request")
    assert await read_all(stream) == b"answer to request"
    assert await stream.read() == b""  # EOF stays EOF

    # a client that gives up: the handler sees a reset, not the end of a request
    stream = await client.new_stream(server.peer_id, ["/test/ends/1"])
    await stream.write(b"half a request")
    await stream.reset()
    assert (await ends.ends.receive())[0] == "reset"
    with pytest.raises(StreamReset):
        await stream.read()

    # a lost connection resets the streams still open on it, on both sides
    stream = await client.new_stream(server.peer_id, ["/test/ends/1"])
    await stream.write(b"cut")
    await client.disconnect(server.peer_id)
    assert (await ends.ends.receive())[0] == "reset"
    with pytest.raises(StreamReset):
        await stream.read()
    with pytest.raises(StreamReset):
        await stream.write(b"more")
