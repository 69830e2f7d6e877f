"""The Kademlia routing table: k-buckets of contacts ordered by XOR distance.

Pure data structure: no I/O, no clock reads (``now`` is a parameter, in trio time).

Distances follow libp2p kad-dht: the XOR of the SHA-256 of the keys, where the key of a peer
is its peer id's bytes. Bucket ``i`` holds the peers whose hashed id shares exactly ``i``
leading bits with ours (its "common prefix length").
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections import OrderedDict
from typing import Iterable, Iterator, Sequence

from modelnet.identity import PeerID

K = 20
"""Bucket size and replication factor: a record lives on the K peers closest to its key
(libp2p and IPFS use 20)."""

ALPHA = 3
"""How many requests one lookup keeps in flight at once (libp2p's default parallelism)."""

MAX_FAILURES = 2
"""Consecutive failed requests after which a contact is evicted. One failure can be a blip
(a lost frame, a slow moment); two in a row, with no success between, is a dead peer."""

MAX_REFRESH_CPL = 15
"""Deepest bucket refreshed by a random lookup. A target for bucket ``i`` is found by
hashing random keys (SHA-256 cannot be inverted), ~2**(i+1) tries; go-libp2p stops at 15
too. Deeper buckets are tiny and the self-lookup keeps them fresh."""

KEY_BITS = 256


def kad_key(data: bytes) -> int:
    """Position of ``data`` (a record key or a peer id's bytes) in the keyspace."""
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


def distance(a: bytes, b: bytes) -> int:
    return kad_key(a) ^ kad_key(b)


def common_prefix_length(a: int, b: int) -> int:
    """Leading bits two keyspace positions share (KEY_BITS when equal)."""
    return KEY_BITS - (a ^ b).bit_length()


@dataclasses.dataclass(frozen=True, slots=True)
class Contact:
    """A peer we can reach, as the routing table or a lookup knows it."""

    peer_id: PeerID
    addrs: tuple[str, ...]
    last_seen: float
    # The hashed id, computed once: every distance comparison would otherwise rehash.
    key: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "addrs", tuple(self.addrs))
        object.__setattr__(self, "key", kad_key(self.peer_id.bytes))


def sort_by_distance(target: bytes, contacts: Iterable[Contact], count: int) -> list[Contact]:
    """The ``count`` contacts closest to ``target``, closest first."""
    target_key = kad_key(target)
    return heapq.nsmallest(count, contacts, key=lambda c: c.key ^ target_key)


class _Bucket:
    __slots__ = ("contacts", "replacements", "refreshed")

    def __init__(self) -> None:
        # Least recently seen first: the head is the one to ping when the bucket is full.
        self.contacts: OrderedDict[PeerID, Contact] = OrderedDict()
        self.replacements: OrderedDict[PeerID, Contact] = OrderedDict()
        self.refreshed = float("-inf")


class RoutingTable:
    """k-buckets around ``local``.

    A full bucket keeps its old, live contacts (long-lived peers tend to stay, and an
    attacker cannot flush the table with fresh ids); a newcomer waits in the bucket's
    replacement list and is promoted when a contact is evicted. The caller pings
    :meth:`ping_candidate` to find out whether the oldest contact is still alive.
    """

    def __init__(self, local: PeerID, *, k: int = K, max_failures: int = MAX_FAILURES) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.local = local
        self.k = k
        self.max_failures = max_failures
        self._local_key = kad_key(local.bytes)
        self._buckets = [_Bucket() for _ in range(KEY_BITS)]
        self._failures: dict[PeerID, int] = {}
        # Every contact of every bucket, so that closest() does not walk 256 buckets.
        self._all: dict[PeerID, Contact] = {}

    def _bucket_index(self, key: int) -> int:
        # Identical hashes (only ourselves, in practice) fold into the deepest bucket.
        return min(common_prefix_length(self._local_key, key), KEY_BITS - 1)

    def _bucket(self, peer: PeerID) -> _Bucket:
        return self._buckets[self._bucket_index(kad_key(peer.bytes))]

    def add(self, peer: PeerID, addrs: Sequence[str], now: float) -> bool:
        """Record that ``peer`` answered or announced itself at ``now``.

        Returns True when the peer is in the table afterwards (new or refreshed), False when
        its bucket is full and it was kept as a replacement candidate (or it is us).
        """
        if peer == self.local:
            return False
        bucket = self._bucket(peer)
        addrs = tuple(addrs) or self._known_addrs(bucket, peer)
        contact = Contact(peer, addrs, now)
        self._failures.pop(peer, None)
        if peer in bucket.contacts or len(bucket.contacts) < self.k:
            bucket.contacts[peer] = self._all[peer] = contact
            bucket.contacts.move_to_end(peer)
            bucket.replacements.pop(peer, None)
            return True
        bucket.replacements[peer] = contact
        bucket.replacements.move_to_end(peer)
        while len(bucket.replacements) > self.k:
            bucket.replacements.popitem(last=False)
        return False

    @staticmethod
    def _known_addrs(bucket: _Bucket, peer: PeerID) -> tuple[str, ...]:
        known = bucket.contacts.get(peer) or bucket.replacements.get(peer)
        return known.addrs if known else ()

    def ping_candidate(self, peer: PeerID) -> Contact | None:
        """The least recently seen contact of ``peer``'s bucket, when ``peer`` waits for a
        place there; ping it and call :meth:`mark_failed` if it does not answer."""
        bucket = self._bucket(peer)
        if peer not in bucket.replacements or not bucket.contacts:
            return None
        return next(iter(bucket.contacts.values()))

    def remove(self, peer: PeerID) -> None:
        """Drop ``peer`` (and promote the freshest replacement into its place)."""
        bucket = self._bucket(peer)
        self._failures.pop(peer, None)
        bucket.replacements.pop(peer, None)
        if bucket.contacts.pop(peer, None) is None:
            return
        del self._all[peer]
        if bucket.replacements:
            _, promoted = bucket.replacements.popitem(last=True)
            bucket.contacts[promoted.peer_id] = self._all[promoted.peer_id] = promoted

    def mark_failed(self, peer: PeerID, now: float) -> bool:
        """Count a failed request to ``peer``; evict it after ``max_failures`` in a row.

        Returns True if the peer was evicted.
        """
        bucket = self._bucket(peer)
        if peer in bucket.replacements:
            # A candidate that fails is not worth promoting later.
            del bucket.replacements[peer]
            return False
        if peer not in bucket.contacts:
            return False
        failures = self._failures.get(peer, 0) + 1
        if failures >= self.max_failures:
            self.remove(peer)
            return True
        self._failures[peer] = failures
        return False

    def closest(self, key: bytes, count: int | None = None, exclude: Iterable[PeerID] = ()) -> list[Contact]:
        """The ``count`` (default k) contacts closest to ``key``, closest first."""
        excluded = set(exclude)
        candidates = (c for c in self if c.peer_id not in excluded)
        return sort_by_distance(key, candidates, self.k if count is None else count)

    def contact(self, peer: PeerID) -> Contact | None:
        return self._all.get(peer)

    def __contains__(self, peer: object) -> bool:
        return peer in self._all

    def __iter__(self) -> Iterator[Contact]:
        return iter(list(self._all.values()))

    def __len__(self) -> int:
        return len(self._all)

    def mark_refreshed(self, key: bytes, now: float) -> None:
        """A lookup for ``key`` just completed: its bucket needs no refresh for a while."""
        self._buckets[self._bucket_index(kad_key(key))].refreshed = now

    def mark_neighbourhood_refreshed(self, closest: Sequence[Contact], now: float) -> None:
        """A lookup of our own id just completed with ``closest`` (the k closest peers that
        answered): the buckets it covers need no random lookup.

        Every peer in a bucket deeper than the farthest of ``closest`` is closer to us than
        that one, so the self-lookup found all of them: those buckets are complete. With
        fewer than k answers the lookup ran out of peers to ask, so it saw the whole
        (reachable) network and every bucket is complete. This is what spares a small
        network, or a node's deep buckets, one random lookup per bucket at every refresh.
        """
        if len(closest) < self.k:
            start = 0
        else:
            start = min(self._bucket_index(c.key) for c in closest) + 1
        for bucket in self._buckets[start:]:
            bucket.refreshed = max(bucket.refreshed, now)

    def buckets_to_refresh(
        self, now: float, interval: float, rng: random.Random | None = None
    ) -> list[bytes]:
        """One random target key inside each bucket not looked up for ``interval``.

        Covers every bucket up to the deepest non-empty one (an empty bucket below it is a
        gap worth filling), capped at :data:`MAX_REFRESH_CPL`.
        """
        deepest = max((i for i, b in enumerate(self._buckets) if b.contacts), default=-1)
        stale = {
            i for i in range(min(deepest, MAX_REFRESH_CPL) + 1) if self._buckets[i].refreshed <= now - interval
        }
        rng = rng or random.Random()
        targets: dict[int, bytes] = {}
        while len(targets) < len(stale):
            candidate = rng.randbytes(32)
            index = self._bucket_index(kad_key(candidate))
            if index in stale and index not in targets:
                targets[index] = candidate
        return [targets[i] for i in sorted(targets)]
