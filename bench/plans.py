"""Plan overhead per step over a direct request.

One asking node and three echo providers, on the in-memory network (no latency: what is
left is our own code) and on loopback (libp2p TCP + Noise + Yamux on 127.0.0.1), all in
this process. Measured in the same run, N iterations each after a warm-up, input "hello
world":

  direct      ``node.ask("echo", text)``;
  by hand ×k  k direct asks in series, each fed the previous output (the reference for a
              k-step pipeline: the same calls, without a plan);
  pipeline-k  ``execute(node, Pipeline(echo × k), text)`` for k = 1, 2, 4;
  by hand ∥3  three direct asks at once, to three distinct providers (the reference for
              the ensemble);
  ensemble-3  ``execute(node, Ensemble.replicate(echo, 3), text)``: three distinct
              providers in parallel, then a majority vote.

"per step over reference" is (p50 of the plan − p50 of its reference) / calls: what the plan
machine, its bookkeeping (trace, events) and the hand-off cost per model call, beyond the
calls themselves.

Run: ``python -m bench.plans [--quick] [--n N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from modelnet.models.embedded import EchoBackend
from modelnet.p2p.libp2p_host import open_libp2p_host
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.node import Config, Node
from modelnet.p2p.plans import execute
from modelnet.protocols import plan as P
from modelnet.testing import open_swarm

from .common import Report, Summary, arguments, ms, quiet_logging

TEXT = "hello world"
PROVIDERS = 3
# One asker plays every request: the providers' per-asker policy limits are lifted, and
# the asker keeps its provider list for the run (bench/lookup.py measures lookups).
CONFIG = Config(provider_cache_ttl=1e9, max_concurrent_requests=64, max_requests_per_peer=64, requests_per_minute_per_peer=10**9)
PLANS: dict[str, tuple[P.PlanNode, int]] = {
    "pipeline-1": (P.Pipeline((P.Step("echo"),)), 1),
    "pipeline-2": (P.Pipeline((P.Step("echo"),) * 2), 2),
    "pipeline-4": (P.Pipeline((P.Step("echo"),) * 4), 4),
    "ensemble-3 (vote)": (P.Ensemble.replicate(P.Step("echo"), 3), 3),
}
HEADERS = ("transport", "request", "calls", *Summary.HEADERS, "per step over reference ms")


async def timed(n: int, warmup: int, once: Callable[[], Awaitable[Any]]) -> list[float]:
    for _ in range(warmup):
        await once()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await once()
        samples.append(time.perf_counter() - started)
    return samples


@contextlib.asynccontextmanager
async def open_network(transport: str) -> AsyncIterator[Node]:
    """The asker (node 0, no models) of a swarm of 1 + PROVIDERS nodes."""
    if transport == "memory":
        factory = MemoryNetwork(seed=1).open_host
    else:

        def factory(key):
            return open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"])

    async with open_swarm(PROVIDERS + 1, factory, backends_for=lambda i: [EchoBackend()] if i else [], config=CONFIG) as swarm:
        yield swarm.nodes[0]


async def measure(report: Report, transport: str, n: int, warmup: int) -> list[list[str]]:
    rows: list[list[str]] = []
    async with open_network(transport) as asker:
        data = report.data.setdefault(transport, {})

        def row(name: str, calls: int, summary: Summary, reference: Summary | None) -> None:
            over = None if reference is None else (summary.p50 - reference.p50) / calls
            rows.append([transport, name, str(calls), *summary.row(), "-" if over is None else ms(over)])
            data[name] = {"summary": summary, "per_step_over_reference_ms": over}

        def by_hand(k: int) -> Callable[[], Awaitable[None]]:
            async def series() -> None:
                text = TEXT
                for _ in range(k):
                    text = (await asker.ask("echo", text)).output

            return series

        async def parallel() -> None:
            providers = [p.peer_id for p in await asker.find("echo")][:PROVIDERS]
            async with trio.open_nursery() as nursery:
                for mine in providers:
                    nursery.start_soon(lambda mine=mine: asker.ask("echo", TEXT, exclude=[p for p in providers if p != mine]))

        row("direct ask", 1, Summary.of_seconds(await timed(n, warmup, by_hand(1))), None)
        for name, (plan, calls) in PLANS.items():

            async def run_plan(plan=plan) -> None:
                result = await execute(asker, plan, TEXT)
                assert result.output == TEXT

            reference = Summary.of_seconds(await timed(n, warmup, parallel if name.startswith("ensemble") else by_hand(calls)))
            row(f"by hand, {'3 at once' if name.startswith('ensemble') else f'{calls} in series'}", calls, reference, None)
            row(name, calls, Summary.of_seconds(await timed(n, warmup, run_plan)), reference)
    return rows


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, help="iterations per row (default 500, quick 100)")

    args = arguments(__doc__.split("\n")[0], options)
    quiet_logging()
    n = args.n or (100 if args.quick else 500)
    warmup = max(20, n // 10)
    report = Report("plans", "Plan overhead per step over a direct request", {
        "quick": args.quick, "iterations": n, "warmup": warmup, "input": TEXT, "backend": "EchoBackend()",
        "providers": PROVIDERS, "transports": "memory (no latency), libp2p TCP+Noise+Yamux on 127.0.0.1",
    })
    rows = trio.run(measure, report, "memory", n, warmup) + trio.run(measure, report, "loopback", n, warmup)
    report.table(
        "Direct request vs plans (echo backend, one process)",
        HEADERS,
        rows,
        note="per step over reference = (plan p50 - p50 of the same calls made by hand, the row above) / calls.",
    )
    report.write()


if __name__ == "__main__":
    main()
