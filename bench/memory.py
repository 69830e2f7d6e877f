"""Memory per node: RSS and Python heap (tracemalloc), on both hosts.

Each configuration runs in a child process of its own (RSS never shrinks back, so one
process per measurement keeps them apart). In the child: import everything, load the
embedded models once and measure what they cost, then bring N nodes up and measure again.
Every fifth node serves one embedded model (round robin over the embedded models); the models are
loaded once per process and shared by every node that serves them, so the per-node figure
is the node's own cost (host, DHT tables and stores, records, sessions). Measured one
second (virtual on the memory network) after the last node published, so that messages
still in flight have landed. An idle node's
baseline: nodes with no peers, opened after a first node (which pays one-time costs).

- memory network: 20 idle nodes, N = 100 (joined through bootstrap lookups), 1000 (oracle
  join, see bench/lookup.py: same routing-table sizes, a fraction of the CPU);
- libp2p on loopback: 20 idle nodes, N = 10, 50 (real hosts, TCP + Noise + Yamux, in one
  process).

tracemalloc (slow, so smaller N): the Python heap per node and where it goes.

Run: ``python -m bench.memory [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import trio
import trio.testing

from .common import SIMULATION_GC_THRESHOLD, Report, arguments, quiet_logging, rss_bytes, settle_memory, simulation_gc

MB = 1024 * 1024
LATENCY = 0.005
PROVIDER_EVERY = 5  # 20 % of the nodes serve a model; all of them publishing costs minutes of CPU at N = 1000
SETTLE = 1.0  # seconds (virtual on the memory network) for messages still in flight to land


def _host_factory(kind: str):
    if kind.startswith("libp2p"):
        from modelnet.p2p.libp2p_host import open_libp2p_host

        return lambda key: open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"])
    from modelnet.p2p.memory import MemoryNetwork

    return MemoryNetwork(latency=LATENCY).open_host


def _backends_for(i: int) -> list:
    """Every PROVIDER_EVERY-th node serves one embedded model (round robin over the embedded models)."""
    from modelnet.models.embedded import EMBEDDED_MODELS, EmbeddedBackend

    if i % PROVIDER_EVERY:
        return []
    names = list(EMBEDDED_MODELS)
    return [EmbeddedBackend(offload=False, models=[names[i // PROVIDER_EVERY % len(names)]])]


@contextlib.asynccontextmanager
async def _idle_nodes(host_factory, n: int, wall_clock) -> AsyncIterator[SimpleNamespace]:
    """``n`` nodes serving a model each, with no peers: nothing to do but exist."""
    from modelnet.testing import open_node, seeded_key

    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_node(host_factory, seeded_key(i + 1), _backends_for(i * PROVIDER_EVERY), wall_clock=wall_clock)
            )
            for i in range(n)
        ]
        yield SimpleNamespace(nodes=nodes)


def _open(kind: str, n: int, host_factory):
    from modelnet.testing import open_oracle_swarm, open_swarm, virtual_wall_clock

    wall_clock = None if kind.startswith("libp2p") else virtual_wall_clock
    if kind.endswith("idle"):
        return _idle_nodes(host_factory, n, wall_clock)
    opener = open_oracle_swarm if kind.endswith("oracle") else open_swarm
    return opener(n, host_factory, backends_for=_backends_for, wall_clock=wall_clock)


def child(kind: str, n: int, trace: bool) -> dict[str, Any]:
    """One measurement, in this (child) process."""
    import modelnet.p2p.libp2p_host  # noqa: F401  (imported in every child alike)
    from modelnet.models.embedded import EMBEDDED_MODELS, EmbeddedBackend
    from modelnet.testing import open_node, seeded_key

    settle_memory()
    result: dict[str, Any] = {"kind": kind, "n": n, "trace": trace, "rss_after_imports": rss_bytes()}
    models: dict[str, int] = {}
    for name in EMBEDDED_MODELS:
        before = rss_bytes()
        trio.run(EmbeddedBackend(offload=False, models=[name]).warm)
        settle_memory()
        models[name] = rss_bytes() - before
    result["model_rss"] = models

    async def measure() -> dict[str, Any]:
        host_factory = _host_factory(kind)
        async with contextlib.AsyncExitStack() as stack:
            if kind.endswith("idle"):
                # One node first, so the idle figure leaves out what the first node of a
                # process pays once (lazy imports, caches, trio's own structures).
                await stack.enter_async_context(open_node(host_factory, seeded_key(0), _backends_for(0)))
            if trace:
                tracemalloc.start(1)
            settle_memory()
            before = rss_bytes()
            started, cpu = trio.current_time(), time.process_time()
            swarm = await stack.enter_async_context(_open(kind, n, host_factory))
            up, up_cpu = trio.current_time() - started, time.process_time() - cpu
            # Publishing returns once requests are sent (ADD_PROVIDER has no answer): let
            # what is still in flight land, so the figure is the steady state.
            await trio.sleep(SETTLE)
            settle_memory()
            measured: dict[str, Any] = {
                "rss_delta": rss_bytes() - before,
                "up_s": up,
                "up_cpu_s": up_cpu,
                "table_size": sum(len(node.dht.routing_table) for node in swarm.nodes) / n,
                "connections": sum(len(node.host.connected_peers()) for node in swarm.nodes) / n,
            }
            if trace:
                measured["traced_delta"] = tracemalloc.get_traced_memory()[0]
                by_place: dict[str, int] = defaultdict(int)
                for stat in tracemalloc.take_snapshot().statistics("filename"):
                    by_place[_place(stat.traceback[0].filename)] += stat.size
                measured["traced_by_place"] = dict(sorted(by_place.items(), key=lambda x: -x[1])[:12])
            return measured

    if kind.startswith("libp2p"):
        clock = None
    else:
        result["gc"] = simulation_gc()
        clock = trio.testing.MockClock(autojump_threshold=0)
    result.update(trio.run(measure, clock=clock))
    return result


def _place(filename: str) -> str:
    for marker in ("/site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            parts = tail.split("/")
            return "/".join(parts[:2]) if len(parts) > 2 else tail
    return filename


def run_child(kind: str, n: int, trace: bool = False) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.memory", "--child", kind, str(n)] + (["--trace"] if trace else [])
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {kind} N={n}{' (tracemalloc)' if trace else ''}: "
          f"{result['rss_delta'] / MB:.1f} MB for the network", flush=True)
    return result


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
        parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)

    args = arguments(__doc__.split("\n")[0], options)
    quiet_logging()
    if args.child:
        kind, n = args.child
        print(json.dumps(child(kind, int(n), args.trace)), flush=True)
        return
    if args.quick:
        plan = [("memory-idle", 10), ("memory", 30), ("libp2p-idle", 10), ("libp2p", 5)]
        traced = [("memory", 20), ("libp2p", 5)]
    else:
        plan = [("memory-idle", 20), ("memory", 100), ("memory-oracle", 1000), ("libp2p-idle", 20), ("libp2p", 10), ("libp2p", 50)]
        traced = [("memory", 100), ("libp2p", 10)]
    report = Report("memory", "Memory per node", {
        "quick": args.quick,
        "configurations": [f"{k} N={n}" for k, n in plan], "tracemalloc": [f"{k} N={n}" for k, n in traced],
        "backends": f"every {PROVIDER_EVERY}th node serves one embedded model (round robin), models loaded once per process; idle nodes each serve one",
        "settle_s": SETTLE, "memory_network_gc": f"threshold {SIMULATION_GC_THRESHOLD}",
        "memory_one_way_latency_ms": LATENCY * 1000,
    })
    results = [run_child(kind, n) for kind, n in plan]
    first = results[0]
    report.table(
        "Process baseline and the embedded models (loaded once, shared by every node)",
        ["what", "RSS MB"],
        [["Python + modelnet + py-libp2p imported", f"{first['rss_after_imports'] / MB:.1f}"]]
        + [[f"model {name}", f"{size / MB:.1f}"] for name, size in first["model_rss"].items()]
        + [[f"all {len(first['model_rss'])} embedded models (sum of the rows above)", f"{sum(first['model_rss'].values()) / MB:.1f}"]],
        note="RSS growth while each model loads (yake's is mostly its import).",
    )
    report.table(
        "RSS per node (the models excluded: loaded before the nodes)",
        ["host", "N", "join", "network RSS MB", "per node KB", "routing table", "connections/node", "up s", "up CPU s"],
        [[r["kind"].split("-")[0], r["n"], _join(r["kind"]), f"{r['rss_delta'] / MB:.1f}",
          f"{r['rss_delta'] / r['n'] / 1024:.0f}", f"{r['table_size']:.0f}", f"{r['connections']:.0f}",
          f"{r['up_s']:.2f}", f"{r['up_cpu_s']:.1f}"] for r in results],
        note="join 'none (idle)': N nodes with no peers, opened after a first node (an idle node's "
        "baseline, without what the first node of a process pays once). memory-network 'up s' is virtual time. "
        "RSS is rounded to pages and includes allocator slack; libp2p nodes hold one TCP connection "
        "(Noise + Yamux state, buffers) per peer they talked to.",
    )
    traces = [run_child(kind, n, trace=True) for kind, n in traced]
    report.table(
        "Python heap per node (tracemalloc)",
        ["host", "N", "traced KB per node", "RSS KB per node (same run)"],
        [[t["kind"], t["n"], f"{t['traced_delta'] / t['n'] / 1024:.0f}", f"{t['rss_delta'] / t['n'] / 1024:.0f}"] for t in traces],
    )
    for t in traces:
        report.table(
            f"Where the heap goes, {t['kind']} N={t['n']} (KB per node, by file)",
            ["file", "KB per node"],
            [[place, f"{size / t['n'] / 1024:.1f}"] for place, size in t["traced_by_place"].items()],
            note="Allocations made since tracing began (after the imports and the models) and still "
            "alive once the network is up, grouped by the file that made them.",
        )
    report.data["rss"] = results
    report.data["tracemalloc"] = traces
    report.write()


def _join(kind: str) -> str:
    return {"idle": "none (idle)", "oracle": "oracle"}.get(kind.partition("-")[2], "bootstrap")


if __name__ == "__main__":
    main()
