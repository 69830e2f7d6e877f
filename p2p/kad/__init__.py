"""Kademlia, speaking the libp2p kad-dht wire format on our own protocol id.

Pure core: :mod:`.table` (k-buckets), :mod:`.lookup` (iterative lookup state machine),
:mod:`.store` (records and providers). Driver: :mod:`.dht` (``KademliaDHT`` over a Host).
"""

from .errors import BootstrapFailed, DHTError, RecordRejected, RequestFailed
from .dht import Config, KademliaDHT, Stats
from .lookup import Lookup
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
