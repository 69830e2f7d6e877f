"""The streams of a memory network: each one two queues of ``(deliver_at, bytes)``, one
per direction, and nothing running in the background; a reader sleeps until its head is
deliverable. Bytes arrive after the link's one-way latency plus a seeded jitter, in
order; a lost stream or a frozen peer swallows them. A clean close reads as ``b""`` on
the other side; a reset raises :class:`StreamReset` from ``read``.
"""

from __future__ import annotations

from collections import deque

import trio

from modelnet.identity import PeerID

from .errors import StreamClosed, StreamReset
from .host import Stream
from .memory_links import Links, draw


class _Pipe:
    """One direction of a stream: chunks in flight, with the time each becomes readable."""

    __slots__ = ("chunks", "waiter", "eof", "writes")

    def __init__(self) -> None:
        # None marks EOF. Readers take from the head only, so order holds even when
        # jitter makes a later chunk "arrive" before an earlier one.
        self.chunks: deque[tuple[float, bytes | None]] = deque()
        self.waiter: trio.Event | None = None
        self.eof = False  # the writer closed this direction
        self.writes = 0

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None


class Channel:
    """Both directions of one stream; pipes[0] carries initiator -> responder bytes.

    ``open_channels`` is its connection's set of open streams (reset if the connection
    drops): the channel leaves it once reset or closed both ways."""

    __slots__ = ("open_channels", "pipes", "is_reset", "lost", "seed")

    def __init__(self, open_channels: set[Channel], lost: bool, seed: int) -> None:
        self.open_channels = open_channels
        self.pipes = (_Pipe(), _Pipe())
        self.is_reset = False
        self.lost = lost
        self.seed = seed  # jitter draws of this stream derive from it

    def reset(self) -> None:
        if self.is_reset:
            return
        self.is_reset = True
        for pipe in self.pipes:
            pipe.chunks.clear()
            pipe.wake()
        self.open_channels.discard(self)

    def finish_direction(self) -> None:
        if self.pipes[0].eof and self.pipes[1].eof:
            self.open_channels.discard(self)


class MemoryStream(Stream):
    """One end of an in-memory stream, on ``local_peer``'s side of ``links``."""

    __slots__ = ("protocol", "remote_peer", "_channel", "_side", "_links", "_local_peer", "_eof")

    def __init__(
        self, links: Links, local_peer: PeerID, channel: Channel, side: int, protocol: str, remote_peer: PeerID
    ) -> None:
        self._links = links
        self._local_peer = local_peer
        self._channel = channel
        self._side = side  # 0: initiator end, 1: responder end
        self.protocol = protocol
        self.remote_peer = remote_peer
        self._eof = False  # a clean end, once read, stays one even if a reset follows

    async def read(self, max_bytes: int = 65536) -> bytes:
        if self._eof:
            await trio.lowlevel.checkpoint()
            return b""
        await trio.lowlevel.checkpoint_if_cancelled()
        channel = self._channel
        pipe = channel.pipes[1 - self._side]
        blocked = False
        data: bytes | None = None  # stays None if the stream is reset
        while not channel.is_reset:
            if pipe.chunks:
                at, head = pipe.chunks[0]
                now = trio.current_time()
                if at <= now:
                    if head is None:
                        self._eof = True
                        data = b""
                    else:
                        data = self._take(pipe, now, max_bytes)
                    break
                # a reset meanwhile is seen when we wake: at most one latency late
                await trio.sleep_until(at)
            else:
                if pipe.waiter is None:
                    pipe.waiter = trio.Event()
                await pipe.waiter.wait()
            blocked = True
        if not blocked:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if data is None:
            raise StreamReset(f"stream {self.protocol} with {self.remote_peer} was reset")
        return data

    @staticmethod
    def _take(pipe: _Pipe, now: float, max_bytes: int) -> bytes:
        out = bytearray()
        chunks = pipe.chunks
        while chunks and len(out) < max_bytes:
            at, data = chunks[0]
            if at > now or data is None:
                break
            room = max_bytes - len(out)
            if len(data) <= room:
                out += data
                chunks.popleft()
            else:
                out += data[:room]
                chunks[0] = (at, data[room:])
        return bytes(out)

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.write_nowait(data)

    def write_nowait(self, data: bytes) -> None:
        """:meth:`write` without the checkpoint: writes from several tasks keep their order."""
        channel = self._channel
        pipe = channel.pipes[self._side]
        if channel.is_reset:
            raise StreamReset(f"stream {self.protocol} to {self.remote_peer} was reset")
        if pipe.eof:
            raise StreamClosed(f"stream {self.protocol} to {self.remote_peer} is closed")
        if data:
            self._send(pipe, bytes(data))

    def reset_nowait(self) -> None:
        self._channel.reset()

    def _send(self, pipe: _Pipe, data: bytes | None) -> None:
        channel = self._channel
        links = self._links
        size = len(data) if data is not None else 0
        links.stats.bytes += size
        if channel.lost or links.is_frozen(self._local_peer) or links.is_frozen(self.remote_peer):
            links.stats.dropped_bytes += size
            return
        pipe.writes += 1
        delay = links.one_way(self._local_peer, self.remote_peer)
        if links.jitter:
            delay += links.jitter * draw(channel.seed, self._side, pipe.writes)
        pipe.chunks.append((trio.current_time() + delay, data))
        pipe.wake()

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        self.close_nowait()

    def close_nowait(self) -> None:
        channel = self._channel
        pipe = channel.pipes[self._side]
        if channel.is_reset or pipe.eof:
            return
        pipe.eof = True
        self._send(pipe, None)
        channel.finish_direction()

    async def reset(self) -> None:
        self._channel.reset()
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"MemoryStream({self.protocol}, remote={self.remote_peer.short()})"
