"""What a running DHT counts: plain data, read by benchmarks and tests, written by the
driver and its stream pool."""

from __future__ import annotations

import dataclasses
from collections import deque

STATS_HISTORY = 1000
"""Lookups whose hop counts are kept in :attr:`Stats.hops`."""


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
