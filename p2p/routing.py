"""What a node measured about each provider, and the order it tries them in.

Pure bookkeeping: time is a parameter. Latency is a moving average of what this node saw
itself (session round trips, time to first chunk); load is what the provider reported in
its grant; a failing provider is banned with exponential backoff, never forever.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, TypeVar

LATENCY_EWMA_WEIGHT = 0.3  # weight of the newest sample: reacts in a few requests, smooths noise
BAN_BASE = 1.0  # seconds of the first ban after a failure
BAN_MAX = 300.0  # a ban never exceeds five minutes: a recovered provider comes back

T = TypeVar("T")


@dataclasses.dataclass
class ProviderStats:
    latency: float | None = None  # seconds, moving average
    load: float = 0.0  # queue / capacity reported by the provider, 0..1+
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    banned_until: float = 0.0

    def record_latency(self, seconds: float, *, load: float | None = None) -> None:
        if self.latency is None:
            self.latency = seconds
        else:
            self.latency += LATENCY_EWMA_WEIGHT * (seconds - self.latency)
        if load is not None:
            self.load = load

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


def rank_providers(
    providers: Iterable[T],
    stats: dict,
    *,
    key: Callable[[T], object],
    now: float | None = None,
) -> list[T]:
    """Order providers: not banned first, then measured ones by expected latency.

    Expected latency is the moving average inflated by the reported load and by the
    failure rate, so a fast but overloaded or flaky provider yields to a healthy one.
    Unmeasured providers come after measured ones, in their given order.
    """

    def score(item: T) -> tuple:
        s: ProviderStats | None = stats.get(key(item))
        if s is None:
            return (0, 1, 0.0)
        banned = 1 if now is not None and s.banned(now) else 0
        if s.latency is None:
            return (banned, 1, 0.0)
        return (banned, 0, s.latency * (1.0 + s.load) / max(s.success_rate, 0.05))

    return sorted(providers, key=score)
