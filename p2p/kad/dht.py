"""The Kademlia driver: the pure table, lookup and stores, over a Host.

Requests use one stream each (open, send one frame, read one frame, close). That costs a
stream open per query (~3 ms on py-libp2p, nothing on the memory network) but needs no
stream pool and keeps a frozen peer from blocking other requests. The handler accepts
several requests on one stream too, as go-libp2p clients reuse streams.

Time: trio time for everything that waits (timeouts, refresh, republish, routing-table
ages); the injected wall clock only for record and provider expiry, which must mean the
same on every peer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
from collections import defaultdict, deque
from typing import Awaitable, Callable, Iterable, Mapping, Sequence

import trio

from modelnet.errors import ModelNetError
from modelnet.identity import PeerID
from modelnet.protocols.errors import RemoteProtocolError
from modelnet.protocols.kad import (
    MAX_MESSAGE_SIZE,
    MAX_PEERS,
    PROTOCOL_ID,
    KadMessage,
    KadPeer,
    KadRecord,
    MessageType,
    decode_message,
    encode_message,
)

from ..errors import StreamClosed
from ..host import Host, PeerInfo, Stream
from ..streams import FramedStream
from .errors import BootstrapFailed, RecordRejected, RequestFailed
from .lookup import Lookup
from .store import ProviderStore, RecordStore, Validator, find_validator
from .table import ALPHA, K, Contact, RoutingTable

logger = logging.getLogger(__name__)

MAX_INBOUND_STREAMS_PER_PEER = 16
"""Concurrent inbound kad streams one peer may hold; beyond that new ones are reset."""
PING_QUIET_PERIOD = 60.0
"""A full bucket's oldest contact seen this recently (seconds) is alive enough: no ping."""
PING_QUEUE = 64
"""Pings waiting to be sent; when full, newcomers simply wait for a later chance."""
REPUBLISH_CONCURRENCY = 4
"""Keys republished at once (each is a lookup plus k stores)."""
EVICTED_BACKOFF = 600.0
"""Seconds an evicted peer is left out of lookups even when others still name it (they
learn of its death later than we did); hearing from it directly ends this at once."""
MAX_EVICTED = 10_000
STATS_HISTORY = 1000
"""Lookups whose hop counts are kept in :attr:`Stats.hops`."""


@dataclasses.dataclass(frozen=True)
class Config:
    k: int = K
    alpha: int = ALPHA
    protocol: str = PROTOCOL_ID
    request_timeout: float = 5.0
    """Bound on every network call (dial, stream, send, answer), seconds."""
    record_ttl: float = 36 * 3600
    """How long a stored value lives without a republish (go-libp2p's MaxRecordAge)."""
    provider_ttl: float = 24 * 3600
    """How long a provider record lives without a republish."""
    republish_interval: float = 12 * 3600
    """Half the shorter ttl: one missed republish loses nothing."""
    refresh_interval: float = 600
    """A bucket not looked up for this long is refreshed with a random lookup."""
    expire_interval: float = 600
    """How often expired records are swept (reads check expiry anyway: this frees memory)."""
    quorum: int = 3
    """get_value stops once this many answers (our own store counts) agree on the best value."""
    client_mode: bool = False
    """Look things up, serve nothing: no handler, so no one adds us to their table."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.alpha < 1 or self.quorum < 1:
            raise ValueError("k, alpha and quorum must be at least 1")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if not 0 < self.republish_interval < min(self.record_ttl, self.provider_ttl):
            raise ValueError("republish_interval must be positive and shorter than both ttls")


@dataclasses.dataclass
class Stats:
    """Counters since start; ``hops`` of the last STATS_HISTORY lookups."""

    lookups: int = 0
    queries: int = 0
    failures: int = 0
    hops: deque[int] = dataclasses.field(default_factory=lambda: deque(maxlen=STATS_HISTORY))


_OnReply = Callable[[Lookup, PeerID, KadMessage], None]


# Peer entries repeat in answer after answer (and, in a simulation, across nodes): parsing a
# peer id and its multiaddrs is most of a lookup's CPU, so both directions are memoised.
@functools.lru_cache(maxsize=8192)
def _decode_peer(kad_peer: KadPeer) -> tuple[PeerID, tuple[str, ...]]:
    peer, addrs = kad_peer.to_peer()  # RemoteProtocolError is not cached
    return peer, tuple(addrs)


@functools.lru_cache(maxsize=8192)
def _encode_peer(peer: PeerID, addrs: tuple[str, ...]) -> KadPeer:
    return KadPeer.from_peer(peer, addrs)


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class KademliaDHT:
    """A Kademlia node on ``host``: ``serve`` it, ``bootstrap`` it, then look things up.

    ``validators`` maps key prefixes to the rules of their namespace; a key under no prefix
    cannot be stored (here or, from others, on this node).
    """

    def __init__(
        self,
        host: Host,
        config: Config = Config(),
        *,
        wall_clock: Callable[[], float] = time.time,
        validators: Mapping[bytes, Validator] = {},
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.config = config
        self.routing_table = RoutingTable(host.peer_id, k=config.k)
        self.records = RecordStore(validators, ttl=config.record_ttl)
        self.providers = ProviderStore(ttl=config.provider_ttl)
        self.stats = Stats()
        self._validators = validators
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._published: dict[bytes, bytes] = {}
        self._providing: set[bytes] = set()
        self._kad_peers: set[PeerID] = set()  # peers whose protocols list ours
        self._inbound: defaultdict[PeerID, int] = defaultdict(int)
        self._ping_send: trio.MemorySendChannel[PeerID] | None = None
        self._pinging: set[PeerID] = set()
        self._evicted: dict[PeerID, float] = {}  # peer -> trio time its backoff ends
        host.add_peer_listener(self._on_peer)

    @property
    def peer_id(self) -> PeerID:
        return self.host.peer_id

    # ---- running ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer requests, keep the table fresh, republish; runs until cancelled."""
        send, receive = trio.open_memory_channel[PeerID](PING_QUEUE)
        if not self.config.client_mode:
            self.host.set_stream_handler(self.config.protocol, self._handle_stream)
        try:
            async with send, receive:
                async with trio.open_nursery() as nursery:
                    self._ping_send = send
                    nursery.start_soon(self._ping_oldest, receive)
                    nursery.start_soon(self._every, self.config.refresh_interval, self._refresh)
                    nursery.start_soon(self._every, self.config.republish_interval, self._republish)
                    nursery.start_soon(self._every, self.config.expire_interval, self._expire)
                    task_status.started()
        finally:
            self._ping_send = None
            if not self.config.client_mode:
                self.host.remove_stream_handler(self.config.protocol)

    async def _every(self, interval: float, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            await trio.sleep(interval)
            try:
                await work()
            except Exception:  # top of a task: one bad round must not stop the next
                logger.exception("kad %s failed", work.__name__)

    async def bootstrap(self, peers: Sequence[tuple[PeerID, Sequence[str]]]) -> int:
        """Join through ``peers``: reach them, look ourselves up, refresh every bucket.

        Returns the routing table's size; raises BootstrapFailed if no peer answered.
        """
        reached = 0
        failures: list[str] = []

        async def reach(peer: PeerID, addrs: Sequence[str]) -> None:
            nonlocal reached
            if addrs:
                self.host.add_addrs(peer, addrs)
            try:
                await self._request(peer, KadMessage(MessageType.FIND_NODE, key=self.peer_id.bytes))
            except RequestFailed as exc:
                failures.append(f"{peer}: {exc.__cause__ or exc}")
            else:
                reached += 1

        async with trio.open_nursery() as nursery:
            for peer, addrs in peers:
                if peer != self.peer_id:
                    nursery.start_soon(reach, peer, addrs)
        if not reached:
            raise BootstrapFailed(f"none of {len(peers)} bootstrap peers answered ({'; '.join(failures)})")
        for failure in failures:  # joined anyway: worth a warning, not an error
            logger.warning("bootstrap peer unreachable: %s", failure)
        await self._refresh()
        return len(self.routing_table)

    # ---- the public operations ----------------------------------------------------------

    async def closest_peers(self, key: bytes) -> list[Contact]:
        """The k peers closest to ``key`` that answered a lookup, closest first."""
        lookup = await self._lookup(key, MessageType.FIND_NODE)
        return lookup.closest()

    async def find_peer(self, peer: PeerID) -> list[str] | None:
        """Addresses of ``peer``, as the network knows them; None if no one does."""
        if peer == self.peer_id:
            return self.host.listen_addrs()
        found: list[str] | None = None

        def on_reply(lookup: Lookup, responder: PeerID, reply: KadMessage) -> None:
            nonlocal found
            if responder == peer:
                found = self.host.peer_addrs(peer)
            else:
                found = next((addrs for pid, addrs in self._peers(reply.closer_peers) if pid == peer and addrs), None)
            if found:
                lookup.stop()

        await self._lookup(peer.bytes, MessageType.FIND_NODE, on_reply)
        return found

    async def put_value(self, key: bytes, value: bytes) -> int:
        """Store ``value`` here and on the k peers closest to ``key``; republished until
        this node stops. Returns how many peers acknowledged.

        Raises RecordRejected (no validator, too large, or we hold a better value) or the
        validator's error.
        """
        if not self.records.put(key, value, self._wall_clock()):
            raise RecordRejected(f"a better value for {key[:40]!r} is already stored")
        self._published[key] = value
        return await self._replicate(key, value)

    async def get_value(self, key: bytes) -> bytes | None:
        """The best valid value for ``key`` (ours or the network's), or None.

        Stops once ``quorum`` answers agree on the best value seen; peers that answered an
        older value are sent the best one.
        """
        validator = find_validator(self._validators, key)
        if validator is None:
            raise RecordRejected(f"no validator for key {key[:40]!r}")
        now = self._wall_clock()
        local = self.records.get(key, now)
        best = local.value if local is not None else None
        answers: dict[PeerID, bytes] = {}

        def on_reply(lookup: Lookup, responder: PeerID, reply: KadMessage) -> None:
            nonlocal best
            record = reply.record
            if record is None or record.key != key:
                return
            try:
                validator.validate(key, record.value, now)
            except ModelNetError as exc:
                logger.debug("dropping an invalid value for %r from %s: %s", key[:40], responder, exc)
                return
            answers[responder] = record.value
            if best is None or (record.value != best and validator.select(key, [best, record.value]) == 1):
                best = record.value
            agreeing = sum(1 for value in answers.values() if value == best)
            agreeing += local is not None and local.value == best
            if agreeing >= self.config.quorum:
                lookup.stop()

        await self._lookup(key, MessageType.GET_VALUE, on_reply)
        if best is not None:
            outdated = [peer for peer, value in answers.items() if value != best]
            await self._store_on(outdated, key, best)
        return best

    async def get_value_from(self, peer: PeerID, key: bytes) -> bytes | None:
        """GET_VALUE asked of one peer (one round trip, no lookup); validated, or None.

        For records a known peer holds about itself, such as its own capability record.
        Raises RequestFailed if the peer cannot be asked.
        """
        validator = find_validator(self._validators, key)
        if validator is None:
            raise RecordRejected(f"no validator for key {key[:40]!r}")
        reply = await self._request(peer, KadMessage(MessageType.GET_VALUE, key=key))
        record = reply.record if reply is not None else None
        if record is None or record.key != key:
            return None
        now = self._wall_clock()
        try:
            validator.validate(key, record.value, now)
        except ModelNetError as exc:
            logger.info("dropping an invalid value for %r from %s: %s", key[:40], peer, exc)
            return None
        return record.value

    async def provide(self, key: bytes) -> int:
        """Announce this node as a provider of ``key`` to the k closest peers; renewed
        before ``provider_ttl`` until :meth:`stop_providing`. Returns how many were told."""
        self._providing.add(key)
        return await self._announce(key)

    def stop_providing(self, key: bytes) -> None:
        """Stop renewing; the records others hold expire within ``provider_ttl``."""
        self._providing.discard(key)
        self.providers.remove(key, self.peer_id)

    async def find_providers(self, key: bytes, count: int = 20) -> list[tuple[PeerID, list[str]]]:
        """Up to ``count`` providers of ``key`` (ours first); stops once ``count`` are known."""
        found: dict[PeerID, list[str]] = {
            peer: list(addrs) for peer, addrs in self.providers.providers(key, self._wall_clock(), count)
        }

        def on_reply(lookup: Lookup, responder: PeerID, reply: KadMessage) -> None:
            for peer, addrs in self._peers(reply.provider_peers):
                if addrs:
                    self.host.add_addrs(peer, addrs)
                found.setdefault(peer, addrs)
            if len(found) >= count:
                lookup.stop()

        if len(found) < count:
            await self._lookup(key, MessageType.GET_PROVIDERS, on_reply)
        return list(found.items())[:count]

    # ---- lookups and requests -----------------------------------------------------------

    async def _lookup(self, key: bytes, kind: MessageType, on_reply: _OnReply | None = None) -> Lookup:
        """Run an iterative lookup for ``key``, ``kind`` requests, at most alpha in flight."""
        lookup = Lookup(key, self.routing_table.closest(key), k=self.config.k, alpha=self.config.alpha)
        request = KadMessage(kind, key=key)
        send, receive = trio.open_memory_channel[tuple[PeerID, KadMessage | None]](math.inf)

        async def query(peer: PeerID) -> None:
            try:
                reply = await self._request(peer, request)
            except RequestFailed:
                reply = None
            send.send_nowait((peer, reply))

        self.stats.lookups += 1
        async with trio.open_nursery() as nursery:
            while True:
                for contact in lookup.next(trio.current_time()):
                    if contact.addrs:
                        self.host.add_addrs(contact.peer_id, contact.addrs)
                    nursery.start_soon(query, contact.peer_id)
                if lookup.finished or not lookup.in_flight:
                    break
                peer, reply = await receive.receive()
                if reply is None:
                    lookup.on_failure(peer, trio.current_time())
                    continue
                closer = self._contacts(reply.closer_peers)
                lookup.on_success(peer, closer, trio.current_time())
                if on_reply is not None:
                    on_reply(lookup, peer, reply)
            nursery.cancel_scope.cancel()  # queries still out after an early stop
        self.routing_table.mark_refreshed(key, trio.current_time())
        self.stats.hops.append(lookup.hops)
        return lookup

    async def _request(self, peer: PeerID, request: KadMessage, *, reply: bool = True) -> KadMessage | None:
        """Send ``request`` to ``peer`` on a new stream and read its answer (if ``reply``).

        Any failure (unreachable, slow, garbage) raises RequestFailed and counts against the
        peer in the routing table; a garbage answer evicts it at once.
        """
        self.stats.queries += 1
        try:
            with trio.fail_after(self.config.request_timeout):
                stream = await self.host.new_stream(peer, [self.config.protocol])
                async with FramedStream(stream, MAX_MESSAGE_SIZE) as framed:
                    await framed.send(encode_message(request))
                    answer = await self._read_answer(framed, request) if reply else None
        except (ModelNetError, trio.TooSlowError) as exc:
            self.stats.failures += 1
            now = trio.current_time()
            if isinstance(exc, RemoteProtocolError):
                logger.info("evicting %s: it answered garbage: %s", peer, exc)
                self.routing_table.remove(peer)
                self._back_off(peer, now)
            elif self.routing_table.mark_failed(peer, now):
                self._back_off(peer, now)
            raise RequestFailed(f"{request.type.name} to {peer}: {exc or type(exc).__name__}") from exc
        self._add_contact(peer, self.host.peer_addrs(peer))
        return answer

    @staticmethod
    async def _read_answer(framed: FramedStream, request: KadMessage) -> KadMessage:
        data = await framed.receive()
        if data is None:  # what a peer that refuses a request (or crashes) does: not garbage
            raise StreamClosed("stream ended without an answer")
        answer = decode_message(data)
        if answer.type != request.type:
            raise RemoteProtocolError(f"answered {answer.type.name} to {request.type.name}")
        return answer

    def _back_off(self, peer: PeerID, now: float) -> None:
        if len(self._evicted) >= MAX_EVICTED:
            self._evicted = {p: until for p, until in self._evicted.items() if until > now}
            if len(self._evicted) >= MAX_EVICTED:
                return
        self._evicted[peer] = now + EVICTED_BACKOFF

    def _backed_off(self, peer: PeerID, now: float) -> bool:
        until = self._evicted.get(peer)
        if until is not None and until <= now:
            del self._evicted[peer]
            return False
        return until is not None

    def _peers(self, kad_peers: Iterable[KadPeer]) -> list[tuple[PeerID, list[str]]]:
        """Peer ids and addresses from an answer, without us; a bad entry is dropped alone."""
        peers = []
        for kad_peer in kad_peers:
            try:
                peer, addrs = _decode_peer(kad_peer)
            except RemoteProtocolError as exc:
                logger.debug("dropping a peer entry: %s", exc)
                continue
            if peer != self.peer_id:
                peers.append((peer, list(addrs)))
        return peers

    def _contacts(self, kad_peers: Iterable[KadPeer]) -> list[Contact]:
        """Contacts named in an answer, less the peers we evicted lately."""
        now = trio.current_time()
        return [
            Contact(peer, tuple(addrs), now)
            for peer, addrs in self._peers(kad_peers)
            if not self._backed_off(peer, now)
        ]

    async def _replicate(self, key: bytes, value: bytes) -> int:
        peers = [contact.peer_id for contact in await self.closest_peers(key)]
        return await self._store_on(peers, key, value)

    async def _store_on(self, peers: Sequence[PeerID], key: bytes, value: bytes) -> int:
        """PUT_VALUE to each of ``peers`` at once; returns how many now hold ``value``."""
        request = KadMessage(MessageType.PUT_VALUE, key=key, record=KadRecord(key, value))
        acks = 0

        async def store(peer: PeerID) -> None:
            nonlocal acks
            try:
                answer = await self._request(peer, request)
            except RequestFailed:
                return
            # A peer holding a better value answers with it instead of an echo.
            if answer is not None and answer.record is not None and answer.record.value == value:
                acks += 1

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(store, peer)
        return acks

    async def _announce(self, key: bytes) -> int:
        """ADD_PROVIDER (no answer, per the spec) to the k closest peers of ``key``."""
        addrs = self.host.listen_addrs()
        self.providers.add(key, self.peer_id, addrs, self._wall_clock())
        me = KadPeer.from_peer(self.peer_id, addrs)
        request = KadMessage(MessageType.ADD_PROVIDER, key=key, provider_peers=(me,))
        told = 0

        async def tell(peer: PeerID) -> None:
            nonlocal told
            try:
                await self._request(peer, request, reply=False)
            except RequestFailed:
                return
            told += 1

        async with trio.open_nursery() as nursery:
            for contact in await self.closest_peers(key):
                nursery.start_soon(tell, contact.peer_id)
        return told

    # ---- the routing table --------------------------------------------------------------

    def _on_peer(self, info: PeerInfo) -> None:
        if self.config.protocol in info.protocols:
            self._kad_peers.add(info.peer_id)
            self._add_contact(info.peer_id, info.addrs)
        else:
            # A client (or a node that stopped serving): never route anyone to it.
            self._kad_peers.discard(info.peer_id)
            self.routing_table.remove(info.peer_id)

    def _add_contact(self, peer: PeerID, addrs: Sequence[str]) -> None:
        """``peer`` is alive and speaks kad: (re)admit it."""
        now = trio.current_time()
        self._evicted.pop(peer, None)
        if self.routing_table.add(peer, addrs, now):
            return
        oldest = self.routing_table.ping_candidate(peer)
        if (
            oldest is None
            or self._ping_send is None
            or oldest.last_seen > now - PING_QUIET_PERIOD
            or oldest.peer_id in self._pinging
        ):
            return
        try:
            self._ping_send.send_nowait(oldest.peer_id)
        except trio.WouldBlock:
            return
        self._pinging.add(oldest.peer_id)

    async def _ping_oldest(self, receive: trio.MemoryReceiveChannel[PeerID]) -> None:
        """Ping full buckets' oldest contacts: one that answers stays (and moves to the back),
        one that does not makes room for the freshest newcomer waiting for its bucket."""
        async for peer in receive:
            try:
                await self._request(peer, KadMessage(MessageType.PING))
            except RequestFailed:
                self.routing_table.remove(peer)
            finally:
                self._pinging.discard(peer)

    async def _refresh(self) -> None:
        """Look ourselves up, then a random key in each stale bucket."""
        await self.closest_peers(self.peer_id.bytes)
        targets = self.routing_table.buckets_to_refresh(trio.current_time(), self.config.refresh_interval, self._rng)
        for target in targets:
            await self.closest_peers(target)

    # ---- republishing and expiry --------------------------------------------------------

    async def _republish(self) -> None:
        limiter = trio.CapacityLimiter(REPUBLISH_CONCURRENCY)

        async def limited(work: Callable[..., Awaitable[object]], *args: bytes) -> None:
            async with limiter:
                await work(*args)

        async with trio.open_nursery() as nursery:
            for key, value in list(self._published.items()):
                nursery.start_soon(limited, self._republish_value, key, value)
            for key in list(self._providing):
                nursery.start_soon(limited, self._announce, key)

    async def _republish_value(self, key: bytes, value: bytes) -> None:
        try:
            current = self.records.put(key, value, self._wall_clock())
        except ModelNetError as exc:  # e.g. a signed record past its own expiry
            logger.warning("no longer republishing %r: %s", key[:40], exc)
            current = False
        if not current:  # invalid now, or someone stored a better value
            self._published.pop(key, None)
            return
        await self._replicate(key, value)

    async def _expire(self) -> None:
        now = self._wall_clock()
        self.records.expire(now)
        self.providers.expire(now)

    # ---- answering ----------------------------------------------------------------------

    async def _handle_stream(self, stream: Stream) -> None:
        peer = stream.remote_peer
        if self._inbound[peer] >= MAX_INBOUND_STREAMS_PER_PEER:
            logger.debug("resetting a kad stream from %s: too many at once", peer)
            await stream.reset()
            return
        self._inbound[peer] += 1
        try:
            async with FramedStream(stream, MAX_MESSAGE_SIZE) as framed:
                while True:
                    with trio.fail_after(self.config.request_timeout):
                        data = await framed.receive()
                        if data is None:
                            break
                        answer = self._answer(peer, decode_message(data))
                        if answer is not None:
                            await framed.send(encode_message(answer))
        except (ModelNetError, trio.TooSlowError) as exc:  # the stream is reset by now
            logger.debug("kad stream from %s ended: %r", peer, exc)
        finally:
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]

    def _answer(self, peer: PeerID, request: KadMessage) -> KadMessage | None:
        """The answer to one request (None: ADD_PROVIDER has none); raises to reset."""
        if peer in self._kad_peers:
            self._add_contact(peer, self.host.peer_addrs(peer))
        key, kind = request.key, request.type
        now = self._wall_clock()
        if kind == MessageType.PING:
            return KadMessage(MessageType.PING)
        if kind == MessageType.PUT_VALUE:
            record = request.record
            if record is None or record.key != key:
                raise RemoteProtocolError("PUT_VALUE without a record for its key")
            if self.records.put(key, record.value, now):
                return request
            kept = self.records.get(key, now)
            assert kept is not None  # put() keeps the old value only when there is one
            return KadMessage(kind, key=key, record=KadRecord(key, kept.value, _rfc3339(kept.received)))
        if kind == MessageType.ADD_PROVIDER:
            for provider, addrs in self._peers(request.provider_peers):
                if provider != peer:  # libp2p rule: a peer announces only itself
                    logger.debug("%s announced %s as a provider: ignored", peer, provider)
                    continue
                self.providers.add(key, provider, addrs or self.host.peer_addrs(peer), now)
            return None
        closer = tuple(
            _encode_peer(c.peer_id, c.addrs) for c in self.routing_table.closest(key, exclude=(peer,))
        )
        if kind == MessageType.GET_VALUE:
            stored = self.records.get(key, now)
            record = None if stored is None else KadRecord(key, stored.value, _rfc3339(stored.received))
            return KadMessage(kind, key=key, record=record, closer_peers=closer)
        if kind == MessageType.GET_PROVIDERS:
            # All we hold (the store keeps <= 100 a key, the wire allows 100): capping at k
            # would hide the same oldest providers behind every answer.
            held = self.providers.providers(key, now, MAX_PEERS)
            providers = tuple(_encode_peer(p, addrs) for p, addrs in held)
            return KadMessage(kind, key=key, provider_peers=providers, closer_peers=closer)
        return KadMessage(kind, key=key, closer_peers=closer)  # FIND_NODE
