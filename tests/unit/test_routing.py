"""Provider ranking: measured latency, load, failures and bans (pure)."""

from __future__ import annotations

from modelnet.p2p.routing import BAN_BASE, BAN_MAX, ProviderStats, rank_providers


def test_bans_back_off_exponentially_and_stay_capped_however_long_the_streak():
    stats = ProviderStats()
    stats.record_failure(now=0.0)
    assert stats.banned_until == BAN_BASE
    stats.record_failure(now=0.0)
    assert stats.banned_until == 2 * BAN_BASE
    for _ in range(5000):  # a provider down for a long time must not overflow the backoff
        stats.record_failure(now=100.0)
    assert stats.banned_until == 100.0 + BAN_MAX
    stats.record_success()
    assert not stats.banned(100.0)


def test_rank_prefers_measured_fast_healthy_unloaded_providers():
    fast, slow, busy, banned, unknown = "fast", "slow", "busy", "banned", "unknown"
    stats = {name: ProviderStats() for name in (fast, slow, busy, banned)}
    stats[fast].record_latency(0.010)
    stats[slow].record_latency(0.050)
    stats[busy].record_latency(0.010)
    stats[busy].record_overload()
    stats[banned].record_latency(0.001)
    stats[banned].record_failure(now=10.0)
    order = rank_providers([unknown, banned, busy, slow, fast], stats, key=lambda p: p, now=10.5)
    assert order == [fast, busy, slow, unknown, banned]


def test_latency_is_a_moving_average_that_follows_change():
    stats = ProviderStats()
    stats.record_latency(0.100)
    for _ in range(20):
        stats.record_latency(0.010)
    assert abs(stats.latency - 0.010) < 0.001
