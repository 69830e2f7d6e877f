"""Tier 3: the Kademlia DHT on the memory network, under trio's autojump clock."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import AsyncIterator

import pytest
import trio

from modelnet.errors import ModelNetError
from modelnet.identity import PrivateKey
from modelnet.p2p.kad import BootstrapFailed, Config, KademliaDHT, RecordRejected
from modelnet.p2p.errors import ProtocolNotSupported
from modelnet.p2p.kad.dht import MAX_INBOUND_STREAMS_PER_PEER
from modelnet.p2p.kad.table import common_prefix_length, distance, kad_key
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.streams import FramedStream
from modelnet.protocols.kad import PROTOCOL_ID, KadMessage, KadPeer, MessageType, decode_message, encode_message

EPOCH = 1_800_000_000.0


def key(i: int) -> PrivateKey:
    return PrivateKey.from_seed(bytes([i]) * 32)


def wall_clock() -> float:
    """Record expiry follows trio's virtual clock, as a real clock follows real time."""
    return EPOCH + trio.current_time()


class BadValue(ModelNetError):
    pass


class Versioned:
    """Values are b"v<number>"; the newest (highest number) wins."""

    def validate(self, key: bytes, value: bytes, now: float) -> None:
        if not value.startswith(b"v") or not value[1:].isdigit():
            raise BadValue(f"not a version: {value!r}")

    def select(self, key: bytes, values: list[bytes]) -> int:
        return max(range(len(values)), key=lambda i: int(values[i][1:]))


class Lax:
    """Accepts anything: a misconfigured (or malicious) node's view of /v/."""

    def validate(self, key: bytes, value: bytes, now: float) -> None:
        pass

    def select(self, key: bytes, values: list[bytes]) -> int:
        return 0


VALIDATORS = {b"/v/": Versioned()}


@dataclasses.dataclass
class Swarm:
    network: MemoryNetwork
    nodes: list[KademliaDHT]
    nursery: trio.Nursery
    stack: contextlib.AsyncExitStack

    async def add(self, i: int, config: Config = Config(), validators=VALIDATORS) -> KademliaDHT:
        """Open host ``key(i)`` and serve a DHT on it (not bootstrapped)."""
        host = await self.stack.enter_async_context(self.network.open_host(key(i)))
        node = KademliaDHT(host, config, wall_clock=wall_clock, validators=validators, rng=random.Random(i))
        await self.nursery.start(node.serve)
        return node

    async def join(self, node: KademliaDHT) -> int:
        first = self.nodes[0]
        return await node.bootstrap([(first.peer_id, first.host.listen_addrs())])


@contextlib.asynccontextmanager
async def swarm(n: int, config: Config = Config(), **network) -> AsyncIterator[Swarm]:
    """``n`` DHT nodes, each joined through the first one, one after another."""
    async with contextlib.AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        result = Swarm(MemoryNetwork(latency=0.002, jitter=0.001, seed=1, **network), [], nursery, stack)
        try:
            for i in range(1, n + 1):
                node = await result.add(i, config)
                result.nodes.append(node)
                if i > 1:
                    await result.join(node)
            yield result
        finally:
            nursery.cancel_scope.cancel()


def peers_of(contacts):
    return [c.peer_id for c in contacts]


async def test_every_node_finds_every_other(autojump_clock):
    async with swarm(32) as s:
        assert all(len(node.routing_table) >= 8 for node in s.nodes)
        for node in s.nodes:
            for other in s.nodes:
                if other is not node:
                    assert await node.find_peer(other.peer_id) == other.host.listen_addrs()
        assert await s.nodes[3].find_peer(key(200).peer_id) is None
        hops = [h for node in s.nodes for h in node.stats.hops]
        assert max(hops) <= 4
        assert sum(node.stats.failures for node in s.nodes) == 0


async def test_closest_peers_are_the_true_closest(autojump_clock):
    async with swarm(30) as s:
        for target in (b"/v/one", b"/v/two", s.nodes[7].peer_id.bytes):
            everyone = [n.peer_id for n in s.nodes[1:]]
            truth = sorted(everyone, key=lambda p: distance(p.bytes, target))[:20]
            assert sorted(peers_of(await s.nodes[0].closest_peers(target))) == sorted(truth)


async def test_put_and_get_with_a_validator(autojump_clock):
    async with swarm(30) as s:
        writer, other = s.nodes[3], s.nodes[11]
        assert await writer.put_value(b"/v/model", b"v1") == 20
        for node in s.nodes:
            assert await node.get_value(b"/v/model") == b"v1"
        assert await other.put_value(b"/v/model", b"v2") == 20
        for node in s.nodes:
            assert await node.get_value(b"/v/model") == b"v2"
        # an older value is refused where the newer one is held
        stale = next(n for n in s.nodes if b"/v/model" not in n.records)
        assert await stale.put_value(b"/v/model", b"v0") == 0
        assert await s.nodes[20].get_value(b"/v/model") == b"v2"
        # bad values and keys outside every namespace never leave the node
        with pytest.raises(BadValue):
            await writer.put_value(b"/v/model", b"not a version")
        with pytest.raises(RecordRejected):
            await writer.put_value(b"/other/model", b"v1")
        with pytest.raises(RecordRejected):
            await writer.get_value(b"/other/model")
        assert await s.nodes[5].get_value(b"/v/never-stored") is None


async def test_bad_values_from_a_lax_node_are_rejected_by_everyone(autojump_clock):
    async with swarm(20) as s:
        lax = await s.add(100, validators={b"/v/": Lax()})
        await s.join(lax)
        assert await lax.put_value(b"/v/junk", b"junk") == 0
        for node in s.nodes:
            assert b"/v/junk" not in node.records
        # refusing its junk does not make the others drop the lax node
        assert lax.peer_id in s.nodes[0].routing_table
        assert await s.nodes[4].get_value(b"/v/junk") is None


async def test_get_value_repairs_peers_holding_an_older_value(autojump_clock):
    async with swarm(25) as s:
        await s.nodes[0].put_value(b"/v/x", b"v1")
        holders = [n for n in s.nodes[1:] if b"/v/x" in n.records]
        assert len(holders) == 20
        holders[7].records.put(b"/v/x", b"v5", wall_clock())  # one holder learned a newer value
        # a reader that wants every holder's answer (no early stop) sees v5 and spreads it
        reader = await s.add(110, Config(quorum=100))
        await s.join(reader)
        assert await reader.get_value(b"/v/x") == b"v5"
        asked = set(peers_of(await reader.closest_peers(b"/v/x")))
        repaired = [n for n in holders if n.peer_id in asked]
        assert len(repaired) >= 19  # the writer may be one of the reader's 20 closest
        assert all(n.records.get(b"/v/x", wall_clock()).value == b"v5" for n in repaired)


async def test_every_node_provides_and_finds_providers(autojump_clock):
    async with swarm(30) as s:
        for i, node in enumerate(s.nodes):
            assert await node.provide(b"/cap/chat") == 20
            assert await node.provide(b"/cap/own/%d" % i) == 20
        everyone = {node.peer_id for node in s.nodes}
        for i, node in enumerate(s.nodes):
            found = await node.find_providers(b"/cap/chat", count=len(s.nodes))
            assert {peer for peer, _ in found} == everyone
            owner = s.nodes[(i + 1) % len(s.nodes)]
            assert await node.find_providers(b"/cap/own/%d" % ((i + 1) % len(s.nodes))) == [
                (owner.peer_id, owner.host.listen_addrs())
            ]
        # count bounds the answer
        assert len(await s.nodes[0].find_providers(b"/cap/chat", count=3)) == 3
        assert await s.nodes[0].find_providers(b"/cap/nobody") == []


async def test_providers_only_announce_themselves(autojump_clock):
    async with swarm(10) as s:
        liar, victim = s.nodes[2], s.nodes[5]
        closest = (await liar.closest_peers(b"/cap/x"))[0].peer_id
        holder = next(n for n in s.nodes if n.peer_id == closest)
        forged = KadMessage(
            MessageType.ADD_PROVIDER,
            key=b"/cap/x",
            provider_peers=(KadPeer.from_peer(victim.peer_id, victim.host.listen_addrs()),),
        )
        itself = KadPeer.from_peer(liar.peer_id, liar.host.listen_addrs())
        honest = dataclasses.replace(forged, provider_peers=(itself,))
        stream = await liar.host.new_stream(holder.peer_id, [PROTOCOL_ID])
        async with FramedStream(stream) as framed:
            # several requests on one stream, as go-libp2p sends them; the PING's answer
            # tells us the announcements before it were handled
            await framed.send(encode_message(forged))
            await framed.send(encode_message(honest))
            await framed.send(encode_message(KadMessage(MessageType.PING)))
            assert decode_message(await framed.receive()).type == MessageType.PING
        assert holder.providers.providers(b"/cap/x", wall_clock()) == [(liar.peer_id, tuple(liar.host.listen_addrs()))]


async def test_records_expire_unless_republished(autojump_clock):
    hour = 3600.0
    config = Config(record_ttl=2 * hour, provider_ttl=2 * hour, republish_interval=hour, refresh_interval=hour)
    async with swarm(10, config) as s:
        keeper, leaver, stopper, reader = s.nodes[1], s.nodes[2], s.nodes[3], s.nodes[9]
        await keeper.put_value(b"/v/kept", b"v1")
        await keeper.provide(b"/cap/kept")
        await leaver.put_value(b"/v/gone", b"v1")
        await leaver.provide(b"/cap/gone")
        await stopper.provide(b"/cap/stopped")
        stopper.stop_providing(b"/cap/stopped")
        s.network.crash(leaver.peer_id)

        await trio.sleep(1.5 * hour)  # not expired yet
        assert await reader.get_value(b"/v/gone") == b"v1"
        assert [p for p, _ in await reader.find_providers(b"/cap/stopped")] == [stopper.peer_id]

        await trio.sleep(5 * hour)  # several ttls: only what is republished is left
        assert await reader.get_value(b"/v/kept") == b"v1"
        assert [p for p, _ in await reader.find_providers(b"/cap/kept")] == [keeper.peer_id]
        assert await reader.get_value(b"/v/gone") is None
        assert await reader.find_providers(b"/cap/gone") == []
        assert await reader.find_providers(b"/cap/stopped") == []
        # the expired records are swept from memory too, not only hidden
        assert all(b"/v/gone" not in n.records for n in s.nodes if n is not leaver)


async def test_crashed_and_frozen_nodes_cost_at_most_a_timeout(autojump_clock):
    config = Config(request_timeout=5.0)
    async with swarm(20, config) as s:
        asker, frozen, crashed = s.nodes[0], s.nodes[6], s.nodes[13]
        await asker.put_value(b"/v/x", b"v1")
        s.network.freeze(frozen.peer_id)
        s.network.crash(crashed.peer_id)
        dead = {frozen.peer_id, crashed.peer_id}
        for target in (frozen.peer_id.bytes, crashed.peer_id.bytes):
            start = trio.current_time()
            result = peers_of(await asker.closest_peers(target))
            assert trio.current_time() - start < 1.5 * config.request_timeout
            assert len(result) == 17 and not dead & set(result)
        # two failures in a row evict both: the next lookups do not wait for them at all
        start = trio.current_time()
        assert await asker.get_value(b"/v/x") == b"v1"
        await asker.closest_peers(frozen.peer_id.bytes)
        assert trio.current_time() - start < 1.0
        assert not dead & {c.peer_id for c in asker.routing_table}
        # a node that never talked to them before finds values all the same
        assert await s.nodes[9].get_value(b"/v/x") == b"v1"


async def test_a_peer_answering_garbage_is_evicted_and_the_node_keeps_serving(autojump_clock):
    async with swarm(12) as s:
        node = s.nodes[4]
        bad_host = await s.stack.enter_async_context(s.network.open_host(key(150)))

        async def garbage(stream):
            async with FramedStream(stream) as framed:
                await framed.receive()
                await framed.send(b"\xff\xff\xff")

        bad_host.set_stream_handler(PROTOCOL_ID, garbage)
        await bad_host.connect(node.peer_id, node.host.listen_addrs())
        assert bad_host.peer_id in node.routing_table  # it claims to speak kad
        failures = node.stats.failures
        result = await node.closest_peers(bad_host.peer_id.bytes)
        assert bad_host.peer_id not in peers_of(result)
        assert bad_host.peer_id not in node.routing_table
        assert node.stats.failures == failures + 1

        # garbage sent *to* the node resets that stream only; it goes on answering others
        no_record = encode_message(KadMessage(MessageType.PUT_VALUE, key=b"/v/a"))
        for raw in (b"\xff" * 20, b"\x03\xff\xff\xff", b"\x0a" + b"\x38" * 10, b"%c" % len(no_record) + no_record):
            stream = await bad_host.new_stream(node.peer_id, [PROTOCOL_ID])
            async with FramedStream(stream) as framed:
                await stream.write(raw)
                assert await framed.receive() is None
        await s.nodes[7].put_value(b"/v/still", b"v3")
        assert await node.get_value(b"/v/still") == b"v3"
        assert await s.nodes[9].find_peer(node.peer_id) == node.host.listen_addrs()


async def test_inbound_streams_per_peer_are_limited(autojump_clock):
    async with swarm(3) as s:
        node = s.nodes[0]
        greedy = await s.stack.enter_async_context(s.network.open_host(key(151)))
        greedy.add_addrs(node.peer_id, node.host.listen_addrs())
        held = [await greedy.new_stream(node.peer_id, [PROTOCOL_ID]) for _ in range(MAX_INBOUND_STREAMS_PER_PEER)]
        extra = await greedy.new_stream(node.peer_id, [PROTOCOL_ID])
        with trio.fail_after(1.0):
            assert await extra.read() == b""  # reset at once
        with trio.move_on_after(1.0) as waiting:
            await held[0].read()
        assert waiting.cancelled_caught  # the first ones are still open
        # a request on a held stream is answered
        async with FramedStream(held[1]) as framed:
            await framed.send(encode_message(KadMessage(MessageType.PING)))
            assert decode_message(await framed.receive()).type == MessageType.PING


async def test_client_mode_looks_up_but_is_never_routed_to(autojump_clock):
    async with swarm(15) as s:
        await s.nodes[2].put_value(b"/v/c", b"v7")
        await s.nodes[5].provide(b"/cap/c")
        client = await s.add(120, Config(client_mode=True))
        assert await s.join(client) > 0
        assert await client.get_value(b"/v/c") == b"v7"
        assert [p for p, _ in await client.find_providers(b"/cap/c")] == [s.nodes[5].peer_id]
        for node in s.nodes:
            assert await client.find_peer(node.peer_id) == node.host.listen_addrs()
        await client.provide(b"/cap/client")
        # let every server refresh its table a few times
        await trio.sleep(3 * Config().refresh_interval)
        for node in s.nodes:
            assert client.peer_id not in node.routing_table
            assert all(c.peer_id != client.peer_id for c in await node.closest_peers(client.peer_id.bytes))
        with pytest.raises(ProtocolNotSupported):
            await s.nodes[0].host.new_stream(client.peer_id, [PROTOCOL_ID])


async def test_bootstrap_fails_when_no_peer_answers(autojump_clock):
    async with swarm(2) as s:
        lonely = await s.add(90)
        with pytest.raises(BootstrapFailed):
            await lonely.bootstrap([(key(91).peer_id, ["/memory/999"])])
        assert len(lonely.routing_table) == 0


async def test_a_full_bucket_pings_its_oldest_before_taking_a_newcomer(autojump_clock):
    config = Config(k=1)
    async with swarm(1, config) as s:
        owner = s.nodes[0]
        owner_key = kad_key(owner.peer_id.bytes)
        # three peers that fall into the same bucket of the owner's table
        same_bucket = [i for i in range(2, 60) if common_prefix_length(owner_key, kad_key(key(i).peer_id.bytes)) == 0]
        old_i, new_i, late_i = same_bucket[:3]
        old = await s.add(old_i, config)
        await s.join(old)
        assert old.peer_id in owner.routing_table
        await trio.sleep(120)  # the old contact is no longer "just seen"

        newcomer = await s.add(new_i, config)
        await s.join(newcomer)
        await trio.sleep(10)  # the ping round trip
        assert old.peer_id in owner.routing_table  # it answered the ping: it stays
        assert newcomer.peer_id not in owner.routing_table

        await trio.sleep(120)
        s.network.crash(old.peer_id)
        late = await s.add(late_i, config)
        await late.bootstrap([(owner.peer_id, owner.host.listen_addrs())])
        await trio.sleep(10)
        assert old.peer_id not in owner.routing_table  # it did not answer: replaced
        assert late.peer_id in owner.routing_table
