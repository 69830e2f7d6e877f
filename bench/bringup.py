"""Time to bring a network up: joined and published, then routable.

Loopback: N real libp2p hosts (TCP + Noise + Yamux) in this process, started through
``modelnet.testing.open_swarm`` (each node joins through node 0, 16 joins at a time, and
publishes its capability record; 4 capabilities, each served by 5 % of the nodes, 2..50).
"up" is when every node has joined and published; "routable" is when a light client that
joined through the last node has found, fresh, a provider of every capability.

Reference measured in the same run: the same N hosts merely listening, each connected to
node 0 (no DHT, no records) — what the transport alone costs in this process.

Memory network: the same bring-up for N = 100 with one-way latency 5 ms, in virtual time,
and the CPU it took.

Run: ``python -m bench.bringup [--quick]``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import trio
import trio.testing

from modelnet.errors import ModelNetError
from modelnet.identity import PrivateKey
from modelnet.p2p.libp2p_host import open_libp2p_host
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.node import Config
from modelnet.testing import HostFactory, open_node, open_swarm, seeded_key, virtual_wall_clock

from .common import (
    CAPABILITIES,
    Report,
    arguments,
    bar_verdict,
    pct,
    provider_plan,
    quiet_logging,
    simulation_gc,
    stub_backends,
)

LATENCY = 0.005
BAR_SECONDS = 15.0
BAR_N = 100
ROUTABLE_ATTEMPTS = 5  # fresh lookups per capability before calling it unroutable


def loopback_host(key: PrivateKey):
    return open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"])


async def routable(client, plan: dict[int, str], max_providers: int) -> tuple[int, float]:
    """Fresh lookups until every capability has a provider; (attempts, recall)."""
    attempts, found, expected = 0, 0, 0
    for capability in CAPABILITIES:
        want = min(max_providers, sum(1 for c in plan.values() if c == capability))
        providers: list = []
        while not providers and attempts < ROUTABLE_ATTEMPTS * len(CAPABILITIES):
            attempts += 1
            providers = await client.find(capability, fresh=True)
        found += min(len(providers), want)
        expected += want
    return attempts, found / expected


async def bring_up(n: int, host_factory: HostFactory, seed: int, wall_clock: Callable[[], float] | None) -> dict[str, Any]:
    """Bring the network up and route; a join that fails is a result too (``failed``)."""
    plan = provider_plan(n, seed)
    opened = 0

    def counting_factory(key: PrivateKey):
        nonlocal opened
        opened += 1
        return host_factory(key)

    result: dict[str, Any] = {"n": n, "providers": len(plan), "failed": None}
    cpu0, started = time.process_time(), trio.current_time()
    try:
        async with open_swarm(n, counting_factory, backends_for=stub_backends(plan), seed=seed, wall_clock=wall_clock) as swarm:
            result["up_s"], result["up_cpu_s"] = trio.current_time() - started, time.process_time() - cpu0
            entry = swarm.nodes[-1].addrs[0]
            async with open_node(
                host_factory, seeded_key(n, seed), (), Config(client_mode=True), bootstrap=[entry], wall_clock=wall_clock
            ) as client:
                result["client_join_s"] = trio.current_time() - started - result["up_s"]
                result["attempts"], result["recall"] = await routable(client, plan, client.config.max_providers)
                result["routable_s"], result["routable_cpu_s"] = trio.current_time() - started, time.process_time() - cpu0
            tables = sorted(len(node.dht.routing_table) for node in swarm.nodes)
            result["table_min"], result["table_median"] = tables[0], tables[len(tables) // 2]
            result["queries_per_node"] = sum(node.dht.stats.queries for node in swarm.nodes) / n
    except* ModelNetError as group:
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        result["failed"] = f"{type(first).__name__}: {first}"[:300]
        result["failed_after_s"] = trio.current_time() - started
        result["hosts_opened"] = opened
    return result


async def transport_only(n: int, seed: int) -> dict[str, float]:
    """N libp2p hosts listening, each connected to host 0: the transport's share."""
    started, cpu0 = trio.current_time(), time.process_time()
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(loopback_host(seeded_key(0, seed)))
        target, addrs = first.peer_id, first.listen_addrs()
        joining = trio.Semaphore(16)  # as open_swarm: 16 hosts coming up at a time

        async def one(i: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with contextlib.AsyncExitStack() as host_stack:
                async with joining:
                    host = await host_stack.enter_async_context(loopback_host(seeded_key(i, seed)))
                    await host.connect(target, addrs)
                task_status.started()
                await trio.sleep_forever()

        nursery = await stack.enter_async_context(trio.open_nursery())
        async with trio.open_nursery() as starters:
            for i in range(1, n):
                starters.start_soon(nursery.start, one, i)
        result = {"n": n, "up_s": trio.current_time() - started, "up_cpu_s": time.process_time() - cpu0}
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    args = arguments(__doc__.split("\n")[0])
    quiet_logging()
    sizes = [10, 30] if args.quick else [10, 50, 100]
    memory_n = 30 if args.quick else 100
    report = Report("bringup", "Time to bring a network up", {
        "quick": args.quick,
        "loopback_sizes": sizes, "join_concurrency": 16, "capabilities": len(CAPABILITIES),
        "providers_per_capability": "5 % of N, 2..50", "memory_n": memory_n,
        "memory_one_way_latency_ms": LATENCY * 1000, "seed": args.seed,
    })
    rows, results = [], []
    for n in sizes:
        reference = trio.run(transport_only, n, args.seed)
        result = trio.run(bring_up, n, loopback_host, args.seed, None)
        result["transport_only"] = reference
        results.append(result)
        if result["failed"]:
            print(f"  loopback N={n}: FAILED after {result['failed_after_s']:.1f} s: {result['failed']}", flush=True)
            rows.append([n, result["providers"], f"{reference['up_s']:.2f}",
                         f"failed after {result['failed_after_s']:.1f} s ({result['hosts_opened']} of {n} hosts opened)",
                         "-", "-", "-", "-", "-", "-", "-", "-", "-"])
            report.note(f"N={n}: the bring-up failed: {result['failed']}")
            continue
        print(f"  loopback N={n}: up {result['up_s']:.2f} s, routable {result['routable_s']:.2f} s", flush=True)
        rows.append([
            n, result["providers"], f"{reference['up_s']:.2f}", f"{result['up_s']:.2f}",
            f"{result['client_join_s']:.2f}", f"{result['routable_s']:.2f}", f"{result['up_cpu_s']:.2f}", f"{result['up_s'] / reference['up_s']:.1f}x",
            f"{result['n'] / result['up_s']:.1f}", result["attempts"], pct(result["recall"]),
            f"{result['table_min']}/{result['table_median']}", f"{result['queries_per_node']:.0f}",
        ])
    report.table(
        "Loopback bring-up: real libp2p hosts in one process (wall time)",
        ["N", "providers", "transport only s", "up s", "client joined +s", "routable s", "up CPU s", "up / transport",
         "nodes/s", "lookups to route", "provider recall", "table min/median", "DHT queries/node"],
        rows,
        note="'transport only': the N hosts listening and connected to node 0, nothing else (the same "
        "run's reference). 'up': every node joined and published. 'routable': then a light client "
        f"joined and found every capability with fresh lookups ({len(CAPABILITIES)} lookups if every "
        "first lookup succeeds). All N nodes share this process, so one core runs the whole network.",
    )
    largest = next((r for r in results if r["n"] == BAR_N), None)
    if largest is not None and largest["failed"]:
        report.bar("100 nodes up and routable on loopback in under 15 s",
                   f"failed after {largest['failed_after_s']:.1f} s", "NOT met (the bring-up failed)")
    elif largest is not None:
        report.bar("100 nodes up and routable on loopback in under 15 s", f"{largest['routable_s']:.2f} s",
                   bar_verdict(largest["routable_s"], BAR_SECONDS))
    else:
        report.note(f"the {BAR_N}-node bar is only measured by the full run")
    gc_setting = simulation_gc()  # loopback runs above keep the default thresholds
    report.note(f"memory network run: {gc_setting}")
    memory_network = MemoryNetwork(latency=LATENCY, seed=args.seed)
    memory = trio.run(bring_up, memory_n, memory_network.open_host, args.seed, virtual_wall_clock,
                      clock=trio.testing.MockClock(autojump_threshold=0))
    report.table(
        f"Memory network bring-up, N = {memory_n}, one-way latency {LATENCY * 1000:g} ms",
        ["N", "up (virtual s)", "routable (virtual s)", "up CPU s", "routable CPU s", "nodes/s of CPU", "lookups to route", "provider recall"],
        [[memory_n, f"{memory['up_s']:.2f}", f"{memory['routable_s']:.2f}", f"{memory['up_cpu_s']:.2f}",
          f"{memory['routable_cpu_s']:.2f}", f"{memory_n / memory['up_cpu_s']:.0f}", memory["attempts"], pct(memory["recall"])]],
        note="Virtual time: what the bring-up would take on a network with that latency if CPU were free; "
        "CPU: what simulating it cost this process.",
    )
    report.data["loopback"] = results
    report.data["memory"] = memory
    report.note("Reference from /work/shared/notes/py-libp2p-0.8.1.md (not this run): py-libp2p's own "
                "KadDHT brought 10 nodes up in 1.5 s, 30 in 17 s, 60 in 89 s on this machine.")
    report.write()


if __name__ == "__main__":
    main()
