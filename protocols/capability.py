"""Capability records: what a node's models can do, signed by the node, kept in the DHT.

A node publishes its full :class:`CapabilityRecord` as a signed record under
``NODE_KEY_PREFIX + peer id bytes`` and registers as a provider under
``CAPABILITY_KEY_PREFIX + tag`` for every tag its models answer to: the task (``chat``,
``embed``, ``classify``…), ``model:<name>``, and each domain tag. A searcher finds
providers by tag, then fetches and verifies the node record before using it.

Payload (canonical msgpack map; unknown fields are ignored)::

    {"peer": <peer id bytes>, "addrs": [multiaddr text…], "software": str,
     "models": [{"name", "task", "tags", "description", "max_input_bytes", "streaming",
                 "context_length"?, "max_output_tokens"?}…]}

``context_length`` (tokens of input and output together) and ``max_output_tokens`` are
present only when the model declares them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from modelnet.identity import IdentityError, PeerID, PrivateKey, SignedRecord, WrongKey, canonical, open_record

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    check_bool,
    check_int,
    check_str,
    check_tuple,
    decode_map,
    field,
    peer_input,
    set_field,
)

DOMAIN = "modelnet"
CAPABILITY_TYPE = "capability"
NODE_KEY_PREFIX = b"/modelnet/node/"
CAPABILITY_KEY_PREFIX = b"/modelnet/cap/"

MAX_TAG_CHARS = 64
MODEL_TAG_PREFIX = "model:"
MAX_MODEL_NAME_CHARS = MAX_TAG_CHARS - len(MODEL_TAG_PREFIX)
MAX_TAGS_PER_MODEL = 16
MAX_DESCRIPTION_CHARS = 1024
MAX_INPUT_BYTES_LIMIT = 1 << 30
MAX_TOKENS_LIMIT = 1 << 32  # context lengths and output limits, in tokens
MAX_MODELS = 64
MAX_ADDRS = 16
MAX_ADDR_CHARS = 256
MAX_SOFTWARE_CHARS = 64
_TAG = re.compile(r"[a-z0-9._:-]{1,%d}" % MAX_TAG_CHARS)


def normalize_tag(text: str) -> str:
    """Strip and lowercase; 1..64 chars of ``[a-z0-9._:-]`` or :class:`LocalProtocolError`."""
    if not isinstance(text, str):
        raise LocalProtocolError(f"a capability tag is a str, not {type(text).__name__}")
    tag = text.strip().lower()
    if not _TAG.fullmatch(tag):
        raise LocalProtocolError(f"capability tag {text!r} must be 1..{MAX_TAG_CHARS} chars of a-z 0-9 . _ : -")
    return tag


def capability_key(tag: str) -> bytes:
    """The DHT provider key for a capability tag."""
    return CAPABILITY_KEY_PREFIX + normalize_tag(tag).encode("ascii")


def node_record_key(peer: PeerID) -> bytes:
    """The DHT key under which ``peer`` stores its signed capability record."""
    return NODE_KEY_PREFIX + peer.bytes


def _dedupe(items: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


@dataclasses.dataclass(frozen=True, slots=True)
class ModelCapability:
    """One model a node serves. ``task`` and ``tags`` are stored normalized."""

    name: str
    task: str
    tags: tuple[str, ...] = ()
    description: str = ""
    max_input_bytes: int = 65536
    streaming: bool = False
    context_length: int | None = None
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        check_str("model name", self.name, min_len=1, max_len=MAX_MODEL_NAME_CHARS)
        normalize_tag(MODEL_TAG_PREFIX + self.name)
        set_field(self, "task", normalize_tag(self.task))
        tags = check_tuple("model tags", self.tags, max_len=MAX_TAGS_PER_MODEL)
        set_field(self, "tags", _dedupe(normalize_tag(tag) for tag in tags))
        check_str("model description", self.description, max_len=MAX_DESCRIPTION_CHARS)
        check_int("max_input_bytes", self.max_input_bytes, 1, MAX_INPUT_BYTES_LIMIT)
        check_bool("streaming", self.streaming)
        for name in ("context_length", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, 1, MAX_TOKENS_LIMIT)

    def capability_tags(self) -> tuple[str, ...]:
        """The task, ``model:<name>`` and each tag, normalized, without repeats."""
        return _dedupe((self.task, normalize_tag(MODEL_TAG_PREFIX + self.name), *self.tags))

    def matches(self, capability: str) -> bool:
        """Whether this model answers to ``capability`` (:class:`LocalProtocolError` if not a tag)."""
        return normalize_tag(capability) in self.capability_tags()

    def _to_wire(self) -> dict[str, Any]:
        wire = {
            "name": self.name,
            "task": self.task,
            "tags": list(self.tags),
            "description": self.description,
            "max_input_bytes": self.max_input_bytes,
            "streaming": self.streaming,
        }
        # Absent rather than nil when undeclared: records without them stay byte-identical.
        for name in ("context_length", "max_output_tokens"):
            if getattr(self, name) is not None:
                wire[name] = getattr(self, name)
        return wire

    @classmethod
    def _from_wire(cls, fields: Any) -> "ModelCapability":
        if not isinstance(fields, dict):
            raise RemoteProtocolError("a model entry is a map")
        return cls(
            name=field(fields, "name", str),
            task=field(fields, "task", str),
            tags=tuple(field(fields, "tags", list, [])),
            description=field(fields, "description", str, ""),
            max_input_bytes=field(fields, "max_input_bytes", int, 65536),
            streaming=field(fields, "streaming", bool, False),
            context_length=field(fields, "context_length", int, None),
            max_output_tokens=field(fields, "max_output_tokens", int, None),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class CapabilityRecord:
    """Everything a node tells the network about itself: where it listens, what it serves."""

    peer_id: PeerID
    addrs: tuple[str, ...]
    models: tuple[ModelCapability, ...]
    software: str = "modelnet/0.1"

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, PeerID):
            raise LocalProtocolError("peer_id must be a PeerID")
        addrs = check_tuple("addrs", self.addrs, max_len=MAX_ADDRS)
        for addr in addrs:
            check_str("address", addr, min_len=1, max_len=MAX_ADDR_CHARS)
            if not addr.startswith("/"):
                raise LocalProtocolError(f"address {addr!r} is not a multiaddr")
        set_field(self, "addrs", addrs)
        models = check_tuple("models", self.models, max_len=MAX_MODELS)
        if not all(isinstance(model, ModelCapability) for model in models):
            raise LocalProtocolError("models must be ModelCapability values")
        set_field(self, "models", models)
        check_str("software", self.software, min_len=1, max_len=MAX_SOFTWARE_CHARS)

    def capability_tags(self) -> set[str]:
        return {tag for model in self.models for tag in model.capability_tags()}

    def models_for(self, capability: str) -> tuple[ModelCapability, ...]:
        tag = normalize_tag(capability)
        return tuple(model for model in self.models if tag in model.capability_tags())

    def to_payload(self) -> bytes:
        return canonical.encode(
            {
                "peer": self.peer_id.bytes,
                "addrs": list(self.addrs),
                "models": [model._to_wire() for model in self.models],
                "software": self.software,
            }
        )

    @classmethod
    def from_payload(cls, data: bytes) -> "CapabilityRecord":
        """Parse and check every field; :class:`RemoteProtocolError` on anything bad."""
        with peer_input("capability record"):
            fields = decode_map(data, "capability record")
            models = field(fields, "models", list)
            if len(models) > MAX_MODELS:
                raise RemoteProtocolError(f"capability record lists more than {MAX_MODELS} models")
            return cls(
                peer_id=PeerID.from_bytes(field(fields, "peer", bytes)),
                addrs=tuple(field(fields, "addrs", list)),
                models=tuple(ModelCapability._from_wire(model) for model in models),
                software=field(fields, "software", str, "unknown"),
            )

    def sign(self, key: PrivateKey, *, seq: int, expires: float) -> SignedRecord:
        """Sign with ``key``; only ``peer_id``'s own key makes a record that opens (else WrongKey)."""
        return SignedRecord.sign(
            key, domain=DOMAIN, type=CAPABILITY_TYPE, payload=self.to_payload(), seq=seq, expires=expires
        )


def open_capability_record(
    data: bytes, *, now: float, peer: PeerID | None = None
) -> tuple[SignedRecord, CapabilityRecord]:
    """Decode, verify (domain, type, expiry, signature) and parse a capability record.

    Raises identity errors (:class:`~modelnet.identity.WrongKey` when the record names a
    peer other than its signer, or other than ``peer``) or :class:`RemoteProtocolError`
    for a payload that does not parse.
    """
    record = open_record(data, now=now, domain=DOMAIN, type=CAPABILITY_TYPE, signer=peer)
    capabilities = CapabilityRecord.from_payload(record.payload)
    if capabilities.peer_id != record.signer:
        raise WrongKey(f"capability record for {capabilities.peer_id} signed by {record.signer}")
    return record, capabilities


class NodeRecordValidator:
    """DHT validator for keys under :data:`NODE_KEY_PREFIX` (pure: time is a parameter)."""

    prefix = NODE_KEY_PREFIX

    def validate(self, key: bytes, value: bytes, now: float) -> None:
        """Raise a typed error unless ``value`` is a valid record signed by the peer in ``key``."""
        open_capability_record(value, now=now, peer=self._peer(key))

    def select(self, key: bytes, values: list[bytes]) -> int:
        """Index of the best value: highest seq, then latest expiry; first one on a tie.

        Values that don't decode, or aren't signed by the key's peer, rank last.
        """
        try:
            peer = self._peer(key)
        except (RemoteProtocolError, IdentityError):
            peer = None
        return select_newest(values, domain=DOMAIN, type=CAPABILITY_TYPE, signer=peer)

    @staticmethod
    def _peer(key: bytes) -> PeerID:
        if not isinstance(key, bytes) or not key.startswith(NODE_KEY_PREFIX):
            raise RemoteProtocolError(f"not a node record key: {key!r}")
        return PeerID.from_bytes(key[len(NODE_KEY_PREFIX) :])


def select_newest(values: list[bytes], *, domain: str, type: str, signer: PeerID | None) -> int:
    """The DHT validators' choice: the index of the signed record with the highest seq, then
    the latest expiry, first one on a tie; values that don't decode or aren't signed by
    ``signer`` (in ``domain``/``type``) rank last. Expiry is not judged here."""
    if not values:
        raise LocalProtocolError("select needs at least one value")

    def rank(value: bytes) -> tuple[int, int, float]:
        try:
            record = SignedRecord.decode(value)
            record.verify_signature(domain=domain, type=type, signer=signer)
        except IdentityError:
            return (0, 0, -math.inf)
        return (1, record.seq, record.expires)

    ranks = [rank(value) for value in values]
    return max(range(len(values)), key=ranks.__getitem__)
