"""Tier 3: whole nodes (DHT, records, sessions, routing, serving) on the memory network."""

from __future__ import annotations

import logging

import pytest
import trio

from modelnet.identity import WrongKey
from modelnet.identity.records import SignedRecord
from modelnet.protocols import kad
from modelnet.identity import canonical
from modelnet.protocols.framing import FrameDecoder, encode_frame
from modelnet.models.embedded import EchoBackend, EmbeddedBackend
from modelnet.p2p.node import Config, NoProvider, RequestFailed
from modelnet.p2p.memory import MemoryNetwork
from modelnet.protocols import capability as cap
from modelnet.protocols import reason, session
from modelnet.p2p.errors import StreamClosed
from modelnet.testing import ScriptedBackend, open_memory_swarm, open_node, seeded_key, virtual_wall_clock

EMBEDDED_SETS = [
    ["vader-sentiment", "langid"],
    ["yake-keywords", "textrank-summary"],
    ["vader-sentiment", "yake-keywords"],
    ["langid", "textrank-summary"],
]


async def test_every_node_finds_and_asks_every_capability(autojump_clock):
    n = 30
    async with open_memory_swarm(
        n, backends_for=lambda i: [EmbeddedBackend(offload=False, models=EMBEDDED_SETS[i % 4])], latency=0.005
    ) as swarm:
        checks = {
            "sentiment": ("What a wonderful, happy day!", lambda out: out["label"] == "positive"),
            "language-id": ("Ceci est une phrase écrite en français.", lambda out: out["language"] == "fr"),
            "keywords": ("Kademlia routing tables hold peers. Kademlia lookups are iterative.", lambda out: any("kademlia" in k["keyword"].lower() for k in out["keywords"])),
            "summarize": ("Modelnet connects models. It uses a DHT. The sky is blue today.", lambda out: isinstance(out, str) and out),
        }
        answered = 0
        for node in swarm.nodes:
            for capability, (text, ok) in checks.items():
                answer = await node.ask(capability, text)
                assert ok(answer.output), (capability, answer.output)
                served = {m.name for m in answer_provider(swarm, answer).capability_record().models}
                assert answer.model in served
                reason.open_receipt(answer.receipt, provider=answer.provider)
                answered += 1
        assert answered == n * len(checks)


def answer_provider(swarm, answer):
    return next(node for node in swarm.nodes if node.peer_id == answer.provider)


async def test_find_returns_only_real_providers_with_verified_records(autojump_clock):
    async with open_memory_swarm(12, backends_for=lambda i: [ScriptedBackend(str(i))] if i % 3 == 0 else []) as swarm:
        providers = await swarm.nodes[5].find("echo")
        assert sorted(str(p.peer_id) for p in providers) == sorted(str(swarm.nodes[i].peer_id) for i in (0, 3, 6, 9))
        for p in providers:
            assert p.record.peer_id == p.peer_id
            assert [m.name for m in p.models] == [f"scripted-{[str(n.peer_id) for n in swarm.nodes].index(str(p.peer_id))}"]
        with pytest.raises(NoProvider):
            await swarm.nodes[5].ask("translate", "hello")


async def test_routes_to_the_lowest_latency_provider(autojump_clock):
    backends = {1: [ScriptedBackend("slow")], 2: [ScriptedBackend("fast")]}
    async with open_memory_swarm(8, backends_for=lambda i: backends.get(i, []), latency=0.002) as swarm:
        asker, slow, fast = swarm.nodes[5], swarm.nodes[1], swarm.nodes[2]
        swarm.network.set_link_latency(asker.peer_id, slow.peer_id, 0.080)
        swarm.network.set_link_latency(asker.peer_id, fast.peer_id, 0.004)
        for _ in range(5):
            answer = await asker.ask("echo", "hi")
            assert answer.output == "fast:hi"
        # Latency flips: the router follows its own measurements.
        swarm.network.set_link_latency(asker.peer_id, slow.peer_id, 0.001)
        swarm.network.set_link_latency(asker.peer_id, fast.peer_id, 0.200)
        outputs = [(await asker.ask("echo", "hi")).output for _ in range(12)]
        assert outputs[-1] == "slow:hi"


async def test_fails_over_when_a_provider_errs_before_its_first_chunk(autojump_clock):
    broken = ScriptedBackend("broken", fail=True)
    healthy = ScriptedBackend("healthy")
    backends = {1: [broken], 2: [healthy]}
    async with open_memory_swarm(6, backends_for=lambda i: backends.get(i, []), latency=0.002) as swarm:
        asker = swarm.nodes[4]
        # Make the broken provider the preferred one.
        swarm.network.set_link_latency(asker.peer_id, swarm.nodes[1].peer_id, 0.001)
        swarm.network.set_link_latency(asker.peer_id, swarm.nodes[2].peer_id, 0.050)
        answer = await asker.ask("echo", "x")
        assert answer.output == "healthy:x"
        assert broken.started == 1
        assert [peer for peer, _ in answer.attempts] == [swarm.nodes[1].peer_id]
        assert "broken" in answer.attempts[0][1]
        # The node that failed serves other askers, unharmed.
        assert (await swarm.nodes[3].ask("echo", "y")).output in {"healthy:y"}


async def test_a_crashed_provider_is_replaced(autojump_clock):
    backends = {1: [ScriptedBackend("a")], 2: [ScriptedBackend("b")]}
    config = Config(network_timeout=2.0)
    async with open_memory_swarm(8, backends_for=lambda i: backends.get(i, []), config=config, latency=0.002) as swarm:
        asker = swarm.nodes[6]
        first = await asker.ask("echo", "1")
        dead = swarm.nodes[1] if first.output.startswith("a:") else swarm.nodes[2]
        swarm.network.crash(dead.peer_id)
        answer = await asker.ask("echo", "2")
        assert answer.provider != dead.peer_id
        assert answer.output.endswith(":2")


async def test_a_frozen_provider_does_not_hold_up_a_request(autojump_clock):
    backends = {1: [ScriptedBackend("frozen")], 2: [ScriptedBackend("alive")]}
    config = Config(network_timeout=5.0)
    async with open_memory_swarm(6, backends_for=lambda i: backends.get(i, []), config=config) as swarm:
        asker = swarm.nodes[4]
        await asker.find("echo")  # both providers known, neither measured yet
        swarm.network.freeze(swarm.nodes[1].peer_id)
        # The deadline is shorter than one session timeout: only a router that does not
        # wait for the frozen provider can answer in time.
        answer = await asker.ask("echo", "now", timeout=3.0)
        assert answer.output == "alive:now"


async def test_deadline_stops_the_work_and_fails_the_request(autojump_clock):
    slow = ScriptedBackend("slow", delay=30.0)
    async with open_memory_swarm(4, backends_for=lambda i: [slow] if i == 1 else []) as swarm:
        with pytest.raises(RequestFailed):
            await swarm.nodes[2].ask("echo", "hi", timeout=3.0)
        with trio.fail_after(5):
            await slow.was_cancelled.wait()  # the provider stopped working for a gone asker


async def test_cancelling_the_asker_cancels_the_provider(autojump_clock):
    slow = ScriptedBackend("slow", delay=60.0)
    async with open_memory_swarm(4, backends_for=lambda i: [slow] if i == 1 else []) as swarm:
        with trio.move_on_after(5):
            await swarm.nodes[3].ask("echo", "hi", timeout=120)
        with trio.fail_after(5):
            await slow.was_cancelled.wait()
        assert slow.started == 1


async def test_session_grants_are_reused(autojump_clock):
    echo = ScriptedBackend("e")
    async with open_memory_swarm(5, backends_for=lambda i: [echo] if i == 1 else []) as swarm:
        asker = swarm.nodes[3]
        await asker.ask("echo", "1")
        grant = asker._grants[(swarm.nodes[1].peer_id, "echo")]
        await asker.ask("echo", "2")
        assert asker._grants[(swarm.nodes[1].peer_id, "echo")] is grant
        assert echo.started == 2


async def test_request_with_a_grant_for_another_peer_is_refused(autojump_clock):
    echo = ScriptedBackend("e")
    async with open_memory_swarm(5, backends_for=lambda i: [echo] if i == 1 else []) as swarm:
        provider, alice, mallory = swarm.nodes[1], swarm.nodes[2], swarm.nodes[3]
        await alice.ask("echo", "mine")
        stolen = alice._grants[(provider.peer_id, "echo")]
        # Mallory presents Alice's grant on her own stream.
        mallory._grants[(provider.peer_id, "echo")] = stolen
        answer = await mallory.ask("echo", "theirs")  # refused, then negotiates a grant of her own
        assert answer.output == "e:theirs"
        own = mallory._grants[(provider.peer_id, "echo")]
        assert own is not stolen and own.client == mallory.peer_id
        assert echo.started == 2  # the stolen grant served nothing


async def test_forged_capability_record_is_rejected_by_the_dht(autojump_clock):
    async with open_memory_swarm(6, backends_for=lambda i: [ScriptedBackend(str(i))] if i == 1 else []) as swarm:
        victim, attacker = swarm.nodes[1], swarm.nodes[4]
        forged = cap.CapabilityRecord(peer_id=victim.peer_id, addrs=("/memory/999",), models=())
        # CapabilityRecord.sign refuses to sign for another peer; an attacker signs by hand.
        signed = SignedRecord.sign(
            attacker.key,
            domain=cap.DOMAIN,
            type=cap.CAPABILITY_TYPE,
            payload=forged.to_payload(),
            seq=10**15,
            expires=virtual_wall_clock() + 3600,
        )
        key = cap.node_record_key(victim.peer_id)
        with pytest.raises(WrongKey):  # our own DHT refuses to store it...
            await attacker.dht.put_value(key, signed.encode())
        # ...so the attacker sends raw PUT_VALUEs to every node, bypassing its own checks.
        put = kad.encode_message(kad.KadMessage(kad.MessageType.PUT_VALUE, key=key, record=kad.KadRecord(key, signed.encode())))
        for node in swarm.nodes:
            if node is attacker:
                continue
            stream = await attacker.host.new_stream(node.peer_id, [kad.PROTOCOL_ID])
            await stream.write(encode_frame(put))
            assert await read_all(stream) == b""  # the node refuses it: no answer, the stream ends
            await stream.reset()
            stored = node.dht.records.get(key, virtual_wall_clock())
            assert stored is None or SignedRecord.decode(stored.value).signer == victim.peer_id
        # Nobody stored it: every node still sees the victim's own record and can use it.
        providers = await swarm.nodes[3].find("echo")
        assert [p.peer_id for p in providers] == [victim.peer_id]
        assert providers[0].record.addrs != ("/memory/999",)
        assert (await swarm.nodes[3].ask("echo", "ok")).output == "1:ok"


async def read_all(stream) -> bytes:
    data = b""
    with trio.fail_after(10):
        try:
            while chunk := await stream.read():
                data += chunk
        except StreamClosed:  # a reset ends it too
            pass
    return data


def only_message(data: bytes) -> dict:
    """The one framed msgpack message in ``data`` (what a provider answers to garbage)."""
    decoder = FrameDecoder()
    decoder.receive_data(data)
    message = canonical.decode(decoder.next_frame())
    assert decoder.next_frame() is None and decoder.pending_bytes == 0
    return message


JUNK = (b"\xff" * 40, b"\x05hello", b"\x00", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\x7f" + b"z" * 127)


async def test_garbage_on_every_protocol_is_refused_and_the_node_keeps_serving(autojump_clock, caplog):
    echo = ScriptedBackend("e")
    async with open_memory_swarm(4, backends_for=lambda i: [echo] if i == 1 else []) as swarm:
        provider, attacker = swarm.nodes[1], swarm.nodes[2]
        for junk in JUNK:
            # session: a typed refusal, not a crash
            stream = await attacker.host.new_stream(provider.peer_id, [session.SESSION_PROTOCOL])
            await stream.write(junk)
            refusal = only_message(await read_all(stream))
            assert refusal["kind"] == "refusal" and refusal["code"] == session.BAD_OFFER
            # reason: a typed error saying the request was malformed
            stream = await attacker.host.new_stream(provider.peer_id, [reason.REASON_PROTOCOL])
            await stream.write(junk)
            error = only_message(await read_all(stream))
            assert error["kind"] == "error" and error["code"] == reason.INVALID_INPUT
            # kad: no answer to garbage
            stream = await attacker.host.new_stream(provider.peer_id, [kad.PROTOCOL_ID])
            await stream.write(junk)
            assert await read_all(stream) == b""
        assert echo.started == 0
        assert (await swarm.nodes[3].ask("echo", "still here")).output == "e:still here"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_republished_records_outlive_their_ttl(autojump_clock):
    config = Config(record_ttl=600, republish_interval=200)
    echo = ScriptedBackend("e")
    async with open_memory_swarm(6, backends_for=lambda i: [echo] if i == 1 else [], config=config) as swarm:
        await trio.sleep(3 * 3600)  # virtual hours: the first record expired long ago
        answer = await swarm.nodes[4].ask("echo", "later")
        assert answer.output == "e:later"


async def test_invalid_input_is_reported_once_not_failed_over(autojump_clock):
    async with open_memory_swarm(
        5, backends_for=lambda i: [EmbeddedBackend(offload=False, models=["yake-keywords"])] if i in (1, 2) else []
    ) as swarm:
        with pytest.raises(RequestFailed) as failed:
            await swarm.nodes[4].ask("keywords", "some text about peers", {"top": 500})
        assert failed.value.code == reason.INVALID_INPUT
        assert len(failed.value.errors) == 1  # the second provider was not bothered
        assert "top" in str(failed.value)
        # and the provider is not held against it: it is neither failed nor banned.
        [(peer, _)] = failed.value.errors
        assert swarm.nodes[4].stats[peer].failures == 0
        answer = await swarm.nodes[4].ask("keywords", "some text about peers", {"top": 2})
        assert len(answer.output["keywords"]) == 2


async def test_an_asker_that_half_closes_after_its_request_still_gets_the_answer(autojump_clock):
    echo = ScriptedBackend("e", delay=1.0)
    async with open_memory_swarm(4, backends_for=lambda i: [echo] if i == 1 else []) as swarm:
        provider, asker = swarm.nodes[1], swarm.nodes[2]
        grant = await asker._grant_for(provider.peer_id, "echo")
        request = reason.Request(
            request_id=bytes(16),
            capability="echo",
            input="hi",
            params={},
            budget=30.0,
            hop_limit=4,
            visited=(asker.peer_id,),
            grant=grant.encode(),
        )
        client = reason.ReasonClient(provider=provider.peer_id)
        stream = await asker.host.new_stream(provider.peer_id, [reason.REASON_PROTOCOL])
        await stream.write(client.send_request(request))
        await stream.close()  # what many libp2p request/response clients do
        client.receive_data(await read_all(stream))
        events = []
        while (event := client.next_event()) is not None:
            events.append(event)
        assert [type(e) for e in events] == [reason.Chunk, reason.Result]
        assert events[-1].output == "e:hi"
        assert not echo.was_cancelled.is_set()


async def test_a_provider_at_its_per_peer_limit_refuses_and_is_not_banned(autojump_clock):
    slow = ScriptedBackend("slow", delay=10.0)
    config = Config(max_requests_per_peer=1)
    async with open_memory_swarm(4, backends_for=lambda i: [slow] if i == 1 else [], config=config) as swarm:
        provider, asker = swarm.nodes[1], swarm.nodes[2]
        outcomes = []

        async def ask() -> None:
            try:
                outcomes.append((await asker.ask("echo", "x")).output)
            except RequestFailed as exc:
                outcomes.append(exc.errors[0][1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            nursery.start_soon(ask)
        assert len(outcomes) == 2 and "slow:x" in outcomes  # one served...
        assert any(o.startswith("overloaded") for o in outcomes if o != "slow:x")  # ...one refused as busy
        stats = asker.stats[provider.peer_id]
        assert stats.failures == 0 and not stats.banned(trio.current_time())
        # refused as busy (load 1.0), then the served request's result reported the queue empty again
        assert stats.load == 0.0
