"""The server side of the DHT: reads requests on inbound kad streams and answers them from
the stores and the routing table.

One stream carries any number of requests, answered in order: clients keep a stream for
their next requests (see :mod:`.pool`). A peer holds at most
:data:`MAX_INBOUND_STREAMS_PER_PEER` streams at once, a stream waits at most twice the
pool's idle timeout for its next request, and an answer is trimmed to the frame limit.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Callable, Mapping

import trio

from modelnet.errors import ModelNetError
from modelnet.identity import PeerID
from modelnet.protocols.errors import RemoteProtocolError
from modelnet.protocols.kad import (
    MAX_MESSAGE_SIZE,
    MAX_PEERS,
    KadMessage,
    KadPeer,
    KadRecord,
    MessageType,
    decode_message,
    encode_message,
)

from ..host import Stream
from ..streams import FramedStream
from .config import Config
from .peer_entries import fit, peers_from
from .store import ProviderStore, RecordStore
from .table import RoutingTable

logger = logging.getLogger(__name__)

MAX_INBOUND_STREAMS_PER_PEER = 16
"""Concurrent inbound kad streams one peer may hold; beyond that new ones are reset."""


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class Answerer:
    """Answers the kad requests of inbound streams; the driver registers
    :meth:`handle_stream` as the protocol's handler.

    ``heard_from`` is told of every request's sender (a request proves a kad peer alive),
    ``own_addrs`` holds the addresses connected peers gave themselves (identify), and
    ``wall_clock`` dates records and providers.
    """

    def __init__(
        self,
        config: Config,
        routing_table: RoutingTable,
        records: RecordStore,
        providers: ProviderStore,
        *,
        own_addrs: Mapping[PeerID, tuple[str, ...]],
        heard_from: Callable[[PeerID], None],
        wall_clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.routing_table = routing_table
        self.records = records
        self.providers = providers
        self._own_addrs = own_addrs
        self._heard_from = heard_from
        self._wall_clock = wall_clock
        self._inbound: defaultdict[PeerID, int] = defaultdict(int)

    async def handle_stream(self, stream: Stream) -> None:
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
                        answer = self.answer(peer, decode_message(data))
                        if answer is not None:
                            await framed.send(encode_message(fit(answer)))
        except (ModelNetError, trio.TooSlowError) as exc:  # the stream is reset by now
            logger.debug("kad stream from %s ended: %r", peer, exc)
        finally:
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]

    def answer(self, peer: PeerID, request: KadMessage) -> KadMessage | None:
        """The answer to one request (None: ADD_PROVIDER has none); raises to reset."""
        self._heard_from(peer)
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
            return KadMessage(kind, key=key, record=KadRecord(key, kept.value, rfc3339(kept.received)))
        if kind == MessageType.ADD_PROVIDER:
            if not self.config.is_provider_key(key):
                logger.debug("%s announced a provider key outside our prefixes: %r ignored", peer, key[:40])
                return None
            for provider, addrs in peers_from(request.provider_peers, self.routing_table.local):
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
            record = None if stored is None else KadRecord(key, stored.value, rfc3339(stored.received))
            return KadMessage(kind, key=key, record=record, closer_peers=closer)
        if kind == MessageType.GET_PROVIDERS:
            # All we hold (the store keeps <= 100 a key, the wire allows 100): capping at k
            # would hide the same oldest providers behind every answer.
            held = self.providers.providers(key, now, MAX_PEERS)
            providers = tuple(KadPeer.from_peer(p, addrs) for p, addrs in held)
            return KadMessage(kind, key=key, provider_peers=providers, closer_peers=closer)
        return KadMessage(kind, key=key, closer_peers=closer)  # FIND_NODE
