"""Forwarding statements: an answer that crossed forwarders stays verifiable.

A forwarder sends the asker's request onward on ``/modelnet/reason/1.0.0`` with the same
request id, one hop less, itself added to ``visited`` and the budget it has left. The
provider at the end signs its receipt for the peer that asked it (the last forwarder), so
the asker cannot check ``receipt.client`` against itself. Instead every forwarder adds one
signed statement (record type ``forward``) in front of the result's ``via`` list::

    {request_id, client: who asked me, next: whom I asked, receipt_sha256}

The asker checks the chain from its own end (:func:`check_route`): the first statement is
signed by the peer it sent the request to and names the asker as client; each following
one is signed by the previous statement's ``next`` and names the previous signer as client;
the last ``next`` signed the receipt, and the receipt's client is the last forwarder. Every
statement commits to the request id and to the SHA-256 of the receipt bytes, so no hop can
swap the answer, re-attribute it or splice in another request's receipt.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

from modelnet.identity import PeerID, PrivateKey, SignedRecord, canonical

from .capability import DOMAIN
from .errors import LocalProtocolError, RemoteProtocolError
from .messages import check_bytes, decode_map, field, peer_input

FORWARD_TYPE = "forward"
STATEMENT_TTL = 30 * 24 * 3600.0  # as long as the receipt it vouches for
MAX_STATEMENT_BYTES = 4 << 10
MAX_ROUTE = 32  # as many as a request's visited list can hold


@dataclasses.dataclass(frozen=True, slots=True)
class Statement:
    request_id: bytes
    forwarder: PeerID  # the signer
    client: PeerID  # the peer that asked the forwarder
    next: PeerID  # the peer the forwarder asked
    receipt_sha256: bytes

    def __post_init__(self) -> None:
        check_bytes("request id", self.request_id, min_len=16, max_len=16)
        check_bytes("receipt_sha256", self.receipt_sha256, min_len=32, max_len=32)
        for peer in (self.forwarder, self.client, self.next):
            if not isinstance(peer, PeerID):
                raise LocalProtocolError("statement peers must be PeerIDs")


def make_statement(
    key: PrivateKey, *, request_id: bytes, client: PeerID, next: PeerID, receipt: bytes, now: float
) -> bytes:
    """``key``'s signed word that it forwarded ``request_id`` from ``client`` to ``next``."""
    statement = Statement(request_id, key.peer_id, client, next, hashlib.sha256(receipt).digest())
    payload = canonical.encode(
        {
            "request_id": statement.request_id,
            "client": client.bytes,
            "next": next.bytes,
            "receipt_sha256": statement.receipt_sha256,
        }
    )
    record = SignedRecord.sign(key, domain=DOMAIN, type=FORWARD_TYPE, payload=payload, seq=0, expires=now + STATEMENT_TTL)
    return record.encode()


def open_statement(data: bytes, *, forwarder: PeerID | None = None) -> Statement:
    """Verify a statement's signature (by ``forwarder`` if given); identity errors or
    :class:`RemoteProtocolError` for a bad one."""
    if not isinstance(data, bytes) or len(data) > MAX_STATEMENT_BYTES:
        raise RemoteProtocolError(f"a forward statement is at most {MAX_STATEMENT_BYTES} bytes")
    record = SignedRecord.decode(data)
    record.verify_signature(domain=DOMAIN, type=FORWARD_TYPE, signer=forwarder)
    with peer_input("forward statement"):
        fields = decode_map(record.payload, "forward statement")
        return Statement(
            request_id=field(fields, "request_id", bytes),
            forwarder=record.signer,
            client=PeerID.from_bytes(field(fields, "client", bytes)),
            next=PeerID.from_bytes(field(fields, "next", bytes)),
            receipt_sha256=field(fields, "receipt_sha256", bytes),
        )


def check_route(
    statements: Sequence[bytes], *, request_id: bytes, asker: PeerID, first_hop: PeerID, receipt: bytes
) -> tuple[tuple[PeerID, ...], PeerID]:
    """Verify a chain of statements; return the forwarders in order and the provider.

    The provider is who must have signed ``receipt``, which must name the last forwarder
    as its client (the caller checks both with :func:`~.reason.open_receipt`). Raises
    :class:`RemoteProtocolError` (or an identity error for a bad signature).
    """
    if not statements or len(statements) > MAX_ROUTE:
        raise RemoteProtocolError(f"a route holds 1..{MAX_ROUTE} forward statements")
    digest = hashlib.sha256(receipt).digest()
    signer, client = first_hop, asker
    forwarders: list[PeerID] = []
    for data in statements:
        statement = open_statement(data, forwarder=signer)
        if statement.request_id != request_id or statement.receipt_sha256 != digest:
            raise RemoteProtocolError(f"the statement of {signer.short()} vouches for another request or receipt")
        if statement.client != client:
            raise RemoteProtocolError(f"{signer.short()} says it forwarded for another client")
        if statement.next in forwarders or statement.next in (asker, signer):
            raise RemoteProtocolError("the route loops")
        forwarders.append(signer)
        signer, client = statement.next, statement.forwarder
    return tuple(forwarders), signer
