"""The Host interface: how bytes move between peers.

Two implementations run everything above them unchanged:
- ``modelnet.p2p.libp2p_host.open_libp2p_host`` — py-libp2p, TCP + Noise + Yamux only;
- ``modelnet.p2p.memory.MemoryNetwork.open_host`` — in-process, with latency, loss and
  partitions, deterministic under trio's ``autojump_clock``.

Rules every implementation keeps:
- A stream handler runs in the host's own nursery; an exception escaping it is logged and
  the stream reset; it never takes the host down.
- ``new_stream`` and ``connect`` raise :class:`~modelnet.p2p.errors.DialError` or
  :class:`~modelnet.p2p.errors.ProtocolNotSupported`; they never hang forever on a dead
  peer by themselves, but callers still bound them with ``trio.fail_after``.
- ``Stream.read`` returns ``b""`` only at a clean end of stream; a reset, a lost
  connection or a closed host raise :class:`~modelnet.p2p.errors.StreamReset`.
- Known addresses are bounded (:class:`~modelnet.p2p.streams.AddressBook`): a few short
  ones per peer, a bounded number of peers; what a peer says about itself (identify)
  outranks what third parties say about it (``add_addrs``).
- Peer listeners fire once a connection is up *and* the remote's listen addresses and
  protocols are known (libp2p identify, or the memory network's own knowledge), so the DHT
  can add a peer it can dial back.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Awaitable, Callable, Sequence

from modelnet.identity import IdentityError, PeerID

from .errors import BadAddress


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """What a host learned about a connected peer."""

    peer_id: PeerID
    addrs: tuple[str, ...]  # multiaddr text, without the /p2p/ suffix
    protocols: frozenset[str]


class Stream(abc.ABC):
    """One bidirectional, ordered byte stream to a peer, for one protocol."""

    protocol: str
    remote_peer: PeerID

    @abc.abstractmethod
    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes``; ``b""`` only at a clean end: the remote closed its side.

        Raises :class:`~modelnet.p2p.errors.StreamReset` if the stream was aborted instead
        (reset by either side, the connection lost, a host closed), so a half-closing
        client is told apart from one that went away.
        """

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Raise :class:`StreamClosed` if the stream is closed (:class:`StreamReset`, a
        subclass, if it was reset)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close our side for writing; the remote reads EOF. Idempotent."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Abort both directions at once. Idempotent."""


StreamHandler = Callable[[Stream], Awaitable[None]]
PeerListener = Callable[[PeerInfo], None]
DisconnectListener = Callable[[PeerID], None]


class Host(abc.ABC):
    peer_id: PeerID

    @abc.abstractmethod
    def listen_addrs(self) -> list[str]:
        """Dialable multiaddrs of this host, without the /p2p/ suffix."""

    @abc.abstractmethod
    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    @abc.abstractmethod
    def remove_stream_handler(self, protocol: str) -> None: ...

    @abc.abstractmethod
    def add_addrs(self, peer: PeerID, addrs: Sequence[str]) -> None:
        """Remember addresses for ``peer`` heard from a third party (used by
        ``connect``/``new_stream``); they never displace the peer's own addresses."""

    @abc.abstractmethod
    def peer_addrs(self, peer: PeerID) -> list[str]: ...

    @abc.abstractmethod
    async def connect(self, peer: PeerID, addrs: Sequence[str] = ()) -> None:
        """Open (or reuse) a connection; raise DialError."""

    @abc.abstractmethod
    async def new_stream(self, peer: PeerID, protocols: Sequence[str]) -> Stream:
        """Open a stream for the first protocol the peer supports; connects if needed."""

    @abc.abstractmethod
    async def disconnect(self, peer: PeerID) -> None: ...

    @abc.abstractmethod
    def connected_peers(self) -> list[PeerID]: ...

    @abc.abstractmethod
    def add_peer_listener(self, on_peer: PeerListener, on_disconnect: DisconnectListener | None = None) -> None:
        """Called (synchronously, must not block) when a peer is identified / disconnects."""

    # -- circuit relay (modelnet.p2p.relay) ----------------------------------------------

    _relay_addrs: tuple[str, ...] = ()

    def set_relay_addrs(self, addrs: Sequence[str]) -> None:
        """Circuit addresses (``…/p2p/<relay>/p2p-circuit``) this host is reachable at
        through relays that hold a reservation for it; ``listen_addrs`` lists them after
        the direct ones, so identify, the DHT and capability records carry them."""
        self._relay_addrs = tuple(addrs)

    @abc.abstractmethod
    async def serve_relayed(self, stream: Stream, remote: PeerID) -> None:
        """Run an inbound connection from ``remote`` over ``stream``, a circuit a relay
        spliced (handed over by the STOP handler), until it ends. Dialling a circuit
        address (``…/p2p-circuit``) is the outbound side, inside ``connect``."""


def full_address(addr: str, peer: PeerID) -> str:
    """``addr`` with the ``/p2p/<peer>`` suffix, the form users copy around."""
    return f"{addr}/p2p/{peer}"


def split_full_address(text: str) -> tuple[str, PeerID]:
    """Split ``…/p2p/<peer-id>`` into the transport address and the peer id.

    Raises :class:`~modelnet.p2p.errors.BadAddress` with a message a user can act on.
    """
    marker = "/p2p/"
    head, sep, tail = text.strip().rpartition(marker)
    if not sep or not head.startswith("/") or not tail or "/" in tail:
        raise BadAddress(f"{text!r} is not a peer address (expected /ip4/HOST/tcp/PORT/p2p/PEER-ID)")
    try:
        return head, PeerID.from_base58(tail)
    except IdentityError as exc:
        raise BadAddress(f"{text!r} has a bad peer id: {exc}") from None
