"""The Kademlia driver: the pure table, lookup and stores, over a Host.

Requests to a peer go one after another on one outbound stream kept per peer, as go-libp2p
does: a new stream costs yamux frames and a protocol negotiation (~2.2 ms of CPU on
py-libp2p against ~0.6 ms for a round trip on an open one). A stream is pooled only while
``serve`` runs, is dropped (reset) on any error, closed after ``stream_idle_timeout``
unused, and at most ``max_pooled_streams`` are kept (least recently used go first). A
request that fails on a stream reused from before (the remote reset or closed it while it
sat idle) is sent once more on a fresh stream; a timeout is never retried. The handler
serves any number of requests on one stream, in order.

Time: trio time for everything that waits (timeouts, refresh, republish, routing-table
ages); the injected wall clock only for record and provider expiry, which must mean the
same on every peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections import OrderedDict, defaultdict, deque
from typing import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence

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
CANDIDATE_BACKOFF = 120.0
"""Seconds a peer outside the table that failed a request (often a lookup candidate some
third party named) is left out of lookups; crafted unreachable candidates then cost each
lookup only once. Hearing from the peer directly ends it."""
MAX_EVICTED = 10_000
MAX_THIRD_PARTY_ADDRS = 8
"""Addresses of a peer taken from someone else's answer (used only to dial it)."""
MAX_ADDR_LENGTH = 1024
"""Characters of one multiaddr taken from someone else's answer; real ones are < 100."""
STATS_HISTORY = 1000
"""Lookups whose hop counts are kept in :attr:`Stats.hops`."""


BOOTSTRAP_RETRY_DELAYS = (1.0, 2.0)  # seconds between tries of one bootstrap peer

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
    lookup_timeout: float = 30.0
    """Bound on one iterative lookup, seconds: past it the lookup ends with the answers it
    has (a partial result, counted in ``Stats.lookup_timeouts``) instead of following
    peers that name ever more unreachable candidates. Everything built on lookups
    (put_value, get_value, provide, find_providers, find_peer, bootstrap) inherits it."""
    stream_idle_timeout: float = 60.0
    """A pooled outbound stream unused this long is closed. The handler resets an inbound
    stream with no request for twice this, so our own peers rarely close one just as we
    reuse it."""
    max_pooled_streams: int = 256
    """Outbound streams kept open for reuse, one per peer, least recently used dropped first."""
    provider_prefixes: tuple[bytes, ...] = (b"/modelnet/cap/", b"/modelnet/pcap/")
    """ADD_PROVIDER is accepted (and provide() allowed) only for keys under these prefixes
    (public capability tags, and organisations' private ones), so no one can fill the
    provider store with keys no one looks up."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.alpha < 1 or self.quorum < 1:
            raise ValueError("k, alpha and quorum must be at least 1")
        if min(self.request_timeout, self.lookup_timeout, self.stream_idle_timeout) <= 0:
            raise ValueError("request_timeout, lookup_timeout and stream_idle_timeout must be positive")
        if self.max_pooled_streams < 0:
            raise ValueError("max_pooled_streams must not be negative")
        if not 0 < self.republish_interval < min(self.record_ttl, self.provider_ttl):
            raise ValueError("republish_interval must be positive and shorter than both ttls")


@dataclasses.dataclass
class Stats:
    """Counters since start; ``hops`` of the last STATS_HISTORY lookups."""

    lookups: int = 0
    lookup_timeouts: int = 0
    """Lookups cut short by ``Config.lookup_timeout``."""
    queries: int = 0
    failures: int = 0
    streams_opened: int = 0
    """Outbound kad streams opened; ``queries - streams_opened`` went on reused ones."""
    stale_retries: int = 0
    """Requests sent again on a fresh stream after a reused one turned out closed."""
    pings: int = 0
    """Pings sent to the oldest contact of a full bucket."""
    refreshes: int = 0
    """Completed table refreshes (the one at bootstrap and the periodic ones)."""
    hops: deque[int] = dataclasses.field(default_factory=lambda: deque(maxlen=STATS_HISTORY))


_OnReply = Callable[[Lookup, PeerID, KadMessage], None]


class _Slot:
    """One peer's place in the pool: the lock that queues our requests to it, and its
    idle stream (None while a request uses it, or when there is none)."""

    __slots__ = ("lock", "framed", "last_used", "users")

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.framed: FramedStream | None = None
        self.last_used = 0.0
        self.users = 0  # tasks holding or waiting for the lock


class _StreamPool:
    """Idle outbound streams, at most one per peer and ``max_streams`` in all.

    Pure bookkeeping: the methods that drop streams return them, and the caller closes
    them (closing is I/O). A stream is in the pool only while idle, so an evicted one is
    never in use.
    """

    def __init__(self, max_streams: int, idle_timeout: float) -> None:
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._slots: dict[PeerID, _Slot] = {}
        self._idle: OrderedDict[PeerID, None] = OrderedDict()  # least recently used first

    @contextlib.asynccontextmanager
    async def slot(self, peer: PeerID) -> AsyncIterator[_Slot]:
        """``peer``'s slot, locked: requests to one peer go one after another."""
        slot = self._slots.get(peer)
        if slot is None:
            slot = self._slots[peer] = _Slot()
        slot.users += 1
        try:
            async with slot.lock:
                yield slot
        finally:
            slot.users -= 1
            if not slot.users and slot.framed is None:
                self._slots.pop(peer, None)

    def take(self, peer: PeerID, slot: _Slot, now: float) -> tuple[FramedStream | None, FramedStream | None]:
        """``(stream to use, stream too long idle to use)``; either may be None."""
        framed, slot.framed = slot.framed, None
        self._idle.pop(peer, None)
        if framed is not None and slot.last_used <= now - self.idle_timeout:
            return None, framed
        return framed, None

    def put(self, peer: PeerID, slot: _Slot, framed: FramedStream, now: float) -> list[FramedStream]:
        """Keep ``framed`` for the next request; returns the streams to close."""
        if self._slots.get(peer) is not slot:  # evicted meanwhile (at the cap): start over
            self._slots[peer] = slot
        slot.framed, slot.last_used = framed, now
        self._idle[peer] = None
        self._idle.move_to_end(peer)
        dropped = []
        while len(self._idle) > self.max_streams:
            dropped.append(self._drop(next(iter(self._idle))))
        return dropped

    def expired(self, now: float) -> list[FramedStream]:
        """Remove and return the streams idle for ``idle_timeout``."""
        dropped = []
        for peer in list(self._idle):
            if self._slots[peer].last_used > now - self.idle_timeout:
                break  # least recently used first: the rest are younger
            dropped.append(self._drop(peer))
        return dropped

    def drain(self) -> list[FramedStream]:
        return [self._drop(peer) for peer in list(self._idle)]

    def _drop(self, peer: PeerID) -> FramedStream:
        del self._idle[peer]
        slot = self._slots[peer]
        framed, slot.framed = slot.framed, None
        if not slot.users:
            del self._slots[peer]
        assert framed is not None  # a peer is in _idle only while its slot holds a stream
        return framed

    def __len__(self) -> int:
        return len(self._idle)


async def _close_all(streams: Iterable[FramedStream], timeout: float) -> None:
    """Close streams dropped from the pool (politely: the remote's handler reads EOF)."""
    # shielded: also how serve() cleans up when cancelled
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        for framed in streams:
            try:
                await framed.close()
            except ModelNetError as exc:
                logger.debug("closing a pooled kad stream to %s: %r", framed.remote_peer, exc)


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_size(length: int) -> int:
    """Bytes of a length-delimited protobuf field (number < 16) holding ``length`` bytes."""
    return 1 + _varint_size(length) + length


def _peer_size(peer: KadPeer) -> int:
    """Bytes ``peer`` adds to a message as one closerPeers / providerPeers entry."""
    inner = _field_size(len(peer.id)) + sum(_field_size(len(a)) for a in peer.addrs)
    inner += 1 + _varint_size(peer.connection) if peer.connection else 0
    return _field_size(inner)


def _fit(answer: KadMessage, budget: int = MAX_MESSAGE_SIZE) -> KadMessage:
    """``answer`` trimmed to encode within ``budget``: first the addresses of the biggest
    peer entries go, then peers from the ends of the lists (closer peers first). Honest
    answers are a few KiB and come back unchanged."""
    lists = [list(answer.closer_peers), list(answer.provider_peers)]
    sizes = [[_peer_size(p) for p in peers] for peers in lists]
    record = answer.record
    # an upper bound of everything but the peers (tags, lengths, the type, cluster level)
    fixed = 32 + len(answer.key) + (0 if record is None else len(record.key) + len(record.value) + len(record.time_received) + 32)
    if fixed + sum(map(sum, sizes)) <= budget:
        return answer
    fixed = len(encode_message(dataclasses.replace(answer, closer_peers=(), provider_peers=())))
    total = fixed + sum(map(sum, sizes))
    if total <= budget:
        return answer
    entries = sorted(((size, i, j) for i, row in enumerate(sizes) for j, size in enumerate(row)), reverse=True)
    for size, i, j in entries:
        if total <= budget:
            break
        peer = lists[i][j]
        if peer.addrs:
            lists[i][j] = dataclasses.replace(peer, addrs=())
            total += _peer_size(lists[i][j]) - size
            sizes[i][j] = _peer_size(lists[i][j])
    for i in (0, 1):
        while total > budget and lists[i]:
            lists[i].pop()
            total -= sizes[i].pop()
    logger.info("trimmed a %s answer for %r to fit %d bytes", answer.type.name, answer.key[:40], budget)
    return dataclasses.replace(answer, closer_peers=tuple(lists[0]), provider_peers=tuple(lists[1]))


def _few_addrs(addrs: Iterable[str]) -> tuple[str, ...]:
    """The few short addresses of a peer we keep from an answer or an identify."""
    return tuple(a for a in addrs if len(a) <= MAX_ADDR_LENGTH)[:MAX_THIRD_PARTY_ADDRS]


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
        self._pool: _StreamPool | None = None  # only while serve() runs
        # What connected kad peers said about themselves (identify): the only addresses the
        # routing table takes. As bounded as the host's connections.
        self._own_addrs: dict[PeerID, tuple[str, ...]] = {}
        host.add_peer_listener(self._on_peer, self._on_disconnect)

    @property
    def peer_id(self) -> PeerID:
        return self.host.peer_id

    @property
    def pooled_streams(self) -> int:
        """Idle outbound streams kept open for the next requests."""
        return 0 if self._pool is None else len(self._pool)

    # ---- running ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer requests, keep the table fresh, republish; runs until cancelled."""
        send, receive = trio.open_memory_channel[PeerID](PING_QUEUE)
        if not self.config.client_mode:
            self.host.set_stream_handler(self.config.protocol, self._handle_stream)
        pool = self._pool = _StreamPool(self.config.max_pooled_streams, self.config.stream_idle_timeout)
        try:
            async with send, receive:
                async with trio.open_nursery() as nursery:
                    self._ping_send = send
                    nursery.start_soon(self._ping_oldest, receive)
                    nursery.start_soon(self._every, self.config.refresh_interval, self._refresh)
                    nursery.start_soon(self._every, self.config.republish_interval, self._republish)
                    nursery.start_soon(self._every, self.config.expire_interval, self._expire)
                    nursery.start_soon(self._every, self.config.stream_idle_timeout / 2, self._close_idle_streams)
                    task_status.started()
        finally:
            self._ping_send = None
            self._pool = None
            await _close_all(pool.drain(), self.config.request_timeout)
            if not self.config.client_mode:
                self.host.remove_stream_handler(self.config.protocol)

    async def _close_idle_streams(self) -> None:
        if self._pool is not None:
            await _close_all(self._pool.expired(trio.current_time()), self.config.request_timeout)

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
            # A bootstrap peer is often the busiest node of a young network: give it a
            # couple more chances before calling the join failed.
            for delay in (*BOOTSTRAP_RETRY_DELAYS, None):
                if addrs:
                    self.host.add_addrs(peer, addrs)
                try:
                    await self._request(peer, KadMessage(MessageType.FIND_NODE, key=self.peer_id.bytes))
                except RequestFailed as exc:
                    cause = exc.__cause__ or exc
                    if delay is None:
                        failures.append(f"{peer}: {cause or type(cause).__name__}")
                        return
                    logger.info("bootstrap peer %s did not answer (%r); again in %g s", peer, cause, delay)
                    await trio.sleep(delay)
                else:
                    reached += 1
                    return

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
                named = (addrs for pid, addrs in self._peers(reply.closer_peers) if pid == peer and addrs)
                found = next((list(_few_addrs(addrs)) for addrs in named), None)
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
        before ``provider_ttl`` until :meth:`stop_providing`. Returns how many were told.

        Raises RecordRejected for a key under none of ``Config.provider_prefixes`` (every
        node refuses those).
        """
        if not self._provider_key(key):
            raise RecordRejected(f"provider key {key[:40]!r} is under none of {self.config.provider_prefixes}")
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
                addrs = list(_few_addrs(addrs))
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
        with trio.move_on_after(self.config.lookup_timeout) as deadline:
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
        if deadline.cancelled_caught:
            self.stats.lookup_timeouts += 1
            logger.info(
                "%s lookup for %r cut short after %ss: %d answers, %d failures",
                kind.name, key[:40], self.config.lookup_timeout, lookup.successes, lookup.failures,
            )
        else:
            self.routing_table.mark_refreshed(key, trio.current_time())
        self.stats.hops.append(lookup.hops)
        return lookup

    async def _request(self, peer: PeerID, request: KadMessage, *, reply: bool = True) -> KadMessage | None:
        """Send ``request`` to ``peer`` and read its answer (if ``reply``), on the peer's
        pooled stream when there is one.

        Any failure (unreachable, slow, garbage) raises RequestFailed and counts against the
        peer: a table member is evicted after MAX_FAILURES in a row (at once for garbage),
        any other peer is left out of lookups for CANDIDATE_BACKOFF.
        """
        self.stats.queries += 1
        try:
            with trio.fail_after(self.config.request_timeout):
                data = encode_message(request)
                if self._pool is None:
                    async with await self._open_stream(peer) as framed:
                        answer = await self._exchange(framed, data, request, reply)
                else:
                    answer = await self._pooled_exchange(self._pool, peer, data, request, reply)
        except (ModelNetError, trio.TooSlowError) as exc:
            self.stats.failures += 1
            now = trio.current_time()
            if isinstance(exc, RemoteProtocolError):
                logger.info("evicting %s: it answered garbage: %s", peer, exc)
                self.routing_table.remove(peer)
                self._back_off(peer, now, EVICTED_BACKOFF)
            elif peer not in self.routing_table:
                self.routing_table.mark_failed(peer, now)  # drops it from the replacements
                self._back_off(peer, now, CANDIDATE_BACKOFF)
            elif self.routing_table.mark_failed(peer, now):
                self._back_off(peer, now, EVICTED_BACKOFF)
            raise RequestFailed(f"{request.type.name} to {peer}: {exc or type(exc).__name__}") from exc
        # Its answer proves it alive; the addresses the table keeps for it are only the
        # ones it gave itself (identify), never what third parties said about it.
        self._add_contact(peer, self._own_addrs.get(peer, ()))
        return answer

    async def _open_stream(self, peer: PeerID) -> FramedStream:
        stream = await self.host.new_stream(peer, [self.config.protocol])
        self.stats.streams_opened += 1
        return FramedStream(stream, MAX_MESSAGE_SIZE)

    async def _pooled_exchange(
        self, pool: _StreamPool, peer: PeerID, data: bytes, request: KadMessage, reply: bool
    ) -> KadMessage | None:
        async with pool.slot(peer) as slot:
            framed, expired = pool.take(peer, slot, trio.current_time())
            if expired is not None:
                await _close_all([expired], self.config.request_timeout)
            answer: KadMessage | None = None
            if framed is not None:
                try:
                    answer = await self._exchange(framed, data, request, reply)
                except StreamClosed as exc:
                    # closed or reset while it sat idle: stale, not the peer's fault
                    logger.debug("stale kad stream to %s (%r): sending on a fresh one", peer, exc)
                    self.stats.stale_retries += 1
                    framed = None
                except BaseException:  # timeouts and cancellation too: the stream is out of step
                    await framed.reset()
                    raise
            if framed is None:
                framed = await self._open_stream(peer)
                try:
                    answer = await self._exchange(framed, data, request, reply)
                except BaseException:
                    await framed.reset()
                    raise
            await _close_all(pool.put(peer, slot, framed, trio.current_time()), self.config.request_timeout)
            return answer

    @classmethod
    async def _exchange(cls, framed: FramedStream, data: bytes, request: KadMessage, reply: bool) -> KadMessage | None:
        try:
            await framed.send(data)
            return await cls._read_answer(framed, request) if reply else None
        except StreamClosed:
            await framed.reset()
            raise

    @staticmethod
    async def _read_answer(framed: FramedStream, request: KadMessage) -> KadMessage:
        data = await framed.receive()
        if data is None:  # what a peer that refuses a request (or crashes) does: not garbage
            raise StreamClosed("stream ended without an answer")
        answer = decode_message(data)
        if answer.type != request.type:
            raise RemoteProtocolError(f"answered {answer.type.name} to {request.type.name}")
        return answer

    def _back_off(self, peer: PeerID, now: float, seconds: float) -> None:
        if len(self._evicted) >= MAX_EVICTED:
            self._evicted = {p: until for p, until in self._evicted.items() if until > now}
            if len(self._evicted) >= MAX_EVICTED:
                return
        self._evicted[peer] = max(self._evicted.get(peer, now), now + seconds)

    def _provider_key(self, key: bytes) -> bool:
        return any(key.startswith(prefix) for prefix in self.config.provider_prefixes)

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
                peer, addrs = kad_peer.to_peer()
            except RemoteProtocolError as exc:
                logger.debug("dropping a peer entry: %s", exc)
                continue
            if peer != self.peer_id:
                peers.append((peer, addrs))
        return peers

    def _contacts(self, kad_peers: Iterable[KadPeer]) -> list[Contact]:
        """Contacts named in an answer (with a few of the addresses it gives, to dial them
        by), less the peers that failed us lately."""
        now = trio.current_time()
        return [
            Contact(peer, _few_addrs(addrs), now)
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
            self._own_addrs[info.peer_id] = _few_addrs(info.addrs)  # bounded all the same
            self._add_contact(info.peer_id, info.addrs)
        else:
            # A client (or a node that stopped serving): never route anyone to it.
            self._kad_peers.discard(info.peer_id)
            self._own_addrs.pop(info.peer_id, None)
            self.routing_table.remove(info.peer_id)

    def _on_disconnect(self, peer: PeerID) -> None:
        # the table keeps its contact's addresses; these are only for connected peers
        # (identify runs again on the next connection)
        self._own_addrs.pop(peer, None)
        self._kad_peers.discard(peer)

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
            self.stats.pings += 1
            try:
                await self._request(peer, KadMessage(MessageType.PING))
            except RequestFailed:
                self.routing_table.remove(peer)
            finally:
                self._pinging.discard(peer)

    async def _refresh(self) -> None:
        """Look ourselves up, then a random key in each stale bucket the self-lookup did
        not already cover (see RoutingTable.mark_neighbourhood_refreshed)."""
        lookup = await self._lookup(self.peer_id.bytes, MessageType.FIND_NODE)
        if lookup.finished:
            self.routing_table.mark_neighbourhood_refreshed(lookup.closest(), trio.current_time())
        targets = self.routing_table.buckets_to_refresh(trio.current_time(), self.config.refresh_interval, self._rng)
        for target in targets:
            await self.closest_peers(target)
        self.stats.refreshes += 1

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
                    # clients keep a stream for their next requests (see the module doc)
                    with trio.fail_after(2 * self.config.stream_idle_timeout):
                        data = await framed.receive()
                    if data is None:
                        break
                    with trio.fail_after(self.config.request_timeout):
                        answer = self._answer(peer, decode_message(data))
                        if answer is not None:
                            await framed.send(encode_message(_fit(answer)))
        except (ModelNetError, trio.TooSlowError) as exc:  # the stream is reset by now
            logger.debug("kad stream from %s ended: %r", peer, exc)
        finally:
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]

    def _answer(self, peer: PeerID, request: KadMessage) -> KadMessage | None:
        """The answer to one request (None: ADD_PROVIDER has none); raises to reset."""
        if peer in self._kad_peers:
            self._add_contact(peer, self._own_addrs.get(peer, ()))
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
            if not self._provider_key(key):
                logger.debug("%s announced a provider key outside our prefixes: %r ignored", peer, key[:40])
                return None
            for provider, addrs in self._peers(request.provider_peers):
                if provider != peer:  # libp2p rule: a peer announces only itself
                    logger.debug("%s announced %s as a provider: ignored", peer, provider)
                    continue
                if not addrs:  # the ones it gave itself when it connected
                    addrs = list(self._own_addrs.get(peer, ()))
                self.providers.add(key, provider, addrs, now)
            return None
        closer = tuple(KadPeer.from_peer(c.peer_id, c.addrs) for c in self.routing_table.closest(key, exclude=(peer,)))
        if kind == MessageType.GET_VALUE:
            stored = self.records.get(key, now)
            record = None if stored is None else KadRecord(key, stored.value, _rfc3339(stored.received))
            return KadMessage(kind, key=key, record=record, closer_peers=closer)
        if kind == MessageType.GET_PROVIDERS:
            # All we hold (the store keeps <= 100 a key, the wire allows 100): capping at k
            # would hide the same oldest providers behind every answer.
            held = self.providers.providers(key, now, MAX_PEERS)
            providers = tuple(KadPeer.from_peer(p, addrs) for p, addrs in held)
            return KadMessage(kind, key=key, provider_peers=providers, closer_peers=closer)
        return KadMessage(kind, key=key, closer_peers=closer)  # FIND_NODE
