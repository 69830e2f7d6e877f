"""The real transport: a py-libp2p 0.8.1 host behind our :class:`~modelnet.p2p.host.Host`.

TCP + Noise + Yamux only, built from our Ed25519 key. What this adapter does that
py-libp2p does not (see /work/shared/notes/py-libp2p-0.8.1.md):
- never offers the default security list (it would accept plaintext peers);
- ``max_connections_per_peer=1`` and no dial retries: a dial costs ~7 ms, and a closed
  port fails in ~2 ms instead of after 0.7 s of backoff;
- dials one address at a time in our order (the loop in streams.py both hosts share),
  unblocking the peer and replacing libp2p's
  stale addresses first (libp2p dials only the first TCP address and blacklists a peer
  for 60 s after a failure), and keeps libp2p's auto-connector from dialling anyone;
- negotiates protocols itself with multistream-select, both ways: pipelined as the
  initiator (the handshake and the first proposal in one write: one round trip instead
  of two), with buffered reads as the responder (libp2p reads byte by byte, sending a
  Yamux window update each time); "not supported" is told apart from a broken stream,
  and libp2p does not log an error for it; a malformed message resets the stream. A
  new stream costs ~1.2 ms (p50, loopback, both hosts in one process) instead of ~2.3;
- advertises a wildcard listen address (0.0.0.0) as the machine's interface addresses;
- runs identify itself, in the host's nursery, once per connection, so it knows when a
  peer's addresses and protocols are known (libp2p's own automatic identify runs in
  detached system tasks and would just duplicate the exchange);
- wraps every handler (an exception is logged and resets the stream; the host lives on)
  and translates every libp2p error into :mod:`modelnet.p2p.errors`; a stream read
  returns ``b""`` only at a clean EOF (libp2p reports a lost connection as EOF too) and
  raises StreamReset otherwise;
- closes a private swarm with a pre-shared key (:mod:`.pnet`, the libp2p pnet spec) when
  given one: a dial that fails during the handshake then names the likely cause (the
  peer has no key, or another one), and an inbound connection from a stranger is logged
  at INFO and dropped while the host keeps serving;
- dials circuit relay addresses (``…/p2p/<relay>/p2p-circuit``, :mod:`.relay`) and
  accepts the circuits a relay opens to it: the spliced stream is upgraded like a TCP
  socket (pnet if any, Noise, Yamux) and added to the swarm, so the relay sees only
  ciphertext and everything above runs unchanged (identify still advertises only the
  direct addresses: py-libp2p strips a ``/p2p/<relay>`` from every advertised address);
- closes the host inside ``run()`` (the only path that closes sockets) and takes over the
  ``libp2p`` logger (records at WARNING and above go to ``modelnet.p2p.libp2p``; those
  about a dial that fails are demoted to DEBUG, since the caller gets a DialError).

This module is the Host itself (dialling, handlers, identify, peer events); its parts
live beside it: :mod:`.libp2p_connections` (the swarm, the pnet guard, relayed
connections, advertised addresses), :mod:`.libp2p_multistream` (protocol negotiation),
:mod:`.libp2p_streams` (the stream adapter) and :mod:`.libp2p_logging`.
"""

from __future__ import annotations

import functools
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.basic_host import BasicHost
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.id import ID as Libp2pID
from multiaddr.protocols import P_P2P

from modelnet.errors import unwrapping_groups
from modelnet.identity import IdentityError, PeerID, PrivateKey
from modelnet.protocols.errors import ProtocolError, RemoteProtocolError

from . import relay
from .errors import BadAddress, DialError, HostClosed, P2PError, ProtocolNotSupported
from .host import DisconnectListener, Host, PeerInfo, PeerListener, Stream, StreamHandler
from .libp2p_connections import (
    RelayedRawConnection,
    advertised,
    build_host,
    dial_failure,
    parse_addr,
    protected_conn,
    swarm_mismatch,
)
from .libp2p_logging import dialling, take_over_libp2p_logging_once
from .libp2p_logging import take_over_libp2p_logging  # noqa: F401  (part of this adapter's API)
from .libp2p_multistream import accept, negotiate
from .libp2p_streams import Libp2pStream, PrefixedNetStream, reset_net_stream
from .pnet import SwarmKey, SwarmMismatch
from .streams import DIAL_TIMEOUT, NEGOTIATE_TIMEOUT, AddressBook, FramedStream, PeerListeners, dial_in_order

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
# Like DIAL_TIMEOUT and NEGOTIATE_TIMEOUT (streams.py): an internal bound, so nothing
# hangs forever on a half-open peer; callers normally give up sooner with fail_after.
IDENTIFY_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 5.0
_IDENTIFY_MAX = 64 * 1024  # an identify message is a few hundred bytes
_ADDR_TTL = 120  # seconds libp2p keeps the one address we hand it before a dial

# Kept importable from here, where the driver tests have always found them.
_accept, _negotiate = accept, negotiate


def _to_libp2p(peer: PeerID) -> Libp2pID:
    return Libp2pID(peer.bytes)


def _from_libp2p(peer: Libp2pID) -> PeerID | None:
    """Our id for a libp2p peer, or None if it is not an Ed25519 peer (we speak only those)."""
    try:
        return PeerID.from_bytes(peer.to_bytes())
    except IdentityError:
        return None


def _parse_identify(peer: PeerID, payload: bytes) -> PeerInfo:
    """An identify message (protobuf) from ``peer``; RemoteProtocolError if it does not parse.
    Listen addresses that do not parse are skipped, one by one."""
    message = Identify()
    try:
        message.ParseFromString(payload)
    except Exception as exc:  # protobuf's DecodeError and friends: any bad bytes
        raise RemoteProtocolError(f"malformed identify message: {exc!r}") from None
    addrs = []
    for raw in message.listen_addrs:
        try:
            addrs.append(str(multiaddr.Multiaddr(raw).decapsulate_code(P_P2P)))
        except Exception:  # multiaddr raises a zoo of types on bad bytes
            logger.debug("identify of %s: skipping a malformed listen address", peer)
    return PeerInfo(peer, tuple(dict.fromkeys(addrs)), frozenset(message.protocols))


class _ConnectionEvents(INotifee):
    """Swarm notifications, forwarded to the host without blocking the swarm."""

    def __init__(self, host: "Libp2pHost") -> None:
        self._host = host

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._host._on_connected(conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._host._on_disconnected(conn.muxed_conn.peer_id)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, maddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, maddr: multiaddr.Multiaddr) -> None:
        return None


class Libp2pHost(Host):
    """Our Host over a running py-libp2p BasicHost; made by :func:`open_libp2p_host`."""

    def __init__(self, key: PrivateKey, basic: BasicHost, nursery: trio.Nursery, swarm_key: SwarmKey | None = None) -> None:
        self.peer_id = key.peer_id
        self.swarm_key = swarm_key
        self._basic = basic
        self._network: Any = basic.get_network()  # the Swarm (its extras are not on INetwork)
        self._nursery = nursery
        self._closing = False
        self._addrbook = AddressBook(self.peer_id)
        self._listeners = PeerListeners()
        self._identified: dict[PeerID, PeerInfo] = {}
        self._identifying: set[PeerID] = set()
        self._dial_errors: dict[PeerID | None, list[SwarmMismatch]] = {}
        self._handlers: dict[str, StreamHandler] = {}
        # inbound streams: our negotiation (buffered reads, one write per answer) instead
        # of libp2p's, which reads byte by byte and sends a window update per byte
        self._network.set_stream_handler(self._serve_inbound)
        # We identify peers ourselves (see the module doc); drop libp2p's automatic
        # identify on connect, keep everything else it registered (tag store).
        for notifee in list(self._network.notifees):
            if type(notifee).__name__ == "_IdentifyNotifee":
                self._network.remove_notifee(notifee)
        self._network.register_notifee(_ConnectionEvents(self))

    # -- Host interface ------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        return advertised(self._basic.get_transport_addrs()) + list(self._relay_addrs)

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

        async def serve(net_stream: INetStream) -> None:
            await self._serve_stream(net_stream, protocol, handler, b"")

        # registered with libp2p too, so that identify advertises the protocol
        self._basic.set_stream_handler(protocol, serve)

    def remove_stream_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)
        self._basic.remove_stream_handler(protocol)

    def add_addrs(self, peer: PeerID, addrs: Sequence[str]) -> None:
        self._addrbook.add(peer, addrs)

    def peer_addrs(self, peer: PeerID) -> list[str]:
        return self._addrbook.addrs(peer)

    async def connect(self, peer: PeerID, addrs: Sequence[str] = ()) -> None:
        self._check_open()
        if peer == self.peer_id:
            raise DialError("a host cannot dial itself")
        self.add_addrs(peer, addrs)
        libp2p_peer = _to_libp2p(peer)
        if self._connected(libp2p_peer):
            await trio.lowlevel.checkpoint()
            return
        try:
            await dial_in_order(self._addrbook, peer, addrs, functools.partial(self._dial, libp2p_peer))
        except DialError as exc:
            if any(isinstance(cause, SwarmMismatch) for cause in self._dial_errors.pop(peer, ())):
                raise SwarmMismatch(str(exc)) from None
            raise
        finally:
            self._dial_errors.pop(peer, None)

    async def new_stream(self, peer: PeerID, protocols: Sequence[str]) -> Stream:
        if not protocols:
            raise ProtocolNotSupported("no protocol asked for")
        await self.connect(peer)
        net_stream = None
        try:
            with trio.fail_after(NEGOTIATE_TIMEOUT):
                net_stream = await self._network.new_stream(_to_libp2p(peer))
                protocol, pending = await negotiate(net_stream, protocols)
        except BaseException as exc:
            if net_stream is not None:
                await reset_net_stream(net_stream)
            if isinstance(exc, ProtocolNotSupported):
                raise
            if isinstance(exc, (BaseLibp2pError, ProtocolError, trio.TooSlowError)):
                raise DialError(f"could not open a stream to {peer}: {exc!r}") from None
            raise
        net_stream.set_protocol(protocol)
        return Libp2pStream(net_stream, protocol, peer, pending)

    async def serve_relayed(self, stream: Stream, remote: PeerID) -> None:
        self._check_open()
        address = f"/p2p/{stream.remote_peer}/p2p-circuit/p2p/{remote}"
        raw = RelayedRawConnection(stream, False, address)
        try:
            muxed = await self._network.upgrade_inbound_raw_conn(raw, multiaddr.Multiaddr(address))
        except (BaseLibp2pError, OSError) as exc:
            logger.info("relayed connection from %s failed: %s", remote, dial_failure(exc))
            return
        if muxed.peer_id != _to_libp2p(remote):  # Noise proved who it is; the relay said otherwise
            logger.warning("relay %s announced %s but %s connected", stream.remote_peer, remote, muxed.peer_id)
        # the circuit's stream must live as long as the connection over it
        await muxed.event_closed.wait()

    async def disconnect(self, peer: PeerID) -> None:
        try:
            await self._network.close_peer(_to_libp2p(peer))
        except BaseLibp2pError as exc:
            logger.debug("closing the connection to %s: %r", peer, exc)

    def connected_peers(self) -> list[PeerID]:
        peers = (_from_libp2p(p) for p, conns in list(self._network.connections.items()) if conns)
        return [p for p in peers if p is not None]

    def add_peer_listener(self, on_peer: PeerListener, on_disconnect: DisconnectListener | None = None) -> None:
        self._listeners.add(on_peer, on_disconnect)

    # -- dialling ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise HostClosed(f"host {self.peer_id} is closed")

    def _connected(self, libp2p_peer: Libp2pID) -> bool:
        return any(not conn.is_closed for conn in self._network.get_connections(libp2p_peer))

    async def _dial(self, libp2p_peer: Libp2pID, addr: str) -> None:
        """One address: DialError for a failure there, as :func:`dial_in_order` expects."""
        try:
            await self._dial_libp2p(libp2p_peer, addr)
        except (P2PError, BaseLibp2pError, OSError, trio.TooSlowError) as exc:
            mismatch = swarm_mismatch(exc)
            if mismatch is not None:
                # kept so that connect() raises the typed error after the loop
                self._dial_errors.setdefault(_from_libp2p(libp2p_peer), []).append(mismatch)
                raise DialError(str(mismatch)) from None
            raise DialError(dial_failure(exc)) from None

    async def _dial_circuit(self, peer: PeerID, addr: str) -> None:
        carrier, _limit = await relay.open_circuit(self, addr, peer)
        raw = protected_conn(RelayedRawConnection(carrier, True, addr), self._network.psk)
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                await self._network.upgrade_outbound_raw_conn(raw, _to_libp2p(peer))
        except BaseException:
            await carrier.reset()
            raise

    async def _dial_libp2p(self, libp2p_peer: Libp2pID, addr: str) -> None:
        if relay.is_circuit(addr):
            peer = _from_libp2p(libp2p_peer)
            assert peer is not None  # we dial only peers we can name
            await self._dial_circuit(peer, addr)
            return
        maddr = parse_addr(addr).decapsulate_code(P_P2P)  # the peer id is the one we expect
        peerstore = self._network.peerstore
        # exactly this address, and no blacklist left by an earlier failure
        self._network.unblock_peer(libp2p_peer)
        peerstore.clear_addrs(libp2p_peer)
        peerstore.add_addrs(libp2p_peer, [maddr], _ADDR_TTL)
        try:
            with dialling(), trio.fail_after(DIAL_TIMEOUT):
                connections = await self._network.dial_peer(libp2p_peer)
                for conn in connections:
                    await conn.event_started.wait()
        finally:
            self._network.unblock_peer(libp2p_peer)

    # -- handlers ------------------------------------------------------------------

    async def _serve_inbound(self, net_stream: INetStream) -> None:
        """Every inbound stream, in the swarm's task for it: negotiate, then dispatch."""
        libp2p_handlers = self._basic.multiselect.handlers
        try:
            with trio.fail_after(NEGOTIATE_TIMEOUT):
                protocol, pending = await accept(net_stream, libp2p_handlers)
        except (BaseLibp2pError, ProtocolError, trio.TooSlowError) as exc:
            logger.debug("inbound negotiation with %s failed: %r", net_stream.muxed_conn.peer_id, exc)
            await reset_net_stream(net_stream)
            return
        net_stream.set_protocol(protocol)
        handler = self._handlers.get(protocol)
        if handler is not None:
            await self._serve_stream(net_stream, protocol, handler, pending)
            return
        try:  # one of libp2p's own (identify, identify push, ping)
            await libp2p_handlers[protocol](PrefixedNetStream(net_stream, pending) if pending else net_stream)
        except Exception:
            logger.exception("libp2p handler for %s failed; stream reset", protocol)
            await reset_net_stream(net_stream)

    async def _serve_stream(
        self, net_stream: INetStream, protocol: str, handler: StreamHandler, pending: bytes
    ) -> None:
        remote = _from_libp2p(net_stream.muxed_conn.peer_id)
        if remote is None:  # not an Ed25519 peer: we cannot name it, so we do not serve it
            await reset_net_stream(net_stream)
            return
        stream = Libp2pStream(net_stream, protocol, remote, pending)
        try:
            await handler(stream)
        except Exception:
            logger.exception("handler for %s from %s failed; stream reset", protocol, remote)
            await stream.reset()
        else:
            await stream.close()  # as trio's serve_* do: the handler owned the stream

    # -- peer events ---------------------------------------------------------------

    def _on_connected(self, libp2p_peer: Libp2pID) -> None:
        peer = _from_libp2p(libp2p_peer)
        if peer is None or self._closing or peer in self._identified or peer in self._identifying:
            return
        self._identifying.add(peer)
        self._nursery.start_soon(self._identify, peer)

    def _on_disconnected(self, libp2p_peer: Libp2pID) -> None:
        peer = _from_libp2p(libp2p_peer)
        if peer is None or self._connected(libp2p_peer):
            return  # another connection to the peer is still up
        if self._identified.pop(peer, None) is not None and not self._closing:
            self._listeners.disconnected(peer)

    async def _identify(self, peer: PeerID) -> None:
        """A task per new connection: learn the peer's addresses and protocols, then tell."""
        try:
            info = await self._fetch_identify(peer)
        except (P2PError, ProtocolError, trio.TooSlowError) as exc:
            logger.debug("identify of %s failed: %r", peer, exc)
            return
        except Exception:
            logger.exception("identify of %s failed unexpectedly", peer)
            return
        finally:
            self._identifying.discard(peer)
        if self._closing or not self._connected(_to_libp2p(peer)):
            return
        self._addrbook.add(peer, info.addrs, own=True)
        self._identified[peer] = info
        self._listeners.identified(info)

    async def _fetch_identify(self, peer: PeerID) -> PeerInfo:
        with trio.fail_after(IDENTIFY_TIMEOUT):
            async with FramedStream(await self.new_stream(peer, [IDENTIFY_PROTOCOL]), _IDENTIFY_MAX) as framed:
                payload = await framed.receive()
        if payload is None:
            raise RemoteProtocolError("empty identify answer")
        return _parse_identify(peer, payload)


@asynccontextmanager
async def open_libp2p_host(
    key: PrivateKey, listen: Sequence[str] = DEFAULT_LISTEN, *, swarm_key: SwarmKey | None = None
) -> AsyncIterator[Host]:
    """``async with open_libp2p_host(key) as host``: a listening libp2p host.

    With ``swarm_key`` the host belongs to a private swarm: it connects only to hosts
    holding the same key (:mod:`modelnet.p2p.pnet`).

    Raises :class:`BadAddress` if an address does not parse or cannot be listened on.
    Leaving the block closes every connection and the listening sockets.
    """
    take_over_libp2p_logging_once()
    listen_addrs = [parse_addr(text) for text in listen]
    basic = build_host(key, listen_addrs, swarm_key)
    missing: set[str] = set()
    with unwrapping_groups():
        async with trio.open_nursery() as nursery:
            host = Libp2pHost(key, basic, nursery, swarm_key)
            try:
                async with basic.run(listen_addrs):
                    try:
                        # libp2p logs a failed listen and carries on; we refuse to
                        missing = {str(a) for a in listen_addrs} - set(basic.get_network().listeners)
                        if not missing:
                            yield host
                    finally:
                        host._closing = True
                        # inside run(): the only path on which libp2p closes its sockets
                        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                            await basic.close()
            finally:
                host._closing = True
                nursery.cancel_scope.cancel()
    if missing:
        raise BadAddress(f"cannot listen on {sorted(missing)}")
