"""Ed25519 keys and libp2p-compatible peer ids.

A peer id is the identity multihash of the protobuf-encoded public key
(``PublicKey{Type: Ed25519, Data: 32 bytes}``), printed in base58btc: ``12D3KooW…``.
That is exactly what libp2p (go, js, rust, py) computes, so the id a node shows is the
id libp2p's Noise handshake authenticates.
"""

from __future__ import annotations

import functools

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import InvalidPeerId, InvalidSignature, MalformedKey

ED25519_KEY_TYPE = 1  # libp2p crypto.proto KeyType.Ed25519
_IDENTITY_MULTIHASH = 0x00
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}
# protobuf header of PublicKey{Type=Ed25519 (field 1, varint), Data=32 bytes (field 2)}
_ED25519_PROTOBUF_PREFIX = bytes([0x08, ED25519_KEY_TYPE, 0x12, 32])


def b58encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        try:
            n = n * 58 + _B58_INDEX[ch]
        except KeyError:
            raise InvalidPeerId(f"not base58: {ch!r} in {text!r}") from None
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


class PublicKey:
    """An Ed25519 public key."""

    __slots__ = ("raw", "_key")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != 32:
            raise MalformedKey("an Ed25519 public key is 32 bytes")
        self.raw = bytes(raw)
        try:
            self._key = ed25519.Ed25519PublicKey.from_public_bytes(self.raw)
        except ValueError as exc:
            raise MalformedKey(f"not an Ed25519 public key: {exc}") from None

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`InvalidSignature` unless ``signature`` signs ``data``."""
        try:
            self._key.verify(bytes(signature), bytes(data))
        except (_CryptoInvalidSignature, ValueError, TypeError):
            raise InvalidSignature(f"signature does not verify for {self.peer_id}") from None

    def to_protobuf(self) -> bytes:
        return _ED25519_PROTOBUF_PREFIX + self.raw

    @classmethod
    def from_protobuf(cls, data: bytes) -> "PublicKey":
        if len(data) != 36 or not bytes(data).startswith(_ED25519_PROTOBUF_PREFIX):
            raise MalformedKey("only Ed25519 public keys in libp2p protobuf form are accepted")
        return cls(data[4:])

    @property
    def peer_id(self) -> "PeerID":
        return PeerID.from_public_key(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.peer_id})"


class PrivateKey:
    """An Ed25519 private key (the 32-byte seed is all that is stored)."""

    __slots__ = ("_key", "public_key")

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = PublicKey(raw)

    @classmethod
    def generate(cls) -> "PrivateKey":
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "PrivateKey":
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
            raise MalformedKey("an Ed25519 seed is 32 bytes")
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @property
    def seed(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def peer_id(self) -> "PeerID":
        return self.public_key.peer_id

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))

    def __repr__(self) -> str:
        return f"PrivateKey({self.peer_id})"


@functools.total_ordering
class PeerID:
    """A libp2p peer id: the identity multihash of an Ed25519 public key."""

    __slots__ = ("bytes", "_text", "_hash")

    def __init__(self, multihash: bytes) -> None:
        multihash = bytes(multihash)
        if len(multihash) < 3 or multihash[0] != _IDENTITY_MULTIHASH or multihash[1] != len(multihash) - 2:
            raise InvalidPeerId("peer id is not an identity multihash of a public key")
        # Shape check only (no curve arithmetic): ids are parsed in bulk from DHT answers;
        # the key itself is built when someone needs to verify with it.
        if len(multihash) != 38 or multihash[2:6] != _ED25519_PROTOBUF_PREFIX:
            raise MalformedKey("only Ed25519 public keys in libp2p protobuf form are accepted")
        self.bytes = multihash
        self._text: str | None = None  # base58 on first use: ids are parsed far more often than printed
        self._hash = hash(multihash)

    @classmethod
    def from_public_key(cls, key: PublicKey) -> "PeerID":
        pb = key.to_protobuf()
        return cls(bytes([_IDENTITY_MULTIHASH, len(pb)]) + pb)

    @classmethod
    def from_base58(cls, text: str) -> "PeerID":
        if not isinstance(text, str) or not text:
            raise InvalidPeerId("empty peer id")
        try:
            return cls(b58decode(text))
        except MalformedKey as exc:
            raise InvalidPeerId(f"{text!r} is not an Ed25519 peer id: {exc}") from None

    @classmethod
    def from_bytes(cls, data: bytes) -> "PeerID":
        try:
            return cls(data)
        except MalformedKey as exc:
            raise InvalidPeerId(f"not an Ed25519 peer id: {exc}") from None

    def public_key(self) -> PublicKey:
        """The public key the id names (identity multihash: it is inside the id)."""
        return PublicKey.from_protobuf(self.bytes[2:])

    def short(self) -> str:
        return str(self)[-8:]

    def __str__(self) -> str:
        if self._text is None:
            self._text = b58encode(self.bytes)
        return self._text

    def __repr__(self) -> str:
        return f"PeerID({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerID) and other.bytes == self.bytes

    def __lt__(self, other: "PeerID") -> bool:
        return self.bytes < other.bytes

    def __hash__(self) -> int:
        return self._hash
