"""Capability lookup latency and success: simulated (memory network) and on loopback.

Memory network (virtual time, one-way link latency 5 ms): N nodes, 4 capabilities each
served by 5 % of the nodes (2..50 per capability). From random nodes that do not serve
it, a FRESH lookup of a capability, ``node.find(cap, fresh=True)`` (the DHT lookup plus
fetching and verifying each provider's signed record), then the raw
``dht.find_providers`` alone, then FIND_NODE lookups of random keys (``closest_peers``),
checked against the true k closest peers. Networks join either through real bootstrap
lookups or through ``modelnet.testing.oracle_join`` (tables filled from global knowledge,
records then published through the DHT); every row says which.

Loopback: real libp2p hosts in this process, joined through node 0; every node looks up
every capability it does not serve, fresh, in rounds (round 1 fetches each provider
record; later rounds find the records cached and redo only the DHT lookup).

Run: ``python -m bench.lookup [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
from typing import Any, Awaitable, Callable, Sequence

import trio
import trio.testing

from modelnet.errors import ModelNetError
from modelnet.p2p.kad.table import kad_key
from modelnet.p2p.libp2p_host import open_libp2p_host
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.node import Node
from modelnet.protocols import capability as cap
from modelnet.testing import open_oracle_swarm, open_swarm, virtual_wall_clock

from .common import (
    CAPABILITIES,
    Report,
    arguments,
    bar_verdict,
    ms,
    pct,
    percentile,
    provider_plan,
    providers_per_capability,
    quiet_logging,
    settle_memory,
    simulation_gc,
    stub_backends,
)

LATENCY = 0.005  # one-way, seconds
LOOKUP_BOUND = 60.0  # a lookup that takes longer counts as failed (never happens in practice)
BAR_P50_MS = 30.0
BAR_SUCCESS = 0.999


@dataclasses.dataclass(slots=True)
class Sample:
    seconds: float  # virtual on the memory network, real on loopback
    cpu: float
    ok: bool
    found: int
    expected: int
    hops: int
    queries: int


def summarize(samples: Sequence[Sample]) -> dict[str, float]:
    n = len(samples)
    return {
        "n": n,
        "p50_ms": percentile([1000 * s.seconds for s in samples], 50),
        "p95_ms": percentile([1000 * s.seconds for s in samples], 95),
        "success": sum(s.ok for s in samples) / n if n else math.nan,
        "recall": sum(min(s.found, s.expected) for s in samples) / max(1, sum(s.expected for s in samples)),
        "hops": sum(s.hops for s in samples) / n if n else math.nan,
        "hops_p95": percentile([s.hops for s in samples], 95),
        "queries": sum(s.queries for s in samples) / n if n else math.nan,
        "cpu_ms": 1000 * sum(s.cpu for s in samples) / n if n else math.nan,
    }


async def measured(node: Node, expected: int, work: Callable[[], Awaitable[int]]) -> Sample:
    """Run one lookup from ``node``; ``work`` returns how many results it found."""
    stats = node.dht.stats
    lookups, queries = stats.lookups, stats.queries
    cpu, started = time.process_time(), trio.current_time()
    found = 0
    with trio.move_on_after(LOOKUP_BOUND):
        try:
            found = await work()
        except ModelNetError:
            found = 0
    return Sample(
        seconds=trio.current_time() - started,
        cpu=time.process_time() - cpu,
        ok=found > 0,
        found=found,
        expected=expected,
        hops=stats.hops[-1] if stats.lookups > lookups and stats.hops else 0,
        queries=stats.queries - queries,
    )


def lookup_pairs(nodes: Sequence[Node], plan: dict[int, str], count: int, rng: random.Random) -> list[tuple[int, str]]:
    """(node index, capability) pairs where the node does not serve the capability."""
    pairs = [(i, c) for i in range(len(nodes)) for c in CAPABILITIES if plan.get(i) != c]
    return rng.sample(pairs, min(count, len(pairs)))


def expected_providers(plan: dict[int, str], capability: str, max_providers: int) -> int:
    return min(max_providers, sum(1 for c in plan.values() if c == capability))


async def fresh_find(node: Node, capability: str, expected: int) -> Sample:
    async def work() -> int:
        return len(await node.find(capability, fresh=True))

    return await measured(node, expected, work)


async def raw_find_providers(node: Node, capability: str, expected: int) -> Sample:
    async def work() -> int:
        found = await node.dht.find_providers(cap.capability_key(capability), count=node.config.max_providers)
        return len(found)

    return await measured(node, expected, work)


async def random_key_lookup(node: Node, target: bytes, truth: set) -> Sample:
    """FIND_NODE for ``target``; ``found`` counts the true k closest it returned."""

    async def work() -> int:
        return len(truth & {c.peer_id for c in await node.dht.closest_peers(target)})

    return await measured(node, len(truth), work)


def true_closest(nodes: Sequence[Node], target: bytes, k: int) -> set:
    key = kad_key(target)
    ranked = sorted(nodes, key=lambda node: kad_key(node.peer_id.bytes) ^ key)
    return {node.peer_id for node in ranked[:k]}


# ---- the memory network ----------------------------------------------------------------


async def simulate(n: int, join: str, lookups: int, seed: int) -> dict[str, Any]:
    """One simulated network: its join cost and three kinds of lookups."""
    network = MemoryNetwork(latency=LATENCY, seed=seed)
    plan = provider_plan(n, seed)
    opener = open_swarm if join == "bootstrap" else open_oracle_swarm
    cpu0, started = time.process_time(), trio.current_time()
    async with opener(n, network.open_host, backends_for=stub_backends(plan), seed=seed, wall_clock=virtual_wall_clock) as swarm:
        join_cpu, join_virtual = time.process_time() - cpu0, trio.current_time() - started
        nodes = swarm.nodes
        join_lookups = sum(node.dht.stats.lookups for node in nodes)
        join_queries = sum(node.dht.stats.queries for node in nodes)
        table_sizes = sorted(len(node.dht.routing_table) for node in nodes)
        rng = random.Random(seed)
        max_providers = nodes[0].config.max_providers
        finds, raws, randoms = [], [], []
        for i, capability in lookup_pairs(nodes, plan, lookups, rng):
            expected = expected_providers(plan, capability, max_providers)
            finds.append(await fresh_find(nodes[i], capability, expected))
        for i, capability in lookup_pairs(nodes, plan, lookups, rng):
            expected = expected_providers(plan, capability, max_providers)
            raws.append(await raw_find_providers(nodes[i], capability, expected))
        k = nodes[0].dht.config.k
        for _ in range(lookups):
            target = rng.randbytes(32)
            node = rng.choice(nodes)
            truth = true_closest([m for m in nodes if m is not node], target, k)
            randoms.append(await random_key_lookup(node, target, truth))
        swarm_stats = network.stats
    return {
        "n": n,
        "join": join,
        "providers_per_capability": providers_per_capability(n),
        "join_cpu_s": join_cpu,
        "join_virtual_s": join_virtual,
        "join_lookups_per_node": join_lookups / n,
        "join_queries_per_node": join_queries / n,
        "table_size_p50": percentile(table_sizes, 50),
        "find": summarize(finds),
        "find_providers": summarize(raws),
        "find_node": summarize(randoms),
        "streams": swarm_stats.streams,
    }


def run_simulation(n: int, join: str, lookups: int, seed: int) -> dict[str, Any]:
    settle_memory()
    result = trio.run(simulate, n, join, lookups, seed, clock=trio.testing.MockClock(autojump_threshold=0))
    print(f"  simulated N={n} ({join} join): join {result['join_cpu_s']:.1f} s CPU, "
          f"fresh find p50 {ms(result['find']['p50_ms'])} ms", flush=True)
    return result


# ---- loopback --------------------------------------------------------------------------


def loopback_host(key):
    return open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"])


async def loopback(n: int, rounds: int, seed: int) -> dict[str, Any]:
    plan = provider_plan(n, seed)
    cpu0, started = time.process_time(), trio.current_time()
    async with open_swarm(n, loopback_host, backends_for=stub_backends(plan), seed=seed) as swarm:
        join_cpu, join_wall = time.process_time() - cpu0, trio.current_time() - started
        nodes = swarm.nodes
        max_providers = nodes[0].config.max_providers
        pairs = lookup_pairs(nodes, plan, len(nodes) * len(CAPABILITIES), random.Random(seed))
        by_round: list[list[Sample]] = []
        for _ in range(rounds):
            samples = []
            for i, capability in pairs:
                samples.append(await fresh_find(nodes[i], capability, expected_providers(plan, capability, max_providers)))
            by_round.append(samples)
    return {
        "n": n,
        "providers_per_capability": providers_per_capability(n),
        "join_wall_s": join_wall,
        "join_cpu_s": join_cpu,
        "cold": summarize(by_round[0]),
        "warm": summarize([s for samples in by_round[1:] for s in samples]) if rounds > 1 else None,
        "all": summarize([s for samples in by_round for s in samples]),
    }


# ---- report ----------------------------------------------------------------------------


def lookup_row(label: str, n: int, join: str, s: dict[str, float]) -> list[str]:
    return [
        label, str(n), join, str(s["n"]), ms(s["p50_ms"]), ms(s["p95_ms"]), pct(s["success"]), pct(s["recall"]),
        f"{s['hops']:.2f}", f"{s['queries']:.1f}", ms(s["cpu_ms"]),
    ]


LOOKUP_HEADERS = ["lookup", "N", "join", "n", "p50 ms", "p95 ms", "success", "recall", "hops", "queries", "CPU ms"]


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--loopback-100", action="store_true",
                            help="also look up on a 100-node loopback network (its bring-up alone takes minutes here)")

    args = arguments(__doc__.split("\n")[0], options)
    quiet_logging()
    gc_setting = simulation_gc()
    if args.quick:
        simulations = [(10, "bootstrap"), (100, "bootstrap"), (100, "oracle"), (300, "oracle")]
        lookups, loopback_sizes, rounds = 40, [10], 1
    else:
        simulations = [(10, "bootstrap"), (100, "bootstrap"), (300, "bootstrap"), (100, "oracle"), (1000, "oracle"), (10000, "oracle")]
        lookups, loopback_sizes, rounds = 200, [10, 50], 3
    if args.loopback_100:
        loopback_sizes.append(100)
    report = Report("lookup", "Capability lookup latency and success", {
        "quick": args.quick,
        "one_way_latency_ms": LATENCY * 1000, "capabilities": len(CAPABILITIES),
        "providers_per_capability": "5 % of N, 2..50", "lookups_per_simulated_network": lookups,
        "simulations": [f"N={n} {j}" for n, j in simulations], "loopback_sizes": loopback_sizes,
        "loopback_rounds": rounds, "k": 20, "alpha": 3, "seed": args.seed, "gc": gc_setting,
    })
    sims = [run_simulation(n, join, lookups, args.seed) for n, join in simulations]
    rows = []
    for sim in sims:
        rows.append(lookup_row("fresh find", sim["n"], sim["join"], sim["find"]))
        rows.append(lookup_row("find_providers", sim["n"], sim["join"], sim["find_providers"]))
    report.table(
        f"Memory network, virtual time, one-way latency {LATENCY * 1000:g} ms",
        LOOKUP_HEADERS,
        rows,
        note="'fresh find': node.find(cap, fresh=True), the DHT lookup plus fetching and verifying "
        "each provider's signed record (up to 20). 'find_providers': the DHT lookup alone. success: at "
        "least one provider found; recall: providers found / min(20, providers of the capability). "
        "hops: longest chain of answers to a peer in the result (dht.stats.hops); queries: DHT requests "
        "sent, record fetches included. CPU ms: real process CPU per lookup (the whole simulated "
        "network runs in this process).",
    )
    report.table(
        "Joining the simulated network (CPU cost)",
        ["N", "join", "CPU s", "nodes/s of CPU", "virtual s", "DHT lookups/node", "DHT queries/node", "table size p50"],
        [[s["n"], s["join"], f"{s['join_cpu_s']:.1f}", f"{s['n'] / s['join_cpu_s']:.0f}", f"{s['join_virtual_s']:.2f}",
          f"{s['join_lookups_per_node']:.1f}", f"{s['join_queries_per_node']:.0f}", f"{s['table_size_p50']:.0f}"] for s in sims],
        note="bootstrap: each node joins through node 0 (FIND_NODE to it, self-lookup, one lookup per "
        "bucket), 16 at a time, then publishes. oracle: modelnet.testing.oracle_join fills every table "
        "from global knowledge (up to k peers per bucket, as a converged refresh would), then the "
        "providers publish through the DHT. Both include publishing the providers' records.",
    )
    oracle_runs = [s for s in sims if s["join"] == "oracle"]
    growth_rows = []
    for s in oracle_runs:
        log_n = math.log2(s["n"])
        fn, fp = s["find_node"], s["find_providers"]
        growth_rows.append([
            s["n"], f"{log_n:.1f}", f"{fn['hops']:.2f}", f"{fn['hops_p95']:.0f}", f"{fn['queries']:.1f}",
            pct(fn["recall"]), f"{fp['hops']:.2f}", f"{fp['queries']:.1f}", f"{fn['queries'] / log_n:.2f}",
        ])
    report.table(
        "Growth with N (oracle join): FIND_NODE of random keys and GET_PROVIDERS",
        ["N", "log2 N", "FIND_NODE hops", "hops p95", "queries", "true k-closest found", "GET_PROVIDERS hops", "queries", "FIND_NODE queries / log2 N"],
        growth_rows,
        note="FIND_NODE: closest_peers(random key) from a random node; 'true k-closest found' compares "
        "the result with the k closest peers computed from global knowledge.",
    )
    report.data["simulations"] = sims
    if len(oracle_runs) >= 2:
        first, last = oracle_runs[0], oracle_runs[-1]
        n_ratio = math.log2(last["n"]) / math.log2(first["n"])
        q_ratio = last["find_node"]["queries"] / first["find_node"]["queries"]
        h_ratio = last["find_node"]["hops"] / first["find_node"]["hops"]
        report.bar(
            f"simulated network: hops grow as log N (N={first['n']} -> {last['n']})",
            f"hops x{h_ratio:.2f}, queries x{q_ratio:.2f}, log2 N x{n_ratio:.2f}",
            "met" if h_ratio <= n_ratio * 1.25 and q_ratio <= n_ratio * 1.25 else "NOT met (faster than log N)",
        )
    loops = []
    for n in loopback_sizes:
        result = trio.run(loopback, n, rounds, args.seed)
        print(f"  loopback N={n}: joined in {result['join_wall_s']:.1f} s, lookup p50 {ms(result['all']['p50_ms'])} ms", flush=True)
        loops.append(result)
    rows = []
    for result in loops:
        rows.append(lookup_row("fresh find, round 1", result["n"], "bootstrap", result["cold"]))
        if result["warm"] is not None:
            rows.append(lookup_row(f"fresh find, rounds 2-{rounds}", result["n"], "bootstrap", result["warm"]))
    report.table(
        "Loopback: real libp2p hosts (TCP + Noise + Yamux) in one process, wall time",
        LOOKUP_HEADERS,
        rows,
        note="Every node looks up every capability it does not serve, fresh (no provider cache). "
        "Round 1 fetches and verifies each provider's record; later rounds find the records cached "
        "and redo the DHT lookup. All nodes share this process, i.e. one core.",
    )
    report.data["loopback"] = loops
    if 100 not in loopback_sizes:
        report.note("No 100-node loopback lookups in this run (--loopback-100 adds them): all 100 nodes run "
                    "in this one process on one core, and bringing them up takes minutes here (see "
                    "bench/results/bringup.md), so the 100-node bar is judged at the largest N measured.")
    largest = loops[-1]
    both = largest["all"]
    label = f"capability lookup on a {largest['n']}-node loopback network"
    report.bar(f"{label}: p50 <= 30 ms", f"{ms(both['p50_ms'])} ms", bar_verdict(both["p50_ms"], BAR_P50_MS))
    report.bar(f"{label}: success >= 99.9 %", f"{pct(both['success'])} of {both['n']}",
               bar_verdict(both["success"], BAR_SUCCESS, higher_is_better=True)
               + ("" if both["n"] >= 1000 else f" (only {both['n']} lookups: one failure is {100 / both['n']:.2f} %)"))
    report.write()


if __name__ == "__main__":
    main()
