"""The DHT's knobs, in one frozen dataclass: imported by the node's config without the
driver (a config is read and written where no DHT runs, e.g. by the command line)."""

from __future__ import annotations

import dataclasses

from modelnet.protocols.kad import PROTOCOL_ID

from .table import ALPHA, K


@dataclasses.dataclass(frozen=True)
class Config:
    k: int = K
    alpha: int = ALPHA
    protocol: str = PROTOCOL_ID
    request_timeout: float = 5.0
    """Bound on every network call (dial, stream, send, answer), seconds."""
    record_ttl: float = 36 * 3600
    """How long a stored value lives without a republish (go-libp2p's MaxRecordAge)."""
    provider_ttl: float = 24 * 3600
    """How long a provider record lives without a republish."""
    republish_interval: float = 12 * 3600
    """Half the shorter ttl: one missed republish loses nothing."""
    refresh_interval: float = 600
    """A bucket not looked up for this long is refreshed with a random lookup."""
    expire_interval: float = 600
    """How often expired records are swept (reads check expiry anyway: this frees memory)."""
    quorum: int = 3
    """get_value stops once this many answers (our own store counts) agree on the best value."""
    client_mode: bool = False
    """Look things up, serve nothing: no handler, so no one adds us to their table."""
    lookup_timeout: float = 30.0
    """Bound on one iterative lookup, seconds: past it the lookup ends with the answers it
    has (a partial result, counted in ``Stats.lookup_timeouts``) instead of following
    peers that name ever more unreachable candidates. Everything built on lookups
    (put_value, get_value, provide, find_providers, find_peer, bootstrap) inherits it."""
    stream_idle_timeout: float = 60.0
    """A pooled outbound stream unused this long is closed. The handler resets an inbound
    stream with no request for twice this, so our own peers rarely close one just as we
    reuse it."""
    max_pooled_streams: int = 256
    """Outbound streams kept open for reuse, one per peer, least recently used dropped first."""
    provider_prefixes: tuple[bytes, ...] = (b"/modelnet/cap/", b"/modelnet/pcap/")
    """ADD_PROVIDER is accepted (and provide() allowed) only for keys under these prefixes
    (public capability tags, and organisations' private ones), so no one can fill the
    provider store with keys no one looks up."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.alpha < 1 or self.quorum < 1:
            raise ValueError("k, alpha and quorum must be at least 1")
        if min(self.request_timeout, self.lookup_timeout, self.stream_idle_timeout) <= 0:
            raise ValueError("request_timeout, lookup_timeout and stream_idle_timeout must be positive")
        if self.max_pooled_streams < 0:
            raise ValueError("max_pooled_streams must not be negative")
        if not 0 < self.republish_interval < min(self.record_ttl, self.provider_ttl):
            raise ValueError("republish_interval must be positive and shorter than both ttls")

    def is_provider_key(self, key: bytes) -> bool:
        """Whether ``key`` is under one of :attr:`provider_prefixes`."""
        return any(key.startswith(prefix) for prefix in self.provider_prefixes)
