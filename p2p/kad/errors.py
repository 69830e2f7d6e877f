"""Errors of the DHT."""

from modelnet.p2p.errors import P2PError


class DHTError(P2PError):
    """Base of DHT errors."""


class BootstrapFailed(DHTError):
    """None of the bootstrap peers could be reached."""


class RecordRejected(DHTError):
    """A record with no validator for its key, or too large to keep."""


class RequestFailed(DHTError):
    """A request to one peer failed: unreachable, too slow, or it answered garbage."""
