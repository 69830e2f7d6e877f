"""Provider ranking: measured latency, load, failures, bans and hedge delays (pure)."""

from __future__ import annotations

from modelnet.p2p.routing import BAN_BASE, BAN_MAX, HEDGE_MIN_SAMPLES, TTFC_WINDOW, ProviderStats, rank_providers


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
    stats[fast].record_rtt(0.010)
    stats[slow].record_rtt(0.050)
    stats[busy].record_rtt(0.010)
    stats[busy].record_overload()
    stats[banned].record_rtt(0.001)
    stats[banned].record_failure(now=10.0)
    order = rank_providers([unknown, banned, busy, slow, fast], stats, key=lambda p: p, now=10.5)
    assert order == [fast, busy, slow, unknown, banned]


def test_latency_is_a_moving_average_that_follows_change():
    stats = ProviderStats()
    stats.record_rtt(0.100)
    for _ in range(20):
        stats.record_rtt(0.010)
    assert abs(stats.latency - 0.010) < 0.001


def test_time_to_first_chunk_outranks_the_round_trip_once_measured():
    near_but_slow, far_but_quick = ProviderStats(), ProviderStats()
    near_but_slow.record_rtt(0.002)
    far_but_quick.record_rtt(0.020)
    stats = {"near": near_but_slow, "far": far_but_quick}
    assert rank_providers(["far", "near"], stats, key=lambda p: p) == ["near", "far"]
    near_but_slow.record_first_chunk(0.500)  # the model behind it is slow
    far_but_quick.record_first_chunk(0.030)
    assert rank_providers(["far", "near"], stats, key=lambda p: p) == ["far", "near"]


def test_load_reported_in_results_ranks_and_a_fresh_report_replaces_overload():
    a, b = ProviderStats(), ProviderStats()
    a.record_first_chunk(0.010)
    b.record_first_chunk(0.014)
    a.record_load(queue=30, capacity=32)  # a is nearly full: 0.010 * 1.94 > 0.014 * 1.0
    assert rank_providers(["a", "b"], {"a": a, "b": b}, key=lambda p: p) == ["b", "a"]
    a.record_overload()
    assert a.load == 1.0
    a.record_load(queue=0, capacity=32)
    assert a.load == 0.0
    a.record_load(queue=5, capacity=0)  # no capacity reported: nothing learned
    assert a.load == 0.0


def test_a_flaky_provider_yields_to_a_slower_healthy_one():
    flaky, healthy = ProviderStats(), ProviderStats()
    flaky.record_first_chunk(0.010)
    healthy.record_first_chunk(0.025)
    both = {"flaky": flaky, "healthy": healthy}
    flaky.record_failure(now=0.0)
    flaky.record_success()  # not banned any more, but its record stays
    assert flaky.success_rate == 0.5  # 0.010 / 0.5 = 0.020: still first
    assert rank_providers(["healthy", "flaky"], both, key=lambda p: p, now=100.0) == ["flaky", "healthy"]
    for _ in range(3):
        flaky.record_failure(now=100.0)
    flaky.record_success()
    assert flaky.success_rate == 1 / 3  # 0.010 * 3 = 0.030 > 0.025
    assert rank_providers(["flaky", "healthy"], both, key=lambda p: p, now=200.0) == ["healthy", "flaky"]


def test_hedge_delay_is_the_p95_of_a_recent_window_with_a_floor_and_a_default():
    stats = ProviderStats()
    assert stats.hedge_delay(floor=0.05, default=1.0) == 1.0  # unmeasured
    for _ in range(HEDGE_MIN_SAMPLES - 1):
        stats.record_first_chunk(0.1)
    assert stats.hedge_delay(floor=0.05, default=1.0) == 1.0  # too few samples for a tail
    for _ in range(19 - (HEDGE_MIN_SAMPLES - 1)):
        stats.record_first_chunk(0.1)
    stats.record_first_chunk(2.0)  # 1 in 20: beyond the p95
    assert stats.hedge_delay(floor=0.05, default=1.0) == 0.1
    stats.record_first_chunk(2.0)  # 2 in 21: the p95 is now a slow one
    assert stats.hedge_delay(floor=0.05, default=1.0) == 2.0
    for _ in range(TTFC_WINDOW):  # the window forgets: only recent samples count
        stats.record_first_chunk(0.001)
    assert stats.hedge_delay(floor=0.05, default=1.0) == 0.05  # never below the floor


def test_a_new_provider_is_hedged_at_the_pooled_p95_of_the_others():
    from modelnet.p2p.routing import pooled_p95

    known, new = ProviderStats(), ProviderStats()
    assert pooled_p95([known, new]) is None  # nobody measured: the caller's default
    for _ in range(10):
        known.record_first_chunk(0.2)
    assert pooled_p95([known, new]) == 0.2
    assert new.hedge_delay(floor=0.05, default=pooled_p95([known, new])) == 0.2
