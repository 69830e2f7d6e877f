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
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Container, Sequence

import multiaddr
import trio
from libp2p import new_swarm
import libp2p.network.swarm as libp2p_swarm
from libp2p.abc import ConnectionType, INetConn, INetStream, INetwork, INotifee, IRawConnection
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.basic_host import BasicHost
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.stream.exceptions import StreamReset as Libp2pStreamReset
from libp2p.peer.id import ID as Libp2pID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr.exceptions import Error as MultiaddrError
from multiaddr.protocols import P_P2P

from modelnet.errors import unwrapping_groups
from modelnet.identity import IdentityError, PeerID, PrivateKey
from modelnet.protocols.errors import ProtocolError, RemoteProtocolError
from modelnet.protocols.framing import decode_uvarint, encode_uvarint

from .errors import BadAddress, DialError, HostClosed, P2PError, ProtocolNotSupported, StreamClosed, StreamReset
from . import relay
from .host import DisconnectListener, Host, PeerInfo, PeerListener, Stream, StreamHandler
from .pnet import NONCE_BYTES, HandshakeCheck, SwarmKey, SwarmMismatch, XSalsa20
from .streams import (
    DIAL_TIMEOUT,
    NEGOTIATE_TIMEOUT,
    AddressBook,
    FramedStream,
    PeerListeners,
    dial_in_order,
)

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
# Like DIAL_TIMEOUT and NEGOTIATE_TIMEOUT (streams.py): an internal bound, so nothing
# hangs forever on a half-open peer; callers normally give up sooner with fail_after.
IDENTIFY_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 5.0
_RESET_TIMEOUT = 1.0
_IDENTIFY_MAX = 64 * 1024  # an identify message is a few hundred bytes
_ADDR_TTL = 120  # seconds libp2p keeps the one address we hand it before a dial

_MULTISTREAM = b"/multistream/1.0.0\n"
_NOT_SUPPORTED = b"na\n"
_MAX_NEGOTIATION_MESSAGE = 1024

_libp2p_log_handler: logging.Handler | None = None
# Set while we dial: libp2p logs a refused or failed dial at ERROR, but the caller gets
# a DialError for it, so those records are demoted to DEBUG rather than said twice.
_dialling: contextvars.ContextVar[bool] = contextvars.ContextVar("modelnet_libp2p_dialling", default=False)


class _ForwardToModelnet(logging.Handler):
    """Hands libp2p's records to ``modelnet.p2p.libp2p``, where the application's
    logging configuration decides what happens to them."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("modelnet.p2p.libp2p")
        if _dialling.get() and record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def take_over_libp2p_logging(level: int = logging.WARNING) -> None:
    """Route the ``libp2p`` logger into ours at ``level`` (importing libp2p leaves it
    with no handler and propagation off, and some of its modules log on every normal
    stream end). Idempotent; a later call changes the level."""
    global _libp2p_log_handler
    libp2p_logger = logging.getLogger("libp2p")
    libp2p_logger.setLevel(level)
    if _libp2p_log_handler is None:
        _libp2p_log_handler = _ForwardToModelnet()
        libp2p_logger.addHandler(_libp2p_log_handler)
    # on the handler too: some libp2p modules set their own logger to INFO
    _libp2p_log_handler.setLevel(level)


def _to_libp2p(peer: PeerID) -> Libp2pID:
    return Libp2pID(peer.bytes)


def _from_libp2p(peer: Libp2pID) -> PeerID | None:
    """Our id for a libp2p peer, or None if it is not an Ed25519 peer (we speak only those)."""
    try:
        return PeerID.from_bytes(peer.to_bytes())
    except IdentityError:
        return None


def _parse_addr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except (MultiaddrError, ValueError, TypeError) as exc:
        raise BadAddress(f"{text!r} is not a multiaddr: {exc}") from None


@functools.lru_cache(maxsize=64)
def _dialable(addr: str) -> tuple[str, ...]:
    """What peers can dial for one listen address: a wildcard (0.0.0.0, ::) becomes the
    machine's interface addresses, loopback last."""
    for wildcard, loopback in (("/ip4/0.0.0.0/", "/ip4/127.0.0.1/"), ("/ip6/::/", "/ip6/::1/")):
        if addr.startswith(wildcard):
            interfaces = [str(a) for a in expand_wildcard_address(multiaddr.Multiaddr(addr)) if str(a) != addr]
            return tuple(dict.fromkeys([*interfaces, loopback + addr[len(wildcard) :]]))
    return (addr,)


def _advertised(addrs: Sequence[multiaddr.Multiaddr]) -> list[str]:
    out: list[str] = []
    for addr in addrs:
        out.extend(_dialable(str(addr.decapsulate_code(P_P2P))))
    return list(dict.fromkeys(out))


def _swarm_mismatch(exc: BaseException) -> SwarmMismatch | None:
    """The :class:`SwarmMismatch` somewhere inside what libp2p raised for a dial (it wraps
    errors in MultiErrors, groups and ``raise … from``), or None."""
    pending, seen = [exc], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, SwarmMismatch):
            return error
        pending.extend(getattr(error, "errors", None) or ())  # libp2p's MultiError
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        pending.extend((error.__cause__, error.__context__))
    return None


def _dial_failure(exc: BaseException) -> str:
    """The useful part of a failed dial: libp2p's per-address reason, not its wrapper."""
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {DIAL_TIMEOUT:g} s"
    cause = exc.__cause__ if isinstance(exc, BaseLibp2pError) and exc.__cause__ is not None else exc
    return str(cause).removeprefix("Error 1: ") or type(cause).__name__


def _key_pair(key: PrivateKey) -> KeyPair:
    private = Ed25519PrivateKey.from_bytes(key.seed)
    return KeyPair(private, private.get_public_key())


class _GuardedConnection(IRawConnection):
    """Every raw connection of our hosts, before the security handshake.

    With a swarm key it is a pnet connection (libp2p pnet v1): our random 24-byte nonce
    goes first, then everything both ways is XSalsa20 under the key. With or without
    one, the peer's first bytes are checked (:class:`~.pnet.HandshakeCheck`), so a peer of
    another swarm fails the dial at once with a :class:`~.pnet.SwarmMismatch` that names
    the likely cause, instead of a handshake that waits for the dial timeout.
    """

    def __init__(self, conn: IRawConnection, key: SwarmKey | None) -> None:
        self._conn = conn
        self._key = key
        self.is_initiator = conn.is_initiator
        self._check = HandshakeCheck(key)
        self._encrypt: XSalsa20 | None = None
        self._decrypt: XSalsa20 | None = None

    async def write(self, data: bytes) -> None:
        if self._key is None:
            await self._conn.write(data)
        elif self._encrypt is None:
            nonce = os.urandom(NONCE_BYTES)
            self._encrypt = XSalsa20(self._key, nonce)
            await self._conn.write(nonce + self._encrypt.apply(data))  # one segment, not two
        else:
            await self._conn.write(self._encrypt.apply(data))

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self._read(n)
        except SwarmMismatch as exc:
            if not self.is_initiator:  # the dialler gets the error; the listener tells its log
                logger.info("refused a connection from %s: %s", self._remote(), exc)
            raise

    async def _read(self, n: int | None) -> bytes:
        if self._key is not None and self._decrypt is None:
            nonce = b""
            while len(nonce) < NONCE_BYTES:  # TCP may split it
                chunk = await self._conn.read(NONCE_BYTES - len(nonce))
                if not chunk:
                    self._check.ended()
                    return b""
                self._check.nonce(nonce + chunk)
                nonce += chunk
            self._decrypt = XSalsa20(self._key, nonce)
        data = await self._conn.read(n)
        if not data:
            self._check.ended()
            return b""
        if self._decrypt is not None:
            data = self._decrypt.apply(data)
        self._check.feed(data)
        return data

    def _remote(self) -> str:
        address = self._conn.get_remote_address()
        return f"{address[0]}:{address[1]}" if address else "an unknown address"

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()

    def get_transport_addresses(self) -> list[multiaddr.Multiaddr]:
        return self._conn.get_transport_addresses()

    def get_connection_type(self) -> ConnectionType:
        return self._conn.get_connection_type()


class _RelayedRawConnection(IRawConnection):
    """A circuit through a relay (one of our streams), as the raw connection libp2p
    secures and muxes: its reset or loss reads as a broken socket."""

    def __init__(self, stream: Stream, is_initiator: bool, address: str) -> None:
        self._stream = stream
        self.is_initiator = is_initiator
        self._address = address

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self._stream.read(n if n is not None and n > 0 else 65536)
        except P2PError as exc:
            raise RawConnError(f"relayed connection: {exc}") from None

    async def write(self, data: bytes) -> None:
        try:
            await self._stream.write(data)
        except P2PError as exc:
            raise RawConnError(f"relayed connection: {exc}") from None

    async def close(self) -> None:
        await self._stream.reset()  # both ways at once, as closing a socket does

    def get_remote_address(self) -> tuple[str, int] | None:
        return None

    def get_transport_addresses(self) -> list[multiaddr.Multiaddr]:
        return [multiaddr.Multiaddr(self._address)]

    def get_connection_type(self) -> ConnectionType:
        return ConnectionType.RELAYED


class _NoSwarmKey:
    """The swarm's ``psk`` for a host in no private swarm: connections are still guarded."""


_NO_SWARM_KEY = _NoSwarmKey()
_stock_protected_conn = libp2p_swarm.new_protected_conn


def _protected_conn(conn: IRawConnection, psk: Any) -> IRawConnection:
    """What a swarm calls for every raw connection when its ``psk`` is set: ours for our
    hosts, py-libp2p's own for the hex text its other users pass."""
    if isinstance(psk, SwarmKey):
        return _GuardedConnection(conn, psk)
    if psk is _NO_SWARM_KEY:
        return _GuardedConnection(conn, None)
    return _stock_protected_conn(conn, psk)


# The swarm looks this name up in its module on every connection; only swarms whose psk
# is one of ours behave differently.
libp2p_swarm.new_protected_conn = _protected_conn


def _build_host(key: PrivateKey, listen: Sequence[multiaddr.Multiaddr], swarm_key: SwarmKey | None = None) -> BasicHost:
    key_pair = _key_pair(key)
    swarm = new_swarm(
        key_pair=key_pair,
        # Noise only: the default list also offers /plaintext and /secio
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        listen_addrs=list(listen),
        # one connection per peer: otherwise every dial waits out a 250 ms happy-eyeballs delay
        connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=DIAL_TIMEOUT),
        # we walk the addresses ourselves; libp2p's retries only delay a refused dial
        retry_config=RetryConfig(max_retries=0),
    )
    # libp2p's auto-connector dials every peer in its peerstore (up to 150 connections)
    # whenever we are below its watermark, and redials peers after a disconnect; no
    # ConnectionConfig turns it off without also pruning our connections. Connections
    # are the DHT's business here, so it never dials.
    swarm.auto_connector.maybe_connect = _never_auto_dial
    # pnet: every raw connection, both ways, goes through _protected_conn before Noise
    swarm.psk = swarm_key if swarm_key is not None else _NO_SWARM_KEY
    # identify then advertises what listen_addrs() returns, never 0.0.0.0
    return BasicHost(network=swarm, addrs_factory=lambda addrs: [multiaddr.Multiaddr(a) for a in _advertised(addrs)])


async def _never_auto_dial() -> None:
    return None


def _delimited(message: bytes) -> bytes:
    return encode_uvarint(len(message)) + message


async def _reset(net_stream: INetStream) -> None:
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


class _Libp2pStream(Stream):
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
        await _reset(self._net_stream)

    def __repr__(self) -> str:
        return f"Libp2pStream({self.protocol}, remote={self.remote_peer.short()})"


class _MessageReader:
    """Reads multistream-select messages (varint-delimited) without reading byte by byte;
    what it reads past the negotiation is handed to the protocol as pending bytes."""

    def __init__(self, net_stream: INetStream) -> None:
        self._net_stream = net_stream
        self._buffer = bytearray()

    async def next_message(self) -> bytes:
        buffer = self._buffer
        while True:
            header = decode_uvarint(buffer)
            if header is not None:
                length, start = header
                if length > _MAX_NEGOTIATION_MESSAGE:
                    raise RemoteProtocolError(f"negotiation message of {length} bytes")
                if len(buffer) - start >= length:
                    message = bytes(buffer[start : start + length])
                    del buffer[: start + length]
                    return message
            data = await self._net_stream.read(65536)
            if not data:
                raise RemoteProtocolError("stream ended during protocol negotiation")
            buffer.extend(data)

    def has_message(self) -> bool:
        header = decode_uvarint(self._buffer)
        return header is not None and len(self._buffer) - header[1] >= header[0]

    def rest(self) -> bytes:
        return bytes(self._buffer)


async def _negotiate(net_stream: INetStream, protocols: Sequence[str]) -> tuple[str, bytes]:
    """multistream-select as the initiator; return the protocol and any bytes read past it."""
    reader = _MessageReader(net_stream)
    proposals = [p.encode() + b"\n" for p in protocols]
    # pipelined: the handshake and the first proposal go together (multistream-select
    # allows it; go-libp2p does the same)
    await net_stream.write(_delimited(_MULTISTREAM) + _delimited(proposals[0]))
    if await reader.next_message() != _MULTISTREAM:
        raise RemoteProtocolError("peer does not speak multistream-select 1.0.0")
    for i, proposal in enumerate(proposals):
        if i:
            await net_stream.write(_delimited(proposal))
        answer = await reader.next_message()
        if answer == proposal:
            return protocols[i], reader.rest()
        if answer != _NOT_SUPPORTED:
            raise RemoteProtocolError(f"unexpected negotiation answer {answer[:64]!r}")
    raise ProtocolNotSupported(f"peer supports none of {list(protocols)}")


async def _accept(net_stream: INetStream, supported: Container[str]) -> tuple[str, bytes]:
    """multistream-select as the responder; return the protocol and any bytes read past it.

    Answers ``na`` to a protocol it does not serve, and to ``ls`` (listing is optional in
    the spec; we do not tell strangers what we serve before they ask for it). A message
    without its trailing newline is malformed: RemoteProtocolError, and the caller resets
    the stream, as the spec asks.
    """
    reader = _MessageReader(net_stream)
    if await reader.next_message() != _MULTISTREAM:
        raise RemoteProtocolError("peer does not speak multistream-select 1.0.0")
    reply = _delimited(_MULTISTREAM)
    while True:
        if reply and not reader.has_message():
            # a client that does not pipeline waits for our answer before proposing
            await net_stream.write(reply)
            reply = b""
        message = await reader.next_message()
        if message == _MULTISTREAM:  # some peers restart the handshake; acknowledge again
            reply += _delimited(_MULTISTREAM)
            continue
        if not message.endswith(b"\n"):
            raise RemoteProtocolError(f"negotiation message without a newline: {message[:64]!r}")
        protocol = message[:-1].decode("utf-8", "replace")
        if protocol and protocol in supported:
            await net_stream.write(reply + _delimited(message))
            return protocol, reader.rest()
        await net_stream.write(reply + _delimited(_NOT_SUPPORTED))
        reply = b""


class _PrefixedNetStream:
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
        return _advertised(self._basic.get_transport_addrs()) + list(self._relay_addrs)

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
                protocol, pending = await _negotiate(net_stream, protocols)
        except BaseException as exc:
            if net_stream is not None:
                await _reset(net_stream)
            if isinstance(exc, ProtocolNotSupported):
                raise
            if isinstance(exc, (BaseLibp2pError, ProtocolError, trio.TooSlowError)):
                raise DialError(f"could not open a stream to {peer}: {exc!r}") from None
            raise
        net_stream.set_protocol(protocol)
        return _Libp2pStream(net_stream, protocol, peer, pending)

    async def serve_relayed(self, stream: Stream, remote: PeerID) -> None:
        self._check_open()
        address = f"/p2p/{stream.remote_peer}/p2p-circuit/p2p/{remote}"
        raw = _RelayedRawConnection(stream, False, address)
        try:
            muxed = await self._network.upgrade_inbound_raw_conn(raw, multiaddr.Multiaddr(address))
        except (BaseLibp2pError, OSError) as exc:
            logger.info("relayed connection from %s failed: %s", remote, _dial_failure(exc))
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
            mismatch = _swarm_mismatch(exc)
            if mismatch is not None:
                # kept so that connect() raises the typed error after the loop
                self._dial_errors.setdefault(_from_libp2p(libp2p_peer), []).append(mismatch)
                raise DialError(str(mismatch)) from None
            raise DialError(_dial_failure(exc)) from None

    async def _dial_circuit(self, peer: PeerID, addr: str) -> None:
        carrier, _limit = await relay.open_circuit(self, addr, peer)
        raw = _protected_conn(_RelayedRawConnection(carrier, True, addr), self._network.psk)
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
        maddr = _parse_addr(addr).decapsulate_code(P_P2P)  # the peer id is the one we expect
        peerstore = self._network.peerstore
        # exactly this address, and no blacklist left by an earlier failure
        self._network.unblock_peer(libp2p_peer)
        peerstore.clear_addrs(libp2p_peer)
        peerstore.add_addrs(libp2p_peer, [maddr], _ADDR_TTL)
        token = _dialling.set(True)  # inherited by the tasks libp2p starts for the dial
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                connections = await self._network.dial_peer(libp2p_peer)
                for conn in connections:
                    await conn.event_started.wait()
        finally:
            _dialling.reset(token)
            self._network.unblock_peer(libp2p_peer)

    # -- handlers ------------------------------------------------------------------

    async def _serve_inbound(self, net_stream: INetStream) -> None:
        """Every inbound stream, in the swarm's task for it: negotiate, then dispatch."""
        libp2p_handlers = self._basic.multiselect.handlers
        try:
            with trio.fail_after(NEGOTIATE_TIMEOUT):
                protocol, pending = await _accept(net_stream, libp2p_handlers)
        except (BaseLibp2pError, ProtocolError, trio.TooSlowError) as exc:
            logger.debug("inbound negotiation with %s failed: %r", net_stream.muxed_conn.peer_id, exc)
            await _reset(net_stream)
            return
        net_stream.set_protocol(protocol)
        handler = self._handlers.get(protocol)
        if handler is not None:
            await self._serve_stream(net_stream, protocol, handler, pending)
            return
        try:  # one of libp2p's own (identify, identify push, ping)
            await libp2p_handlers[protocol](_PrefixedNetStream(net_stream, pending) if pending else net_stream)
        except Exception:
            logger.exception("libp2p handler for %s failed; stream reset", protocol)
            await _reset(net_stream)

    async def _serve_stream(
        self, net_stream: INetStream, protocol: str, handler: StreamHandler, pending: bytes
    ) -> None:
        remote = _from_libp2p(net_stream.muxed_conn.peer_id)
        if remote is None:  # not an Ed25519 peer: we cannot name it, so we do not serve it
            await _reset(net_stream)
            return
        stream = _Libp2pStream(net_stream, protocol, remote, pending)
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
    if _libp2p_log_handler is None:  # keep a level the application chose
        take_over_libp2p_logging()
    listen_addrs = [_parse_addr(text) for text in listen]
    basic = _build_host(key, listen_addrs, swarm_key)
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
