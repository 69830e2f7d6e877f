"""``/modelnet/session/1.0.0``: a client asks a provider for a session on one capability.

One offer, one answer, on one stream::

    client                                   provider
      offer  {record: SignedRecord "session-offer", signed by the client}  ->
                                             <-  grant {record: SignedRecord "session-grant"}
                                             <-  or refusal {code, reason}

The provider checks that the offer's signer is the peer the Noise handshake authenticated
(``remote``) and that its timestamp is within :data:`MAX_CLOCK_SKEW` of its own clock. A
grant is bound to the client's peer id, the capability and the offer's nonce; it is signed
by the provider and can be re-presented (``Grant.encode()``) on later reason requests until
it expires. Each message is one frame holding a canonical msgpack map with a ``kind``.

Sans-IO and deterministic: the clock (``now``) and the random values (the offer's nonce,
the grant's id) are the caller's, so the same inputs give the same bytes.

Offer payload: ``{capability, nonce, timestamp, credentials}``. Grant payload:
``{grant_id, client, capability, nonce, limits: {max_concurrent, max_input_bytes,
requests_per_minute}, queue, capacity}``; the provider is the record's signer and the
expiry is the record's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from modelnet.identity import PeerID, PrivateKey, SignedRecord, canonical, open_record

from .capability import DOMAIN, normalize_tag
from .errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    AWAITING_ANSWER,
    DONE,
    ERROR,
    IDLE,
    Endpoint,
    check_bytes,
    check_code,
    check_float,
    check_int,
    check_str,
    check_tuple,
    decode_map,
    field,
    peer_input,
    set_field,
)

SESSION_PROTOCOL = "/modelnet/session/1.0.0"
OFFER_TYPE = "session-offer"
GRANT_TYPE = "session-grant"
MAX_CLOCK_SKEW = 300.0  # seconds an offer's timestamp may differ from the provider's clock
NONCE_BYTES = 16
GRANT_ID_BYTES = 16
MAX_CREDENTIALS = 8
MAX_CREDENTIAL_BYTES = 16 << 10
MAX_REASON_CHARS = 1024
SESSION_MAX_FRAME = 256 << 10  # an offer with all its credentials fits
_LIMIT_MAX = (1 << 31) - 1

# refusal codes
NO_SUCH_CAPABILITY = "no-such-capability"
FORBIDDEN = "forbidden"
OVERLOADED = "overloaded"
BAD_OFFER = "bad-offer"
EXPIRED = "expired"
INTERNAL = "internal"
REFUSAL_CODES = frozenset({NO_SUCH_CAPABILITY, FORBIDDEN, OVERLOADED, BAD_OFFER, EXPIRED, INTERNAL})


class GrantMismatch(RemoteProtocolError):
    """A genuine grant presented for another client, capability or offer (replay)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Offer:
    capability: str  # normalized tag
    nonce: bytes  # 16 random bytes; the grant must echo it
    timestamp: float  # unix seconds, the client's clock
    credentials: tuple[bytes, ...] = ()  # organisation certificates: carried, not interpreted here

    def __post_init__(self) -> None:
        set_field(self, "capability", normalize_tag(self.capability))
        check_bytes("offer nonce", self.nonce, min_len=NONCE_BYTES, max_len=NONCE_BYTES)
        set_field(self, "timestamp", check_float("offer timestamp", self.timestamp, lo=0.0))
        credentials = check_tuple("credentials", self.credentials, max_len=MAX_CREDENTIALS)
        for credential in credentials:
            check_bytes("credential", credential, max_len=MAX_CREDENTIAL_BYTES)
        set_field(self, "credentials", credentials)

    def _payload(self) -> bytes:
        return canonical.encode(
            {
                "capability": self.capability,
                "nonce": self.nonce,
                "timestamp": self.timestamp,
                "credentials": list(self.credentials),
            }
        )

    @classmethod
    def _from_payload(cls, data: bytes) -> "Offer":
        fields = decode_map(data, "offer")
        return cls(
            capability=field(fields, "capability", str),
            nonce=field(fields, "nonce", bytes),
            timestamp=field(fields, "timestamp", (int, float)),
            credentials=tuple(field(fields, "credentials", list, [])),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    max_concurrent: int
    max_input_bytes: int
    requests_per_minute: int

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "max_input_bytes", "requests_per_minute"):
            check_int(name, getattr(self, name), 1, _LIMIT_MAX)

    def _to_wire(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def _from_wire(cls, fields: dict[str, Any]) -> "Limits":
        return cls(
            max_concurrent=field(fields, "max_concurrent", int),
            max_input_bytes=field(fields, "max_input_bytes", int),
            requests_per_minute=field(fields, "requests_per_minute", int),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    grant_id: bytes
    client: PeerID
    provider: PeerID
    capability: str
    nonce: bytes  # the offer's nonce
    limits: Limits
    expires: float
    record: SignedRecord = dataclasses.field(repr=False)  # the provider-signed form
    queue: int = 0  # load report: requests waiting at the provider
    capacity: int = 0  # load report: requests it could take now

    def __post_init__(self) -> None:
        check_bytes("grant id", self.grant_id, min_len=GRANT_ID_BYTES, max_len=GRANT_ID_BYTES)
        if not isinstance(self.client, PeerID) or not isinstance(self.provider, PeerID):
            raise LocalProtocolError("grant client and provider must be PeerIDs")
        set_field(self, "capability", normalize_tag(self.capability))
        check_bytes("grant nonce", self.nonce, min_len=NONCE_BYTES, max_len=NONCE_BYTES)
        if not isinstance(self.limits, Limits):
            raise LocalProtocolError("grant limits must be Limits")
        set_field(self, "expires", check_float("grant expires", self.expires))
        check_int("queue", self.queue, 0, _LIMIT_MAX)
        check_int("capacity", self.capacity, 0, _LIMIT_MAX)

    def encode(self) -> bytes:
        """The signed grant, to re-present on reason requests."""
        return self.record.encode()


def _grant_payload(
    grant_id: bytes, client: PeerID, capability: str, nonce: bytes, limits: Limits, queue: int, capacity: int
) -> bytes:
    return canonical.encode(
        {
            "grant_id": grant_id,
            "client": client.bytes,
            "capability": capability,
            "nonce": nonce,
            "limits": limits._to_wire(),
            "queue": queue,
            "capacity": capacity,
        }
    )


def _grant_from_record(record: SignedRecord) -> Grant:
    with peer_input("grant"):
        fields = decode_map(record.payload, "grant")
        return Grant(
            grant_id=field(fields, "grant_id", bytes),
            client=PeerID.from_bytes(field(fields, "client", bytes)),
            provider=record.signer,
            capability=field(fields, "capability", str),
            nonce=field(fields, "nonce", bytes),
            limits=Limits._from_wire(field(fields, "limits", dict)),
            expires=record.expires,
            record=record,
            queue=field(fields, "queue", int, 0),
            capacity=field(fields, "capacity", int, 0),
        )


def open_grant(
    data: bytes, *, now: float, client: PeerID, provider: PeerID, capability: str | None = None
) -> Grant:
    """Verify a grant (signature, domain, expiry, provider) and its binding.

    Raises identity errors for a bad record, :class:`RemoteProtocolError` for a bad
    payload, :class:`GrantMismatch` for a grant issued to another client or capability.
    """
    record = open_record(data, now=now, domain=DOMAIN, type=GRANT_TYPE, signer=provider)
    grant = _grant_from_record(record)
    if grant.client != client:
        raise GrantMismatch(f"grant was issued to {grant.client}, not {client}")
    if capability is not None and grant.capability != normalize_tag(capability):
        raise GrantMismatch(f"grant is for {grant.capability!r}, not {capability!r}")
    return grant


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    code: str  # one of REFUSAL_CODES when we send; peers may send codes we don't know yet
    reason: str

    def __post_init__(self) -> None:
        check_code("refusal code", self.code)
        check_str("refusal reason", self.reason, max_len=MAX_REASON_CHARS)


# states, besides the shared IDLE, AWAITING_ANSWER, DONE and ERROR
AWAITING_OFFER = "awaiting-offer"
DECIDING = "deciding"

# (state, event) -> next state; "send-x" is us sending x, a bare kind is the peer's message
_TRANSITIONS = {
    # client
    (IDLE, "send-offer"): AWAITING_ANSWER,
    (AWAITING_ANSWER, "grant"): DONE,
    (AWAITING_ANSWER, "refusal"): DONE,
    # provider
    (AWAITING_OFFER, "offer"): DECIDING,
    (DECIDING, "send-grant"): DONE,
    (DECIDING, "send-refusal"): DONE,
    (AWAITING_OFFER, "send-refusal"): DONE,  # e.g. shutting down before the offer arrived
    (ERROR, "send-refusal"): DONE,  # answer a bad offer with BAD_OFFER before closing
}


class ClientSession(Endpoint):
    """Send one offer to ``provider``; receive its grant or refusal.

    ``now`` (unix seconds) stamps the offer and judges the grant's expiry; the exchange is
    one round trip, so one reading of the clock serves both. A driver that waits long may
    set ``now`` again before calling :meth:`next_event`.
    """

    def __init__(self, key: PrivateKey, *, provider: PeerID, now: float) -> None:
        super().__init__(_TRANSITIONS, IDLE, eof_states=frozenset({DONE}), max_frame=SESSION_MAX_FRAME)
        self._key = key
        self.provider = provider
        self.now = now
        self.offer: Offer | None = None

    def send_offer(self, capability: str, credentials: tuple[bytes, ...] = (), *, nonce: bytes) -> bytes:
        """The signed offer for ``capability``. ``nonce`` is :data:`NONCE_BYTES` fresh random
        bytes the grant must echo: a new one per offer, or old grants could be replayed."""
        offer = Offer(capability, nonce, self.now, tuple(credentials))
        record = SignedRecord.sign(
            self._key,
            domain=DOMAIN,
            type=OFFER_TYPE,
            payload=offer._payload(),
            seq=0,
            expires=offer.timestamp + MAX_CLOCK_SKEW,
        )
        data = self._pack("offer", {"record": record.encode()})
        self.offer = offer
        return data

    def next_event(self) -> Grant | Refusal | None:
        """The provider's answer, once it has arrived; the grant is verified against the
        offer (nonce, capability), this client and ``provider``, and must not be expired."""
        with self._receiving("session answer"):
            message = self._next_message()
            if message is None:
                return None
            kind, fields = message
            if kind == "refusal":
                return Refusal(code=field(fields, "code", str), reason=field(fields, "reason", str, ""))
            assert self.offer is not None  # the table allows a grant only after our offer
            grant = open_grant(
                field(fields, "record", bytes),
                now=self.now,
                client=self._key.peer_id,
                provider=self.provider,
                capability=self.offer.capability,
            )
            if grant.nonce != self.offer.nonce:
                raise GrantMismatch("grant answers another offer (nonce differs)")
            return grant


class ProviderSession(Endpoint):
    """Receive one offer from ``remote`` (the Noise-authenticated peer); answer it once.

    ``now`` (unix seconds) judges the offer's expiry and clock skew; settable like the
    client's.
    """

    def __init__(self, key: PrivateKey, *, remote: PeerID, now: float) -> None:
        super().__init__(
            _TRANSITIONS, AWAITING_OFFER, eof_states=frozenset({DECIDING, DONE}), max_frame=SESSION_MAX_FRAME
        )
        self._key = key
        self.remote = remote
        self.now = now
        self.offer: Offer | None = None

    def next_event(self) -> Offer | None:
        """The client's offer; :class:`RemoteProtocolError` if it is malformed, not signed by
        ``remote``, expired, or its timestamp is more than :data:`MAX_CLOCK_SKEW` off."""
        with self._receiving("session offer"):
            message = self._next_message()
            if message is None:
                return None
            _, fields = message
            now = self.now
            record = open_record(
                field(fields, "record", bytes), now=now, domain=DOMAIN, type=OFFER_TYPE, signer=self.remote
            )
            offer = Offer._from_payload(record.payload)
            if abs(now - offer.timestamp) > MAX_CLOCK_SKEW:
                raise RemoteProtocolError(
                    f"offer timestamp {offer.timestamp} is more than {MAX_CLOCK_SKEW:.0f} s from now ({now})"
                )
            self.offer = offer
            return offer

    def send_grant(
        self,
        *,
        grant_id: bytes,
        limits: Limits,
        expires: float,
        queue: int = 0,
        capacity: int = 0,
        capability: str | None = None,
    ) -> tuple[bytes, Grant]:
        """Grant the offered capability to the client until ``expires`` (unix seconds).

        ``grant_id`` is :data:`GRANT_ID_BYTES` fresh random bytes naming this grant.
        ``capability``, if given, must be the one offered (a check, not a choice).
        """
        if self.state != DECIDING or self.offer is None:
            raise LocalProtocolError(f"cannot send grant in state {self.state}")
        if capability is not None and normalize_tag(capability) != self.offer.capability:
            raise LocalProtocolError(f"the offer was for {self.offer.capability!r}, not {capability!r}")
        if not isinstance(limits, Limits):
            raise LocalProtocolError("limits must be Limits")
        expires = check_float("grant expires", expires)
        check_int("queue", queue, 0, _LIMIT_MAX)
        check_int("capacity", capacity, 0, _LIMIT_MAX)
        check_bytes("grant id", grant_id, min_len=GRANT_ID_BYTES, max_len=GRANT_ID_BYTES)
        payload = _grant_payload(
            grant_id, self.remote, self.offer.capability, self.offer.nonce, limits, queue, capacity
        )
        record = SignedRecord.sign(self._key, domain=DOMAIN, type=GRANT_TYPE, payload=payload, seq=0, expires=expires)
        grant = Grant(
            grant_id=grant_id,
            client=self.remote,
            provider=self._key.peer_id,
            capability=self.offer.capability,
            nonce=self.offer.nonce,
            limits=limits,
            expires=expires,
            record=record,
            queue=queue,
            capacity=capacity,
        )
        return self._pack("grant", {"record": record.encode()}), grant

    def send_refusal(self, code: str, reason: str) -> bytes:
        refusal = Refusal(check_code("refusal code", code, REFUSAL_CODES), reason)
        return self._pack("refusal", {"code": refusal.code, "reason": refusal.reason})
