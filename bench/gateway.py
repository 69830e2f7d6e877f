"""Gateway overhead: the OpenAI API through modelnet against calling the model directly.

Everything on loopback in this process, the official ``openai`` client (AsyncOpenAI under
trio) on the client side, N requests each after a warm-up:

  (a)  the upstream OpenAI-compatible server (testing/openai_upstream.py) called directly;
  (b)  the same request to a light client's gateway → libp2p (TCP + Noise + Yamux) →
       a provider node whose ``openai:`` backend calls that upstream;
  (c)  ``Node.ask("embed", …)`` from the gateway's node to a provider serving the
       embedded ``hash-embed`` model, against (d) the same through the gateway
       (``/v1/embeddings``).

Per request: chat completions, plain and streamed (time to the last chunk). Per streamed
chunk: the mean gap between chunks of a long streamed answer. The overhead is the
difference of the two rows measured in the same run.

Run: ``python -m bench.gateway [--quick] [--n N]``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator

import openai
import trio

from modelnet.gateway import Config as GatewayConfig
from modelnet.gateway import Gateway
from modelnet.models.embedded import EmbeddedBackend
from modelnet.models.openai_http import OpenAIBackend
from modelnet.testing import open_node, seeded_key
from modelnet.testing.openai_upstream import open_upstream

from .common import Report, Summary, arguments, ms, quiet_logging
from .overhead import CLIENT_CONFIG, PROVIDER_CONFIG, loopback_host, timed

SHORT = [{"role": "user", "content": "hello there"}]
LONG_WORDS = 200  # the streamed answer echoes them: ~200 chunks


@contextlib.asynccontextmanager
async def open_setup() -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI, Any]]:
    """(direct upstream client, gateway client, the gateway's node)."""
    async with open_upstream(["tiny-chat"]) as upstream:
        backends = [OpenAIBackend(upstream.base_url, ["tiny-chat"]), EmbeddedBackend(models=["hash-embed"])]
        async with open_node(loopback_host, seeded_key(1), backends, PROVIDER_CONFIG) as provider:
            async with open_node(loopback_host, seeded_key(2), (), CLIENT_CONFIG, bootstrap=provider.addrs) as node:
                async with trio.open_nursery() as nursery:
                    url = await nursery.start(Gateway(node, GatewayConfig(port=0)).serve)
                    async with openai.AsyncOpenAI(base_url=upstream.base_url, api_key="-", max_retries=0) as direct:
                        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as through:
                            yield direct, through, node
                    nursery.cancel_scope.cancel()


async def chat_once(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(model="tiny-chat", messages=SHORT)
    if not answer.choices[0].message.content:
        raise AssertionError("empty answer")


async def stream_once(client: openai.AsyncOpenAI, messages=SHORT) -> list[float]:
    """Arrival times of the content chunks of one streamed answer."""
    arrivals = []
    stream = await client.chat.completions.create(model="tiny-chat", messages=messages, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    return arrivals


async def chunk_gaps(client: openai.AsyncOpenAI, n: int) -> list[float]:
    long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(LONG_WORDS))}]
    gaps: list[float] = []
    await stream_once(client, long)  # warm-up
    for _ in range(n):
        arrivals = await stream_once(client, long)
        gaps += [b - a for a, b in zip(arrivals, arrivals[1:])]
    return gaps


async def measure(report: Report, n: int, warmup: int, streams: int) -> None:
    async with open_setup() as (direct, through, node):
        rows: dict[str, tuple[Summary, Summary]] = {}
        for label, once in (
            ("chat completion", chat_once),
            ("streamed chat completion (to last chunk)", stream_once),
        ):
            rows[label] = (
                Summary.of_seconds(await timed(n, warmup, lambda: once(direct))),
                Summary.of_seconds(await timed(n, warmup, lambda: once(through))),
            )
        rows[f"per streamed chunk ({LONG_WORDS}-word answers × {streams})"] = (
            Summary.of_seconds(await chunk_gaps(direct, streams)),
            Summary.of_seconds(await chunk_gaps(through, streams)),
        )

        async def ask_embed() -> None:
            await node.ask("embed", "the cat sat on the mat")

        async def gateway_embed() -> None:
            await through.embeddings.create(model="task:embed", input="the cat sat on the mat")

        rows["embedding, hash-embed on the provider"] = (
            Summary.of_seconds(await timed(n, warmup, ask_embed)),
            Summary.of_seconds(await timed(n, warmup, gateway_embed)),
        )
    table = []
    for label, (reference, gateway) in rows.items():
        reference_name = "Node.ask" if label.startswith("embedding") else "upstream directly"
        table.append([label, reference_name, *reference.row()])
        table.append([label, "through the gateway", *gateway.row()])
    report.table(f"Latency ({n} requests each after {warmup} warm-up)", ["measure", "path", *Summary.HEADERS], table)
    report.table(
        "Gateway overhead (gateway row minus reference row, same run)",
        ["measure", "p50 ms", "p95 ms", "mean ms", "ratio p50"],
        [
            [label, ms(g.p50 - r.p50), ms(g.p95 - r.p95), ms(g.mean - r.mean), f"{g.p50 / r.p50:.2f}x"]
            for label, (r, g) in rows.items()
        ],
        note="Chat rows: the gateway path adds the gateway's HTTP hop, routing over libp2p and the "
        "provider's own HTTP call to the same upstream. Embedding row: only the gateway's HTTP and JSON work.",
    )
    report.data["rows"] = {label: {"reference": r, "gateway": g} for label, (r, g) in rows.items()}


async def main_async(args) -> None:
    quiet_logging()
    n, warmup, streams = (50, 10, 3) if args.quick else (args.n, 50, 20)
    report = Report("gateway", "OpenAI gateway overhead (loopback, one process)", {"quick": args.quick, "n": n})
    await measure(report, n, warmup, streams)
    report.write()


def main() -> None:
    args = arguments(__doc__, lambda p: p.add_argument("--n", type=int, default=300, help="requests per row"))
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
