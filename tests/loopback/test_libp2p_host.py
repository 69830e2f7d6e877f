"""The libp2p host on 127.0.0.1: real TCP + Noise + Yamux, identify, error translation."""

from __future__ import annotations

import logging
import socket
from contextlib import AsyncExitStack
from functools import partial

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from modelnet.identity import PrivateKey
from modelnet.p2p.errors import BadAddress, DialError, ProtocolNotSupported, StreamReset
from modelnet.p2p.host import Host, Stream
from modelnet.p2p.libp2p_host import open_libp2p_host
from modelnet.p2p.streams import FramedStream
from modelnet.protocols.framing import encode_uvarint

from ..drivers import ECHO, Recorder, check_eof_and_reset, echo, read_all, request

pytestmark = pytest.mark.loopback

IDENTIFY = "/ipfs/id/1.0.0"


def key(i: int) -> PrivateKey:
    return PrivateKey.from_seed(bytes([0x40 + i]) * 32)


async def open_hosts(stack: AsyncExitStack, n: int, first: int = 0):
    hosts = []
    for i in range(first, first + n):
        host = await stack.enter_async_context(open_libp2p_host(key(i)))
        host.set_stream_handler(ECHO, echo)
        hosts.append(host)
    return hosts


def delimited(message: bytes) -> bytes:
    return encode_uvarint(len(message)) + message


async def raw_stream(a: Host, b: Host) -> INetStream:
    """A libp2p stream from ``a`` to ``b`` below our negotiation: the test speaks it."""
    await a.connect(b.peer_id, b.listen_addrs())
    return await a._network.new_stream(ID(b.peer_id.bytes))


def tcp_port(addr: str) -> int:
    parts = addr.split("/")
    return int(parts[parts.index("tcp") + 1])


async def test_listen_reports_the_bound_port_and_our_peer_id():
    with trio.fail_after(10):
        async with open_libp2p_host(key(0)) as host:
            (addr,) = host.listen_addrs()
            assert addr.startswith("/ip4/127.0.0.1/tcp/")
            assert tcp_port(addr) != 0
            assert "/p2p/" not in addr
            assert host.peer_id == key(0).peer_id


async def test_a_wildcard_listen_address_is_advertised_as_dialable_ones():
    with trio.fail_after(15):
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(open_libp2p_host(key(0), ["/ip4/0.0.0.0/tcp/0"]))
            b = await stack.enter_async_context(open_libp2p_host(key(1)))
            addrs = a.listen_addrs()
            assert not any("0.0.0.0" in addr for addr in addrs)
            port = tcp_port(addrs[0])
            assert port != 0 and all(tcp_port(addr) == port for addr in addrs)
            assert addrs[-1] == f"/ip4/127.0.0.1/tcp/{port}"
            seen = Recorder()
            b.add_peer_listener(seen.on_peer)
            await b.connect(a.peer_id, addrs[-1:])
            await seen.wait_for(lambda: seen.info(a.peer_id) is not None)
            assert seen.info(a.peer_id).addrs == tuple(addrs)  # identify says the same


async def test_two_hosts_streams_both_ways_and_identify():
    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            a, b = await open_hosts(stack, 2)
            b.set_stream_handler("/test/other/1", echo)
            seen_a, seen_b = Recorder(), Recorder()
            a.add_peer_listener(seen_a.on_peer, seen_a.on_disconnect)
            b.add_peer_listener(seen_b.on_peer, seen_b.on_disconnect)

            await a.connect(b.peer_id, b.listen_addrs())
            assert b.peer_id in a.connected_peers()
            assert await request(a, b.peer_id, b"from a") == b"from a"

            # identify ran both ways: each side knows the other's listen address and protocols
            await seen_a.wait_for(lambda: seen_a.info(b.peer_id) is not None)
            await seen_b.wait_for(lambda: seen_b.info(a.peer_id) is not None)
            info_b = seen_a.info(b.peer_id)
            assert info_b.addrs == tuple(b.listen_addrs())
            assert {ECHO, "/test/other/1", IDENTIFY} <= info_b.protocols
            info_a = seen_b.info(a.peer_id)
            assert info_a.addrs == tuple(a.listen_addrs())
            assert ECHO in info_a.protocols and "/test/other/1" not in info_a.protocols

            # b dials back over the connection a opened, knowing a's address from identify
            assert b.peer_addrs(a.peer_id) == a.listen_addrs()
            assert await request(b, a.peer_id, b"from b") == b"from b"

            big = bytes(range(256)) * 2000
            assert await request(a, b.peer_id, big) == big

            await a.disconnect(b.peer_id)
            await seen_a.wait_for(lambda: seen_a.gone == [b.peer_id])
            await seen_b.wait_for(lambda: seen_b.gone == [a.peer_id])


async def test_three_hosts_concurrent_streams_and_framing():
    async def reverse(stream: Stream) -> None:
        async with FramedStream(stream) as framed:
            while (frame := await framed.receive()) is not None:
                await framed.send(frame[::-1])

    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            hosts = await open_hosts(stack, 3)
            seen = []
            for host in hosts:
                host.set_stream_handler("/test/rev/1", reverse)
                seen.append(Recorder())
                host.add_peer_listener(seen[-1].on_peer)
            results = {}

            async def one(i: int, j: int, n: int) -> None:
                src, dst = hosts[i], hosts[j]
                framed = FramedStream(await src.new_stream(dst.peer_id, ["/test/rev/1"]))
                async with framed:
                    payload = f"{i}->{j} #{n}".encode() * (n + 1)
                    await framed.send(payload)
                    results[(i, j, n)] = await framed.receive() == payload[::-1]

            for i, src in enumerate(hosts):
                for j, dst in enumerate(hosts):
                    if i != j:
                        src.add_addrs(dst.peer_id, dst.listen_addrs())
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    for j in range(3):
                        if i != j:
                            for n in range(5):
                                nursery.start_soon(one, i, j, n)
            assert len(results) == 30 and all(results.values())
            for host, recorder in zip(hosts, seen):
                assert len(host.connected_peers()) == 2
                others = [h for h in hosts if h is not host]
                await recorder.wait_for(lambda: all(recorder.info(o.peer_id) for o in others))
                for other in others:
                    info = recorder.info(other.peer_id)
                    assert info.addrs == tuple(other.listen_addrs())
                    assert {ECHO, "/test/rev/1"} <= info.protocols


async def test_unknown_protocol():
    with trio.fail_after(10):
        async with AsyncExitStack() as stack:
            a, b = await open_hosts(stack, 2)
            a.add_addrs(b.peer_id, b.listen_addrs())
            with pytest.raises(ProtocolNotSupported):
                await a.new_stream(b.peer_id, ["/nope/1", "/nope/2"])
            stream = await a.new_stream(b.peer_id, ["/nope/1", ECHO])  # the first supported one
            assert stream.protocol == ECHO
            await stream.write(b"still fine")
            await stream.close()
            assert await read_all(stream) == b"still fine"


async def test_handler_exception_is_isolated(caplog):
    async def broken(stream: Stream) -> None:
        await stream.read()
        raise RuntimeError("boom")

    with trio.fail_after(15):
        async with AsyncExitStack() as stack:
            a, b = await open_hosts(stack, 2)
            b.set_stream_handler("/test/broken/1", broken)
            a.add_addrs(b.peer_id, b.listen_addrs())
            with caplog.at_level(logging.ERROR, logger="modelnet.p2p"):
                stream = await a.new_stream(b.peer_id, ["/test/broken/1"])
                await stream.write(b"x")
                with pytest.raises(StreamReset):  # reset by the wrapper: not a clean end
                    await stream.read()
                with pytest.raises(StreamReset):
                    await stream.write(b"y")
            assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
            assert await request(a, b.peer_id, b"host alive") == b"host alive"


async def test_dial_to_a_closed_port_fails_fast():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(10):
        async with AsyncExitStack() as stack:
            (a,) = await open_hosts(stack, 1)
            # refused on loopback takes about a millisecond; libp2p's default retries
            # alone would sleep 0.7 s
            with trio.fail_after(0.5):
                with pytest.raises(DialError):
                    await a.connect(key(5).peer_id, [f"/ip4/127.0.0.1/tcp/{port}"])
                with pytest.raises(DialError):
                    await a.new_stream(key(5).peer_id, [ECHO])  # same address, still refused


async def test_a_failed_dial_is_not_retried():
    accepted = 0

    async def hang_up(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await stream.aclose()  # the handshake fails at once

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            async with open_libp2p_host(key(0)) as a:
                with pytest.raises(DialError):
                    await a.connect(key(5).peer_id, [f"/ip4/127.0.0.1/tcp/{port}"])
            assert accepted == 1
            nursery.cancel_scope.cancel()


async def test_wrong_peer_id_at_a_real_address():
    with trio.fail_after(15):
        async with AsyncExitStack() as stack:
            a, b = await open_hosts(stack, 2)
            impostor = key(9).peer_id
            with pytest.raises(DialError):
                await a.connect(impostor, b.listen_addrs())  # Noise shows b's key, not the impostor's
            assert impostor not in a.connected_peers()
            # the failure does not block the right peer at that address
            await a.connect(b.peer_id, b.listen_addrs())
            assert await request(a, b.peer_id, b"ok") == b"ok"


async def test_redial_after_a_failed_address():
    with trio.fail_after(15):
        async with AsyncExitStack() as stack:
            a, b = await open_hosts(stack, 2)
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                dead = f"/ip4/127.0.0.1/tcp/{probe.getsockname()[1]}"
            with pytest.raises(DialError):
                await a.connect(b.peer_id, [dead])
            # libp2p would blacklist b for 60 s and dial only the first address: we try both
            await a.connect(b.peer_id, [dead, *b.listen_addrs()])
            assert a.peer_addrs(b.peer_id)[0] == b.listen_addrs()[0]


async def test_close_releases_the_port_and_tells_peers():
    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            (a,) = await open_hosts(stack, 1)
            seen = Recorder()
            a.add_peer_listener(seen.on_peer, seen.on_disconnect)
            async with open_libp2p_host(key(1)) as b:
                b.set_stream_handler(ECHO, echo)
                addr = b.listen_addrs()[0]
                b_peer = b.peer_id
                await a.connect(b_peer, [addr])
                await seen.wait_for(lambda: seen.info(b_peer) is not None)
            await seen.wait_for(lambda: seen.gone == [b_peer])
            assert b_peer not in a.connected_peers()
            with socket.socket() as probe:  # the listening socket is gone: the port binds again
                # (SO_REUSEADDR skips closed connections in TIME_WAIT, never a live listener)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(("127.0.0.1", tcp_port(addr)))
                probe.listen()
            with pytest.raises(DialError):
                await a.connect(b_peer, [addr])
            # the same key on the same port comes back, and is dialled again at once
            async with open_libp2p_host(key(1), [addr]) as b2:
                b2.set_stream_handler(ECHO, echo)
                assert await request(a, b_peer, b"back") == b"back"


async def test_bad_listen_addresses():
    with trio.fail_after(10):
        with pytest.raises(BadAddress):
            async with open_libp2p_host(key(0), ["not a multiaddr"]):
                pass
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            with pytest.raises(BadAddress):
                async with open_libp2p_host(key(0), [f"/ip4/127.0.0.1/tcp/{busy.getsockname()[1]}"]):
                    pass


async def test_inbound_negotiation_keeps_pipelined_bytes():
    """A lazy initiator (go-libp2p's style) sends its first bytes with the proposal."""
    with trio.fail_after(15):
        async with AsyncExitStack() as stack:
            a, b = await open_hosts(stack, 2)
            for protocol, payload in ((ECHO, b"eager bytes"), ("/ipfs/ping/1.0.0", bytes(range(32)))):
                raw = await raw_stream(a, b)
                proposal = protocol.encode() + b"\n"
                await raw.write(delimited(b"/multistream/1.0.0\n") + delimited(b"/nope/1\n"))
                await raw.write(delimited(proposal) + payload)
                expected = (
                    delimited(b"/multistream/1.0.0\n") + delimited(b"na\n") + delimited(proposal) + payload
                )
                got = b""
                while len(got) < len(expected):
                    got += await raw.read(65536)
                assert got == expected  # ping and echo both answered the pipelined payload
                await raw.reset()


async def test_inbound_negotiation_with_a_step_by_step_initiator():
    """py-libp2p's own client waits for each answer before it says the next thing."""
    async def read_exactly(raw, n: int) -> bytes:
        got = b""
        while len(got) < n:
            got += await raw.read(n - len(got))
        return got

    with trio.fail_after(15):
        async with AsyncExitStack() as stack:
            a, b = await open_hosts(stack, 2)
            raw = await raw_stream(a, b)
            for message in (b"/multistream/1.0.0\n", b"/nope/1\n", ECHO.encode() + b"\n"):
                await raw.write(delimited(message))
                answer = delimited(b"na\n" if message == b"/nope/1\n" else message)
                assert await read_exactly(raw, len(answer)) == answer
            await raw.write(b"step by step")
            assert await read_exactly(raw, 12) == b"step by step"
            await raw.reset()


async def test_errors_in_the_body_come_out_unwrapped():
    with trio.fail_after(10):
        with pytest.raises(KeyError):
            async with open_libp2p_host(key(0)):
                raise KeyError("body")


async def test_libp2p_logging_is_taken_over():
    forwarded: list[logging.LogRecord] = []
    collector = logging.Handler(logging.DEBUG)
    collector.emit = forwarded.append
    ours = logging.getLogger("modelnet.p2p.libp2p")
    ours.addHandler(collector)
    level = ours.level
    ours.setLevel(logging.DEBUG)
    try:
        with trio.fail_after(10):
            async with open_libp2p_host(key(0)) as a:
                chatty = logging.getLogger("libp2p.network.auto_connector")  # sets itself to INFO
                chatty.info("noise")
                chatty.warning("worth seeing")
                with pytest.raises(DialError):  # libp2p logs this at ERROR; we say it once, as DialError
                    await a.connect(key(5).peer_id, ["/ip4/127.0.0.1/tcp/1"])
    finally:
        ours.removeHandler(collector)
        ours.setLevel(level)
    assert [r.getMessage() for r in forwarded if r.levelno >= logging.WARNING] == ["worth seeing"]
    assert "noise" not in [r.getMessage() for r in forwarded]
    assert any(r.name.startswith("libp2p.transport") for r in forwarded)  # the refused dial, at DEBUG


async def test_eof_and_reset_are_told_apart():
    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            a, b = await open_hosts(stack, 2)
            await check_eof_and_reset(a, b)


async def test_a_closing_host_resets_the_streams_to_it():
    stuck = trio.Event()

    async def hold(stream: Stream) -> None:
        stuck.set()
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            (a,) = await open_hosts(stack, 1)
            async with open_libp2p_host(key(1)) as b:
                b.set_stream_handler("/test/hold/1", hold)
                a.add_addrs(b.peer_id, b.listen_addrs())
                stream = await a.new_stream(b.peer_id, ["/test/hold/1"])
                await stream.write(b"x")
                await stuck.wait()
            with pytest.raises(StreamReset):
                await stream.read()


async def test_a_negotiation_message_without_a_newline_resets_the_stream():
    with trio.fail_after(15):
        async with AsyncExitStack() as stack:
            a, b = await open_hosts(stack, 2)
            raw = await raw_stream(a, b)
            await raw.write(delimited(b"/multistream/1.0.0\n") + delimited(ECHO.encode()))  # no "\n"
            got = b""
            with pytest.raises(StreamError):
                while True:
                    got += await raw.read(65536)
            assert b"na" not in got and ECHO.encode() not in got
            assert raw.muxed_stream.reset_received  # reset, not closed
            assert await request(a, b.peer_id, b"next one is fine") == b"next one is fine"
