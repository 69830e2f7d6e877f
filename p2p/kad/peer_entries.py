"""Peer entries of kad messages, both ways: what we take from others' answers (never
ourselves, a few short addresses, a bad entry dropped alone) and how many we put in our
own (trimmed to fit the frame limit).

The size arithmetic is protobuf's, for the entries :mod:`modelnet.protocols.kad` encodes;
it lives here because only our answers need it, and encoding a whole answer to learn its
size would cost more than the answer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

from modelnet.identity import PeerID
from modelnet.protocols.errors import RemoteProtocolError
from modelnet.protocols.kad import MAX_MESSAGE_SIZE, KadMessage, KadPeer, encode_message

logger = logging.getLogger(__name__)

MAX_THIRD_PARTY_ADDRS = 8
"""Addresses of a peer taken from someone else's answer (used only to dial it)."""
MAX_ADDR_LENGTH = 1024
"""Characters of one multiaddr taken from someone else's answer; real ones are < 100."""


def few_addrs(addrs: Iterable[str]) -> tuple[str, ...]:
    """The few short addresses of a peer we keep from an answer or an identify."""
    return tuple(a for a in addrs if len(a) <= MAX_ADDR_LENGTH)[:MAX_THIRD_PARTY_ADDRS]


def peers_from(kad_peers: Iterable[KadPeer], local_peer: PeerID) -> list[tuple[PeerID, list[str]]]:
    """Peer ids and addresses from an answer, without ``local_peer``; a bad entry is
    dropped alone."""
    peers = []
    for kad_peer in kad_peers:
        try:
            peer, addrs = kad_peer.to_peer()
        except RemoteProtocolError as exc:
            logger.debug("dropping a peer entry: %s", exc)
            continue
        if peer != local_peer:
            peers.append((peer, addrs))
    return peers


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_size(length: int) -> int:
    """Bytes of a length-delimited protobuf field (number < 16) holding ``length`` bytes."""
    return 1 + _varint_size(length) + length


def peer_entry_size(peer: KadPeer) -> int:
    """Bytes ``peer`` adds to a message as one closerPeers / providerPeers entry."""
    inner = _field_size(len(peer.id)) + sum(_field_size(len(a)) for a in peer.addrs)
    inner += 1 + _varint_size(peer.connection) if peer.connection else 0
    return _field_size(inner)


def fit(answer: KadMessage, budget: int = MAX_MESSAGE_SIZE) -> KadMessage:
    """``answer`` trimmed to encode within ``budget``: first the addresses of the biggest
    peer entries go, then peers from the ends of the lists (closer peers first). Honest
    answers are a few KiB and come back unchanged."""
    lists = [list(answer.closer_peers), list(answer.provider_peers)]
    sizes = [[peer_entry_size(p) for p in peers] for peers in lists]
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
            total += peer_entry_size(lists[i][j]) - size
            sizes[i][j] = peer_entry_size(lists[i][j])
    for i in (0, 1):
        while total > budget and lists[i]:
            lists[i].pop()
            total -= sizes[i].pop()
    logger.info("trimmed a %s answer for %r to fit %d bytes", answer.type.name, answer.key[:40], budget)
    return dataclasses.replace(answer, closer_peers=tuple(lists[0]), provider_peers=tuple(lists[1]))
