"""What a node measured about each provider, and the order it tries them in.

Pure bookkeeping: time is a parameter. Everything here is what this node saw itself:
- ``rtt``: a moving average of session round trips (the network alone);
- ``ttfc``: a moving average of the time from sending a request to its first answer frame
  (network, queueing and the model's first token), plus a short window of the latest
  samples whose 95th percentile is how long the router waits before it hedges;
- ``load``: ``queue / capacity`` as the provider last reported it (grants and results);
- successes and failures; a failing provider is banned with exponential backoff, never
  forever.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Callable, Iterable, TypeVar

LATENCY_EWMA_WEIGHT = 0.3  # weight of the newest sample: reacts in a few requests, smooths noise
BAN_BASE = 1.0  # seconds of the first ban after a failure
BAN_MAX = 300.0  # a ban never exceeds five minutes: a recovered provider comes back
TTFC_WINDOW = 32  # samples kept per provider for its p95: recent enough to follow change
HEDGE_MIN_SAMPLES = 4  # fewer samples than this say nothing about a tail: use the default
MIN_SUCCESS_RATE = 0.05  # floor of the divisor, so one failure never makes a score infinite

T = TypeVar("T")


def _ewma(average: float | None, sample: float) -> float:
    return sample if average is None else average + LATENCY_EWMA_WEIGHT * (sample - average)


@dataclasses.dataclass
class ProviderStats:
    rtt: float | None = None  # seconds, moving average of session round trips
    ttfc: float | None = None  # seconds, moving average of time to first chunk
    load: float = 0.0  # queue / capacity reported by the provider, 0..1+
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    banned_until: float = 0.0
    ttfc_samples: deque = dataclasses.field(default_factory=lambda: deque(maxlen=TTFC_WINDOW))

    @property
    def latency(self) -> float | None:
        """The expected wait for a first chunk: measured if we have it, else the round trip."""
        return self.ttfc if self.ttfc is not None else self.rtt

    def record_rtt(self, seconds: float, *, load: float | None = None) -> None:
        self.rtt = _ewma(self.rtt, seconds)
        if load is not None:
            self.load = load

    def record_first_chunk(self, seconds: float) -> None:
        self.ttfc = _ewma(self.ttfc, seconds)
        self.ttfc_samples.append(seconds)

    def record_load(self, queue: int, capacity: int) -> None:
        if capacity > 0:
            self.load = queue / capacity

    def record_overload(self) -> None:
        """The provider said it is full: rank it last for now, but it did not fail."""
        self.load = 1.0

    def record_success(self) -> None:
        self.successes += 1
        self.consecutive_failures = 0
        self.banned_until = 0.0

    def record_failure(self, now: float) -> None:
        self.failures += 1
        self.consecutive_failures += 1
        # The exponent is capped before it is used: 2 ** 1000 is no ban length.
        doublings = min(self.consecutive_failures - 1, math.ceil(math.log2(BAN_MAX / BAN_BASE)))
        backoff = min(BAN_MAX, BAN_BASE * 2**doublings)
        self.banned_until = now + backoff

    def banned(self, now: float) -> bool:
        return now < self.banned_until

    @property
    def success_rate(self) -> float:
        total = self.successes + self.failures
        return self.successes / total if total else 1.0

    def hedge_delay(self, *, floor: float, default: float) -> float:
        """How long to wait for a first chunk before asking another provider too.

        The 95th percentile of the recent samples (nearest rank), never below ``floor``
        (hedging on noise doubles the load for nothing); ``default`` until there are
        enough samples to speak of a tail.
        """
        p95 = _p95(self.ttfc_samples)
        return max(default if p95 is None else p95, floor)


def pooled_p95(stats: Iterable[ProviderStats]) -> float | None:
    """The p95 time to first chunk over every provider's recent samples: the hedge delay
    for a provider too new to have its own (better than a fixed guess once we asked anyone)."""
    return _p95([sample for s in stats for sample in s.ttfc_samples])


def _p95(samples) -> float | None:
    if len(samples) < HEDGE_MIN_SAMPLES:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def rank_providers(
    providers: Iterable[T],
    stats: dict,
    *,
    key: Callable[[T], object],
    now: float | None = None,
) -> list[T]:
    """Order providers: not banned first, then measured ones by expected latency.

    Expected latency is the measured time to first chunk; for a provider we only know the
    round trip of, it is that round trip plus the quickest model time seen anywhere (the
    least ``first chunk - round trip`` of the measured providers), so a near provider we
    never asked is not preferred just because a round trip has no model in it. It is
    inflated by the reported load and by the failure rate, so a fast but overloaded or
    flaky provider yields to a healthy one. Unmeasured providers come after measured ones,
    in their given order.
    """
    providers = list(providers)
    found = [stats.get(key(item)) for item in providers]
    model_time = min(
        (min(s.ttfc_samples) - s.rtt for s in found if s is not None and s.ttfc_samples and s.rtt is not None),
        default=0.0,
    )
    model_time = max(model_time, 0.0)

    def score(item: T) -> tuple:
        s: ProviderStats | None = stats.get(key(item))
        if s is None:
            return (0, 1, 0.0)
        banned = 1 if now is not None and s.banned(now) else 0
        if s.latency is None:
            return (banned, 1, 0.0)
        expected = s.ttfc if s.ttfc is not None else s.latency + model_time
        return (banned, 0, expected * (1.0 + s.load) / max(s.success_rate, MIN_SUCCESS_RATE))

    return sorted(providers, key=score)
