"""Tier 4: private swarms (pnet) with real libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import functools
import logging

import pytest
import trio

from modelnet.identity import PrivateKey
from modelnet.models.embedded import EchoBackend
from modelnet.p2p.errors import DialError, P2PError
from modelnet.p2p.libp2p_host import open_libp2p_host
from modelnet.p2p.node import Config
from modelnet.p2p.pnet import SwarmKey, SwarmMismatch
from modelnet.testing import open_node, open_swarm

pytestmark = pytest.mark.loopback

SWARM = SwarmKey(bytes(range(32)))
OTHER = SwarmKey(bytes(range(1, 33)))


def host_in(swarm_key: SwarmKey | None):
    return functools.partial(open_libp2p_host, listen=["/ip4/127.0.0.1/tcp/0"], swarm_key=swarm_key)


async def test_same_key_finds_and_asks_end_to_end():
    with trio.fail_after(60):
        async with open_swarm(3, host_in(SWARM), backends_for=lambda i: [EchoBackend()] if i == 1 else []) as swarm:
            async with open_node(
                host_in(SWARM), PrivateKey.generate(), (), Config(client_mode=True), bootstrap=[swarm.nodes[2].addrs[0]]
            ) as client:
                [provider] = await client.find("echo")
                assert provider.peer_id == swarm.nodes[1].peer_id
                answer = await client.ask("echo", "inside the swarm")
                assert answer.provider == swarm.nodes[1].peer_id


@pytest.mark.parametrize(
    "ours, theirs, dialler_says, listener_says",
    [
        (OTHER, SWARM, "does not decrypt under our swarm key", "does not decrypt under our swarm key"),
        (None, SWARM, "likely in a private swarm", "not in a private swarm"),
        (SWARM, None, "not in a private swarm", "likely in a private swarm"),
    ],
    ids=["another-key", "no-key-dials-private", "private-dials-no-key"],
)
async def test_a_stranger_is_refused_clearly_and_fast_both_ways(ours, theirs, dialler_says, listener_says, caplog):
    async with open_libp2p_host(PrivateKey.generate(), swarm_key=theirs) as listener:
        async with open_libp2p_host(PrivateKey.generate(), swarm_key=ours) as dialler:
            with caplog.at_level(logging.INFO, logger="modelnet.p2p.libp2p_host"):
                started = trio.current_time()
                with pytest.raises(SwarmMismatch, match=dialler_says) as refused:
                    await dialler.connect(listener.peer_id, listener.listen_addrs())
                # at the first packet, not at the dial timeout
                assert trio.current_time() - started < 2.0
            assert isinstance(refused.value, DialError)
            assert listener.peer_id.short() in str(refused.value) or str(listener.peer_id) in str(refused.value)
            assert dialler.connected_peers() == [] and listener.connected_peers() == []
            logged = [r for r in caplog.records if r.levelno == logging.INFO and "refused a connection" in r.getMessage()]
            assert logged and listener_says in logged[-1].getMessage()


async def test_a_node_keeps_serving_its_swarm_after_strangers_knock():
    with trio.fail_after(60):
        async with open_swarm(2, host_in(SWARM), backends_for=lambda i: [EchoBackend()] if i == 1 else []) as swarm:
            provider = swarm.nodes[1]
            for stranger_key in (OTHER, None):
                async with open_libp2p_host(PrivateKey.generate(), swarm_key=stranger_key) as stranger:
                    for _ in range(3):
                        with pytest.raises(SwarmMismatch):
                            await stranger.connect(provider.peer_id, provider.host.listen_addrs())
                # a stranger node cannot even join through the provider, and is told why
                with pytest.raises(P2PError, match="swarm"):
                    async with open_node(
                        host_in(stranger_key), PrivateKey.generate(), (), Config(client_mode=True), bootstrap=provider.addrs
                    ):
                        pass
            async with open_node(
                host_in(SWARM), PrivateKey.generate(), (), Config(client_mode=True), bootstrap=[swarm.nodes[0].addrs[0]]
            ) as member:
                answer = await member.ask("echo", "still here")
                assert answer.provider == provider.peer_id
