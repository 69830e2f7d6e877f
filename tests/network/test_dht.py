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
from modelnet.p2p.errors import ProtocolNotSupported, StreamClosed
from modelnet.p2p.kad.answerer import MAX_INBOUND_STREAMS_PER_PEER
from modelnet.p2p.kad.peer_entries import fit
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
            assert await node.provide(b"/modelnet/cap/chat") == 20
            assert await node.provide(b"/modelnet/cap/own/%d" % i) == 20
        everyone = {node.peer_id for node in s.nodes}
        for i, node in enumerate(s.nodes):
            found = await node.find_providers(b"/modelnet/cap/chat", count=len(s.nodes))
            assert {peer for peer, _ in found} == everyone
            owner = s.nodes[(i + 1) % len(s.nodes)]
            assert await node.find_providers(b"/modelnet/cap/own/%d" % ((i + 1) % len(s.nodes))) == [
                (owner.peer_id, owner.host.listen_addrs())
            ]
        # count bounds the answer
        assert len(await s.nodes[0].find_providers(b"/modelnet/cap/chat", count=3)) == 3
        assert await s.nodes[0].find_providers(b"/modelnet/cap/nobody") == []


async def test_providers_only_announce_themselves(autojump_clock):
    async with swarm(10) as s:
        liar, victim = s.nodes[2], s.nodes[5]
        closest = (await liar.closest_peers(b"/modelnet/cap/x"))[0].peer_id
        holder = next(n for n in s.nodes if n.peer_id == closest)
        forged = KadMessage(
            MessageType.ADD_PROVIDER,
            key=b"/modelnet/cap/x",
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
        assert holder.providers.providers(b"/modelnet/cap/x", wall_clock()) == [(liar.peer_id, tuple(liar.host.listen_addrs()))]


async def test_records_expire_unless_republished(autojump_clock):
    hour = 3600.0
    config = Config(record_ttl=2 * hour, provider_ttl=2 * hour, republish_interval=hour, refresh_interval=hour)
    async with swarm(10, config) as s:
        keeper, leaver, stopper, reader = s.nodes[1], s.nodes[2], s.nodes[3], s.nodes[9]
        await keeper.put_value(b"/v/kept", b"v1")
        await keeper.provide(b"/modelnet/cap/kept")
        await leaver.put_value(b"/v/gone", b"v1")
        await leaver.provide(b"/modelnet/cap/gone")
        await stopper.provide(b"/modelnet/cap/stopped")
        stopper.stop_providing(b"/modelnet/cap/stopped")
        s.network.crash(leaver.peer_id)

        await trio.sleep(1.5 * hour)  # not expired yet
        assert await reader.get_value(b"/v/gone") == b"v1"
        assert [p for p, _ in await reader.find_providers(b"/modelnet/cap/stopped")] == [stopper.peer_id]

        await trio.sleep(5 * hour)  # several ttls: only what is republished is left
        assert await reader.get_value(b"/v/kept") == b"v1"
        assert [p for p, _ in await reader.find_providers(b"/modelnet/cap/kept")] == [keeper.peer_id]
        assert await reader.get_value(b"/v/gone") is None
        assert await reader.find_providers(b"/modelnet/cap/gone") == []
        assert await reader.find_providers(b"/modelnet/cap/stopped") == []
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
                with pytest.raises(StreamClosed):  # reset
                    await framed.receive()
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
        with trio.fail_after(1.0), pytest.raises(StreamClosed):
            await extra.read()  # reset at once
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
        await s.nodes[5].provide(b"/modelnet/cap/c")
        client = await s.add(120, Config(client_mode=True))
        assert await s.join(client) > 0
        assert await client.get_value(b"/v/c") == b"v7"
        assert [p for p, _ in await client.find_providers(b"/modelnet/cap/c")] == [s.nodes[5].peer_id]
        for node in s.nodes:
            assert await client.find_peer(node.peer_id) == node.host.listen_addrs()
        await client.provide(b"/modelnet/cap/client")
        # let every server refresh its table a few times (and check that they did)
        refreshes = [node.stats.refreshes for node in s.nodes]
        await trio.sleep(3 * Config().refresh_interval)
        assert all(node.stats.refreshes >= before + 2 for node, before in zip(s.nodes, refreshes))
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


class PingWatching(KademliaDHT):
    """Sets ``pinged`` when a PING it sent is answered or failed."""

    pinged = trio.Event()

    async def _request(self, peer, request, **kwargs):
        try:
            return await super()._request(peer, request, **kwargs)
        finally:
            if request.type == MessageType.PING:
                self.pinged.set()


async def test_a_full_bucket_pings_its_oldest_before_taking_a_newcomer(autojump_clock):
    config = Config(k=1)
    async with swarm(0, config) as s:
        host = await s.stack.enter_async_context(s.network.open_host(key(1)))
        owner = PingWatching(host, config, wall_clock=wall_clock, validators=VALIDATORS)
        await s.nursery.start(owner.serve)
        s.nodes.append(owner)
        owner_key = kad_key(owner.peer_id.bytes)
        # three peers that fall into the same bucket of the owner's table
        same_bucket = [i for i in range(2, 60) if common_prefix_length(owner_key, kad_key(key(i).peer_id.bytes)) == 0]
        old_i, new_i, late_i = same_bucket[:3]
        old = await s.add(old_i, config)
        await s.join(old)
        assert old.peer_id in owner.routing_table
        await trio.sleep(120)  # the old contact is no longer "just seen"

        newcomer = await s.add(new_i, config)
        owner.pinged = trio.Event()
        await s.join(newcomer)
        with trio.fail_after(60):
            await owner.pinged.wait()
        assert owner.stats.pings == 1
        assert old.peer_id in owner.routing_table  # it answered the ping: it stays
        assert newcomer.peer_id not in owner.routing_table

        await trio.sleep(120)
        s.network.crash(old.peer_id)
        late = await s.add(late_i, config)
        owner.pinged = trio.Event()
        await late.bootstrap([(owner.peer_id, owner.host.listen_addrs())])
        with trio.fail_after(60):
            await owner.pinged.wait()
        assert owner.stats.pings == 2
        assert old.peer_id not in owner.routing_table  # it did not answer: replaced
        assert late.peer_id in owner.routing_table


# ---- stream reuse -------------------------------------------------------------------------


async def test_requests_to_a_peer_reuse_one_stream(autojump_clock):
    async with swarm(6) as s:
        asker = s.nodes[0]
        await asker.closest_peers(b"warm-up")
        opened, queries = asker.stats.streams_opened, asker.stats.queries
        assert asker.pooled_streams == len(asker.routing_table) == 5
        for i in range(5):  # (lookups that stop early, like find_peer, reset what is in flight)
            await asker.closest_peers(b"target %d" % i)
            assert await asker.get_value(b"/v/none %d" % i) is None
        assert asker.stats.queries >= queries + 20
        assert asker.stats.streams_opened == opened  # every one of them on a pooled stream
        assert asker.stats.failures == 0


async def test_a_stale_pooled_stream_is_replaced_once(autojump_clock):
    async with swarm(4) as s:
        asker, other = s.nodes[0], s.nodes[1]
        await asker.closest_peers(b"warm-up")
        assert asker.pooled_streams == 3
        await asker.host.disconnect(other.peer_id)  # resets every stream between them
        opened = asker.stats.streams_opened
        await asker.closest_peers(b"after the reset")
        assert asker.stats.stale_retries >= 1
        assert asker.stats.streams_opened > opened
        assert asker.stats.failures == 0 and other.peer_id in asker.routing_table


async def test_timeouts_are_not_retried_and_drop_the_stream(autojump_clock):
    config = Config(request_timeout=5.0)
    async with swarm(4, config) as s:
        asker, frozen = s.nodes[0], s.nodes[2]
        await asker.closest_peers(b"warm-up")
        s.network.freeze(frozen.peer_id)
        opened, pooled = asker.stats.streams_opened, asker.pooled_streams
        start = trio.current_time()
        assert frozen.peer_id not in peers_of(await asker.closest_peers(b"while frozen"))
        assert trio.current_time() - start < 1.5 * config.request_timeout
        assert asker.stats.stale_retries == 0 and asker.stats.streams_opened == opened
        assert asker.pooled_streams == pooled - 1  # the frozen peer's stream was reset


async def test_idle_streams_are_closed_and_the_pool_is_bounded(autojump_clock):
    config = Config(max_pooled_streams=3)
    async with swarm(8, config) as s:
        asker = s.nodes[0]
        await asker.closest_peers(b"everyone")
        assert len(asker.routing_table) == 7 and asker.pooled_streams == 3
        await trio.sleep(1.5 * config.stream_idle_timeout)
        assert asker.pooled_streams == 0
        opened = asker.stats.streams_opened
        await asker.closest_peers(b"again")
        assert asker.stats.streams_opened > opened and asker.stats.stale_retries == 0


# ---- what answers carry -------------------------------------------------------------------


def test_answers_are_trimmed_to_fit_addresses_first():
    peers = tuple(KadPeer.from_peer(key(i).peer_id, [f"/ip4/10.0.0.{j}/tcp/{4000 + i}" for j in range(8)]) for i in range(20))
    answer = KadMessage(MessageType.GET_PROVIDERS, key=b"/modelnet/cap/x", closer_peers=peers, provider_peers=peers)
    size = len(encode_message(answer))
    assert fit(answer, size) is answer
    # a little too big: the biggest entries lose their addresses, every peer stays
    fitted = fit(answer, size - 100)
    assert len(encode_message(fitted)) <= size - 100
    assert [p.id for p in fitted.closer_peers + fitted.provider_peers] == [p.id for p in peers + peers]
    assert 0 < sum(not p.addrs for p in fitted.closer_peers + fitted.provider_peers) < 40
    # far too big: peers go too, closer peers first
    bare = tuple(dataclasses.replace(p, addrs=()) for p in peers)
    budget = len(encode_message(KadMessage(MessageType.GET_PROVIDERS, key=b"/modelnet/cap/x", provider_peers=bare)))
    fitted = fit(answer, budget)
    assert len(encode_message(fitted)) <= budget
    assert fitted.closer_peers == () and fitted.provider_peers == bare


def lie(host, named):
    """Make ``host`` answer every kad request with ``named`` as the closer peers."""

    async def handler(stream):
        async with FramedStream(stream) as framed:
            while (data := await framed.receive()) is not None:
                request = decode_message(data)
                await framed.send(encode_message(KadMessage(request.type, key=request.key, closer_peers=named)))

    host.set_stream_handler(PROTOCOL_ID, handler)


async def test_third_party_addresses_never_reach_the_routing_table(autojump_clock):
    async with swarm(8) as s:
        node, victim = s.nodes[0], s.nodes[5]
        liar = await s.stack.enter_async_context(s.network.open_host(key(152)))
        junk = [f"/ip4/6.6.6.{i}/tcp/666" for i in range(30)]
        lie(liar, (KadPeer.from_peer(victim.peer_id, junk),))
        await liar.connect(node.peer_id, node.host.listen_addrs())
        node.routing_table.remove(victim.peer_id)  # so only the liar's answer names it
        assert victim.peer_id in peers_of(await node.closest_peers(victim.peer_id.bytes))
        assert node.routing_table.contact(victim.peer_id).addrs == tuple(victim.host.listen_addrs())
        # and what the node tells others about the victim is the victim's own word
        stream = await s.nodes[3].host.new_stream(node.peer_id, [PROTOCOL_ID])
        async with FramedStream(stream) as framed:
            await framed.send(encode_message(KadMessage(MessageType.FIND_NODE, key=victim.peer_id.bytes)))
            answer = decode_message(await framed.receive())
        named = {peer: addrs for peer, addrs in (p.to_peer() for p in answer.closer_peers)}
        assert named[victim.peer_id] == victim.host.listen_addrs()


# ---- bounded lookups ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tarpit_swarm(config: Config) -> AsyncIterator[tuple[Swarm, KademliaDHT]]:
    """10 honest nodes and a liar that names 20 unreachable peers (frozen: every dial to
    one takes the whole request timeout)."""
    async with swarm(10, config) as s:
        tarpits = [await s.stack.enter_async_context(s.network.open_host(key(160 + i))) for i in range(20)]
        for tarpit in tarpits:
            s.network.freeze(tarpit.peer_id)
        liar = await s.stack.enter_async_context(s.network.open_host(key(159)))
        lie(liar, tuple(KadPeer.from_peer(t.peer_id, t.listen_addrs()) for t in tarpits))
        node = s.nodes[0]
        await liar.connect(node.peer_id, node.host.listen_addrs())
        yield s, node


async def test_a_lookup_ends_at_its_deadline(autojump_clock):
    config = Config(request_timeout=5.0, lookup_timeout=8.0)
    async with tarpit_swarm(config) as (s, node):
        start = trio.current_time()
        found = await node.closest_peers(b"anything")
        assert trio.current_time() - start <= config.lookup_timeout + 0.1
        assert node.stats.lookup_timeouts == 1
        assert set(peers_of(found)) >= {n.peer_id for n in s.nodes[1:]}  # what it had so far


async def test_candidates_that_failed_are_backed_off(autojump_clock):
    config = Config(request_timeout=5.0, lookup_timeout=60.0)
    async with tarpit_swarm(config) as (s, node):
        start = trio.current_time()
        await node.closest_peers(b"first")  # pays for each tarpit once: 7 rounds of 3
        assert 30 <= trio.current_time() - start <= 40
        start = trio.current_time()
        await node.closest_peers(b"second")  # the liar names them again: all left out
        assert trio.current_time() - start < 1.0
        assert node.stats.lookup_timeouts == 0


# ---- provider keys ------------------------------------------------------------------------


async def test_provider_keys_only_under_the_configured_prefixes(autojump_clock):
    async with swarm(5) as s:
        announcer, holder = s.nodes[1], s.nodes[2]
        with pytest.raises(RecordRejected):
            await announcer.provide(b"/other/x")
        me = (KadPeer.from_peer(announcer.peer_id, announcer.host.listen_addrs()),)
        stream = await announcer.host.new_stream(holder.peer_id, [PROTOCOL_ID])
        async with FramedStream(stream) as framed:
            for k in (b"/other/x", b"/modelnet/cap/x", b"/modelnet/capx"):
                await framed.send(encode_message(KadMessage(MessageType.ADD_PROVIDER, key=k, provider_peers=me)))
            await framed.send(encode_message(KadMessage(MessageType.PING)))
            assert decode_message(await framed.receive()).type == MessageType.PING
        held = {k for k in (b"/other/x", b"/modelnet/cap/x", b"/modelnet/capx") if holder.providers.providers(k, wall_clock())}
        assert held == {b"/modelnet/cap/x"}
        other = await s.add(130, Config(provider_prefixes=(b"/other/",)))
        await s.join(other)
        assert await other.provide(b"/other/y") >= 1  # told, though the others keep nothing
        assert all(not n.providers.providers(b"/other/y", wall_clock()) for n in s.nodes)


async def test_bootstrap_tries_an_unreachable_peer_again_before_giving_up(autojump_clock):
    net = MemoryNetwork()
    async with net.open_host(PrivateKey.from_seed(b"\x01" * 32)) as first, net.open_host(
        PrivateKey.from_seed(b"\x02" * 32)
    ) as joiner:
        seed_dht = KademliaDHT(first, wall_clock=wall_clock)
        joining = KademliaDHT(joiner, wall_clock=wall_clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(seed_dht.serve)
            await nursery.start(joining.serve)
            net.partition([first.peer_id], [joiner.peer_id])

            async def heal_soon():  # the path comes back while the joiner waits to try again
                await trio.sleep(0.5)
                net.heal()

            nursery.start_soon(heal_soon)
            assert await joining.bootstrap([(first.peer_id, first.listen_addrs())]) == 1
            # A peer that never comes back still fails the join, after the last try.
            net.partition([first.peer_id], [joiner.peer_id])
            with pytest.raises(BootstrapFailed):
                await KademliaDHT(joiner, wall_clock=wall_clock).bootstrap([(first.peer_id, first.listen_addrs())])
            nursery.cancel_scope.cancel()
