"""Signed records with domain separation.

A record is signed over the canonical encoding of
``["modelnet-signed-record/1", domain, type, payload, seq, expires, public_key]``, so a
signature made for one domain or record type never verifies as another (no cross-protocol
replay), and the expiry cannot be stripped or extended. On the wire a record is a canonical
map; fields this version does not know are ignored so later versions can add some.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from . import canonical
from .errors import MalformedKey, MalformedRecord, RecordExpired, WrongDomain, WrongKey
from .keys import PeerID, PrivateKey, PublicKey

SIGNED_RECORD_PREFIX = "modelnet-signed-record/1"
MAX_NAME_CHARS = 64  # domain and type
MAX_RECORD_BYTES = 1 << 20
_SIGNATURE_BYTES = 64
_SEQ_MAX = (1 << 64) - 1


def _check_fields(domain: Any, type: Any, payload: Any, seq: Any, expires: Any) -> None:
    for name, value in (("domain", domain), ("type", type)):
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
            raise MalformedRecord(f"record {name} must be a str of 1..{MAX_NAME_CHARS} chars")
    if not isinstance(payload, bytes):
        raise MalformedRecord("record payload must be bytes")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= _SEQ_MAX:
        raise MalformedRecord("record seq must be an int in 0..2**64-1")
    if not isinstance(expires, float) or math.isnan(expires):
        raise MalformedRecord("record expires must be a float (unix seconds)")


def _signed_bytes(domain: str, type: str, payload: bytes, seq: int, expires: float, key: PublicKey) -> bytes:
    return canonical.encode([SIGNED_RECORD_PREFIX, domain, type, payload, seq, expires, key.to_protobuf()])


@dataclasses.dataclass(frozen=True, slots=True)
class SignedRecord:
    domain: str  # a signature for one domain never verifies in another
    type: str  # record kind: "capability", "session-offer", "session-grant", "receipt", ...
    payload: bytes  # canonical msgpack of the body
    seq: int  # >= 0; newer wins
    expires: float  # unix seconds; part of the signed bytes
    public_key: PublicKey
    signature: bytes

    @property
    def signer(self) -> PeerID:
        return self.public_key.peer_id

    def body(self) -> Any:
        """The decoded payload (:class:`MalformedRecord` if it is not canonical msgpack)."""
        return canonical.decode(self.payload)

    @classmethod
    def sign(
        cls, key: PrivateKey, *, domain: str, type: str, payload: bytes, seq: int, expires: float
    ) -> "SignedRecord":
        """Sign a record; :class:`MalformedRecord` if a field is out of range."""
        if isinstance(expires, int) and not isinstance(expires, bool):
            expires = float(expires)
        _check_fields(domain, type, payload, seq, expires)
        signature = key.sign(_signed_bytes(domain, type, payload, seq, expires, key.public_key))
        return cls(domain, type, payload, seq, expires, key.public_key, signature)

    def encode(self) -> bytes:
        return canonical.encode(
            {
                "domain": self.domain,
                "type": self.type,
                "payload": self.payload,
                "seq": self.seq,
                "expires": self.expires,
                "key": self.public_key.to_protobuf(),
                "sig": self.signature,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> "SignedRecord":
        """Parse a record; :class:`MalformedRecord` on anything bad. Does not verify."""
        fields = canonical.decode(data, max_size=MAX_RECORD_BYTES)
        if not isinstance(fields, dict):
            raise MalformedRecord("a signed record is a map")
        try:
            domain, type_, payload, seq, expires, key, sig = (
                fields[name] for name in ("domain", "type", "payload", "seq", "expires", "key", "sig")
            )
        except KeyError as exc:
            raise MalformedRecord(f"signed record misses the field {exc.args[0]!r}") from None
        if isinstance(expires, int) and not isinstance(expires, bool):
            expires = float(expires)
        _check_fields(domain, type_, payload, seq, expires)
        if not isinstance(sig, bytes) or len(sig) != _SIGNATURE_BYTES:
            raise MalformedRecord(f"record signature must be {_SIGNATURE_BYTES} bytes")
        if not isinstance(key, bytes):
            raise MalformedRecord("record key must be bytes")
        try:
            public_key = PublicKey.from_protobuf(key)
        except MalformedKey as exc:
            raise MalformedRecord(f"record key: {exc}") from None
        return cls(domain, type_, payload, seq, expires, public_key, sig)

    def verify_signature(self, *, domain: str, type: str, signer: PeerID | None = None) -> None:
        """Everything :meth:`verify` checks except expiry (for records kept as evidence)."""
        if self.domain != domain or self.type != type:
            raise WrongDomain(f"record is for {self.domain}/{self.type}, expected {domain}/{type}")
        self.public_key.verify(
            self.signature,
            _signed_bytes(self.domain, self.type, self.payload, self.seq, self.expires, self.public_key),
        )
        if signer is not None and self.signer != signer:
            raise WrongKey(f"record signed by {self.signer}, expected {signer}")

    def verify(self, *, now: float, domain: str, type: str, signer: PeerID | None = None) -> None:
        """Raise :class:`WrongDomain`, :class:`InvalidSignature`, :class:`WrongKey` or
        :class:`RecordExpired` (checked in that order). A record is valid while
        ``now < expires``."""
        self.verify_signature(domain=domain, type=type, signer=signer)
        if not now < self.expires:
            raise RecordExpired(f"{self.type} record from {self.signer} expired at {self.expires}")


def open_record(
    data: bytes, *, now: float, domain: str, type: str, signer: PeerID | None = None
) -> SignedRecord:
    """Decode and verify in one step."""
    record = SignedRecord.decode(data)
    record.verify(now=now, domain=domain, type=type, signer=signer)
    return record

