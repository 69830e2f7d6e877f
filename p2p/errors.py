"""Errors of the network layer. Errors from trio and libp2p are translated into these."""

from modelnet.errors import ModelNetError


class P2PError(ModelNetError):
    """Base of network errors."""


class DialError(P2PError):
    """The peer could not be reached (no address, refused, handshake failed, unreachable)."""


class ProtocolNotSupported(P2PError):
    """The peer does not speak any of the protocols asked for."""


class StreamClosed(P2PError):
    """The stream was closed or reset while we used it."""


class StreamReset(StreamClosed):
    """The stream was aborted, not ended: the remote reset it, the connection was lost or
    a host closed. Bytes in flight may be lost; a clean end of stream reads ``b""`` instead."""


class HostClosed(P2PError):
    """The host is shut down."""


class BadAddress(P2PError):
    """A multiaddr that does not parse or cannot be dialled by this host."""
