"""What a DHT node keeps for others: value records and provider records.

Pure data structures; ``now`` is wall-clock seconds (records outlive a process, and their
expiry must mean the same on every peer), passed in by the caller.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Mapping, Protocol, Sequence

from modelnet.identity import PeerID

from .errors import RecordRejected

MAX_RECORDS = 10_000
MAX_VALUE_SIZE = 64 * 1024
"""A DHT record names or describes something; anything bigger belongs on a stream."""
MAX_RECORD_BYTES = 64 * 1024 * 1024
"""Total value bytes one node keeps for others (with MAX_RECORDS, bounds memory)."""
MAX_PROVIDER_KEYS = 10_000
MAX_PROVIDERS_PER_KEY = 100


class Validator(Protocol):
    """The rules of one key namespace (a key prefix such as ``b"/cap/"``)."""

    def validate(self, key: bytes, value: bytes, now: float) -> None:
        """Raise a ModelNetError to reject ``value`` for ``key``."""

    def select(self, key: bytes, values: list[bytes]) -> int:
        """Index of the best of several valid ``values`` (e.g. the newest)."""


def find_validator(validators: Mapping[bytes, Validator], key: bytes) -> Validator | None:
    """The validator of the longest prefix of ``key`` (None: the key is in no namespace)."""
    best: bytes | None = None
    for prefix in validators:
        if key.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else validators[best]


@dataclasses.dataclass(frozen=True, slots=True)
class StoredRecord:
    key: bytes
    value: bytes
    received: float
    expires: float


class RecordStore:
    """key -> the best valid value seen, with the time it arrived and its expiry.

    When full, the record that would expire first goes: refreshed records move to the back.
    """

    def __init__(
        self,
        validators: Mapping[bytes, Validator],
        *,
        ttl: float,
        max_records: int = MAX_RECORDS,
        max_value_size: int = MAX_VALUE_SIZE,
        max_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self.validators = validators
        self.ttl = ttl
        self.max_records = max_records
        self.max_value_size = max_value_size
        self.max_bytes = max_bytes
        self._records: OrderedDict[bytes, StoredRecord] = OrderedDict()
        self._bytes = 0

    def validate(self, key: bytes, value: bytes, now: float) -> Validator:
        """Check ``value`` for ``key`` (raises RecordRejected or the validator's error)."""
        if len(value) > self.max_value_size:
            raise RecordRejected(f"value of {len(value)} bytes exceeds {self.max_value_size}")
        validator = find_validator(self.validators, key)
        if validator is None:
            raise RecordRejected(f"no validator for key {key[:40]!r}")
        validator.validate(key, value, now)
        return validator

    def put(self, key: bytes, value: bytes, now: float) -> bool:
        """Validate and store ``value`` unless the stored one is better.

        Returns True if ``value`` is what the store now holds (new, better or the same value
        again, which renews its expiry), False if the stored value was kept. Raises
        RecordRejected or the validator's error for an invalid value.
        """
        validator = self.validate(key, value, now)
        old = self.get(key, now)
        if old is not None and old.value != value and validator.select(key, [value, old.value]) != 0:
            return False
        self._discard(key)
        self._records[key] = StoredRecord(key, value, now, now + self.ttl)
        self._bytes += len(value)
        while len(self._records) > self.max_records or self._bytes > self.max_bytes:
            self._discard(next(iter(self._records)))
        return True

    def get(self, key: bytes, now: float) -> StoredRecord | None:
        record = self._records.get(key)
        if record is not None and record.expires <= now:
            self._discard(key)
            return None
        return record

    def expire(self, now: float) -> int:
        """Drop expired records; returns how many."""
        expired = [key for key, record in self._records.items() if record.expires <= now]
        for key in expired:
            self._discard(key)
        return len(expired)

    def _discard(self, key: bytes) -> None:
        record = self._records.pop(key, None)
        if record is not None:
            self._bytes -= len(record.value)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records


class ProviderStore:
    """key -> {provider peer: (addrs, expires)}.

    Bounded: at most ``max_keys`` keys (the key least recently announced goes first) and
    ``max_per_key`` providers per key (the provider least recently announced goes first).
    """

    def __init__(
        self, *, ttl: float, max_keys: int = MAX_PROVIDER_KEYS, max_per_key: int = MAX_PROVIDERS_PER_KEY
    ) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self.max_per_key = max_per_key
        self._providers: OrderedDict[bytes, OrderedDict[PeerID, tuple[tuple[str, ...], float]]] = OrderedDict()

    def add(self, key: bytes, peer: PeerID, addrs: Sequence[str], now: float) -> None:
        entries = self._providers.get(key)
        if entries is None:
            entries = self._providers[key] = OrderedDict()
        self._providers.move_to_end(key)
        entries[peer] = (tuple(addrs), now + self.ttl)
        entries.move_to_end(peer)
        while len(entries) > self.max_per_key:
            entries.popitem(last=False)
        while len(self._providers) > self.max_keys:
            self._providers.popitem(last=False)

    def remove(self, key: bytes, peer: PeerID) -> None:
        entries = self._providers.get(key)
        if entries is not None:
            entries.pop(peer, None)
            if not entries:
                del self._providers[key]

    def providers(
        self, key: bytes, now: float, count: int = MAX_PROVIDERS_PER_KEY
    ) -> list[tuple[PeerID, tuple[str, ...]]]:
        """Live providers of ``key``, most recently announced first."""
        entries = self._providers.get(key)
        if not entries:
            return []
        live = [(peer, addrs) for peer, (addrs, expires) in reversed(entries.items()) if expires > now]
        return live[:count]

    def expire(self, now: float) -> int:
        """Drop expired provider records; returns how many."""
        dropped = 0
        for key in list(self._providers):
            entries = self._providers[key]
            for peer in [p for p, (_, expires) in entries.items() if expires <= now]:
                del entries[peer]
                dropped += 1
            if not entries:
                del self._providers[key]
        return dropped

    def __len__(self) -> int:
        """Number of keys with at least one provider record."""
        return len(self._providers)
