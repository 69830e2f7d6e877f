"""Our libp2p host against a stock py-libp2p host: its own multistream-select client and
server (MultiselectClient / Multiselect), Noise and Yamux, both directions."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.host.exceptions import StreamFailure
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as Libp2pPeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr
from multiaddr.protocols import P_P2P

from modelnet.identity import PeerID, PrivateKey
from modelnet.p2p.errors import ProtocolNotSupported, StreamReset
from modelnet.p2p.host import Stream
from modelnet.p2p.libp2p_host import open_libp2p_host

from ..drivers import Recorder, read_all, request

pytestmark = pytest.mark.loopback

UPPER = "/test/upper/1.0.0"
ABORT = "/test/abort/1.0.0"


@asynccontextmanager
async def stock_host(seed: bytes) -> AsyncIterator[IHost]:
    """A py-libp2p host as its own docs make one, with the safe settings only."""
    key_pair = create_new_key_pair(seed)
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        listen_addrs=listen,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    async with host.run(listen_addrs=listen):
        try:
            yield host
        finally:
            # inside run(): the only path on which libp2p closes its sockets
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await host.close()


def addrs_of(host: IHost) -> list[str]:
    return [str(a.decapsulate_code(P_P2P)) for a in host.get_addrs()]


def peer_of(host: IHost) -> PeerID:
    return PeerID.from_bytes(host.get_id().to_bytes())


async def stock_read_all(stream: INetStream) -> bytes:
    out = b""
    while True:
        try:
            data = await stream.read(65536)
        except StreamEOF:
            return out
        if not data:
            return out
        out += data


async def test_a_stock_host_opens_a_stream_to_ours():
    ended: list[str] = []

    async def upper(stream: Stream) -> None:
        data = b""
        try:
            while chunk := await stream.read():
                data += chunk
        except StreamReset:
            ended.append("reset")
            raise
        ended.append("eof")  # the stock client half-closed: a clean end, not a reset
        await stream.write(data.upper())

    with trio.fail_after(20):
        async with open_libp2p_host(PrivateKey.from_seed(b"\x61" * 32)) as ours, stock_host(b"\x62" * 32) as stock:
            ours.set_stream_handler(UPPER, upper)
            our_id = ID(ours.peer_id.bytes)
            await stock.connect(Libp2pPeerInfo(our_id, [Multiaddr(a) for a in ours.listen_addrs()]))
            # the stock MultiselectClient: handshake, a refused proposal, then ours
            stream = await stock.new_stream(our_id, ["/test/unknown/1.0.0", UPPER])
            assert stream.get_protocol() == UPPER
            await stream.write(b"hello from stock libp2p")
            await stream.close()
            assert await stock_read_all(stream) == b"HELLO FROM STOCK LIBP2P"
            assert ended == ["eof"]
            with pytest.raises(StreamFailure) as refused:
                await stock.new_stream(our_id, ["/test/unknown/1.0.0"])
            assert "response='na'" in str(refused.value.__cause__)  # our "na", as stock reads it
            # the connection is still good after the refusal
            stream = await stock.new_stream(our_id, [UPPER])
            await stream.write(b"again")
            await stream.close()
            assert await stock_read_all(stream) == b"AGAIN"


async def test_our_host_opens_a_stream_to_a_stock_host():
    async def upper(stream: INetStream) -> None:
        data = await stock_read_all(stream)
        await stream.write(data.upper())
        await stream.close()

    async def abort(stream: INetStream) -> None:
        await stream.read(65536)
        await stream.reset()

    with trio.fail_after(20):
        async with open_libp2p_host(PrivateKey.from_seed(b"\x63" * 32)) as ours, stock_host(b"\x64" * 32) as stock:
            stock.set_stream_handler(UPPER, upper)
            stock.set_stream_handler(ABORT, abort)
            seen = Recorder()
            ours.add_peer_listener(seen.on_peer)
            stock_id = peer_of(stock)
            await ours.connect(stock_id, addrs_of(stock))
            assert await request(ours, stock_id, b"hello from modelnet", UPPER) == b"HELLO FROM MODELNET"

            # our identify of the stock host: its addresses and protocols
            await seen.wait_for(lambda: seen.info(stock_id) is not None)
            info = seen.info(stock_id)
            assert {UPPER, ABORT} <= info.protocols
            assert set(addrs_of(stock)) <= set(info.addrs)

            with pytest.raises(ProtocolNotSupported):
                await ours.new_stream(stock_id, ["/test/unknown/1.0.0"])
            stream = await ours.new_stream(stock_id, ["/test/unknown/1.0.0", UPPER])
            assert stream.protocol == UPPER
            await stream.write(b"fallback")
            await stream.close()
            assert await read_all(stream) == b"FALLBACK"

            # the stock side's reset reads as a reset, not as the end of the answer
            stream = await ours.new_stream(stock_id, [ABORT])
            await stream.write(b"x")
            with pytest.raises(StreamReset):
                await read_all(stream)
