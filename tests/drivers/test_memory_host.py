"""The in-memory network: the Host contract, virtual-time latency, and failure injection."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import pytest
import trio

from modelnet.identity import PrivateKey
from modelnet.p2p.errors import DialError, HostClosed, P2PError, ProtocolNotSupported, StreamClosed, StreamReset
from modelnet.p2p.host import PeerInfo, Stream
from modelnet.p2p.memory import DIAL_TIMEOUT, MemoryNetwork

from . import ECHO, Recorder, check_eof_and_reset, echo, read_all, request


def key(i: int) -> PrivateKey:
    return PrivateKey.from_seed(bytes([i + 1]) * 32)


async def open_hosts(stack: AsyncExitStack, net: MemoryNetwork, n: int):
    hosts = [await stack.enter_async_context(net.open_host(key(i))) for i in range(n)]
    for host in hosts:
        host.set_stream_handler(ECHO, echo)
    return hosts


async def test_streams_both_ways():
    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        with pytest.raises(DialError, match="no known address"):
            await a.new_stream(b.peer_id, [ECHO])
        a.add_addrs(b.peer_id, b.listen_addrs())
        assert await request(a, b.peer_id, b"from a") == b"from a"
        # b learned a's address from the connection, so it can dial back
        assert b.peer_addrs(a.peer_id) == a.listen_addrs()
        assert await request(b, a.peer_id, b"from b") == b"from b"
        assert set(a.connected_peers()) == {b.peer_id}
        assert set(b.connected_peers()) == {a.peer_id}


async def test_cannot_dial_itself():
    net = MemoryNetwork()
    async with net.open_host(key(0)) as a:
        with pytest.raises(DialError):
            await a.connect(a.peer_id, a.listen_addrs())


async def test_many_concurrent_streams():
    net = MemoryNetwork(latency=0.01, jitter=0.005, seed=3)
    results: dict[int, bytes] = {}
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        await a.connect(b.peer_id, b.listen_addrs())

        async def one(i: int) -> None:
            results[i] = await request(a, b.peer_id, f"payload {i} ".encode() * (i + 1))

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
    assert results == {i: f"payload {i} ".encode() * (i + 1) for i in range(100)}
    assert net.stats.streams == 100
    assert net.stats.bytes > 0


async def test_latency_costs_virtual_time(autojump_clock):
    net = MemoryNetwork(latency=0.05)
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        start = trio.current_time()
        await a.connect(b.peer_id, b.listen_addrs())
        assert trio.current_time() - start == pytest.approx(0.1)  # one round trip

        start = trio.current_time()
        stream = await a.new_stream(b.peer_id, [ECHO])
        assert trio.current_time() - start == pytest.approx(0.1)  # one round trip of negotiation

        start = trio.current_time()
        await stream.write(b"ping")
        assert await stream.read() == b"ping"
        assert trio.current_time() - start == pytest.approx(0.1)

        c = await stack.enter_async_context(net.open_host(key(2)))
        c.set_stream_handler(ECHO, echo)
        net.set_link_latency(a.peer_id, c.peer_id, 0.2)
        a.add_addrs(c.peer_id, c.listen_addrs())
        start = trio.current_time()
        stream = await a.new_stream(c.peer_id, [ECHO])  # connect + negotiate over the slow link
        assert trio.current_time() - start == pytest.approx(0.8)
        await stream.reset()


async def test_unknown_protocol_after_one_round_trip(autojump_clock):
    net = MemoryNetwork(latency=0.03)
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        await a.connect(b.peer_id, b.listen_addrs())
        start = trio.current_time()
        with pytest.raises(ProtocolNotSupported):
            await a.new_stream(b.peer_id, ["/nope/1", "/nope/2"])
        assert trio.current_time() - start == pytest.approx(0.06)
        # the first supported protocol in the caller's order wins
        stream = await a.new_stream(b.peer_id, ["/nope/1", ECHO])
        assert stream.protocol == ECHO
        await stream.reset()


async def test_order_preserved_under_jitter(autojump_clock):
    net = MemoryNetwork(latency=0.01, jitter=0.05, seed=11)
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        a.add_addrs(b.peer_id, b.listen_addrs())
        stream = await a.new_stream(b.peer_id, [ECHO])
        chunks = [bytes([i]) * (i % 7 + 1) for i in range(200)]
        for chunk in chunks:
            await stream.write(chunk)
        await stream.close()
        assert await read_all(stream) == b"".join(chunks)


async def test_read_splits_at_max_bytes():
    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        a.add_addrs(b.peer_id, b.listen_addrs())
        stream = await a.new_stream(b.peer_id, [ECHO])
        await stream.write(b"abcdefgh")
        await stream.close()
        parts = []
        while data := await stream.read(3):
            assert len(data) <= 3
            parts.append(data)
        assert b"".join(parts) == b"abcdefgh"
        assert await stream.read() == b""  # EOF stays EOF
        with pytest.raises(StreamClosed):
            await stream.write(b"late")


async def test_peer_listener_contents():
    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        b.set_stream_handler("/other/1", echo)
        seen_a, seen_b = Recorder(), Recorder()
        a.add_peer_listener(seen_a.on_peer, seen_a.on_disconnect)
        b.add_peer_listener(seen_b.on_peer, seen_b.on_disconnect)
        await a.connect(b.peer_id, b.listen_addrs())
        assert seen_a.peers == [PeerInfo(b.peer_id, tuple(b.listen_addrs()), frozenset({ECHO, "/other/1"}))]
        assert seen_b.peers == [PeerInfo(a.peer_id, tuple(a.listen_addrs()), frozenset({ECHO}))]
        await a.connect(b.peer_id)  # reused: no second event
        assert len(seen_a.peers) == 1 and len(seen_b.peers) == 1
        await a.disconnect(b.peer_id)
        assert seen_a.gone == [b.peer_id]
        assert seen_b.gone == [a.peer_id]
        assert a.connected_peers() == [] and b.connected_peers() == []


async def test_wrong_or_unknown_address_is_a_dial_error():
    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        a, b, c = await open_hosts(stack, net, 3)
        with pytest.raises(DialError, match="answered as"):
            await a.connect(b.peer_id, c.listen_addrs())  # c answers, but it is not b
        with pytest.raises(DialError, match="refused"):
            await a.connect(b.peer_id, ["/memory/999"])
        with pytest.raises(DialError):
            await a.connect(b.peer_id, ["/ip4/127.0.0.1/tcp/1"])
        assert a.connected_peers() == []
        # a bad address first, then a good one: the good one is used and moved to the front
        await a.connect(b.peer_id, ["/memory/999", *b.listen_addrs()])
        assert a.peer_addrs(b.peer_id)[0] == b.listen_addrs()[0]


async def test_handler_exception_does_not_kill_the_host(caplog):
    async def broken(stream: Stream) -> None:
        await stream.read()
        raise RuntimeError("boom")

    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        b.set_stream_handler("/broken/1", broken)
        a.add_addrs(b.peer_id, b.listen_addrs())
        with caplog.at_level(logging.ERROR, logger="modelnet.p2p"):
            stream = await a.new_stream(b.peer_id, ["/broken/1"])
            await stream.write(b"x")
            with pytest.raises(StreamReset):  # reset by the wrapper
                await stream.read()
            with pytest.raises(StreamReset):
                await stream.write(b"y")
        failures = [r for r in caplog.records if r.name.startswith("modelnet.p2p") and r.exc_info]
        assert any("boom" in str(r.exc_info[1]) for r in failures)
        assert await request(a, b.peer_id, b"still alive") == b"still alive"


async def test_handler_return_closes_the_stream():
    async def greet(stream: Stream) -> None:
        await stream.write(b"hi")

    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        b.set_stream_handler("/greet/1", greet)
        a.add_addrs(b.peer_id, b.listen_addrs())
        stream = await a.new_stream(b.peer_id, ["/greet/1"])
        assert await read_all(stream) == b"hi"
        await a.disconnect(b.peer_id)
        assert await stream.read() == b""  # a clean end, once read, stays one
        with pytest.raises(StreamReset):  # but our side was still open: the drop reset it
            await stream.write(b"late")


async def test_partition_and_heal(autojump_clock):
    net = MemoryNetwork(latency=0.01)
    async with AsyncExitStack() as stack:
        a, b, c = await open_hosts(stack, net, 3)
        seen = Recorder()
        a.add_peer_listener(seen.on_peer, seen.on_disconnect)
        for other in (b, c):
            await a.connect(other.peer_id, other.listen_addrs())
        stream = await a.new_stream(b.peer_id, [ECHO])

        net.partition([a.peer_id, c.peer_id], [b.peer_id])
        with pytest.raises(StreamReset):  # the cross-partition stream was reset
            await stream.read()
        with pytest.raises(StreamReset):
            await stream.write(b"x")
        assert seen.gone == [b.peer_id]
        with pytest.raises(DialError, match="partition"):
            await a.connect(b.peer_id)
        assert await request(a, c.peer_id, b"same side") == b"same side"

        net.heal()
        assert await request(a, b.peer_id, b"healed") == b"healed"


async def test_unlisted_peers_form_their_own_group():
    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        a, b, c = await open_hosts(stack, net, 3)
        net.partition([a.peer_id])
        with pytest.raises(DialError):
            await b.connect(a.peer_id, a.listen_addrs())
        b.add_addrs(c.peer_id, c.listen_addrs())
        assert await request(b, c.peer_id, b"ok") == b"ok"


async def test_crash_resets_streams_and_makes_peer_unreachable(autojump_clock):
    handler_started = trio.Event()
    handler_cancelled = trio.Event()

    async def stuck(stream: Stream) -> None:
        handler_started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            handler_cancelled.set()
            raise

    net = MemoryNetwork(latency=0.01)
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        b.set_stream_handler("/stuck/1", stuck)
        seen = Recorder()
        a.add_peer_listener(seen.on_peer, seen.on_disconnect)
        a.add_addrs(b.peer_id, b.listen_addrs())
        echo_stream = await a.new_stream(b.peer_id, [ECHO])
        stuck_stream = await a.new_stream(b.peer_id, ["/stuck/1"])
        await handler_started.wait()

        net.crash(b.peer_id)
        with pytest.raises(StreamReset):
            await echo_stream.read()
        with pytest.raises(StreamReset):
            await stuck_stream.read()
        with pytest.raises(StreamReset):
            await echo_stream.write(b"x")
        await handler_cancelled.wait()
        assert seen.gone == [b.peer_id]
        assert b.peer_id not in net.hosts
        with pytest.raises(DialError):
            await a.connect(b.peer_id)
        with pytest.raises(HostClosed):
            await b.new_stream(a.peer_id, [ECHO])

        # the same key can come back (a restart) at a new address
        b2 = await stack.enter_async_context(net.open_host(key(1)))
        b2.set_stream_handler(ECHO, echo)
        assert b2.listen_addrs() != b.listen_addrs()
        a.add_addrs(b2.peer_id, b2.listen_addrs())
        assert await request(a, b2.peer_id, b"again") == b"again"


async def test_freeze_makes_the_callers_deadline_fire(autojump_clock):
    net = MemoryNetwork(latency=0.01)
    async with AsyncExitStack() as stack:
        a, b, c = await open_hosts(stack, net, 3)
        seen = Recorder()
        a.add_peer_listener(seen.on_peer, seen.on_disconnect)
        a.add_addrs(b.peer_id, b.listen_addrs())
        stream = await a.new_stream(b.peer_id, [ECHO])
        net.freeze(b.peer_id)

        await stream.write(b"into the void")
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(1):
                await stream.read()
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(1):
                await a.new_stream(b.peer_id, [ECHO])
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(1):
                await c.connect(b.peer_id, b.listen_addrs())
        assert seen.gone == []  # half-open: nobody is told
        # without a deadline the host's own bound ends the dial eventually
        start = trio.current_time()
        with pytest.raises(DialError):
            await c.connect(b.peer_id, b.listen_addrs())
        assert trio.current_time() - start == pytest.approx(DIAL_TIMEOUT)
        assert net.stats.dropped_bytes >= len(b"into the void")


async def _loss_pattern(seed: int) -> list[bool]:
    net = MemoryNetwork(latency=0.01, loss=0.5, seed=seed)
    pattern = []
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        a.add_addrs(b.peer_id, b.listen_addrs())
        for i in range(24):
            with trio.move_on_after(1) as scope:
                answer = await request(a, b.peer_id, b"x%d" % i)
                assert answer == b"x%d" % i
            pattern.append(scope.cancelled_caught)
    assert net.stats.lost_streams == sum(pattern)
    return pattern


async def test_loss_is_deterministic_with_a_seed(autojump_clock):
    first = await _loss_pattern(seed=5)
    assert first == await _loss_pattern(seed=5)
    assert 0 < sum(first) < len(first)
    assert first != await _loss_pattern(seed=6)


async def test_closing_a_host(autojump_clock):
    handler_cancelled = trio.Event()

    async def stuck(stream: Stream) -> None:
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()

    net = MemoryNetwork(latency=0.01)
    async with AsyncExitStack() as stack:
        (a,) = await open_hosts(stack, net, 1)
        seen = Recorder()
        a.add_peer_listener(seen.on_peer, seen.on_disconnect)
        async with net.open_host(key(1)) as b:
            b.set_stream_handler("/stuck/1", stuck)
            a.add_addrs(b.peer_id, b.listen_addrs())
            stream = await a.new_stream(b.peer_id, ["/stuck/1"])
            assert b.peer_id in net.hosts
        assert handler_cancelled.is_set()
        assert b.peer_id not in net.hosts
        assert seen.gone == [b.peer_id]
        with pytest.raises(StreamReset):  # the host went away: not a clean end
            await stream.read()
        with pytest.raises(DialError):
            await a.connect(b.peer_id)
        with pytest.raises(HostClosed):
            await b.connect(a.peer_id, a.listen_addrs())


async def test_one_key_one_live_host():
    net = MemoryNetwork()
    async with net.open_host(key(0)):
        with pytest.raises(P2PError):
            async with net.open_host(key(0)):
                pass


async def test_listener_failure_is_contained(caplog):
    def bad_listener(info: PeerInfo) -> None:
        raise ValueError("listener bug")

    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        seen = Recorder()
        a.add_peer_listener(bad_listener)
        a.add_peer_listener(seen.on_peer, seen.on_disconnect)
        with caplog.at_level(logging.ERROR, logger="modelnet.p2p"):
            await a.connect(b.peer_id, b.listen_addrs())
        assert [info.peer_id for info in seen.peers] == [b.peer_id]
        assert any("listener" in r.getMessage() for r in caplog.records)


async def test_many_hosts_stay_small():
    """A host costs little memory, so the 10,000-node simulation fits in one process."""
    import tracemalloc

    net = MemoryNetwork()
    keys = [PrivateKey.from_seed(i.to_bytes(32, "big")) for i in range(1, 501)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        async with AsyncExitStack() as stack:
            for k in keys:
                await stack.enter_async_context(net.open_host(k))
            per_host = (tracemalloc.get_traced_memory()[0] - before) / len(keys)
            assert len(net.hosts) == len(keys)
    finally:
        tracemalloc.stop()
    assert per_host < 16_000, per_host


async def test_errors_in_the_body_come_out_unwrapped():
    net = MemoryNetwork()
    with pytest.raises(KeyError):
        async with net.open_host(key(0)):
            raise KeyError("body")
    assert key(0).peer_id not in net.hosts


async def test_eof_and_reset_are_told_apart(autojump_clock):
    net = MemoryNetwork(latency=0.01)
    async with AsyncExitStack() as stack:
        a, b = await open_hosts(stack, net, 2)
        await check_eof_and_reset(a, b)


async def test_dials_keep_the_address_book(autojump_clock):
    """Both hosts run the same dial loop: a hearsay address that fails is forgotten, the
    peer's own address that fails goes last, the one that works goes first."""
    net = MemoryNetwork(latency=0.01)
    async with AsyncExitStack() as stack:
        a, b, c = await open_hosts(stack, net, 3)
        a.add_addrs(b.peer_id, ["/memory/999", *c.listen_addrs()])  # hearsay, wrong
        with pytest.raises(DialError, match="refused.*answered as"):
            await a.connect(b.peer_id)
        assert a.peer_addrs(b.peer_id) == []
        assert net.stats.dials == 2

        await a.connect(b.peer_id, b.listen_addrs())
        await a.disconnect(b.peer_id)
        a.add_addrs(b.peer_id, ["/memory/998"])
        assert a.peer_addrs(b.peer_id) == [*b.listen_addrs(), "/memory/998"]
        net.partition([b.peer_id])
        with pytest.raises(DialError, match="partitioned"):
            await a.connect(b.peer_id)
        # b's own address is kept for later, at the end; the hearsay one is gone
        assert a.peer_addrs(b.peer_id) == b.listen_addrs()
        net.heal()
        await a.connect(b.peer_id)
