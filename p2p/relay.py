"""Circuit relay v2 (libp2p/specs relay/circuit-v2.md): reach a peer that cannot be dialled.

A peer behind NAT dials out to a relay and keeps that connection; it *reserves* a slot
there (:class:`RelayClient`) and advertises ``<relay addr>/p2p/<relay>/p2p-circuit``
among its listen addresses (so in its signed capability record and in the DHT). A peer
that wants it dials that address: it asks the relay to CONNECT (hop protocol), the relay
opens a STOP stream on the reserved peer's connection, and once both say OK the relay
splices the two streams (:class:`RelayService`). The host then runs a whole connection
over the spliced stream: on libp2p a Noise handshake and Yamux, exactly as over TCP, so
the relay sees only ciphertext and the peer's identity is proved end to end; on the
memory network a small muxer (:mod:`.memory_circuit`). Above the host nothing changes:
a relayed peer is dialled, identified and streamed to like any other.

The relay enforces the spec's limits: a bounded number of reservations, each with a TTL
and dropped when its peer disconnects; a bounded number of circuits, in all and per
peer; and per circuit a duration and a number of bytes in each direction, past which it
resets the circuit. Nested circuits (a relay reached through a relay) are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence, TypeVar

import trio

from modelnet.identity import PeerID
from modelnet.protocols import relay as wire
from modelnet.protocols.errors import ProtocolError, RemoteProtocolError
from modelnet.protocols.framing import decode_uvarint, encode_uvarint

from .errors import BadAddress, DialError, P2PError, StreamClosed
from .host import Host, Stream, full_address, split_full_address
from .streams import NEGOTIATE_TIMEOUT

logger = logging.getLogger(__name__)

CIRCUIT = "/p2p-circuit"
HANDSHAKE_TIMEOUT = NEGOTIATE_TIMEOUT  # one hop or stop exchange, so nothing hangs on a half-open peer
RETRY_MIN = 1.0  # seconds before trying a relay again after a failure, doubling
RETRY_MAX = 60.0
_SPLICE_READ = 65536
_M = TypeVar("_M")


class RelayError(P2PError):
    """A relay refused or failed; ``status`` is the spec's status code when one was given."""

    def __init__(self, message: str, status: wire.Status | None = None) -> None:
        super().__init__(message)
        self.status = status


class CircuitFailed(DialError, RelayError):
    """A peer could not be reached through a relay (no reservation, limit, relay down…)."""


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """What a relay accepts. Defaults are sized for model requests, not only hole punching
    (go-libp2p's 2 min / 128 KiB would cut a long answer)."""

    max_reservations: int = 128
    reservation_ttl: float = 3600.0  # seconds; clients refresh before it ends
    max_circuits: int = 64  # open at once, in all
    max_circuits_per_peer: int = 8  # open at once with one peer at either end
    circuit_duration: float = 600.0  # seconds a circuit may stay up
    circuit_data: int = 64 << 20  # bytes allowed in each direction of a circuit


@dataclasses.dataclass(frozen=True)
class Reservation:
    """A slot a relay granted us."""

    relay: PeerID
    expires: float  # UNIX seconds, as the relay said
    addrs: tuple[str, ...]  # the relay's addresses, ending in /p2p/<relay>
    limit: wire.Limit | None


@dataclasses.dataclass(slots=True)
class ServiceStats:
    reservations: int = 0  # granted (refreshes included)
    refused: int = 0  # reservations and circuits refused
    circuits: int = 0  # opened
    relayed_bytes: int = 0
    limited: int = 0  # circuits reset at their duration or data limit


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


def circuit_address(relay_addr: str, relay: PeerID) -> str:
    """The listen address a reserved peer advertises: ``<relay addr>/p2p/<relay>/p2p-circuit``."""
    return full_address(relay_addr, relay) + CIRCUIT


def split_circuit(addr: str) -> tuple[str, PeerID]:
    """``(relay transport address, relay peer)`` of ``…/p2p/<relay>/p2p-circuit[/p2p/<peer>]``."""
    head, sep, tail = addr.partition(CIRCUIT)
    if not sep or is_circuit(tail) or (tail and not tail.startswith("/p2p/")):
        raise BadAddress(f"{addr!r} is not a circuit address (…/p2p/RELAY/p2p-circuit)")
    relay_addr, relay = split_full_address(head)
    if is_circuit(relay_addr):
        raise BadAddress(f"{addr!r}: nested circuits are not allowed")
    return relay_addr, relay


# ---- messages on a stream -------------------------------------------------------------


async def _read_exactly(stream: Stream, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        data = await stream.read(size - len(out))
        if not data:
            raise RemoteProtocolError("the stream ended inside a relay message")
        out += data
    return bytes(out)


async def read_message(stream: Stream) -> bytes:
    """One uvarint-delimited message, read to its last byte and not one byte further:
    after the handshake the same stream carries the relayed connection."""
    header = b""
    while True:
        header += await _read_exactly(stream, 1)
        decoded = decode_uvarint(header)  # raises past 10 bytes
        if decoded is not None:
            break
    length = decoded[0]
    if length > wire.MAX_MESSAGE_SIZE:
        raise RemoteProtocolError(f"relay message of {length} bytes is over {wire.MAX_MESSAGE_SIZE}")
    return await _read_exactly(stream, length)


async def write_message(stream: Stream, payload: bytes) -> None:
    await stream.write(encode_uvarint(len(payload)) + payload)


async def _receive(stream: Stream, decode: Callable[[bytes], _M]) -> _M | None:
    """The request that opens a hop or stop stream, or None (logged) if it is bad or late."""
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            return decode(await read_message(stream))
    except (ProtocolError, P2PError, trio.TooSlowError) as exc:
        logger.info("bad relay request from %s: %s", stream.remote_peer.short(), exc or "timed out")
        return None


# ---- the relay ------------------------------------------------------------------------


class _DataLimit(Exception):
    """Internal: one direction of a circuit passed its byte limit."""


class RelayService:
    """The hop side: ``await nursery.start(RelayService(host).serve)``."""

    def __init__(self, host: Host, config: ServiceConfig = ServiceConfig(), *, wall_clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.config = config
        self.wall_clock = wall_clock
        self.stats = ServiceStats()
        self._reservations: dict[PeerID, float] = {}  # peer -> expiry on trio's clock
        self._circuits: dict[PeerID, int] = {}  # peer -> open circuits it is an end of
        self._open = 0
        self._serving = False
        host.add_peer_listener(lambda info: None, self._disconnected)

    @property
    def reservations(self) -> list[PeerID]:
        now = trio.current_time()
        return [peer for peer, expires in self._reservations.items() if expires > now]

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(wire.HOP_PROTOCOL, self._handle_hop)
        self._serving = True
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._serving = False
            self.host.remove_stream_handler(wire.HOP_PROTOCOL)

    def _disconnected(self, peer: PeerID) -> None:
        # A reservation lives on the connection it was made on: without it no STOP can
        # reach the peer, so keeping the slot would only fail circuits later.
        if self._reservations.pop(peer, None) is not None:
            logger.info("reservation of %s dropped: disconnected", peer.short())

    async def _handle_hop(self, stream: Stream) -> None:
        source = stream.remote_peer
        msg = await _receive(stream, wire.decode_hop)
        if msg is None:
            await self._answer(stream, wire.Status.MALFORMED_MESSAGE)
            return
        if msg.type is wire.HopType.RESERVE:
            await self._reserve(stream, source)
        elif msg.type is wire.HopType.CONNECT:
            assert msg.peer is not None  # decode_hop checks it
            await self._connect(stream, source, msg.peer.peer_id)
        else:
            await self._answer(stream, wire.Status.UNEXPECTED_MESSAGE)

    async def _answer(self, stream: Stream, status: wire.Status, **fields) -> bool:
        if status is not wire.Status.OK:
            self.stats.refused += 1
        try:
            await write_message(stream, wire.encode_hop(wire.HopMessage(wire.HopType.STATUS, status=status, **fields)))
        except P2PError as exc:
            logger.info("could not answer %s: %s", stream.remote_peer.short(), exc)
            return False
        return True

    def _limit(self) -> wire.Limit:
        return wire.Limit(duration=int(self.config.circuit_duration), data=self.config.circuit_data)

    async def _reserve(self, stream: Stream, peer: PeerID) -> None:
        now = trio.current_time()
        for other, expires in list(self._reservations.items()):
            if expires <= now:
                del self._reservations[other]
        if peer not in self._reservations and len(self._reservations) >= self.config.max_reservations:
            logger.info("reservation of %s refused: %d slots taken", peer.short(), len(self._reservations))
            await self._answer(stream, wire.Status.RESERVATION_REFUSED)
            return
        self._reservations[peer] = now + self.config.reservation_ttl
        self.stats.reservations += 1
        addrs = tuple(full_address(a, self.host.peer_id) for a in self.host.listen_addrs() if not is_circuit(a))
        reservation = wire.Reservation(expire=int(self.wall_clock() + self.config.reservation_ttl), addrs=addrs[: wire.MAX_ADDRS])
        await self._answer(stream, wire.Status.OK, reservation=reservation, limit=self._limit())
        logger.info("reserved a slot for %s", peer.short())

    async def _connect(self, stream: Stream, source: PeerID, target: PeerID) -> None:
        expires = self._reservations.get(target)
        if expires is None or expires <= trio.current_time():
            await self._answer(stream, wire.Status.NO_RESERVATION)
            return
        per_peer = self.config.max_circuits_per_peer
        if self._open >= self.config.max_circuits or max(self._circuits.get(source, 0), self._circuits.get(target, 0)) >= per_peer:
            logger.info("circuit %s -> %s refused: limit reached", source.short(), target.short())
            await self._answer(stream, wire.Status.RESOURCE_LIMIT_EXCEEDED)
            return
        limit = self._limit()
        self._open += 1
        for peer in (source, target):
            self._circuits[peer] = self._circuits.get(peer, 0) + 1
        try:
            stop = await self._open_stop(source, target, limit)
            if stop is None:
                await self._answer(stream, wire.Status.CONNECTION_FAILED)
                return
            try:
                if not await self._answer(stream, wire.Status.OK, limit=limit):
                    await stop.reset()
                    return
                self.stats.circuits += 1
                await self._splice(stream, stop, limit)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stop.reset()
                raise
        finally:
            self._open -= 1
            for peer in (source, target):
                self._circuits[peer] -= 1
                if not self._circuits[peer]:
                    del self._circuits[peer]

    async def _open_stop(self, source: PeerID, target: PeerID, limit: wire.Limit) -> Stream | None:
        """A STOP stream to ``target`` that accepted ``source``, or None (logged)."""
        stop = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                # on the reservation's connection: a peer behind NAT cannot be dialled
                stop = await self.host.new_stream(target, [wire.STOP_PROTOCOL])
                await write_message(stop, wire.encode_stop(wire.StopMessage(wire.StopType.CONNECT, peer=wire.Peer(source), limit=limit)))
                answer = wire.decode_stop(await read_message(stop))
        except (ProtocolError, P2PError, trio.TooSlowError) as exc:
            logger.info("stop to %s for %s failed: %s", target.short(), source.short(), exc)
            if stop is not None:
                await stop.reset()
            return None
        if answer.type is not wire.StopType.STATUS or answer.status is not wire.Status.OK:
            logger.info("%s refused a circuit from %s: %s", target.short(), source.short(), answer.status)
            await stop.reset()
            return None
        return stop

    async def _splice(self, a: Stream, b: Stream, limit: wire.Limit) -> None:
        """Copy both ways until both ends close; reset both at the first reset or limit."""

        async def pipe(src: Stream, dst: Stream) -> None:
            sent = 0
            while True:
                data = await src.read(_SPLICE_READ)
                if not data:
                    await dst.close()
                    return
                sent += len(data)
                if limit.data and sent > limit.data:
                    raise _DataLimit
                self.stats.relayed_bytes += len(data)
                await dst.write(data)

        finished = False
        try:
            with trio.move_on_after(limit.duration or float("inf")):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pipe, a, b)
                    nursery.start_soon(pipe, b, a)
                finished = True
            if not finished:
                self.stats.limited += 1
                logger.info("circuit %s <-> %s reset: %d s passed", a.remote_peer.short(), b.remote_peer.short(), limit.duration)
        except* _DataLimit:
            self.stats.limited += 1
            logger.info("circuit %s <-> %s reset: over %d bytes", a.remote_peer.short(), b.remote_peer.short(), limit.data)
        except* StreamClosed:
            pass  # one end went away: the other is reset below
        if not finished:
            with trio.CancelScope(shield=True):
                await a.reset()
                await b.reset()


# ---- the reserving peer and the dialler -----------------------------------------------


async def reserve(host: Host, relay: PeerID, addrs: Sequence[str] = ()) -> Reservation:
    """Reserve a slot on ``relay`` (dialled at ``addrs`` if not connected).

    Raises :class:`RelayError` if the relay refuses, :class:`DialError` if it cannot be reached.
    """
    await host.connect(relay, addrs)
    stream = await host.new_stream(relay, [wire.HOP_PROTOCOL])
    try:
        await write_message(stream, wire.encode_hop(wire.HopMessage(wire.HopType.RESERVE)))
        answer = wire.decode_hop(await read_message(stream))
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.reset()
        raise
    await stream.close()
    if answer.type is not wire.HopType.STATUS or answer.status is not wire.Status.OK:
        raise RelayError(f"relay {relay} refused the reservation: {_status_name(answer.status)}", answer.status)
    if answer.reservation is None:
        raise RelayError(f"relay {relay} said OK without a reservation")
    return Reservation(relay, float(answer.reservation.expire), answer.reservation.addrs, answer.limit)


async def open_circuit(host: Host, addr: str, target: PeerID) -> tuple[Stream, wire.Limit | None]:
    """A stream to ``target`` through the relay in ``addr`` (a circuit address), spliced
    and ready to carry a connection, with the relay's limit for it.

    Raises :class:`CircuitFailed` with the relay's reason.
    """
    relay_addr, relay = split_circuit(addr)
    if relay == target or relay == host.peer_id:
        raise CircuitFailed(f"{addr!r}: a circuit through the peer itself")
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await host.connect(relay, [relay_addr])
            stream = await host.new_stream(relay, [wire.HOP_PROTOCOL])
    except (P2PError, trio.TooSlowError) as exc:
        raise CircuitFailed(f"relay {relay.short()} unreachable: {exc or 'timed out'}") from None
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await write_message(stream, wire.encode_hop(wire.HopMessage(wire.HopType.CONNECT, peer=wire.Peer(target))))
            answer = wire.decode_hop(await read_message(stream))
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await stream.reset()
        if isinstance(exc, (P2PError, ProtocolError, trio.TooSlowError)):
            raise CircuitFailed(f"relay {relay.short()} failed: {exc or 'timed out'}") from None
        raise
    if answer.type is not wire.HopType.STATUS or answer.status is not wire.Status.OK:
        await stream.reset()
        raise CircuitFailed(f"relay {relay.short()} refused the circuit to {target.short()}: {_status_name(answer.status)}", answer.status)
    return stream, answer.limit


def _status_name(status: wire.Status | None) -> str:
    return status.name if status is not None else "no status"


class RelayClient:
    """Keeps reservations on relays and accepts the circuits they open.

    ``await nursery.start(RelayClient(host, ["/ip4/…/p2p/<relay>"]).serve)`` returns once
    every relay has answered a first reservation (or failed, which is logged and retried
    with backoff); the host then advertises the circuit addresses of the relays that
    granted one. Reservations are renewed at three quarters of their life; a relay that
    drops us is retried and its address withdrawn meanwhile.
    """

    def __init__(self, host: Host, relays: Sequence[str], *, wall_clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.relays = [split_full_address(a) for a in relays]
        self.wall_clock = wall_clock
        self.reservations: dict[PeerID, Reservation] = {}
        self._changed = trio.Event()
        self._lost: dict[PeerID, trio.Event] = {}  # set when the connection to that relay drops
        host.add_peer_listener(lambda info: None, self._disconnected)

    def _disconnected(self, peer: PeerID) -> None:
        lost = self._lost.get(peer)
        if lost is not None:
            lost.set()

    def circuit_addrs(self) -> list[str]:
        return [circuit_address(a, relay) for a, relay in self.relays if relay in self.reservations]

    async def wait_reserved(self) -> None:
        """Until at least one relay holds a reservation for us."""
        while not self.reservations:
            await self._changed.wait()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(wire.STOP_PROTOCOL, self._handle_stop)
        try:
            async with trio.open_nursery() as nursery:
                for addr, relay in self.relays:
                    await nursery.start(self._keep, addr, relay)
                task_status.started()
        finally:
            self.host.remove_stream_handler(wire.STOP_PROTOCOL)
            self.host.set_relay_addrs(())

    def _update(self, relay: PeerID, reservation: Reservation | None) -> None:
        if reservation is None:
            self.reservations.pop(relay, None)
        else:
            self.reservations[relay] = reservation
        self.host.set_relay_addrs(self.circuit_addrs())
        self._changed.set()
        self._changed = trio.Event()

    async def _keep(self, addr: str, relay: PeerID, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        delay = RETRY_MIN
        started = False
        while True:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    reservation = await reserve(self.host, relay, [addr])
            except (P2PError, ProtocolError, trio.TooSlowError) as exc:
                logger.warning("reservation on relay %s failed: %s", relay.short(), exc or "timed out")
                self._update(relay, None)
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN
            self._update(relay, reservation)
            if not started:
                started = True
                task_status.started()
            renew_in = max(RETRY_MIN, 0.75 * (reservation.expires - self.wall_clock()))
            # renew early if the relay goes away: our address through it is dead meanwhile
            lost = self._lost[relay] = trio.Event()
            if relay not in self.host.connected_peers():
                lost.set()
            with trio.move_on_after(renew_in):
                await lost.wait()
                logger.warning("lost the connection to relay %s; reserving again", relay.short())
                self._update(relay, None)
                await trio.sleep(delay)

    async def _handle_stop(self, stream: Stream) -> None:
        relay = stream.remote_peer
        msg = await _receive(stream, wire.decode_stop)
        if msg is None:
            return
        if relay not in self.reservations:
            # only relays we chose may open circuits to us
            status = wire.Status.PERMISSION_DENIED
        elif msg.type is not wire.StopType.CONNECT:
            status = wire.Status.UNEXPECTED_MESSAGE
        else:
            status = wire.Status.OK
        await write_message(stream, wire.encode_stop(wire.StopMessage(wire.StopType.STATUS, status=status)))
        if status is not wire.Status.OK:
            return
        assert msg.peer is not None
        logger.info("relayed connection from %s through %s", msg.peer.peer_id.short(), relay.short())
        await self.host.serve_relayed(stream, msg.peer.peer_id)

