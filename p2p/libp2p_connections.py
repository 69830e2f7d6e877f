"""How the libp2p host's connections are made: the swarm (TCP + Noise + Yamux only), the
guard every raw connection goes through before Noise (a private swarm's pre-shared key,
and a clear error for a peer of another swarm), circuits through a relay upgraded like a
TCP socket, and the addresses the host listens on and advertises.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

import multiaddr
import trio
from libp2p import new_swarm
import libp2p.network.swarm as libp2p_swarm
from libp2p.abc import ConnectionType, IRawConnection
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr.exceptions import Error as MultiaddrError
from multiaddr.protocols import P_P2P

from modelnet.identity import PrivateKey

from .errors import BadAddress, P2PError
from .host import Stream
from .pnet import NONCE_BYTES, HandshakeCheck, SwarmKey, SwarmMismatch, XSalsa20
from .streams import DIAL_TIMEOUT

# The adapter's name, which applications and tests configure: a refused stranger is
# logged here as it was before the adapter was split into modules.
logger = logging.getLogger("modelnet.p2p.libp2p_host")


def parse_addr(text: str) -> multiaddr.Multiaddr:
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


def advertised(addrs: Sequence[multiaddr.Multiaddr]) -> list[str]:
    out: list[str] = []
    for addr in addrs:
        out.extend(_dialable(str(addr.decapsulate_code(P_P2P))))
    return list(dict.fromkeys(out))


def swarm_mismatch(exc: BaseException) -> SwarmMismatch | None:
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


def dial_failure(exc: BaseException) -> str:
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


class RelayedRawConnection(IRawConnection):
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


def protected_conn(conn: IRawConnection, psk: Any) -> IRawConnection:
    """What a swarm calls for every raw connection when its ``psk`` is set: ours for our
    hosts, py-libp2p's own for the hex text its other users pass."""
    if isinstance(psk, SwarmKey):
        return _GuardedConnection(conn, psk)
    if psk is _NO_SWARM_KEY:
        return _GuardedConnection(conn, None)
    return _stock_protected_conn(conn, psk)


# The swarm looks this name up in its module on every connection; only swarms whose psk
# is one of ours behave differently.
libp2p_swarm.new_protected_conn = protected_conn


def build_host(key: PrivateKey, listen: Sequence[multiaddr.Multiaddr], swarm_key: SwarmKey | None = None) -> BasicHost:
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
    # pnet: every raw connection, both ways, goes through protected_conn before Noise
    swarm.psk = swarm_key if swarm_key is not None else _NO_SWARM_KEY
    # identify then advertises what listen_addrs() returns, never 0.0.0.0
    return BasicHost(network=swarm, addrs_factory=lambda addrs: [multiaddr.Multiaddr(a) for a in advertised(addrs)])


async def _never_auto_dial() -> None:
    return None
