"""Relayed connections on a memory network: a small muxer over the stream a circuit relay
spliced (:mod:`.relay`). The memory network moves whole streams, not bytes on a socket,
so a relayed connection needs a muxer of its own; its bytes really cross the relay,
which can count and cut them.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import trio

from modelnet.identity import PeerID
from modelnet.protocols.errors import ProtocolError
from modelnet.protocols.framing import FrameDecoder, decode_uvarint, encode_frame, encode_uvarint

from .errors import DialError, ProtocolNotSupported, StreamClosed, StreamReset
from .host import Stream, StreamHandler
from .memory_streams import MemoryStream
from .streams import NEGOTIATE_TIMEOUT

logger = logging.getLogger(__name__)

# The muxer of relayed connections: frames [uvarint stream id][kind][payload], each one
# length-prefixed. Stream ids are odd from the dialler, even from the listener.
_OPEN, _ACCEPT, _REFUSE, _DATA, _FIN, _RST = range(6)
_MUX_CHUNK = 65536  # payload bytes per DATA frame
_MUX_MAX_FRAME = _MUX_CHUNK + 16


class Circuit:
    """A connection over a relayed stream (``carrier``): the memory network moves whole
    streams, not bytes on a socket, so a relayed connection needs a muxer of its own. Like
    the rest of the memory network it has no flow control. Writes are synchronous, so
    frames from several tasks never interleave."""

    def __init__(
        self,
        carrier: MemoryStream,
        remote: PeerID,
        *,
        initiator: bool,
        handlers: Mapping[str, StreamHandler],
        start_handler: Callable[[StreamHandler, MuxStream], None],
    ) -> None:
        self.carrier = carrier
        self.remote = remote
        self.alive = True
        self._next_id = 1 if initiator else 2
        self._streams: dict[int, MuxStream] = {}
        self._decoder = FrameDecoder(_MUX_MAX_FRAME)
        self._handlers = handlers  # the host's, live: what it serves when a stream opens
        self._start_handler = start_handler

    def send(self, stream_id: int, kind: int, payload: bytes = b"") -> None:
        if not self.alive:
            raise StreamReset(f"relayed connection to {self.remote} is down")
        try:
            self.carrier.write_nowait(encode_frame(encode_uvarint(stream_id) + bytes((kind,)) + payload, _MUX_MAX_FRAME))
        except StreamClosed:
            self.abort()
            raise StreamReset(f"relayed connection to {self.remote} was cut") from None

    async def open_stream(self, protocols: Sequence[str]) -> MuxStream:
        stream_id = self._next_id
        self._next_id += 2
        stream = self._streams[stream_id] = MuxStream(self, stream_id, "", self.remote)
        try:
            self.send(stream_id, _OPEN, "\n".join(protocols).encode())
            with trio.fail_after(NEGOTIATE_TIMEOUT):
                await stream.negotiated.wait()
        except trio.TooSlowError:
            raise DialError(f"stream negotiation with {self.remote} over a relay timed out") from None
        except BaseException:
            stream.reset_nowait()
            raise
        if stream.refused:
            raise ProtocolNotSupported(f"{self.remote} supports none of {list(protocols)}")
        if stream.is_reset:
            raise DialError(f"relayed connection to {self.remote} dropped while opening a stream")
        return stream

    async def run(self) -> None:
        """Read frames until the carrier ends; then every stream is reset."""
        try:
            while True:
                data = await self.carrier.read(_MUX_MAX_FRAME)
                if not data:
                    return
                self._decoder.receive_data(data)
                while (frame := self._decoder.next_frame()) is not None:
                    self._dispatch(frame)
        except (StreamClosed, ProtocolError) as exc:
            logger.info("relayed connection to %s ended: %s", self.remote, exc)
        finally:
            self.abort()

    def _dispatch(self, frame: bytes) -> None:
        header = decode_uvarint(frame)
        if header is None or header[1] >= len(frame):
            raise ProtocolError("truncated mux frame")
        stream_id, pos = header
        kind, payload = frame[pos], frame[pos + 1 :]
        if kind == _OPEN:
            self._accept(stream_id, payload)
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # frames after a reset
        if kind == _ACCEPT:
            stream.protocol = payload.decode("utf-8", "replace")
            stream.negotiated.set()
        elif kind == _REFUSE:
            stream.refused = True
            stream.forget()
        elif kind == _DATA:
            stream.feed(payload)
        elif kind == _FIN:
            stream.feed_eof()
        elif kind == _RST:
            stream.forget()

    def _accept(self, stream_id: int, payload: bytes) -> None:
        if stream_id in self._streams or stream_id % 2 == self._next_id % 2:
            raise ProtocolError(f"mux stream {stream_id} opened twice or with our parity")
        handlers = self._handlers
        protocol = next((p for p in payload.decode("utf-8", "replace").split("\n") if p in handlers), None)
        if protocol is None:
            self.send(stream_id, _REFUSE)
            return
        stream = self._streams[stream_id] = MuxStream(self, stream_id, protocol, self.remote)
        stream.negotiated.set()
        self.send(stream_id, _ACCEPT, protocol.encode())
        self._start_handler(handlers[protocol], stream)

    def abort(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for stream in list(self._streams.values()):
            stream.forget()
        self.carrier.reset_nowait()


class MuxStream(Stream):
    """One stream of a relayed connection."""

    def __init__(self, circuit: Circuit, stream_id: int, protocol: str, remote_peer: PeerID) -> None:
        self._circuit = circuit
        self._id = stream_id
        self.protocol = protocol
        self.remote_peer = remote_peer
        self.negotiated = trio.Event()
        self.refused = False
        self.is_reset = False
        self._buffer = bytearray()
        self._eof = False  # the remote's FIN
        self._closed = False  # our FIN
        self._waiter: trio.Event | None = None

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()
        if self._closed:
            self._circuit._streams.pop(self._id, None)

    def forget(self) -> None:
        """Reset by the remote or by the circuit going down."""
        self.is_reset = True
        self.negotiated.set()
        self._wake()
        self._circuit._streams.pop(self._id, None)

    async def read(self, max_bytes: int = 65536) -> bytes:
        await trio.lowlevel.checkpoint()
        while True:
            if self._buffer:
                data = bytes(self._buffer[:max_bytes])
                del self._buffer[:max_bytes]
                return data
            if self.is_reset:
                raise StreamReset(f"stream {self.protocol} with {self.remote_peer} was reset")
            if self._eof:
                return b""
            self._waiter = trio.Event()
            await self._waiter.wait()

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self.is_reset:
            raise StreamReset(f"stream {self.protocol} to {self.remote_peer} was reset")
        if self._closed:
            raise StreamClosed(f"stream {self.protocol} to {self.remote_peer} is closed")
        data = bytes(data)
        for start in range(0, len(data), _MUX_CHUNK):
            self._circuit.send(self._id, _DATA, data[start : start + _MUX_CHUNK])

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        self.close_nowait()

    def close_nowait(self) -> None:
        if self.is_reset or self._closed:
            return
        self._closed = True
        try:
            self._circuit.send(self._id, _FIN)
        except StreamClosed:
            return
        if self._eof:
            self._circuit._streams.pop(self._id, None)

    async def reset(self) -> None:
        self.reset_nowait()
        await trio.lowlevel.checkpoint()

    def reset_nowait(self) -> None:
        if self.is_reset:
            return
        self.forget()
        try:
            self._circuit.send(self._id, _RST)
        except StreamClosed:
            pass

    def __repr__(self) -> str:
        return f"MuxStream({self.protocol}, remote={self.remote_peer.short()}, relayed)"
