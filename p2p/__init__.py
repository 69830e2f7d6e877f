"""The network layer: hosts (libp2p and in-memory), framed streams, and what runs on them.

Importing this package does not import libp2p (slow, heavy): ``open_libp2p_host`` is
loaded from :mod:`modelnet.p2p.libp2p_host` on first use.
"""

from typing import Any

from .errors import BadAddress, DialError, HostClosed, P2PError, ProtocolNotSupported, StreamClosed, StreamReset
from .host import Host, PeerInfo, Stream, full_address, split_full_address
from .memory import MemoryHost, MemoryNetwork, NetworkStats
from .streams import FramedStream

__all__ = [
    "BadAddress",
    "DialError",
    "FramedStream",
    "Host",
    "HostClosed",
    "MemoryHost",
    "MemoryNetwork",
    "NetworkStats",
    "P2PError",
    "PeerInfo",
    "ProtocolNotSupported",
    "Stream",
    "StreamClosed",
    "StreamReset",
    "full_address",
    "open_libp2p_host",
    "split_full_address",
]


def __getattr__(name: str) -> Any:
    if name == "open_libp2p_host":
        from .libp2p_host import open_libp2p_host

        return open_libp2p_host
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
