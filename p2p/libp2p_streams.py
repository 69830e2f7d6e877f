"""Our :class:`~modelnet.p2p.host.Stream` over a libp2p NetStream, and the NetStream that
hands libp2p's own handlers the bytes our negotiation read ahead.

libp2p reports a clean end, a received RST and a lost connection all as EOF; the adapter
tells them apart, so a read returns ``b""`` only at a clean EOF and raises StreamReset
otherwise, and translates every libp2p error into :mod:`modelnet.p2p.errors`.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.stream.exceptions import StreamReset as Libp2pStreamReset

from modelnet.identity import PeerID

from .errors import StreamClosed, StreamReset
from .host import Stream

_RESET_TIMEOUT = 1.0


async def reset_net_stream(net_stream: INetStream) -> None:
    # shielded: a reset is how a cancelled caller cleans up
    with trio.CancelScope(shield=True), trio.move_on_after(_RESET_TIMEOUT):
        try:
            await net_stream.reset()
        except BaseLibp2pError:
            pass


def _connection_down(net_stream: INetStream) -> bool:
    conn = net_stream.muxed_conn
    shutting_down = getattr(conn, "event_shutting_down", None)  # Yamux's
    return bool(conn.is_closed or (shutting_down is not None and shutting_down.is_set()))


def _fin_received(net_stream: INetStream) -> bool:
    """The remote half-closed the stream, and the connection is still up to say so."""
    muxed = net_stream.muxed_stream
    return (
        bool(getattr(muxed, "recv_closed", False))
        and not getattr(muxed, "reset_received", False)
        and not _connection_down(net_stream)
    )


class Libp2pStream(Stream):
    """Our Stream over a libp2p NetStream: a clean EOF reads b"", a reset or a lost
    connection raises StreamReset, write errors are StreamClosed.

    libp2p reports a received RST and a lost connection as EOF too, and a connection
    that goes down marks its Yamux streams closed as if by FIN; so an EOF counts as clean
    only if the remote's FIN is seen, without a RST, while the connection is up (or was
    seen with the last bytes read). A FIN and a connection close arriving together may
    still read as a reset.
    """

    def __init__(self, net_stream: INetStream, protocol: str, remote_peer: PeerID, pending: bytes = b"") -> None:
        self._net_stream = net_stream
        self.protocol = protocol
        self.remote_peer = remote_peer
        self._pending = pending  # bytes read past the negotiation
        self._closed = False
        self._reset = False  # by us
        self._aborted = False  # by us, the remote or a lost connection
        self._fin = False  # the remote's FIN seen while the connection was up
        self._eof = False  # a clean end, once read, stays one

    async def read(self, max_bytes: int = 65536) -> bytes:
        if self._pending:
            await trio.lowlevel.checkpoint()
            data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
            return data
        if self._aborted or self._eof:
            await trio.lowlevel.checkpoint()
            if self._aborted:
                raise StreamReset(f"stream {self.protocol} with {self.remote_peer} was reset")
            return b""
        try:
            data = await self._net_stream.read(max_bytes)
        except StreamEOF:
            data = b""
        except BaseLibp2pError as exc:  # StreamReset, a stream in libp2p's error state
            self._aborted = True
            raise StreamReset(f"stream {self.protocol} with {self.remote_peer}: {exc!r}") from None
        self._fin = self._fin or _fin_received(self._net_stream)
        if data:
            return data
        if not self._fin:  # libp2p says EOF after a RST or a lost connection too
            self._aborted = True
            raise StreamReset(f"stream {self.protocol} with {self.remote_peer} was reset or its connection lost")
        self._eof = True
        return b""

    async def write(self, data: bytes) -> None:
        if self._aborted:
            raise StreamReset(f"stream {self.protocol} to {self.remote_peer} was reset")
        if self._closed:
            raise StreamClosed(f"stream {self.protocol} to {self.remote_peer} is closed")
        try:
            await self._net_stream.write(bytes(data))
        except Libp2pStreamReset as exc:
            self._aborted = True
            raise StreamReset(f"stream {self.protocol} to {self.remote_peer}: {exc!r}") from None
        except BaseLibp2pError as exc:
            raise StreamClosed(f"stream {self.protocol} to {self.remote_peer}: {exc!r}") from None

    async def close(self) -> None:
        if self._closed or self._reset:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            # a Yamux half-close (FIN) that also releases libp2p's stream accounting;
            # reading the remote's side still works afterwards
            await self._net_stream.close()
        except BaseLibp2pError:
            pass

    async def reset(self) -> None:
        if self._reset:
            await trio.lowlevel.checkpoint()
            return
        self._reset = self._aborted = True
        self._pending = b""
        await reset_net_stream(self._net_stream)

    def __repr__(self) -> str:
        return f"Libp2pStream({self.protocol}, remote={self.remote_peer.short()})"


class PrefixedNetStream:
    """A libp2p NetStream that first returns bytes already read during negotiation (for
    libp2p's own handlers: identify, ping); everything else goes to the stream itself."""

    def __init__(self, net_stream: INetStream, pending: bytes) -> None:
        self._net_stream = net_stream
        self._pending = pending

    async def read(self, n: int | None = None) -> bytes:
        if self._pending:
            await trio.lowlevel.checkpoint()
            size = len(self._pending) if n is None or n < 0 else n
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        return await self._net_stream.read(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._net_stream, name)
