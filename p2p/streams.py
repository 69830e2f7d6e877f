"""What every host implementation and every protocol driver shares, above the Host interface.

- :class:`FramedStream`: length-prefixed frames over any stream. The framing is sans-IO
  (:mod:`modelnet.protocols.framing`); this is the short trio driver every message
  protocol (kad, session, reason) uses.
- :class:`AddressBook` and :class:`PeerListeners`: the bookkeeping both hosts keep.
- :func:`lone_error_unwrapped`: so an error raised in the body of a host's context
  manager comes out as itself, not wrapped in the exception groups of the nurseries
  the host runs.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from types import TracebackType
from typing import Iterator, Sequence

from modelnet.identity import PeerID
from modelnet.protocols.errors import RemoteProtocolError
from modelnet.protocols.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

from .host import DisconnectListener, PeerInfo, PeerListener, Stream

logger = logging.getLogger(__name__)

_READ_SIZE = 65536


class FramedStream:
    """Send and receive whole frames; ``async with`` closes it (or resets it on error)."""

    __slots__ = ("stream", "_decoder", "_max_frame", "_eof")

    def __init__(self, stream: Stream, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.stream = stream
        self._max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._eof = False

    @property
    def remote_peer(self) -> PeerID:
        return self.stream.remote_peer

    @property
    def protocol(self) -> str:
        return self.stream.protocol

    async def send(self, payload: bytes) -> None:
        """Raise LocalProtocolError above ``max_frame``, StreamClosed if the stream is gone."""
        await self.stream.write(encode_frame(payload, self._max_frame))

    async def receive(self) -> bytes | None:
        """The next frame, or None at a clean end of stream.

        Raises :class:`RemoteProtocolError` if the stream ends inside a frame and
        :class:`~modelnet.protocols.errors.FrameTooLarge` for a length above ``max_frame``.
        """
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            if self._eof:
                return None
            data = await self.stream.read(_READ_SIZE)
            if not data:
                self._eof = True
                if self._decoder.pending_bytes:
                    raise RemoteProtocolError(
                        f"stream from {self.stream.remote_peer} ended inside a frame "
                        f"({self._decoder.pending_bytes} bytes pending)"
                    )
                return None
            self._decoder.receive_data(data)

    async def close(self) -> None:
        await self.stream.close()

    async def reset(self) -> None:
        await self.stream.reset()

    async def __aenter__(self) -> "FramedStream":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.reset()


class AddressBook:
    """Addresses known per peer, in the order to dial them: the one that last worked
    first, the ones that failed last."""

    __slots__ = ("_owner", "_addrs")

    def __init__(self, owner: PeerID) -> None:
        self._owner = owner
        self._addrs: dict[PeerID, list[str]] = {}

    def add(self, peer: PeerID, addrs: Sequence[str]) -> None:
        if peer == self._owner or not addrs:
            return
        known = self._addrs.setdefault(peer, [])
        for addr in addrs:
            if addr not in known:
                known.append(addr)

    def addrs(self, peer: PeerID) -> list[str]:
        return list(self._addrs.get(peer, ()))

    def dial_order(self, peer: PeerID, first: Sequence[str] = ()) -> list[str]:
        """``first`` (the caller's addresses), then the known ones."""
        ordered = list(dict.fromkeys(first))
        ordered += [a for a in self._addrs.get(peer, ()) if a not in ordered]
        return ordered

    def worked(self, peer: PeerID, addr: str) -> None:
        known = self._addrs.setdefault(peer, [])
        if addr in known:
            known.remove(addr)
        known.insert(0, addr)

    def failed(self, peer: PeerID, addr: str) -> None:
        known = self._addrs.get(peer)
        if known and addr in known:
            known.remove(addr)
            known.append(addr)


class PeerListeners:
    """The callbacks of ``Host.add_peer_listener``; one that raises is logged, not fatal."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[tuple[PeerListener, DisconnectListener | None]] = []

    def add(self, on_peer: PeerListener, on_disconnect: DisconnectListener | None) -> None:
        self._listeners.append((on_peer, on_disconnect))

    def identified(self, info: PeerInfo) -> None:
        for on_peer, _ in list(self._listeners):
            try:
                on_peer(info)
            except Exception:
                logger.exception("peer listener failed for %s", info.peer_id)

    def disconnected(self, peer: PeerID) -> None:
        for _, on_disconnect in list(self._listeners):
            if on_disconnect is None:
                continue
            try:
                on_disconnect(peer)
            except Exception:
                logger.exception("disconnect listener failed for %s", peer)


@contextmanager
def lone_error_unwrapped() -> Iterator[None]:
    """Re-raise the one exception inside (nested) exception groups as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            exc = pending.pop()
            if isinstance(exc, BaseExceptionGroup):
                pending.extend(exc.exceptions)
            else:
                leaves.append(exc)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
