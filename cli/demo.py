"""``modelnet demo``: a real network on loopback, end to end.

Starts provider nodes as real libp2p hosts (TCP + Noise + Yamux on 127.0.0.1), each serving
a different pair of the embedded models, joined through the first node only. A light client
that knows a single bootstrap address (the last node's) then finds providers through the DHT
and routes each request, printing what was asked, who answered, the answer and the time.
"""

from __future__ import annotations

import json
import sys

import trio

from . import render

# Each capability is served by two different nodes, so routing has a choice to make.
NODE_MODELS = [
    ["vader-sentiment", "langid"],
    ["yake-keywords", "textrank-summary"],
    ["vader-sentiment", "yake-keywords"],
    ["langid", "textrank-summary"],
]

ARTICLE = (
    "Small language models now run on laptops, phones and office servers. "
    "Each of them is good at one narrow job, such as reading contracts or triaging tickets. "
    "They rarely talk to each other, because every deployment is an island behind its own API. "
    "A peer-to-peer network lets each model publish what it can do under a signed identity. "
    "Other nodes discover those capabilities through a distributed hash table, with no central registry. "
    "Requests are then routed to the fastest provider that can serve them. "
    "The weather was pleasant on the day the first prototype ran."
)

REQUESTS = [
    ("sentiment", "I absolutely love how easy this network makes it to share models!", {}),
    ("language-id", "Le réseau trouve tout seul le modèle qui sait répondre.", {}),
    ("keywords", ARTICLE, {"top": 4}),
    ("summarize", ARTICLE, {"sentences": 2}),
    ("sentiment", "The old setup was slow, fragile and frankly terrible.", {}),
    ("language-id", "Das Netzwerk verbindet kleine Modelle auf vielen Rechnern.", {}),
]


async def run_demo(n_nodes: int = 4, as_json: bool = False) -> int:
    from modelnet.identity import PrivateKey
    from modelnet.models.embedded import EmbeddedBackend
    from modelnet.p2p.libp2p_host import open_libp2p_host
    from modelnet.p2p.node import Config
    from modelnet.testing import open_node, open_swarm

    out = sys.stdout
    n_nodes = max(2, n_nodes)

    def host_factory(key):
        return open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"])

    def backends_for(i: int):
        return [EmbeddedBackend(models=NODE_MODELS[i % len(NODE_MODELS)])]

    started = trio.current_time()
    if not as_json:
        print(f"starting {n_nodes} nodes on 127.0.0.1 (libp2p: TCP + Noise + Yamux)…", file=out, flush=True)
    async with open_swarm(
        n_nodes, host_factory, backends_for=backends_for, key_for=lambda i: PrivateKey.generate()
    ) as swarm:
        up = trio.current_time() - started
        if not as_json:
            rows = []
            for i, node in enumerate(swarm.nodes):
                models = node.capability_record().models
                rows.append([i, str(node.peer_id), ", ".join(f"{m.task} ({m.name})" for m in models), node.addrs[0]])
            print(render.table(["node", "peer id", "serves", "address"], rows), file=out)
            print(f"network up and published in {up:.2f} s", file=out)
        entry = swarm.nodes[-1].addrs[0]
        async with open_node(
            host_factory, PrivateKey.generate(), (), Config(client_mode=True), bootstrap=[entry]
        ) as client:
            if not as_json:
                print(f"\nclient {client.peer_id.short()} joined through {entry}\n", file=out, flush=True)
            results = []
            for capability, text, params in REQUESTS:
                providers = await client.find(capability)
                answer = await client.ask(capability, text, params)
                index = next(i for i, node in enumerate(swarm.nodes) if node.peer_id == answer.provider)
                results.append(
                    {
                        "capability": capability,
                        "providers_found": len(providers),
                        "provider": str(answer.provider),
                        "node": index,
                        "model": answer.model,
                        "answer": answer.output,
                        "ms": round(answer.elapsed * 1000, 1),
                    }
                )
                if not as_json:
                    print(
                        f"{capability:<12} {len(providers)} found -> node {index} ({answer.provider.short()}, {answer.model}) "
                        f"{answer.elapsed * 1000:6.1f} ms\n    {render.output_text(answer.output, width=110)}",
                        file=out,
                        flush=True,
                    )
    if as_json:
        print(json.dumps({"nodes": n_nodes, "bring_up_s": round(up, 3), "requests": results}, indent=2), file=out)
    else:
        print(f"\n{len(results)} requests answered through the network.", file=out)
    return 0
