"""``modelnet demo``: a real network on loopback, end to end.

Starts provider nodes as real libp2p hosts (TCP + Noise + Yamux on 127.0.0.1), each serving
a different set of the embedded models, joined through the first node only. A light client
that knows a single bootstrap address (the last node's) then finds providers through the DHT
and routes each request, printing what was asked, who answered, the answer and the time.
It then runs two collaborative plans (a pipeline, and an ensemble that votes) and checks
their signed traces, and calls a model that one node serves privately for an organisation:
the client, a member, finds and calls it; an outsider cannot even find it.
"""

from __future__ import annotations

import json
import sys
import time

import trio

from . import render

# Each capability is served by two different nodes, so routing has a choice to make.
NODE_MODELS = [
    ["vader-sentiment", "langid"],
    ["yake-keywords", "textrank-summary"],
    ["vader-sentiment", "yake-keywords"],
    ["langid", "textrank-summary", "hash-embed"],
]
PRIVATE_MODEL = "hash-embed"  # served by the last node for the demo organisation only

ARTICLE = (
    "Small language models now run on laptops, phones and office servers. "
    "Each of them is good at one narrow job, such as reading contracts or triaging tickets. "
    "They rarely talk to each other, because every deployment is an island behind its own API. "
    "A peer-to-peer network lets each model publish what it can do under a signed identity. "
    "Other nodes discover those capabilities through a distributed hash table, with no central registry. "
    "Requests are then routed to the fastest provider that can serve them. "
    "The weather was pleasant on the day the first prototype ran."
)

REVIEW = (
    "We moved our support models onto the network last month. "
    "Setting up the first node took ten minutes and the documentation was excellent. "
    "Requests now reach the fastest model automatically, and our team loves how reliable it has been. "
    "The office coffee machine broke on Tuesday. "
    "Overall the switch was a great success and we are delighted with the results."
)

REQUESTS = [
    ("sentiment", "I absolutely love how easy this network makes it to share models!", {}),
    ("language-id", "Le réseau trouve tout seul le modèle qui sait répondre.", {}),
    ("keywords", ARTICLE, {"top": 4}),
    ("summarize", ARTICLE, {"sentences": 2}),
    ("sentiment", "The old setup was slow, fragile and frankly terrible.", {}),
    ("language-id", "Das Netzwerk verbindet kleine Modelle auf vielen Rechnern.", {}),
]


def demo_plans():
    from modelnet.protocols.plan import Ensemble, Pipeline, Step, Vote

    return [
        ("pipeline: summarize -> sentiment", Pipeline((Step("summarize", params={"sentences": 2}), Step("sentiment"))), REVIEW),
        (
            "ensemble: sentiment on 2 providers, majority vote on the label",
            Ensemble.replicate(Step("sentiment"), 2, Vote(field="label")),
            "Routing requests by measured latency is a wonderful idea.",
        ),
    ]


async def run_demo(n_nodes: int = 4, as_json: bool = False) -> int:
    from modelnet.identity import PrivateKey
    from modelnet.models.embedded import EmbeddedBackend
    from modelnet.p2p.libp2p_host import open_libp2p_host
    from modelnet.p2p.node import Config
    from modelnet.testing import open_node, open_swarm

    out = sys.stdout
    n_nodes = max(2, n_nodes)
    keys = [PrivateKey.generate() for _ in range(n_nodes)]
    client_key, outsider_key = PrivateKey.generate(), PrivateKey.generate()
    org = _DemoOrg(keys[-1], client_key)

    def host_factory(key):
        return open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"])

    def backends_for(i: int):
        return [EmbeddedBackend(models=NODE_MODELS[i % len(NODE_MODELS)])]

    def say(text: str) -> None:
        if not as_json:
            print(text, file=out, flush=True)

    started = trio.current_time()
    say(f"starting {n_nodes} nodes on 127.0.0.1 (libp2p: TCP + Noise + Yamux)…")
    async with open_swarm(
        n_nodes,
        host_factory,
        backends_for=backends_for,
        key_for=keys.__getitem__,
        memberships_for=lambda i: org.memberships(keys[i]),
        policies_for=lambda i: org.policies(keys[i]),
    ) as swarm:
        up = trio.current_time() - started
        if not as_json:
            rows = []
            for i, node in enumerate(swarm.nodes):
                served = [f"{s.info.task} ({s.info.name})" for s in node.server.models.values()]
                served = [f"{m} [private: {org.name}]" if PRIVATE_MODEL in m and node.policies else m for m in served]
                rows.append([i, str(node.peer_id), ", ".join(served), node.addrs[0]])
            print(render.table(["node", "peer id", "serves", "address"], rows), file=out)
            print(f"network up and published in {up:.2f} s", file=out)
        entry = swarm.nodes[-1].addrs[0]
        client_config = Config(client_mode=True)
        async with open_node(
            host_factory, client_key, (), client_config, bootstrap=[entry], memberships=org.memberships(client_key)
        ) as client:
            say(f"\nclient {client.peer_id.short()} joined through {entry}\n")
            results = []
            for capability, text, params in REQUESTS:
                providers = await client.find(capability)
                answer = await client.ask(capability, text, params)
                index = _node_index(swarm, answer.provider)
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
                say(
                    f"{capability:<12} {len(providers)} found -> node {index} ({answer.provider.short()}, {answer.model}) "
                    f"{answer.elapsed * 1000:6.1f} ms\n    {render.output_text(answer.output, width=110)}"
                )
            plans = await _run_plans(client, swarm, say)
            async with open_node(host_factory, outsider_key, (), client_config, bootstrap=[entry]) as outsider:
                private = await _private_model(client, outsider, swarm, org, say)
    if as_json:
        report = {"nodes": n_nodes, "bring_up_s": round(up, 3), "requests": results, "plans": plans, "private": private}
        print(json.dumps(report, indent=2), file=out)
    else:
        print(f"\n{len(results)} requests and {len(plans)} plans answered through the network.", file=out)
    return 0


def _node_index(swarm, peer) -> int:
    return next(i for i, node in enumerate(swarm.nodes) if node.peer_id == peer)


async def _run_plans(client, swarm, say) -> list[dict]:
    from modelnet.p2p.plans import execute

    say("\ncollaborative plans (each step routed on its own; every step's receipt checked):")
    reports = []
    for title, plan, text in demo_plans():
        result = await execute(client, plan, text)
        result.verify(now=time.time())  # raises if any receipt or hand-off does not check out
        steps = [f"{step.capability}@node {_node_index(swarm, step.provider)}" for step in result.trace.steps]
        reports.append(
            {"plan": title, "steps": steps, "answer": result.output, "ms": round(result.elapsed * 1000, 1), "trace_verified": True}
        )
        say(
            f"  {title}\n    steps: {', '.join(steps)}; trace verified; {result.elapsed * 1000:.1f} ms\n"
            f"    {render.output_text(result.output, width=110)}"
        )
    return reports


async def _private_model(client, outsider, swarm, org, say) -> dict:
    from modelnet.p2p.node import NoProvider

    say(f"\nprivate model: {PRIVATE_MODEL} is published only for members of {org.name!r}:")
    members_see = await client.find("embed")
    answer = await client.ask("embed", "peer-to-peer networks of small models")
    say(
        f"  member {client.peer_id.short()}: {len(members_see)} provider found -> node {_node_index(swarm, answer.provider)}, "
        f"a {len(answer.output)}-dimensional embedding in {answer.elapsed * 1000:.1f} ms"
    )
    outsiders_see = await outsider.find("embed")
    try:
        await outsider.ask("embed", "peer-to-peer networks of small models", timeout=5)
        refused = None
    except NoProvider as exc:
        refused = str(exc)
    say(f"  outsider {outsider.peer_id.short()}: {len(outsiders_see)} providers found; asking: {refused}")
    return {
        "member_found": len(members_see),
        "member_answer_dimensions": len(answer.output),
        "outsider_found": len(outsiders_see),
        "outsider_refused": refused,
    }


class _DemoOrg:
    """An organisation whose members are the last node (which serves the private model) and
    the demo's client."""

    name = "demo-org"

    def __init__(self, provider_key, client_key) -> None:
        from modelnet.identity import PrivateKey

        self.key = PrivateKey.generate()
        self.provider = provider_key.peer_id
        self.members = {provider_key.peer_id, client_key.peer_id}

    def memberships(self, key):
        from modelnet.identity import Membership, issue_certificate, records_key

        if key.peer_id not in self.members:
            return ()
        now = time.time()
        certificate = issue_certificate(self.key, self.name, key.peer_id, now=now, expires=now + 3600)
        return (Membership(certificate=certificate, records_key=records_key(self.key)),)

    def policies(self, key):
        from modelnet.protocols.access import AccessPolicy

        return {PRIVATE_MODEL: AccessPolicy(orgs=(self.key.peer_id,))} if key.peer_id == self.provider else {}
