"""Circuit relay v2 over real libp2p hosts on 127.0.0.1: a client reaches a peer only
through a relay, over Noise + Yamux end to end, so the relay carries only ciphertext."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
from libp2p.abc import ConnectionType
from libp2p.peer.id import ID

from modelnet.identity import PrivateKey
from modelnet.p2p import relay
from modelnet.p2p.errors import DialError
from modelnet.p2p.host import Stream, full_address
from modelnet.p2p.libp2p_host import open_libp2p_host

from ..drivers import ECHO, echo, request

pytestmark = pytest.mark.loopback

SECRET = b"only the two ends may read this"


def key(i: int) -> PrivateKey:
    return PrivateKey.from_seed(bytes([0x60 + i]) * 32)


class _Tap(Stream):
    """A relay-side stream that keeps a copy of every byte it reads."""

    def __init__(self, stream: Stream, seen: bytearray) -> None:
        self._stream, self._seen = stream, seen
        self.protocol, self.remote_peer = stream.protocol, stream.remote_peer

    async def read(self, max_bytes: int = 65536) -> bytes:
        data = await self._stream.read(max_bytes)
        self._seen += data
        return data

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    async def close(self) -> None:
        await self._stream.close()

    async def reset(self) -> None:
        await self._stream.reset()


class TappedRelay(relay.RelayService):
    def __init__(self, host) -> None:
        super().__init__(host)
        self.seen = bytearray()

    async def _splice(self, a, b, limit) -> None:
        await super()._splice(_Tap(a, self.seen), _Tap(b, self.seen), limit)


async def test_a_peer_reached_only_through_a_relay_over_libp2p():
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            r, p, a = [await stack.enter_async_context(open_libp2p_host(key(i))) for i in range(3)]
            p.set_stream_handler(ECHO, echo)
            service = TappedRelay(r)
            client = relay.RelayClient(p, [full_address(r.listen_addrs()[0], r.peer_id)])
            nursery = await stack.enter_async_context(trio.open_nursery())
            await nursery.start(service.serve)
            await nursery.start(client.serve)
            [circuit] = client.circuit_addrs()
            assert circuit in p.listen_addrs() and service.reservations == [p.peer_id]

            await a.connect(p.peer_id, [circuit])  # A was given only the circuit address
            [conn] = a._network.get_connections(ID(p.peer_id.bytes))
            assert conn.muxed_conn.secured_conn.get_connection_type() == ConnectionType.RELAYED
            assert await request(a, p.peer_id, SECRET) == SECRET
            assert await request(a, p.peer_id, SECRET * 100) == SECRET * 100  # several Yamux frames

            assert service.stats.circuits == 1 and service.stats.relayed_bytes > len(SECRET) * 101
            assert len(service.seen) == service.stats.relayed_bytes
            assert SECRET not in bytes(service.seen)  # Noise: the relay saw only ciphertext
            nursery.cancel_scope.cancel()


async def test_a_dead_relay_fails_the_dial_clearly_over_libp2p():
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            p, a = [await stack.enter_async_context(open_libp2p_host(key(i))) for i in (1, 2)]
            async with open_libp2p_host(key(0)) as r:
                dead = relay.circuit_address(r.listen_addrs()[0], r.peer_id)
            with pytest.raises(DialError) as caught:
                await a.connect(p.peer_id, [dead])
            assert "unreachable" in str(caught.value)
