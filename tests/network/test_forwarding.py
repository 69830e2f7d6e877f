"""Tier 3: forwarding chains on the memory network -- provenance, cancellation, loops, hops, budgets."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import AsyncIterator

import pytest
import trio
import trio.testing

from modelnet.identity import IdentityError
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.node import Config, RequestFailed
from modelnet.protocols import reason
from modelnet.protocols.errors import RemoteProtocolError
from modelnet.testing import ScriptedBackend, open_node, seeded_key, virtual_wall_clock

LINK = 0.050  # one way: large enough that every hop's own time shows in the budget


@contextlib.asynccontextmanager
async def chain(
    forwarders: int, backend: ScriptedBackend, *, forwarder_config: Config = Config(), loop: bool = False
) -> AsyncIterator[tuple[list, object]]:
    """asker -> F1 -> … -> Fn -> provider: F1..Fn-1 have no DHT and only their upstream;
    Fn joined the provider's DHT. With ``loop``, Fn's upstream is F1 and nobody has a DHT."""
    network = MemoryNetwork(latency=LINK)
    async with contextlib.AsyncExitStack() as stack:

        async def start(i, backends=(), config=Config(), bootstrap=()):
            return await stack.enter_async_context(
                open_node(network.open_host, seeded_key(i), backends, config, bootstrap=bootstrap, wall_clock=virtual_wall_clock)
            )

        provider = await start(0, [backend])
        hops: list = []
        upstream: tuple[str, ...] = ()
        for i in range(forwarders, 0, -1):  # the last hop first: each one's upstream is the next
            last = i == forwarders
            config = dataclasses.replace(forwarder_config, forwarding=True, upstream=upstream)
            node = await start(i, config=config, bootstrap=provider.addrs if last and not loop else ())
            hops.insert(0, node)
            upstream = tuple(node.addrs)
        if loop:
            last = hops[-1]
            last.config = dataclasses.replace(last.config, upstream=tuple(hops[0].addrs))
        asker = await start(99, config=Config(client_mode=True))
        yield [asker, *hops, provider], network


def spy_on_requests(node) -> list[reason.Request]:
    seen: list[reason.Request] = []
    check = node.server._check

    def spy(request, remote):
        seen.append(request)
        return check(request, remote)

    node.server._check = spy
    return seen


async def test_a_request_crosses_two_forwarders_and_the_receipt_chain_verifies(autojump_clock):
    async with chain(2, ScriptedBackend("p", chunks=2)) as (nodes, _):
        asker, f1, f2, provider = nodes
        streamed: list[tuple] = []
        answer = await asker.ask("echo", "hello", via=f1.addrs, on_chunk=lambda peer, text: streamed.append((peer, text)))
        assert answer.output == "p:hello"
        assert answer.chunks == ("p-0", "p-1") == tuple(text for _, text in streamed)
        assert answer.provider == provider.peer_id
        assert answer.route == (f1.peer_id, f2.peer_id)
        receipt = answer.verify(asker.peer_id)
        assert receipt.client == f2.peer_id  # the provider answered the last forwarder...
        assert receipt.request_id == answer.request_id  # ...for the asker's own request id
        with pytest.raises(RemoteProtocolError):
            answer.verify(f1.peer_id)  # the chain names the asker: nobody else can claim it
        assert f1.forwarder.forwarded == f2.forwarder.forwarded == 1


async def test_every_hop_subtracts_its_time_from_the_budget_and_one_hop(autojump_clock):
    async with chain(2, ScriptedBackend("p")) as (nodes, _):
        asker, f1, f2, provider = nodes
        seen = {node.peer_id: spy_on_requests(node) for node in (f1, f2, provider)}
        await asker.ask("echo", "x", via=f1.addrs, timeout=10.0, hop_limit=5)
        [at_f1], [at_f2], [at_p] = (seen[node.peer_id] for node in (f1, f2, provider))
        # each hop spent at least a session and a stream set-up (round trips of 2 * LINK)
        assert 10.0 >= at_f1.budget > at_f2.budget + 2 * LINK > at_p.budget + 4 * LINK
        assert [r.hop_limit for r in (at_f1, at_f2, at_p)] == [5, 4, 3]
        assert at_p.visited == (asker.peer_id, f1.peer_id, f2.peer_id)
        assert len({r.request_id for r in (at_f1, at_f2, at_p)}) == 1


async def test_cancelling_the_asker_stops_the_model_three_hops_away(autojump_clock):
    slow = ScriptedBackend("p", delay=600.0)
    async with chain(2, slow) as (nodes, _):
        asker, f1, f2, provider = nodes
        with trio.move_on_after(20):
            await asker.ask("echo", "x", via=f1.addrs, timeout=900)
        assert slow.started == 1
        with trio.fail_after(2):  # a few link delays, not the 600 s the model would take
            await slow.was_cancelled.wait()
        await trio.testing.wait_all_tasks_blocked()  # the handlers finish unwinding
        assert f1.server.in_flight == f2.server.in_flight == provider.server.in_flight == 0


async def test_forwarding_never_loops(autojump_clock):
    async with chain(2, ScriptedBackend("p"), loop=True) as (nodes, _):
        asker, f1, f2, provider = nodes
        seen = {node.peer_id: spy_on_requests(node) for node in (f1, f2)}
        with pytest.raises(RequestFailed) as failed:
            await asker.ask("echo", "x", via=f1.addrs, timeout=30)
        # F1 -> F2, and F2 does not send it back to F1, which it visited: it has nowhere to go
        assert [len(seen[f1.peer_id]), len(seen[f2.peer_id])] == [1, 1]
        assert failed.value.code is None or failed.value.code == reason.NO_SUCH_CAPABILITY
        assert "no provider" in str(failed.value)
        # A request that claims to have passed F1 already is refused by F1 itself.
        grant = await asker._grant_for(f1.peer_id, "echo")
        request = reason.Request(bytes(16), "echo", "x", {}, 10.0, 4, (asker.peer_id, f1.peer_id), grant.encode())
        assert (await send_raw(asker, f1, request)).code == reason.LOOP


async def send_raw(asker, target, request: reason.Request):
    client = reason.ReasonClient()
    stream = await asker.host.new_stream(target.peer_id, [reason.REASON_PROTOCOL])
    await stream.write(client.send_request(request))
    with trio.fail_after(30):
        while True:
            client.receive_data(await stream.read())
            if (event := client.next_event()) is not None:
                return event


async def test_the_hop_limit_is_respected(autojump_clock):
    async with chain(3, ScriptedBackend("p")) as (nodes, _):
        asker, f1, f2, f3, provider = nodes
        with pytest.raises(RequestFailed) as failed:
            await asker.ask("echo", "x", via=f1.addrs, hop_limit=3)  # F1, F2, F3: none left for the provider
        assert failed.value.code == reason.HOP_LIMIT
        answer = await asker.ask("echo", "x", via=f1.addrs, hop_limit=4)
        # F1 met F2 on the first request and, through it, the DHT: it may now find a
        # shorter route itself. Whatever the route, it starts at F1 and verifies.
        assert answer.route[0] == f1.peer_id and len(answer.route) <= 3
        answer.verify(asker.peer_id)


async def test_a_forwarders_own_limits_apply_to_forwarded_work(autojump_clock):
    slow = ScriptedBackend("p", delay=5.0)
    async with chain(1, slow, forwarder_config=Config(max_requests_per_peer=1)) as (nodes, _):
        asker, f1, provider = nodes
        outcomes: list[str] = []

        async def ask() -> None:
            try:
                outcomes.append((await asker.ask("echo", "x", via=f1.addrs)).output)
            except RequestFailed as exc:
                outcomes.append(exc.errors[0][1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            nursery.start_soon(ask)
        assert sorted(o.split(":")[0] for o in outcomes) == ["overloaded", "p"]
        assert slow.started == 1


async def test_a_forwarder_cannot_swap_the_receipt_or_forge_the_route(autojump_clock):
    async with chain(1, ScriptedBackend("p")) as (nodes, _):
        asker, f1, provider = nodes
        answer = await asker.ask("echo", "x", via=f1.addrs)
        other = await asker.ask("echo", "y", via=f1.addrs)

        with pytest.raises(RemoteProtocolError):  # another request's receipt under this statement
            dataclasses.replace(answer, receipt=other.receipt).verify(asker.peer_id)
        with pytest.raises(RemoteProtocolError):  # the output changed
            dataclasses.replace(answer, output="p:z").verify(asker.peer_id)
        forged = bytearray(answer.forwards[0])
        forged[-1] ^= 1
        with pytest.raises(IdentityError):  # the signature no longer covers it
            dataclasses.replace(answer, forwards=(bytes(forged),)).verify(asker.peer_id)


@pytest.mark.parametrize("n", [3, 5, 7])
async def test_a_mesh_of_forwarders_handles_one_request_per_hop_not_per_path(autojump_clock, n):
    # n forwarders, each listing all others as upstream; one ask for what nobody serves.
    # Unbounded, this explored every simple path (n=5: 65 requests, n=6: 326).
    network = MemoryNetwork(latency=0.001)
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_node(network.open_host, seeded_key(i), [], Config(forwarding=True), wall_clock=virtual_wall_clock)
            )
            for i in range(1, n + 1)
        ]
        for node in nodes:
            node.config = dataclasses.replace(node.config, upstream=tuple(o.addrs[0] for o in nodes if o is not node))
        seen = [spy_on_requests(node) for node in nodes]
        asker = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(99), [], Config(client_mode=True), wall_clock=virtual_wall_clock)
        )
        with pytest.raises(RequestFailed) as failed:
            await asker.ask("no-such-thing", "x", via=nodes[0].addrs, timeout=600)
        assert failed.value.code == reason.NO_SUCH_CAPABILITY
        handled = sum(len(s) for s in seen)
        assert handled <= min(n, Config().hop_limit)  # a walk: each forwarder at most once
        assert all(len(s) <= 1 for s in seen)


async def test_a_forwarder_clamps_the_hop_limit_to_its_own(autojump_clock):
    async with chain(2, ScriptedBackend("p"), forwarder_config=Config(hop_limit=3)) as (nodes, _):
        asker, f1, f2, provider = nodes
        seen = {node.peer_id: spy_on_requests(node) for node in (f1, f2, provider)}
        await asker.ask("echo", "x", via=f1.addrs, hop_limit=reason.MAX_HOP_LIMIT)
        [at_f1], [at_f2], [at_p] = (seen[node.peer_id] for node in (f1, f2, provider))
        assert [r.hop_limit for r in (at_f1, at_f2, at_p)] == [reason.MAX_HOP_LIMIT, 2, 1]


async def test_a_forwarders_no_provider_is_final_for_the_asker(autojump_clock):
    # Two forwarders that find nothing: the asker that may use both stops at the first one's
    # answer (it searched already), instead of paying for the same search again.
    async with chain(1, ScriptedBackend("p")) as (nodes, network):
        asker, f1, provider = nodes
        config = Config(forwarding=True)
        async with open_node(network.open_host, seeded_key(7), [], config, wall_clock=virtual_wall_clock) as other:
            seen = [spy_on_requests(node) for node in (f1, other)]
            with pytest.raises(RequestFailed) as failed:
                await asker.ask("nothing-here", "x", via=[*f1.addrs, *other.addrs])
            assert failed.value.code == reason.NO_SUCH_CAPABILITY
            assert sorted(len(s) for s in seen) == [0, 1]


async def test_a_forwarded_request_tries_one_upstream_forwarder_its_own_requests_all(autojump_clock):
    network = MemoryNetwork(latency=0.001)
    async with contextlib.AsyncExitStack() as stack:

        async def start(i, config):
            return await stack.enter_async_context(open_node(network.open_host, seeded_key(i), [], config, wall_clock=virtual_wall_clock))

        busy = [await start(i, Config(forwarding=True, max_concurrent_requests=0)) for i in (11, 12, 13)]
        upstream = tuple(node.addrs[0] for node in busy)
        forwarder = await start(1, Config(forwarding=True, upstream=upstream))
        asker = await start(99, Config(client_mode=True, upstream=upstream))
        seen = [spy_on_requests(node) for node in busy]
        with pytest.raises(RequestFailed):  # through the forwarder: it tries one upstream
            await asker.ask("echo", "x", via=forwarder.addrs)
        assert sum(len(s) for s in seen) == 1
        with pytest.raises(RequestFailed) as failed:  # its own request: every upstream, in turn
            await asker.ask("echo", "x")
        assert sum(len(s) for s in seen) == 1 + 3
        assert failed.value.code == reason.OVERLOADED
