"""Tier 2: drivers over in-memory streams. Helpers here serve the loopback host tests too."""

from __future__ import annotations

from typing import Callable

import trio

from modelnet.identity import PeerID
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
