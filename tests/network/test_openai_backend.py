"""Nodes serving an OpenAI-compatible server (a real one, on loopback) to the network.

The nodes run on the memory network; the upstream is a real HTTP server, so these tests
run on trio's real clock (autojump would jump time while a socket is being read).
"""

from __future__ import annotations

import contextlib

import pytest

from modelnet.models.embedded import hashed_embedding
from modelnet.models.openai_http import OpenAIBackend
from modelnet.models.registry import discover_models
from modelnet.p2p.node import RequestFailed
from modelnet.protocols import reason
from modelnet.testing import open_memory_swarm
from modelnet.testing.openai_upstream import chat_reply, open_upstream, split_tokens

KEY = "sk-network"


@contextlib.asynccontextmanager
async def provider_swarm(upstream, providers=2):
    """Node 0 asks; nodes 1.. each serve the upstream's models through their own backend."""
    backends = [OpenAIBackend(upstream.base_url, ["tiny-chat", "tiny-embed"], api_key=KEY) for _ in range(providers)]
    for backend in backends:  # as `modelnet node` does: learn context lengths before publishing
        await discover_models([backend])
    async with open_memory_swarm(providers + 1, backends_for=lambda i: [backends[i - 1]] if i else []) as swarm:
        yield swarm
    for backend in backends:
        await backend.aclose()


@pytest.fixture
async def upstream():
    async with open_upstream(["tiny-chat", "tiny-embed"], api_key=KEY, context_length=2048) as server:
        yield server


async def test_streamed_chat_through_the_network(upstream):
    async with provider_swarm(upstream) as swarm:
        asker = swarm.nodes[0]
        providers = await asker.find("chat")
        assert len(providers) == 2
        (declared,) = providers[0].models
        assert (declared.name, declared.task, declared.streaming, declared.context_length) == ("tiny-chat", "chat", True, 2048)
        assert (await asker.find("model:tiny-embed"))[0].models[0].task == "embed"

        streamed = []
        answer = await asker.ask("chat", "route this through the network", on_chunk=lambda peer, text: streamed.append((peer, text)))
        expected = chat_reply([{"role": "user", "content": "route this through the network"}])
        assert answer.output == expected and answer.model == "tiny-chat"
        assert [text for _, text in streamed] == list(answer.chunks) == split_tokens(expected)
        assert {peer for peer, _ in streamed} == {answer.provider}
        receipt = reason.open_receipt(answer.receipt, provider=answer.provider)
        assert receipt.model == "tiny-chat"
        assert upstream.requests[-1].authorization == f"Bearer {KEY}"

        vector = await asker.ask("embed", "peer to peer", model="tiny-embed")
        assert vector.output == pytest.approx(hashed_embedding("peer to peer"))


@pytest.mark.parametrize(("status", "code"), [(500, reason.INTERNAL), (429, reason.OVERLOADED), (503, reason.INTERNAL)])
async def test_an_upstream_failure_fails_over_to_another_provider(upstream, status, code):
    async with provider_swarm(upstream) as swarm:
        # Both providers use the same upstream; the first request to reach it fails, so
        # whichever provider is tried first fails and the other one answers.
        upstream.faults.status, upstream.faults.times = status, 1
        answer = await swarm.nodes[0].ask("chat", "hello again")
        assert answer.output == chat_reply([{"role": "user", "content": "hello again"}])
        ((failed, why),) = answer.attempts
        assert failed != answer.provider and why.startswith(f"{code}:") and f"HTTP {status}" in why
        assert sum(seen.path == "/v1/chat/completions" for seen in upstream.requests) == 2


async def test_input_the_upstream_refuses_is_not_retried(upstream):
    async with provider_swarm(upstream) as swarm:
        upstream.faults.status = 400
        with pytest.raises(RequestFailed) as info:
            await swarm.nodes[0].ask("chat", "hello")
        assert info.value.code == reason.INVALID_INPUT and len(info.value.errors) == 1
        assert sum(seen.path == "/v1/chat/completions" for seen in upstream.requests) == 1
