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
  connection is a small muxer (:mod:`.memory_circuit`) over the spliced stream, so its
  bytes really cross the relay, which can count and cut them.

This module holds the hosts and the network that connects them; the link conditions are
in :mod:`.memory_links`, the streams in :mod:`.memory_streams`.
"""

from __future__ import annotations

import functools
import logging
import types
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterable, Mapping, Sequence

import trio

from modelnet.errors import unwrapping_groups
from modelnet.identity import PeerID, PrivateKey

from . import relay
from .errors import DialError, HostClosed, P2PError, ProtocolNotSupported
from .host import DisconnectListener, Host, PeerInfo, PeerListener, Stream, StreamHandler
from .memory_circuit import Circuit, MuxStream
from .memory_links import Links, NetworkStats, draw
from .memory_streams import Channel, MemoryStream
from .streams import DIAL_TIMEOUT, NEGOTIATE_TIMEOUT, AddressBook, PeerListeners, dial_in_order

__all__ = ["ADDRESS_PREFIX", "DIAL_TIMEOUT", "MemoryHost", "MemoryNetwork", "MemoryStream", "NetworkStats"]

logger = logging.getLogger(__name__)

ADDRESS_PREFIX = "/memory/"


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await trio.sleep(seconds)
    else:
        await trio.lowlevel.checkpoint()


class _Connection:
    """A connection between two hosts; both hold the same object."""

    __slots__ = ("hosts", "channels", "opened", "alive")

    def __init__(self, a: MemoryHost, b: MemoryHost) -> None:
        self.hosts = (a, b)
        self.channels: set[Channel] = set()  # open streams, reset if the connection drops
        self.opened = 0  # streams opened so far: numbers each stream for the seeded draws
        self.alive = True

    def other(self, host: MemoryHost) -> MemoryHost:
        a, b = self.hosts
        return b if host is a else a


class MemoryHost(Host):
    """A host on a :class:`MemoryNetwork`; make one with ``network.open_host(key)``."""

    def __init__(
        self, network: MemoryNetwork, key: PrivateKey, address: str, nursery: trio.Nursery, dialable: bool = True
    ) -> None:
        self.network = network
        self.peer_id = key.peer_id
        self.address = address
        self.dialable = dialable
        self._circuits: dict[PeerID, Circuit] = {}  # relayed connections
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
        if isinstance(conn, Circuit):
            return await conn.open_stream(protocols)
        remote = conn.other(self)
        network = self.network
        one_way = network.one_way(self.peer_id, peer)
        if network.is_frozen(peer) or network.is_frozen(self.peer_id):
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
        lost = bool(network.loss) and draw(network.seed, "loss", self.peer_id.bytes, peer.bytes, n) < network.loss
        channel = Channel(conn.channels, lost, int(draw(network.seed, "stream", self.peer_id.bytes, peer.bytes, n) * 2**62))
        conn.channels.add(channel)
        network.stats.streams += 1
        local = MemoryStream(network, self.peer_id, channel, 0, protocol, peer)
        if lost:
            network.stats.lost_streams += 1
        else:
            answering = MemoryStream(network, remote.peer_id, channel, 1, protocol, self.peer_id)
            remote._start_handler(remote._handlers[protocol], answering)
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
        await self._run_circuit(self._circuit(stream, remote, initiator=False))

    def add_peer_listener(self, on_peer: PeerListener, on_disconnect: DisconnectListener | None = None) -> None:
        self._listeners.add(on_peer, on_disconnect)

    # -- internals -------------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self._alive:
            raise HostClosed(f"host {self.peer_id} is closed")

    async def _connection_to(self, peer: PeerID, addrs: Sequence[str]) -> _Connection | Circuit:
        if peer == self.peer_id:
            raise DialError("a host cannot dial itself")
        self.add_addrs(peer, addrs)
        conn = self._conns.get(peer) or self._circuits.get(peer)
        if conn is not None:
            return conn
        return await dial_in_order(self._addrbook, peer, addrs, functools.partial(self._dial, peer))

    async def _dial(self, peer: PeerID, addr: str) -> _Connection | Circuit:
        """One address: DialError for a failure there, as :func:`dial_in_order` expects."""
        if relay.is_circuit(addr):
            return await self._dial_circuit(peer, addr)
        network = self.network
        network.stats.dials += 1
        target = network._by_addr.get(addr)
        if network.is_frozen(self.peer_id) or (target is not None and network.is_frozen(target.peer_id)):
            await trio.sleep(DIAL_TIMEOUT)
            raise DialError("timed out")
        await _sleep(2 * network.one_way(self.peer_id, target.peer_id if target is not None else peer))
        self._check_alive()
        conn = self._conns.get(peer)
        if conn is not None:  # a concurrent dial (ours or theirs) won
            return conn
        target = network._by_addr.get(addr)  # it may have crashed meanwhile
        if target is None or not target.dialable:
            raise DialError("connection refused")
        if target.peer_id != peer:
            raise DialError(f"answered as {target.peer_id}, not {peer}")
        if not network.reachable(self.peer_id, peer):
            raise DialError("unreachable (partitioned)")
        return network._connect(self, target)

    async def _dial_circuit(self, peer: PeerID, addr: str) -> Circuit:
        carrier, _limit = await relay.open_circuit(self, addr, peer)
        existing = self._circuits.get(peer) or self._conns.get(peer)
        if existing is not None:  # a concurrent dial won
            carrier.reset_nowait()
            return existing  # type: ignore[return-value]
        if not isinstance(carrier, MemoryStream):
            raise DialError("a memory host relays only over memory streams")
        circuit = self._circuit(carrier, peer, initiator=True)
        self._nursery.start_soon(self._run_circuit, circuit)
        return circuit

    def _circuit(self, carrier: MemoryStream, remote: PeerID, *, initiator: bool) -> Circuit:
        return Circuit(carrier, remote, initiator=initiator, handlers=self._handlers, start_handler=self._start_handler)

    async def _run_circuit(self, circuit: Circuit) -> None:
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

    def _start_handler(self, handler: StreamHandler, stream: MemoryStream | MuxStream) -> None:
        # only called on a live connection, so this host is alive and its nursery open
        self._nursery.start_soon(self._run_handler, handler, stream)

    async def _run_handler(self, handler: StreamHandler, stream: MemoryStream | MuxStream) -> None:
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


class MemoryNetwork(Links):
    """Hosts in one process, with latency, jitter, stream loss, partitions and crashes
    (the link conditions are :class:`~.memory_links.Links`)."""

    def __init__(self, *, latency: float = 0.0, jitter: float = 0.0, loss: float = 0.0, seed: int = 0) -> None:
        super().__init__(latency=latency, jitter=jitter, loss=loss, seed=seed)
        self._hosts: dict[PeerID, MemoryHost] = {}
        self._by_addr: dict[str, MemoryHost] = {}
        self._next_addr = 0

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

    def partition(self, *groups: Iterable[PeerID]) -> None:
        """Peers in different groups cannot reach each other; unlisted peers form one more group.

        Connections across groups drop at once (their streams reset, disconnect listeners
        fire); dials across groups fail until :meth:`heal`.
        """
        self._group_of = {peer: i for i, group in enumerate(groups) for peer in group}
        for conn in self._connections():
            a, b = conn.hosts
            if not self.reachable(a.peer_id, b.peer_id):
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

    # -- internals -------------------------------------------------------------------

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
