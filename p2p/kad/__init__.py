"""Kademlia, speaking the libp2p kad-dht wire format on our own protocol id.

Pure core: :mod:`.table` (k-buckets), :mod:`.lookup` (iterative lookup state machine),
:mod:`.store` (records and providers), :mod:`.peer_entries` (peers taken from answers,
answers trimmed to fit). Driver: :mod:`.dht` (``KademliaDHT`` over a Host), with
:mod:`.pool` (our requests on reused outbound streams) and :mod:`.answerer` (answering
others'). Plain data: :mod:`.config` (``Config``), :mod:`.stats` (``Stats``).
"""

from .errors import BootstrapFailed, DHTError, RecordRejected, RequestFailed
from .config import Config
from .dht import KademliaDHT
from .lookup import Lookup
from .stats import Stats
from .store import ProviderStore, RecordStore, StoredRecord, Validator
from .table import ALPHA, K, Contact, RoutingTable

__all__ = [
    "ALPHA",
    "K",
    "BootstrapFailed",
    "Config",
    "Contact",
    "DHTError",
    "KademliaDHT",
    "Lookup",
    "ProviderStore",
    "RecordRejected",
    "RecordStore",
    "RequestFailed",
    "RoutingTable",
    "Stats",
    "StoredRecord",
    "Validator",
]
