"""Tier 3: circuit relay v2 on the memory network -- a provider behind NAT is found and
answers through a relay; the relay's limits hold; a dead relay fails requests clearly.
(The circuit message codec's property tests are here too: they belong to the feature.)"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import AsyncIterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.p2p import relay
from modelnet.p2p.errors import DialError
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.node import Config, RequestFailed
from modelnet.protocols import relay as wire
from modelnet.protocols.errors import ModelNetError, RemoteProtocolError
from modelnet.testing import ScriptedBackend, open_node, seeded_key, virtual_wall_clock

LINK = 0.005


@contextlib.asynccontextmanager
async def nat_setup(
    limits: relay.ServiceConfig = relay.ServiceConfig(), backend: ScriptedBackend | None = None
) -> AsyncIterator[tuple]:
    """relay R (also the DHT bootstrap), provider P behind NAT reserving on R, asker A."""
    network = MemoryNetwork(latency=LINK)
    backend = backend or ScriptedBackend("p", chunks=2)
    async with contextlib.AsyncExitStack() as stack:

        async def start(i, backends=(), config=Config(), bootstrap=(), dialable=True):
            factory = functools.partial(network.open_host, dialable=dialable)
            return await stack.enter_async_context(
                open_node(factory, seeded_key(i), backends, config, bootstrap=bootstrap, wall_clock=virtual_wall_clock)
            )

        r = await start(0, config=Config(relay_service=True, relay_limits=limits))
        p = await start(1, [backend], Config(relays=tuple(r.addrs)), r.addrs, dialable=False)
        a = await start(2, config=Config(request_timeout=20.0), bootstrap=r.addrs)
        yield network, r, p, a


async def test_a_provider_behind_nat_is_found_and_answers_through_the_relay(autojump_clock):
    async with nat_setup() as (network, r, p, a):
        # P cannot be dialled: its only addresses are circuits through R, and its record says so
        with pytest.raises(DialError):
            await a.host.connect(p.peer_id, [p.host.address])
        circuit = f"{r.host.address}/p2p/{r.peer_id}/p2p-circuit"
        assert p.host.listen_addrs() == [circuit]
        [found] = await a.find("echo")
        assert found.peer_id == p.peer_id and found.addrs == (circuit,)

        streamed: list[str] = []
        answer = await a.ask("echo", "hello", on_chunk=lambda peer, text: streamed.append(text))
        assert answer.output == "p:hello" and streamed == ["p-0", "p-1"]
        assert answer.provider == p.peer_id
        answer.verify(a.peer_id)  # the receipt is P's own, end to end
        stats = r.relay_service.stats
        assert stats.circuits == 1 and stats.relayed_bytes > len("p:hello")
        # the connection is reused: a second request opens no second circuit
        await a.ask("echo", "again")
        assert stats.circuits == 1


async def test_the_relay_refuses_circuits_to_peers_without_a_reservation(autojump_clock):
    async with nat_setup() as (network, r, p, a):
        stranger = seeded_key(7).peer_id
        addr = relay.circuit_address(r.host.address, r.peer_id)
        with pytest.raises(relay.CircuitFailed) as caught:
            await relay.open_circuit(a.host, addr, stranger)
        assert caught.value.status is wire.Status.NO_RESERVATION
        assert "NO_RESERVATION" in str(caught.value)


async def test_reservations_are_bounded_and_dropped_on_disconnect(autojump_clock):
    limits = relay.ServiceConfig(max_reservations=1)
    async with nat_setup(limits) as (network, r, p, a):
        assert r.relay_service.reservations == [p.peer_id]
        with pytest.raises(relay.RelayError) as caught:
            await relay.reserve(a.host, r.peer_id)
        assert caught.value.status is wire.Status.RESERVATION_REFUSED
        # P refreshes its own slot: the bound counts peers, not requests
        await relay.reserve(p.host, r.peer_id)
        await r.host.disconnect(p.peer_id)
        assert r.relay_service.reservations == []
        reservation = await relay.reserve(a.host, r.peer_id)  # the freed slot
        assert reservation.relay == r.peer_id
        assert reservation.addrs == (f"{r.host.address}/p2p/{r.peer_id}",)


async def test_a_circuit_over_its_data_limit_is_reset(autojump_clock):
    async with nat_setup(relay.ServiceConfig(circuit_data=6000)) as (network, r, p, a):
        await a.ask("echo", "small")  # under the limit: fine
        with pytest.raises(RequestFailed):
            await a.ask("echo", "x" * 10_000)
        assert r.relay_service.stats.limited == 1


async def test_a_circuit_past_its_duration_is_reset(autojump_clock):
    slow = ScriptedBackend("p", delay=5.0)
    async with nat_setup(relay.ServiceConfig(circuit_duration=2), slow) as (network, r, p, a):
        with pytest.raises(RequestFailed):
            await a.ask("echo", "x")
        assert r.relay_service.stats.limited == 1
        assert slow.was_cancelled.is_set()  # the reset reached the model: it stopped


async def test_circuits_per_peer_are_bounded(autojump_clock):
    async with nat_setup(relay.ServiceConfig(max_circuits_per_peer=1)) as (network, r, p, a):
        await a.ask("echo", "one")  # A <-> P holds the one circuit P may have
        addr = relay.circuit_address(r.host.address, r.peer_id)
        with pytest.raises(relay.CircuitFailed) as caught:
            await relay.open_circuit(a.host, addr, p.peer_id)
        assert caught.value.status is wire.Status.RESOURCE_LIMIT_EXCEEDED


async def test_a_dead_relay_makes_the_provider_unreachable_with_a_clear_error(autojump_clock):
    async with nat_setup() as (network, r, p, a):
        await a.find("echo")  # A knows P and its circuit address
        network.crash(r.peer_id)
        with pytest.raises(RequestFailed) as caught:
            await a.ask("echo", "anyone?")
        assert "unreachable" in str(caught.value.errors) or "unreachable" in str(caught.value)
        assert trio.current_time() < 20.0  # failed fast, not at the request's deadline


async def test_a_relay_that_drops_an_open_circuit_resets_the_request(autojump_clock):
    slow = ScriptedBackend("p", delay=1.0)
    async with nat_setup(backend=slow) as (network, r, p, a):
        async with trio.open_nursery() as nursery:
            failure: list[BaseException] = []

            async def ask():
                try:
                    await a.ask("echo", "x")
                except RequestFailed as exc:
                    failure.append(exc)

            nursery.start_soon(ask)
            await trio.sleep(0.5)  # virtual: the model is running by then
            network.crash(r.peer_id)
        assert failure and slow.was_cancelled.is_set()


async def test_only_a_relay_we_reserved_on_may_open_circuits_to_us(autojump_clock):
    async with nat_setup() as (network, r, p, a):
        await a.host.connect(p.peer_id, p.host.listen_addrs())  # through R: A is connected to P
        stream = await a.host.new_stream(p.peer_id, [wire.STOP_PROTOCOL])
        await relay.write_message(stream, wire.encode_stop(wire.StopMessage(wire.StopType.CONNECT, peer=wire.Peer(a.peer_id))))
        answer = wire.decode_stop(await relay.read_message(stream))
        assert answer.status is wire.Status.PERMISSION_DENIED


async def test_a_provider_reserves_again_when_the_relay_drops_it(autojump_clock):
    async with nat_setup() as (network, r, p, a):
        circuit = p.host.listen_addrs()
        await r.host.disconnect(p.peer_id)
        assert r.relay_service.reservations == []
        await trio.sleep(2 * relay.RETRY_MIN)  # virtual time: P notices, waits, reserves again
        assert r.relay_service.reservations == [p.peer_id] and r.relay_service.stats.reservations == 2
        assert p.host.listen_addrs() == circuit
        assert (await a.ask("echo", "back")).provider == p.peer_id


# ---- the wire codec ---------------------------------------------------------------------

peers = st.builds(lambda i: wire.Peer(seeded_key(i).peer_id, (f"/ip4/10.0.0.{i % 250}/tcp/4001",)), st.integers(0, 50))
limits = st.builds(wire.Limit, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
statuses = st.sampled_from(list(wire.Status))


@settings(max_examples=200)
@given(
    st.sampled_from(list(wire.HopType)),
    st.none() | peers,
    st.none() | st.builds(wire.Reservation, st.integers(0, 2**64 - 1), st.just(("/ip4/1.2.3.4/tcp/1",)), st.binary(max_size=40)),
    st.none() | limits,
    statuses,
)
def test_hop_messages_round_trip(kind, peer, reservation, limit, status):
    if kind is wire.HopType.CONNECT and peer is None:
        peer = wire.Peer(seeded_key(1).peer_id)
    msg = wire.HopMessage(kind, peer, reservation, limit, status)
    assert wire.decode_hop(wire.encode_hop(msg)) == msg


@settings(max_examples=200)
@given(st.sampled_from(list(wire.StopType)), peers, st.none() | limits, statuses)
def test_stop_messages_round_trip(kind, peer, limit, status):
    msg = wire.StopMessage(kind, peer, limit, status)
    assert wire.decode_stop(wire.encode_stop(msg)) == msg


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_message_or_a_typed_error(data):
    for decode in (wire.decode_hop, wire.decode_stop):
        try:
            decode(data)
        except ModelNetError:
            pass


def test_the_codec_matches_the_spec_protobuf():
    """Byte-compatible with py-libp2p's generated circuit_pb2 (the spec's schema), both ways."""
    from libp2p.relay.circuit_v2.pb import circuit_pb2 as pb

    reserve = wire.encode_hop(wire.HopMessage(wire.HopType.RESERVE))
    parsed = pb.HopMessage.FromString(reserve)
    assert parsed.HasField("type") and parsed.type == pb.HopMessage.RESERVE  # type 0 is on the wire
    target = seeded_key(3).peer_id
    theirs = pb.HopMessage(type=pb.HopMessage.CONNECT, peer=pb.PeerId(id=target.bytes)).SerializeToString()
    assert wire.decode_hop(theirs) == wire.HopMessage(wire.HopType.CONNECT, peer=wire.Peer(target))
    ok = pb.StopMessage(type=pb.StopMessage.STATUS, status=pb.OK, limit=pb.Limit(duration=120, data=1 << 17))
    assert wire.decode_stop(ok.SerializeToString()) == wire.StopMessage(
        wire.StopType.STATUS, limit=wire.Limit(120, 1 << 17), status=wire.Status.OK
    )
    mine = wire.encode_hop(
        wire.HopMessage(wire.HopType.STATUS, reservation=wire.Reservation(99, ("/ip4/1.2.3.4/tcp/1",)), status=wire.Status.OK)
    )
    assert pb.HopMessage.FromString(mine).reservation.expire == 99


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no type
        wire.encode_hop(wire.HopMessage(wire.HopType.STATUS, status=wire.Status.OK))[:2],  # a STATUS without its status
        bytes([0x08, 0x07]),  # an unknown hop type
        bytes([0x08, 0x01]),  # CONNECT without a peer
    ],
)
def test_malformed_hop_messages_are_remote_errors(data):
    with pytest.raises(RemoteProtocolError):
        wire.decode_hop(data)
