"""An in-process network of hosts: deterministic under ``autojump_clock``, cheap enough for
10,000 hosts in one process.

Model (what a test can rely on):
- Addresses are ``/memory/<n>``; a host is dialled by address and must answer under the
  peer id the caller expects (like Noise would check).
- A connection costs one round trip to set up, a stream one more (the multistream
  negotiation). Bytes written arrive after the one-way latency of the link, plus a
  seeded jitter, in order. Buffers are unbounded: there is no flow control.
- Nothing runs per stream or per host in the background: a stream is two queues of
  ``(deliver_at, bytes)`` and a reader sleeps until its head is deliverable. The only
  tasks are the stream handlers, started in the remote host's nursery.
- Every random choice (stream loss, jitter) is a hash of the seed and of what it
  decides about, never of scheduling order, so a run repeats exactly.
- A clean close reads as ``b""`` on the other side; a reset, a dropped connection, a
  crash or a closed host raise :class:`StreamReset` from ``read`` (as the libp2p host).
- Failure injection: :meth:`MemoryNetwork.partition` (cross-group connections are
  dropped, their streams reset, dials fail), :meth:`MemoryNetwork.crash` (all streams
  of the host reset, it becomes unreachable, its handlers stop),
  :meth:`MemoryNetwork.freeze` (half-open: bytes to and from it vanish, dials and
  stream negotiations to it hang until the internal bound, then fail), and ``loss``
  (a new stream is black-holed: it opens, but its bytes never arrive and no handler
  runs, so the caller's deadline fires).
- A stream handler runs in the remote host's nursery; an exception escaping it is
  logged and resets the stream; when it returns, its side of the stream is closed.
  Closing or crashing a host cancels its handlers.
- A host opened with ``dialable=False`` is behind "NAT": it dials out, but dials to it
  are refused. Others reach it through a circuit relay (:mod:`.relay`): the relayed
  connection is a small muxer (:class:`_Circuit`) over the spliced stream, so its bytes
  really cross the relay, which can count and cut them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import types
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterable, Mapping, Sequence

import trio

from modelnet.errors import unwrapping_groups
from modelnet.identity import PeerID, PrivateKey
from modelnet.protocols.errors import ProtocolError
from modelnet.protocols.framing import FrameDecoder, decode_uvarint, encode_frame, encode_uvarint

from .errors import DialError, HostClosed, P2PError, ProtocolNotSupported, StreamClosed, StreamReset
from .host import DisconnectListener, Host, PeerInfo, PeerListener, Stream, StreamHandler
from . import relay
from .streams import (
    DIAL_TIMEOUT,
    NEGOTIATE_TIMEOUT,
    AddressBook,
    PeerListeners,
    dial_in_order,
)

logger = logging.getLogger(__name__)

ADDRESS_PREFIX = "/memory/"


@dataclasses.dataclass(slots=True)
class NetworkStats:
    """Counters since the network was made."""

    dials: int = 0  # connection attempts that reached the network
    streams: int = 0  # streams opened (negotiated)
    bytes: int = 0  # bytes written into streams
    dropped_bytes: int = 0  # bytes that went nowhere (lost stream, frozen peer)
    lost_streams: int = 0  # streams black-holed by ``loss``


def _draw(*parts: bytes | int | str) -> float:
    """A uniform float in [0, 1) that depends only on ``parts`` (not on process or order)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, int):
            part = part.to_bytes(8, "big", signed=True)
        elif isinstance(part, str):
            part = part.encode()
        h.update(len(part).to_bytes(2, "big"))
        h.update(part)
    return int.from_bytes(h.digest(), "big") / 2**64


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await trio.sleep(seconds)
    else:
        await trio.lowlevel.checkpoint()


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


class _Channel:
    """Both directions of one stream; pipes[0] carries initiator -> responder bytes."""

    __slots__ = ("conn", "pipes", "is_reset", "lost", "seed")

    def __init__(self, conn: "_Connection", lost: bool, seed: int) -> None:
        self.conn = conn
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
        self.conn.channels.discard(self)

    def finish_direction(self) -> None:
        if self.pipes[0].eof and self.pipes[1].eof:
            self.conn.channels.discard(self)


class _Connection:
    """A connection between two hosts; both hold the same object."""

    __slots__ = ("hosts", "channels", "opened", "alive")

    def __init__(self, a: "MemoryHost", b: "MemoryHost") -> None:
        self.hosts = (a, b)
        self.channels: set[_Channel] = set()  # open streams, reset if the connection drops
        self.opened = 0  # streams opened so far: numbers each stream for the seeded draws
        self.alive = True

    def other(self, host: "MemoryHost") -> "MemoryHost":
        a, b = self.hosts
        return b if host is a else a


class MemoryStream(Stream):
    """One end of an in-memory stream."""

    __slots__ = ("protocol", "remote_peer", "_channel", "_side", "_host", "_eof")

    def __init__(self, host: "MemoryHost", channel: _Channel, side: int, protocol: str, remote_peer: PeerID) -> None:
        self._host = host
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
        network = self._host.network
        size = len(data) if data is not None else 0
        network.stats.bytes += size
        if channel.lost or network._is_frozen(self._host.peer_id) or network._is_frozen(self.remote_peer):
            network.stats.dropped_bytes += size
            return
        pipe.writes += 1
        delay = network._one_way(self._host.peer_id, self.remote_peer)
        if network.jitter:
            delay += network.jitter * _draw(channel.seed, self._side, pipe.writes)
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


class MemoryHost(Host):
    """A host on a :class:`MemoryNetwork`; make one with ``network.open_host(key)``."""

    def __init__(
        self, network: "MemoryNetwork", key: PrivateKey, address: str, nursery: trio.Nursery, dialable: bool = True
    ) -> None:
        self.network = network
        self.peer_id = key.peer_id
        self.address = address
        self.dialable = dialable
        self._circuits: dict[PeerID, _Circuit] = {}  # relayed connections
        self._nursery = nursery
        self._alive = True
        self._handlers: dict[str, StreamHandler] = {}
        self._conns: dict[PeerID, _Connection] = {}
        self._addrbook = AddressBook(self.peer_id)
        self._listeners = PeerListeners()
        self._handler_scopes: set[trio.CancelScope] = set()

    # -- Host interface ------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        return ([self.address] if self.dialable else []) + list(self._relay_addrs)

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    def remove_stream_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    def add_addrs(self, peer: PeerID, addrs: Sequence[str]) -> None:
        self._addrbook.add(peer, addrs)

    def peer_addrs(self, peer: PeerID) -> list[str]:
        return self._addrbook.addrs(peer)

    async def connect(self, peer: PeerID, addrs: Sequence[str] = ()) -> None:
        self._check_alive()
        await trio.lowlevel.checkpoint()
        await self._connection_to(peer, addrs)

    async def new_stream(self, peer: PeerID, protocols: Sequence[str]) -> Stream:
        self._check_alive()
        conn = await self._connection_to(peer, ())
        if isinstance(conn, _Circuit):
            return await conn.open_stream(protocols)
        remote = conn.other(self)
        network = self.network
        one_way = network._one_way(self.peer_id, peer)
        if network._is_frozen(peer) or network._is_frozen(self.peer_id):
            await trio.sleep(NEGOTIATE_TIMEOUT)
            raise DialError(f"stream negotiation with {peer} timed out")
        await _sleep(one_way)  # our proposal travels to the remote
        self._check_alive()
        if not conn.alive:
            raise DialError(f"connection to {peer} dropped while opening a stream")
        protocol = next((p for p in protocols if p in remote._handlers), None)
        if protocol is None:
            await _sleep(one_way)
            raise ProtocolNotSupported(f"{peer} supports none of {list(protocols)}")
        n = conn.opened
        conn.opened += 1
        lost = bool(network.loss) and _draw(network.seed, "loss", self.peer_id.bytes, peer.bytes, n) < network.loss
        channel = _Channel(conn, lost, int(_draw(network.seed, "stream", self.peer_id.bytes, peer.bytes, n) * 2**62))
        conn.channels.add(channel)
        network.stats.streams += 1
        local = MemoryStream(self, channel, 0, protocol, peer)
        if lost:
            network.stats.lost_streams += 1
        else:
            remote._start_handler(remote._handlers[protocol], MemoryStream(remote, channel, 1, protocol, self.peer_id))
        try:
            await _sleep(one_way)  # the acceptance travels back
        except BaseException:
            channel.reset()
            raise
        return local

    async def disconnect(self, peer: PeerID) -> None:
        conn = self._conns.get(peer)
        if conn is not None:
            self.network._drop(conn)
        circuit = self._circuits.get(peer)
        if circuit is not None:
            circuit.abort()
        await trio.lowlevel.checkpoint()

    def connected_peers(self) -> list[PeerID]:
        return list(dict.fromkeys([*self._conns, *self._circuits]))

    async def serve_relayed(self, stream: Stream, remote: PeerID) -> None:
        if not isinstance(stream, MemoryStream):
            raise P2PError("a memory host relays only over memory streams")
        await self._run_circuit(_Circuit(self, stream, remote, initiator=False))

    def add_peer_listener(self, on_peer: PeerListener, on_disconnect: DisconnectListener | None = None) -> None:
        self._listeners.add(on_peer, on_disconnect)

    # -- internals -------------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self._alive:
            raise HostClosed(f"host {self.peer_id} is closed")

    async def _connection_to(self, peer: PeerID, addrs: Sequence[str]) -> "_Connection | _Circuit":
        if peer == self.peer_id:
            raise DialError("a host cannot dial itself")
        self.add_addrs(peer, addrs)
        conn = self._conns.get(peer) or self._circuits.get(peer)
        if conn is not None:
            return conn
        return await dial_in_order(self._addrbook, peer, addrs, functools.partial(self._dial, peer))

    async def _dial(self, peer: PeerID, addr: str) -> "_Connection | _Circuit":
        """One address: DialError for a failure there, as :func:`dial_in_order` expects."""
        if relay.is_circuit(addr):
            return await self._dial_circuit(peer, addr)
        network = self.network
        network.stats.dials += 1
        target = network._by_addr.get(addr)
        if network._is_frozen(self.peer_id) or (target is not None and network._is_frozen(target.peer_id)):
            await trio.sleep(DIAL_TIMEOUT)
            raise DialError("timed out")
        await _sleep(2 * network._one_way(self.peer_id, target.peer_id if target is not None else peer))
        self._check_alive()
        conn = self._conns.get(peer)
        if conn is not None:  # a concurrent dial (ours or theirs) won
            return conn
        target = network._by_addr.get(addr)  # it may have crashed meanwhile
        if target is None or not target.dialable:
            raise DialError("connection refused")
        if target.peer_id != peer:
            raise DialError(f"answered as {target.peer_id}, not {peer}")
        if not network._reachable(self.peer_id, peer):
            raise DialError("unreachable (partitioned)")
        return network._connect(self, target)

    async def _dial_circuit(self, peer: PeerID, addr: str) -> "_Circuit":
        carrier, _limit = await relay.open_circuit(self, addr, peer)
        existing = self._circuits.get(peer) or self._conns.get(peer)
        if existing is not None:  # a concurrent dial won
            carrier.reset_nowait()
            return existing  # type: ignore[return-value]
        if not isinstance(carrier, MemoryStream):
            raise DialError("a memory host relays only over memory streams")
        circuit = _Circuit(self, carrier, peer, initiator=True)
        self._nursery.start_soon(self._run_circuit, circuit)
        return circuit

    async def _run_circuit(self, circuit: "_Circuit") -> None:
        """A relayed connection's life: registered and identified, its reader, then gone."""
        peer = circuit.remote
        self._circuits[peer] = circuit
        remote = self.network._hosts.get(peer)
        if remote is not None:  # identify, for free, as on a direct connection
            self._identified(remote._info())
        try:
            await circuit.run()
        finally:
            circuit.abort()
            if self._circuits.get(peer) is circuit:
                del self._circuits[peer]
                if self._alive and peer not in self._conns:
                    self._listeners.disconnected(peer)

    def _start_handler(self, handler: StreamHandler, stream: "MemoryStream | _MuxStream") -> None:
        # only called on a live connection, so this host is alive and its nursery open
        self._nursery.start_soon(self._run_handler, handler, stream)

    async def _run_handler(self, handler: StreamHandler, stream: "MemoryStream | _MuxStream") -> None:
        with trio.CancelScope() as scope:
            self._handler_scopes.add(scope)
            try:
                await handler(stream)
            except Exception:
                logger.exception("handler for %s from %s failed; stream reset", stream.protocol, stream.remote_peer)
                stream.reset_nowait()
            else:
                stream.close_nowait()  # as trio's serve_* do: the handler owned the stream
            finally:
                self._handler_scopes.discard(scope)

    def _identified(self, info: PeerInfo) -> None:
        self._addrbook.add(info.peer_id, info.addrs, own=True)  # as identify would: dial-back addresses
        self._listeners.identified(info)

    def _info(self) -> PeerInfo:
        return PeerInfo(self.peer_id, tuple(self.listen_addrs()), frozenset(self._handlers))

    def _shutdown(self) -> None:
        """Stop everything at once: handlers cancelled, connections dropped, no goodbye."""
        if not self._alive:
            return
        self._alive = False
        for scope in list(self._handler_scopes):
            scope.cancel()
        for conn in list(self._conns.values()):
            self.network._drop(conn, quiet=self)
        for circuit in list(self._circuits.values()):
            circuit.abort()
        self.network._unregister(self)

    def __repr__(self) -> str:
        return f"MemoryHost({self.peer_id.short()} at {self.address})"


# The muxer of relayed connections: frames [uvarint stream id][kind][payload], each one
# length-prefixed. Stream ids are odd from the dialler, even from the listener.
_OPEN, _ACCEPT, _REFUSE, _DATA, _FIN, _RST = range(6)
_MUX_CHUNK = 65536  # payload bytes per DATA frame
_MUX_MAX_FRAME = _MUX_CHUNK + 16


class _Circuit:
    """A connection over a relayed stream (``carrier``): the memory network moves whole
    streams, not bytes on a socket, so a relayed connection needs a muxer of its own. Like
    the rest of the memory network it has no flow control. Writes are synchronous, so
    frames from several tasks never interleave."""

    def __init__(self, host: MemoryHost, carrier: MemoryStream, remote: PeerID, *, initiator: bool) -> None:
        self.host = host
        self.carrier = carrier
        self.remote = remote
        self.alive = True
        self._next_id = 1 if initiator else 2
        self._streams: dict[int, _MuxStream] = {}
        self._decoder = FrameDecoder(_MUX_MAX_FRAME)

    def send(self, stream_id: int, kind: int, payload: bytes = b"") -> None:
        if not self.alive:
            raise StreamReset(f"relayed connection to {self.remote} is down")
        try:
            self.carrier.write_nowait(encode_frame(encode_uvarint(stream_id) + bytes((kind,)) + payload, _MUX_MAX_FRAME))
        except StreamClosed:
            self.abort()
            raise StreamReset(f"relayed connection to {self.remote} was cut") from None

    async def open_stream(self, protocols: Sequence[str]) -> "_MuxStream":
        stream_id = self._next_id
        self._next_id += 2
        stream = self._streams[stream_id] = _MuxStream(self, stream_id, "", self.remote)
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
        handlers = self.host._handlers
        protocol = next((p for p in payload.decode("utf-8", "replace").split("\n") if p in handlers), None)
        if protocol is None:
            self.send(stream_id, _REFUSE)
            return
        stream = self._streams[stream_id] = _MuxStream(self, stream_id, protocol, self.remote)
        stream.negotiated.set()
        self.send(stream_id, _ACCEPT, protocol.encode())
        self.host._start_handler(handlers[protocol], stream)

    def abort(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for stream in list(self._streams.values()):
            stream.forget()
        self.carrier.reset_nowait()


class _MuxStream(Stream):
    """One stream of a relayed connection."""

    def __init__(self, circuit: _Circuit, stream_id: int, protocol: str, remote_peer: PeerID) -> None:
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


class MemoryNetwork:
    """Hosts in one process, with latency, jitter, stream loss, partitions and crashes."""

    def __init__(self, *, latency: float = 0.0, jitter: float = 0.0, loss: float = 0.0, seed: int = 0) -> None:
        if latency < 0 or jitter < 0 or not 0 <= loss <= 1:
            raise ValueError("latency and jitter must be >= 0 and loss within [0, 1]")
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.seed = seed
        self.stats = NetworkStats()
        self._hosts: dict[PeerID, MemoryHost] = {}
        self._by_addr: dict[str, MemoryHost] = {}
        self._next_addr = 0
        self._link_latency: dict[tuple[PeerID, PeerID], float] = {}
        self._group_of: dict[PeerID, int] = {}
        self._frozen: set[PeerID] = set()

    @property
    def hosts(self) -> Mapping[PeerID, MemoryHost]:
        return types.MappingProxyType(self._hosts)

    @asynccontextmanager
    async def open_host(self, key: PrivateKey, *, dialable: bool = True) -> AsyncIterator[MemoryHost]:
        """``async with network.open_host(key) as host``; leaving closes it abruptly.

        ``dialable=False``: a host behind NAT; it dials out, nobody can dial it (only a
        circuit relay it reserved on reaches it)."""
        peer = key.peer_id
        if peer in self._hosts:
            raise P2PError(f"{peer} is already on this network")
        address = f"{ADDRESS_PREFIX}{self._next_addr}"
        self._next_addr += 1
        with unwrapping_groups():
            async with trio.open_nursery() as nursery:
                host = MemoryHost(self, key, address, nursery, dialable)
                self._hosts[peer] = host
                self._by_addr[address] = host
                try:
                    yield host
                finally:
                    host._shutdown()

    def set_link_latency(self, a: PeerID, b: PeerID, seconds: float) -> None:
        """One-way latency between ``a`` and ``b`` (both directions), overriding the default."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._link_latency[(a, b) if a < b else (b, a)] = seconds

    def partition(self, *groups: Iterable[PeerID]) -> None:
        """Peers in different groups cannot reach each other; unlisted peers form one more group.

        Connections across groups drop at once (their streams reset, disconnect listeners
        fire); dials across groups fail until :meth:`heal`.
        """
        self._group_of = {peer: i for i, group in enumerate(groups) for peer in group}
        for conn in self._connections():
            a, b = conn.hosts
            if not self._reachable(a.peer_id, b.peer_id):
                self._drop(conn)

    def heal(self) -> None:
        """Undo :meth:`partition` (dropped connections stay dropped; peers redial)."""
        self._group_of = {}

    def crash(self, peer: PeerID) -> None:
        """Kill the host abruptly: every stream reset, handlers stopped, unreachable.

        Its context can still be left normally; its key can open a new host (a restart).
        """
        host = self._hosts.get(peer)
        if host is not None:
            host._shutdown()

    def freeze(self, peer: PeerID) -> None:
        """Make the host half-open: bytes to and from it vanish, dials to it hang."""
        self._frozen.add(peer)

    # -- internals -------------------------------------------------------------------

    def _one_way(self, a: PeerID, b: PeerID) -> float:
        if self._link_latency:
            override = self._link_latency.get((a, b) if a < b else (b, a))
            if override is not None:
                return override
        return self.latency

    def _reachable(self, a: PeerID, b: PeerID) -> bool:
        return self._group_of.get(a, -1) == self._group_of.get(b, -1)

    def _is_frozen(self, peer: PeerID) -> bool:
        return peer in self._frozen

    def _connections(self) -> list[_Connection]:
        seen: dict[int, _Connection] = {}
        for host in self._hosts.values():
            for conn in host._conns.values():
                seen[id(conn)] = conn
        return list(seen.values())

    def _connect(self, dialer: MemoryHost, target: MemoryHost) -> _Connection:
        conn = _Connection(dialer, target)
        dialer._conns[target.peer_id] = conn
        target._conns[dialer.peer_id] = conn
        # identify, for free: both sides learn the other's addresses and protocols
        target._identified(dialer._info())
        dialer._identified(target._info())
        return conn

    def _drop(self, conn: _Connection, quiet: MemoryHost | None = None) -> None:
        """Tear a connection down; ``quiet`` is a host going away that is not told."""
        if not conn.alive:
            return
        conn.alive = False
        for channel in list(conn.channels):
            channel.reset()
        a, b = conn.hosts
        for host, other in ((a, b), (b, a)):
            if host._conns.get(other.peer_id) is conn:
                del host._conns[other.peer_id]
        for host, other in ((a, b), (b, a)):
            if host is not quiet and host._alive:
                host._listeners.disconnected(other.peer_id)

    def _unregister(self, host: MemoryHost) -> None:
        if self._hosts.get(host.peer_id) is host:
            del self._hosts[host.peer_id]
            self._frozen.discard(host.peer_id)
        self._by_addr.pop(host.address, None)
