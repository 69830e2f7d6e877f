"""Tier 4: real libp2p nodes (TCP + Noise + Yamux) on 127.0.0.1, end to end."""

from __future__ import annotations

import pytest
import trio

from modelnet.identity import PrivateKey
from modelnet.models.embedded import EmbeddedBackend
from modelnet.p2p.libp2p_host import open_libp2p_host
from modelnet.p2p.node import Config
from modelnet.protocols import reason
from modelnet.testing import open_node, open_swarm

pytestmark = pytest.mark.loopback

NODE_MODELS = [["vader-sentiment"], ["langid", "vader-sentiment"], ["yake-keywords"]]


def loopback_host(key):
    return open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"])


async def test_three_libp2p_nodes_publish_discover_and_answer():
    with trio.fail_after(60):
        async with open_swarm(
            3, loopback_host, backends_for=lambda i: [EmbeddedBackend(offload=False, models=NODE_MODELS[i])]
        ) as swarm:
            # A light client that knows only the last node's address.
            async with open_node(
                loopback_host, PrivateKey.generate(), (), Config(client_mode=True), bootstrap=[swarm.nodes[2].addrs[0]]
            ) as client:
                providers = await client.find("sentiment")
                assert {p.peer_id for p in providers} == {swarm.nodes[0].peer_id, swarm.nodes[1].peer_id}
                answer = await client.ask("sentiment", "This is a truly great and lovely result")
                assert answer.output["label"] == "positive"
                assert answer.provider in {swarm.nodes[0].peer_id, swarm.nodes[1].peer_id}
                reason.open_receipt(answer.receipt, provider=answer.provider)
                lang = await client.ask("language-id", "Dies ist ein deutscher Satz über Netzwerke.")
                assert lang.provider == swarm.nodes[1].peer_id and lang.output["language"] == "de"
                kw = await client.ask("keywords", "Kademlia tables and Kademlia lookups route peers.")
                assert kw.provider == swarm.nodes[2].peer_id
                # Client mode: the client is in nobody's routing table.
                for node in swarm.nodes:
                    assert node.dht.routing_table.contact(client.peer_id) is None
