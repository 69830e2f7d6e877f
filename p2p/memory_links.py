"""The links of a memory network: latency (a default, or per link), seeded jitter, stream
loss, partitions and frozen peers, and counters of what crossed them.

Pure bookkeeping about peers, not hosts: :class:`~.memory.MemoryNetwork` is built on
:class:`Links` and applies them to its hosts' connections, and :mod:`.memory_streams`
to the bytes. Every random choice is a hash of the seed and of what it decides about
(:func:`draw`), never of scheduling order, so a run repeats exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib

from modelnet.identity import PeerID


@dataclasses.dataclass(slots=True)
class NetworkStats:
    """Counters since the network was made."""

    dials: int = 0  # connection attempts that reached the network
    streams: int = 0  # streams opened (negotiated)
    bytes: int = 0  # bytes written into streams
    dropped_bytes: int = 0  # bytes that went nowhere (lost stream, frozen peer)
    lost_streams: int = 0  # streams black-holed by ``loss``


def draw(*parts: bytes | int | str) -> float:
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


class Links:
    """Latency, jitter, loss, partitions and frozen peers between the peers of one network."""

    def __init__(self, *, latency: float = 0.0, jitter: float = 0.0, loss: float = 0.0, seed: int = 0) -> None:
        if latency < 0 or jitter < 0 or not 0 <= loss <= 1:
            raise ValueError("latency and jitter must be >= 0 and loss within [0, 1]")
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.seed = seed
        self.stats = NetworkStats()
        self._link_latency: dict[tuple[PeerID, PeerID], float] = {}
        self._group_of: dict[PeerID, int] = {}  # partition groups (MemoryNetwork.partition); unlisted: -1
        self._frozen: set[PeerID] = set()

    def set_link_latency(self, a: PeerID, b: PeerID, seconds: float) -> None:
        """One-way latency between ``a`` and ``b`` (both directions), overriding the default."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._link_latency[(a, b) if a < b else (b, a)] = seconds

    def freeze(self, peer: PeerID) -> None:
        """Make the host half-open: bytes to and from it vanish, dials to it hang."""
        self._frozen.add(peer)

    def one_way(self, a: PeerID, b: PeerID) -> float:
        if self._link_latency:
            override = self._link_latency.get((a, b) if a < b else (b, a))
            if override is not None:
                return override
        return self.latency

    def reachable(self, a: PeerID, b: PeerID) -> bool:
        return self._group_of.get(a, -1) == self._group_of.get(b, -1)

    def is_frozen(self, peer: PeerID) -> bool:
        return peer in self._frozen
