"""An iterative Kademlia lookup as a pure state machine (after rust-libp2p's
``ClosestPeersIter``).

The driver asks :meth:`Lookup.next` whom to query, does the requests, and reports each
outcome with :meth:`Lookup.on_success` / :meth:`Lookup.on_failure`. The lookup is finished
when the k closest peers it knows have all answered (failed peers do not count), or when
nobody is left to ask. No I/O, no clock reads.
"""

from __future__ import annotations

import enum
from typing import Iterable

from modelnet.identity import PeerID

from .table import ALPHA, K, Contact, kad_key


class _State(enum.Enum):
    NOT_CONTACTED = "not contacted"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class _Candidate:
    __slots__ = ("contact", "distance", "depth", "state")

    def __init__(self, contact: Contact, distance: int, depth: int) -> None:
        self.contact = contact
        self.distance = distance
        self.depth = depth  # answers between a seed and this contact (seeds: 0)
        self.state = _State.NOT_CONTACTED


class Lookup:
    """Find the ``k`` peers closest to ``target`` (raw key bytes; hashed like the table)."""

    def __init__(
        self, target: bytes, seeds: Iterable[Contact], *, k: int = K, alpha: int = ALPHA, max_new: int | None = None
    ) -> None:
        if k < 1 or alpha < 1 or (max_new is not None and max_new < 1):
            raise ValueError("k, alpha and max_new must be at least 1")
        self.target = target
        self.k = k
        self.alpha = alpha
        self.max_new = k if max_new is None else max_new
        """New candidates one answer may add (of the k closest peers it names)."""
        self.queries = 0
        self.successes = 0
        self.failures = 0
        self._target_key = kad_key(target)
        self._candidates: dict[PeerID, _Candidate] = {}
        self._order: list[_Candidate] = []  # by distance, closest first
        self._stopped = False
        self._learn(seeds, depth=0)

    def _learn(self, contacts: Iterable[Contact], depth: int, limit: int | None = None) -> None:
        added = 0
        for contact in contacts:
            if limit is not None and added >= limit:
                break
            if contact.peer_id not in self._candidates:
                candidate = _Candidate(contact, contact.key ^ self._target_key, depth)
                self._candidates[contact.peer_id] = candidate
                self._order.append(candidate)
                added += 1
        if added:
            self._order.sort(key=lambda c: c.distance)

    def _walk(self) -> tuple[bool, list[_Candidate]]:
        """``(finished, not-yet-contacted candidates that may still matter, closest first)``.

        Walks outward until k peers have answered: anything farther cannot enter the result.
        """
        answered = 0
        busy = False
        pending: list[_Candidate] = []
        for candidate in self._order:
            if candidate.state is _State.SUCCEEDED:
                answered += 1
                if answered >= self.k:
                    break
            elif candidate.state is _State.WAITING:
                busy = True
            elif candidate.state is _State.NOT_CONTACTED:
                pending.append(candidate)
        return not busy and not pending, pending

    @property
    def in_flight(self) -> int:
        return sum(1 for c in self._order if c.state is _State.WAITING)

    @property
    def finished(self) -> bool:
        return self._stopped or self._walk()[0]

    def next(self, now: float) -> list[Contact]:
        """Peers to query now (marked as waiting), keeping at most ``alpha`` in flight."""
        if self._stopped:
            return []
        finished, pending = self._walk()
        if finished:
            return []
        start = pending[: max(0, self.alpha - self.in_flight)]
        for candidate in start:
            candidate.state = _State.WAITING
        self.queries += len(start)
        return [c.contact for c in start]

    def on_success(self, peer: PeerID, closer: Iterable[Contact], now: float) -> None:
        """``peer`` answered, naming ``closer`` peers: of the k closest distinct peers it
        names, at most ``max_new`` not yet known become candidates."""
        candidate = self._candidates.get(peer)
        if candidate is None or candidate.state is not _State.WAITING:
            return  # a late or unsolicited answer changes nothing
        candidate.state = _State.SUCCEEDED
        self.successes += 1
        target_key = self._target_key
        # A peer may name many contacts; only the k closest could ever matter, and keeping
        # the rest (or repeats of one) would let one peer bloat every lookup.
        distinct = {c.peer_id: c for c in closer}.values()
        best = sorted(distinct, key=lambda c: c.key ^ target_key)[: self.k]
        self._learn(best, depth=candidate.depth + 1, limit=self.max_new)

    def on_failure(self, peer: PeerID, now: float) -> None:
        candidate = self._candidates.get(peer)
        if candidate is None or candidate.state is not _State.WAITING:
            return
        candidate.state = _State.FAILED
        self.failures += 1

    def stop(self) -> None:
        """End early (a value or enough providers were found); ``next`` returns nothing."""
        self._stopped = True

    def closest(self) -> list[Contact]:
        """The k closest peers that answered, closest first."""
        return [c.contact for c in self._answered()]

    def _answered(self) -> list[_Candidate]:
        return [c for c in self._order if c.state is _State.SUCCEEDED][: self.k]

    @property
    def hops(self) -> int:
        """Longest chain of answers from a seed to a peer in the result (a seed is 1 hop)."""
        return max((c.depth + 1 for c in self._answered()), default=0)

    def depth(self, peer: PeerID) -> int | None:
        """Answers between a seed and ``peer`` when it was learned (None if unknown)."""
        candidate = self._candidates.get(peer)
        return None if candidate is None else candidate.depth
