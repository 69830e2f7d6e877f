"""What every host implementation and every protocol driver shares, above the Host interface.

- :class:`FramedStream`: length-prefixed frames over any stream. The framing is sans-IO
  (:mod:`modelnet.protocols.framing`); this is the short trio driver every message
  protocol (kad, session, reason) uses.
- :class:`AddressBook` and :class:`PeerListeners`: the bookkeeping both hosts keep, and
  :func:`dial_in_order`, the dial loop both run (each with its own per-address dial).
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Awaitable, Callable, Sequence, TypeVar

from modelnet.identity import PeerID
from modelnet.protocols.errors import RemoteProtocolError
from modelnet.protocols.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

from .errors import DialError
from .host import DisconnectListener, PeerInfo, PeerListener, Stream

logger = logging.getLogger(__name__)

# Internal bounds on a dial and on a stream negotiation, so nothing hangs forever on a
# half-open peer (py-libp2p has no keepalive; the memory network's frozen peers mimic
# it); callers normally give up sooner with their own fail_after.
DIAL_TIMEOUT = 10.0
NEGOTIATE_TIMEOUT = 10.0

_READ_SIZE = 65536
T = TypeVar("T")


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
        """The next frame, or None at a clean end of stream (EOF at a frame boundary).

        Raises :class:`RemoteProtocolError` if the stream ends inside a frame,
        :class:`~modelnet.protocols.errors.FrameTooLarge` for a length above ``max_frame``
        and :class:`~modelnet.p2p.errors.StreamReset` if the stream is reset.
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


MAX_ADDRS_PER_PEER = 8  # a host listens on a few; more is noise or an attack
MAX_ADDR_LENGTH = 1024  # characters of multiaddr text; real ones are under 100
MAX_PEERS = 10_000  # peers whose addresses are kept; the least recently used go first


class _Entry:
    __slots__ = ("addrs", "own")

    def __init__(self) -> None:
        self.addrs: list[str] = []  # in dial order
        self.own: set[str] = set()  # said by the peer itself, or dialled successfully


class AddressBook:
    """Addresses known per peer, in the order to dial them, bounded so third parties
    cannot grow it: at most ``max_addrs`` per peer (each at most :data:`MAX_ADDR_LENGTH`
    characters) and ``max_peers`` peers.

    Addresses the peer gave itself (``own=True``: identify) or that a dial proved come
    first, and a hearsay address never displaces one of them. Order: the one that last
    worked, the peer's own, hearsay; a failed own address goes last, a failed hearsay
    address is forgotten. When full, peers known only by hearsay are dropped first,
    least recently used first.
    """

    __slots__ = ("_owner", "_max_addrs", "_max_peers", "_vouched", "_hearsay")

    def __init__(self, owner: PeerID, *, max_addrs: int = MAX_ADDRS_PER_PEER, max_peers: int = MAX_PEERS) -> None:
        self._owner = owner
        self._max_addrs = max_addrs
        self._max_peers = max_peers
        # two pools, each in least-recently-used order (dicts keep insertion order)
        self._vouched: dict[PeerID, _Entry] = {}
        self._hearsay: dict[PeerID, _Entry] = {}

    def __len__(self) -> int:
        return len(self._vouched) + len(self._hearsay)

    def add(self, peer: PeerID, addrs: Sequence[str], *, own: bool = False) -> None:
        if peer == self._owner:
            return
        usable = [a for a in addrs if isinstance(a, str) and 0 < len(a) <= MAX_ADDR_LENGTH]
        if len(usable) < len(addrs):
            logger.debug("ignoring %d overlong address(es) for %s", len(addrs) - len(usable), peer)
        fresh = list(dict.fromkeys(usable))
        if not fresh:
            return
        entry = self._entry(peer)
        if own:
            entry.own.update(fresh)
            mine = [a for a in entry.addrs if a in entry.own]
            mine += [a for a in fresh if a not in mine]
            entry.addrs = mine + [a for a in entry.addrs if a not in entry.own]
        else:
            room = self._max_addrs - len(entry.addrs)
            entry.addrs += [a for a in fresh if a not in entry.addrs][: max(room, 0)]
        self._place(peer, entry)

    def addrs(self, peer: PeerID) -> list[str]:
        entry = self._vouched.get(peer) or self._hearsay.get(peer)
        return list(entry.addrs) if entry is not None else []

    def dial_order(self, peer: PeerID, first: Sequence[str] = ()) -> list[str]:
        """``first`` (the caller's addresses), then the known ones."""
        ordered = list(dict.fromkeys(first))
        ordered += [a for a in self.addrs(peer) if a not in ordered]
        return ordered

    def worked(self, peer: PeerID, addr: str) -> None:
        if peer == self._owner or len(addr) > MAX_ADDR_LENGTH:
            return
        entry = self._entry(peer)
        if addr in entry.addrs:
            entry.addrs.remove(addr)
        entry.addrs.insert(0, addr)
        entry.own.add(addr)  # the transport checked the peer id there
        self._place(peer, entry)

    def failed(self, peer: PeerID, addr: str) -> None:
        entry = self._vouched.get(peer) or self._hearsay.get(peer)
        if entry is None or addr not in entry.addrs:
            return
        entry.addrs.remove(addr)
        if addr in entry.own:
            entry.addrs.append(addr)  # the peer may come back there
        self._place(peer, entry)

    def _entry(self, peer: PeerID) -> _Entry:
        return self._vouched.get(peer) or self._hearsay.get(peer) or _Entry()

    def _place(self, peer: PeerID, entry: _Entry) -> None:
        """Trim ``entry`` and store it as the most recently used of its pool; evict beyond the cap."""
        del entry.addrs[self._max_addrs :]
        entry.own.intersection_update(entry.addrs)
        self._vouched.pop(peer, None)
        self._hearsay.pop(peer, None)
        if not entry.addrs:
            return
        (self._vouched if entry.own else self._hearsay)[peer] = entry
        while len(self) > self._max_peers:
            pool = self._hearsay or self._vouched
            del pool[next(iter(pool))]


async def dial_in_order(
    book: AddressBook, peer: PeerID, first: Sequence[str], attempt: Callable[[str], Awaitable[T]]
) -> T:
    """The dial loop both hosts share: try ``first``, then ``peer``'s known addresses, one
    at a time, until ``attempt(addr)`` succeeds; tell ``book`` how each one went.

    ``attempt`` raises :class:`DialError` for a failed address (its message says why);
    anything else propagates at once. Raises DialError naming every failure.
    """
    candidates = book.dial_order(peer, first)
    if not candidates:
        raise DialError(f"no known address for {peer}")
    failures = []
    for addr in candidates:
        try:
            result = await attempt(addr)
        except DialError as exc:
            failures.append(f"{addr}: {exc}")
            book.failed(peer, addr)
            continue
        book.worked(peer, addr)
        return result
    raise DialError(f"could not reach {peer}: " + "; ".join(failures))


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
