"""A node's knobs, in one frozen dataclass. Times are seconds."""

from __future__ import annotations

import dataclasses

from .kad.config import Config as DHTConfig
from .relay import ServiceConfig as RelayServiceConfig


@dataclasses.dataclass(frozen=True)
class Config:
    record_ttl: float = 3600.0  # signed capability records expire after this
    republish_interval: float = 1200.0  # republish well before expiry (a third of the TTL)
    session_ttl: float = 600.0  # lifetime of a session grant we issue
    request_timeout: float = 30.0  # default deadline of a request we send
    network_timeout: float = 5.0  # bound of one network exchange (dial, session, record fetch)
    max_providers: int = 20  # providers considered per lookup
    provider_cache_ttl: float = 30.0  # reuse a capability's provider list this long (DHT lookups are not free)
    max_answer_bytes: int = 8 << 20  # chunks + result we accept from a provider for one request
    # What we serve, and to whom. A peer's limits are signed into its grant.
    max_concurrent_requests: int = 32  # requests served at once; more are refused OVERLOADED
    max_requests_per_peer: int = 8  # of those, at most this many for one asker
    requests_per_minute_per_peer: int = 600
    max_request_seconds: float = 300.0  # work for one request stops after this, whatever its deadline
    # Session negotiations (each costs up to 9 signature checks and one signature) are
    # limited per peer as requests are: at once, and per minute.
    max_sessions_per_peer: int = 4
    sessions_per_minute_per_peer: int = 120
    # Organisations: how often a provider with org policies looks up each org's revocation
    # list; None means republish_interval, so a revocation is honoured within one.
    revocation_refresh: float | None = None
    client_mode: bool = False  # a light client: no DHT serving, nothing published
    # Routing (what we ask). Hedging: if a provider sends no first chunk within its
    # measured p95 (at least hedge_floor; while it has too few samples, the p95 over all
    # providers, or hedge_default before we measured anyone), ask the next one too; the
    # first to answer wins and the other is cancelled.
    hedging: bool = True
    hedge_floor: float = 0.05
    hedge_default: float = 1.0
    max_parallel_attempts: int = 2  # attempts in flight at once for one request (1: no hedging)
    max_attempts: int = 6  # providers one request tries in all, failover and hedging together
    hop_limit: int = 8  # hops a request we send may take
    # Forwarding (what we route for others): answer requests for capabilities we don't
    # serve by routing them onward, through the DHT or, failing that, through ``upstream``
    # (full addresses of peers that forward for us). Our own limits apply to that work.
    forwarding: bool = False
    upstream: tuple[str, ...] = ()
    # Circuit relay v2 (p2p/relay.py): ``relays`` (full addresses) to reserve a slot on, for
    # a node others cannot dial (its records then carry …/p2p/<relay>/p2p-circuit);
    # ``relay_service`` makes this node a relay for others, within ``relay_limits``.
    relays: tuple[str, ...] = ()
    relay_service: bool = False
    relay_limits: RelayServiceConfig = RelayServiceConfig()
    dht: DHTConfig = DHTConfig()
