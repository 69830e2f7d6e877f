"""What a DHT node keeps for others: value records and provider records.

Pure data structures; ``now`` is wall-clock seconds (records outlive a process, and their
expiry must mean the same on every peer), passed in by the caller.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import Mapping, Protocol, Sequence

from modelnet.identity import PeerID

from .errors import RecordRejected

logger = logging.getLogger(__name__)

MAX_RECORDS = 10_000
MAX_KEY_SIZE = 1024
"""Bytes of a record or provider key (the kad wire allows no more either)."""
MAX_VALUE_SIZE = 64 * 1024
"""A DHT record names or describes something; anything bigger belongs on a stream."""
MAX_RECORD_BYTES = 64 * 1024 * 1024
"""Total key + value bytes one node keeps for others (with MAX_RECORDS, bounds memory)."""
MAX_PROVIDER_KEYS = 10_000
MAX_PROVIDERS_PER_KEY = 100
MAX_KEYS_PER_PROVIDER = 256
"""Keys one peer may be provider of in our store: a node announces its own capabilities,
a few dozen; past this its new announcements are refused (never others' evicted)."""
MAX_PROVIDER_ADDRS = 32
MAX_PROVIDER_ADDR_BYTES = 4096
"""Text addresses kept with one provider record: the first ones that fit both caps."""
MAX_PROVIDER_BYTES = 32 * 1024 * 1024
"""Total bytes of provider records (keys, addresses and ~_PROVIDER_OVERHEAD each). Without
it the caps above allow 10,000 keys x 100 providers x 4 KiB = 4 GiB; past it the key least
recently announced goes, as for MAX_PROVIDER_KEYS."""
_PROVIDER_OVERHEAD = 160  # bytes of Python objects per provider record (peer id, tuples, slot)


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
        if len(key) > MAX_KEY_SIZE:
            raise RecordRejected(f"key of {len(key)} bytes exceeds {MAX_KEY_SIZE}")
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
        self._bytes += len(key) + len(value)
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
            self._bytes -= len(record.key) + len(record.value)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records


class ProviderStore:
    """key -> {provider peer: (addrs, expires)}.

    Bounded: at most ``max_keys`` keys and ``max_bytes`` in all (past either, the key least
    recently announced goes first), ``max_per_key`` providers per key (the provider least
    recently announced goes first), ``max_keys_per_provider`` keys per provider peer (past
    it, that peer's announcements of new keys are refused, so one identity cannot push out
    everyone else's records), and the first addresses within MAX_PROVIDER_ADDRS /
    MAX_PROVIDER_ADDR_BYTES per record.
    """

    def __init__(
        self,
        *,
        ttl: float,
        max_keys: int = MAX_PROVIDER_KEYS,
        max_per_key: int = MAX_PROVIDERS_PER_KEY,
        max_keys_per_provider: int = MAX_KEYS_PER_PROVIDER,
        max_bytes: int = MAX_PROVIDER_BYTES,
    ) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self.max_per_key = max_per_key
        self.max_keys_per_provider = max_keys_per_provider
        self.max_bytes = max_bytes
        self._providers: OrderedDict[bytes, OrderedDict[PeerID, tuple[tuple[str, ...], float]]] = OrderedDict()
        self._keys_of: dict[PeerID, int] = {}  # provider -> how many keys it holds here
        self.bytes = 0
        """What the records held cost, by the estimate that ``max_bytes`` bounds."""

    def add(self, key: bytes, peer: PeerID, addrs: Sequence[str], now: float) -> bool:
        """Store or renew ``peer`` as a provider of ``key``; False if it was refused (the key
        is too long or ``peer`` is at its quota of keys) or at once evicted by the caps."""
        if len(key) > MAX_KEY_SIZE:
            logger.debug("provider key of %d bytes from %s refused", len(key), peer)
            return False
        entries = self._providers.get(key)
        if (entries is None or peer not in entries) and self._keys_of.get(peer, 0) >= self.max_keys_per_provider:
            logger.debug("%s is provider of %d keys already: %r refused", peer, self.max_keys_per_provider, key[:40])
            return False
        if entries is None:
            entries = self._providers[key] = OrderedDict()
            self.bytes += len(key)
        else:
            self._providers.move_to_end(key)
            self._drop(key, entries, peer)
        kept = _capped_addrs(addrs)
        entries[peer] = (kept, now + self.ttl)
        self._keys_of[peer] = self._keys_of.get(peer, 0) + 1
        self.bytes += _record_cost(kept)
        while len(entries) > self.max_per_key:
            self._drop(key, entries, next(iter(entries)))
        while len(self._providers) > self.max_keys or self.bytes > self.max_bytes:
            self._drop_key(next(iter(self._providers)))
        return peer in self._providers.get(key, ())

    def remove(self, key: bytes, peer: PeerID) -> None:
        entries = self._providers.get(key)
        if entries is not None:
            self._drop(key, entries, peer)
            if not entries:
                self._drop_key(key)

    def providers(
        self, key: bytes, now: float, count: int = MAX_PROVIDERS_PER_KEY
    ) -> list[tuple[PeerID, tuple[str, ...]]]:
        """Live providers of ``key``, most recently announced first."""
        entries = self._providers.get(key)
        if not entries:
            return []
        live = [(peer, addrs) for peer, (addrs, expires) in reversed(entries.items()) if expires > now]
        return live[:count]

    def keys_of(self, peer: PeerID) -> int:
        """How many keys ``peer`` is a provider of here."""
        return self._keys_of.get(peer, 0)

    def expire(self, now: float) -> int:
        """Drop expired provider records; returns how many."""
        dropped = 0
        for key in list(self._providers):
            entries = self._providers[key]
            for peer in [p for p, (_, expires) in entries.items() if expires <= now]:
                self._drop(key, entries, peer)
                dropped += 1
            if not entries:
                self._drop_key(key)
        return dropped

    def _drop(self, key: bytes, entries: OrderedDict[PeerID, tuple[tuple[str, ...], float]], peer: PeerID) -> None:
        """Forget one record (the key stays, even if it has no providers left)."""
        record = entries.pop(peer, None)
        if record is None:
            return
        self.bytes -= _record_cost(record[0])
        left = self._keys_of[peer] - 1
        if left:
            self._keys_of[peer] = left
        else:
            del self._keys_of[peer]

    def _drop_key(self, key: bytes) -> None:
        entries = self._providers.pop(key)
        for peer in list(entries):
            self._drop(key, entries, peer)
        self.bytes -= len(key)

    def __len__(self) -> int:
        """Number of keys with at least one provider record."""
        return len(self._providers)


def _capped_addrs(addrs: Sequence[str]) -> tuple[str, ...]:
    kept: list[str] = []
    total = 0
    for addr in addrs:
        if len(kept) == MAX_PROVIDER_ADDRS:
            break
        if total + len(addr) <= MAX_PROVIDER_ADDR_BYTES:
            kept.append(addr)
            total += len(addr)
    return tuple(kept)


def _record_cost(addrs: tuple[str, ...]) -> int:
    return _PROVIDER_OVERHEAD + sum(map(len, addrs))
