"""The Kademlia driver: the pure table, lookup and stores, over a Host.

Our requests go on pooled outbound streams (:mod:`.pool`): a stream is pooled only while
``serve`` runs, is dropped (reset) on any error, closed after ``stream_idle_timeout``
unused, and at most ``max_pooled_streams`` are kept (least recently used go first). A
request that fails on a stream reused from before (the remote reset or closed it while it
sat idle) is sent once more on a fresh stream; a timeout is never retried. Others'
requests are answered by :mod:`.answerer`, any number on one stream, in order.

Time: trio time for everything that waits (timeouts, refresh, republish, routing-table
ages); the injected wall clock only for record and provider expiry, which must mean the
same on every peer.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Awaitable, Callable, Iterable, Mapping, Sequence

import trio

from modelnet.errors import ModelNetError
from modelnet.identity import PeerID
from modelnet.protocols.errors import RemoteProtocolError
from modelnet.protocols.kad import MAX_MESSAGE_SIZE, KadMessage, KadPeer, KadRecord, MessageType, encode_message

from ..host import Host, PeerInfo
from ..streams import FramedStream
from .answerer import Answerer
from .config import Config
from .errors import BootstrapFailed, RecordRejected, RequestFailed
from .lookup import Lookup
from .peer_entries import few_addrs, peers_from
from .pool import StreamPool, close_all, exchange, pooled_exchange
from .stats import Stats
from .store import ProviderStore, RecordStore, Validator, find_validator
from .table import Contact, RoutingTable

logger = logging.getLogger(__name__)

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
BOOTSTRAP_RETRY_DELAYS = (1.0, 2.0)
"""Seconds between tries of one bootstrap peer."""


_OnReply = Callable[[Lookup, PeerID, KadMessage], None]


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
        self._ping_send: trio.MemorySendChannel[PeerID] | None = None
        self._pinging: set[PeerID] = set()
        self._evicted: dict[PeerID, float] = {}  # peer -> trio time its backoff ends
        self._pool: StreamPool | None = None  # only while serve() runs
        # What connected kad peers said about themselves (identify): the only addresses the
        # routing table takes. As bounded as the host's connections.
        self._own_addrs: dict[PeerID, tuple[str, ...]] = {}
        self._answerer = Answerer(
            config, self.routing_table, self.records, self.providers,
            own_addrs=self._own_addrs, heard_from=self._heard_from, wall_clock=wall_clock,
        )
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
            self.host.set_stream_handler(self.config.protocol, self._answerer.handle_stream)
        pool = self._pool = StreamPool(self.config.max_pooled_streams, self.config.stream_idle_timeout)
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
            await close_all(pool.drain(), self.config.request_timeout)
            if not self.config.client_mode:
                self.host.remove_stream_handler(self.config.protocol)

    async def _close_idle_streams(self) -> None:
        if self._pool is not None:
            await close_all(self._pool.expired(trio.current_time()), self.config.request_timeout)

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
                named = (addrs for pid, addrs in peers_from(reply.closer_peers, self.peer_id) if pid == peer and addrs)
                found = next((list(few_addrs(addrs)) for addrs in named), None)
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
        if not self.config.is_provider_key(key):
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
            for peer, addrs in peers_from(reply.provider_peers, self.peer_id):
                addrs = list(few_addrs(addrs))
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
                        answer = await exchange(framed, data, request, reply)
                else:
                    answer = await pooled_exchange(
                        self._pool, peer, data, request, reply,
                        open_stream=self._open_stream, close_timeout=self.config.request_timeout, stats=self.stats,
                    )
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

    def _back_off(self, peer: PeerID, now: float, seconds: float) -> None:
        if len(self._evicted) >= MAX_EVICTED:
            self._evicted = {p: until for p, until in self._evicted.items() if until > now}
            if len(self._evicted) >= MAX_EVICTED:
                return
        self._evicted[peer] = max(self._evicted.get(peer, now), now + seconds)

    def _backed_off(self, peer: PeerID, now: float) -> bool:
        until = self._evicted.get(peer)
        if until is not None and until <= now:
            del self._evicted[peer]
            return False
        return until is not None

    def _contacts(self, kad_peers: Iterable[KadPeer]) -> list[Contact]:
        """Contacts named in an answer (with a few of the addresses it gives, to dial them
        by), less the peers that failed us lately."""
        now = trio.current_time()
        return [
            Contact(peer, few_addrs(addrs), now)
            for peer, addrs in peers_from(kad_peers, self.peer_id)
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
            self._own_addrs[info.peer_id] = few_addrs(info.addrs)  # bounded all the same
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

    def _heard_from(self, peer: PeerID) -> None:
        """A request from ``peer`` came in: alive, and in the table if it serves kad."""
        if peer in self._kad_peers:
            self._add_contact(peer, self._own_addrs.get(peer, ()))

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
