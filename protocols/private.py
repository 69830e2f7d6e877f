"""Private capability records: what a node serves to one organisation, hidden from others.

A model whose access policy names organisations is never advertised under the public
``/modelnet/cap/`` and ``/modelnet/node/`` keys. For each such organisation the node
holds a membership of, it publishes under keys derived from the organisation's records
key (a 32-byte secret every member holds, :func:`modelnet.identity.org.records_key`):

- ``/modelnet/pcap/<hex HMAC(records key, tag)>`` — a provider key per capability tag;
  without the records key no one can compute it, so no one can look the model up.
- ``/modelnet/pnode/<hex HMAC(records key, peer)>/<peer id bytes>`` — the node's private
  record. The peer id stays in the clear so that a storing node can check who signed the
  value (as for public node records) and keep the newest; the HMAC part differs per
  organisation and per peer, so keys do not link a node's organisations to each other.

The value is a signed record (type ``private-capability``, signed by the provider) whose
payload is ``{key, nonce, sealed}``: ``sealed`` is ``{capabilities, membership}`` — the
capability record (the payload of a public one, listing only the models this organisation
may use) and the provider's own membership certificate of the organisation — encrypted
with ChaCha20-Poly1305 under a key derived from the records key, a random 12-byte nonce,
and the DHT key as associated data (a sealed record moved under another key does not open).
Storing nodes verify the signature, the signer against the key, the key field, expiry,
and keep the highest seq; they learn nothing of the content.

Members decrypt, then check that the record names its signer and that the certificate
inside is the organisation's (signed by its key, for the current records key), issued to
that signer, unexpired and not revoked in the lists the member knows. Knowing the records
key is therefore not enough to pose as a provider: every member, a revoked one included,
knows it; only a current member holds a certificate. No role is required to provide: the
organisation vouches for its members, and clients' policies judge roles, not providers.

What a non-member still sees: that some peer (its id is in the key) publishes private
records, their sizes and how often; not which organisation, capabilities or models.
Members of an organisation share its records key, so a revoked member can still find (not
call, nor pose as a provider of) its private models until the organisation rotates the key
(rotation is not built).

Sans-IO and deterministic: time and the sealing nonce are parameters.
"""

from __future__ import annotations

import hashlib
import hmac

from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from modelnet.identity import IdentityError, PeerID, PrivateKey, SignedRecord, canonical, open_record
from modelnet.identity.org import MembershipCertificate, WrongOrganisation, open_certificate, records_key_id

from .capability import DOMAIN, CapabilityRecord, normalize_tag, select_newest
from .errors import LocalProtocolError, RemoteProtocolError
from .messages import check_bytes, decode_map, field

PRIVATE_CAPABILITY_TYPE = "private-capability"
PRIVATE_CAP_KEY_PREFIX = b"/modelnet/pcap/"
PRIVATE_NODE_KEY_PREFIX = b"/modelnet/pnode/"
RECORDS_KEY_BYTES = 32
NONCE_BYTES = 12
MAX_SEALED_BYTES = 60 << 10  # the whole value must fit a DHT value (64 KiB)
_HEX_CHARS = 32  # 128 bits of HMAC in a key: no collisions, short keys
_TAG_LABEL = b"modelnet-private/cap/1\0"
_NODE_LABEL = b"modelnet-private/node/1\0"
_SEAL_LABEL = b"modelnet-private/seal/1"


class UndecryptableRecord(RemoteProtocolError):
    """A private record that does not open under our records key: tampered, or not ours."""


class RevokedProvider(RemoteProtocolError):
    """A private record whose provider's membership the organisation has revoked."""


def _check_records_key(records_key: bytes) -> bytes:
    if not isinstance(records_key, bytes) or len(records_key) != RECORDS_KEY_BYTES:
        raise LocalProtocolError(f"a records key is {RECORDS_KEY_BYTES} bytes")
    return records_key


def _mac_hex(records_key: bytes, label: bytes, data: bytes) -> bytes:
    digest = hmac.new(_check_records_key(records_key), label + data, hashlib.sha256).hexdigest()
    return digest[:_HEX_CHARS].encode("ascii")


def private_capability_key(records_key: bytes, tag: str) -> bytes:
    """The provider key of ``tag`` among one organisation's members."""
    return PRIVATE_CAP_KEY_PREFIX + _mac_hex(records_key, _TAG_LABEL, normalize_tag(tag).encode("ascii"))


def private_node_key(records_key: bytes, peer: PeerID) -> bytes:
    """The key under which ``peer`` keeps its record for one organisation."""
    return PRIVATE_NODE_KEY_PREFIX + _mac_hex(records_key, _NODE_LABEL, peer.bytes) + b"/" + peer.bytes


def peer_of_private_node_key(key: bytes) -> PeerID:
    """The peer a private node key names; :class:`RemoteProtocolError` if it is not one."""
    if not isinstance(key, bytes) or not key.startswith(PRIVATE_NODE_KEY_PREFIX):
        raise RemoteProtocolError(f"not a private node record key: {key[:40]!r}")
    rest = key[len(PRIVATE_NODE_KEY_PREFIX) :]
    mac, slash, peer = rest[:_HEX_CHARS], rest[_HEX_CHARS : _HEX_CHARS + 1], rest[_HEX_CHARS + 1 :]
    if slash != b"/" or len(mac) != _HEX_CHARS or not all(c in b"0123456789abcdef" for c in mac):
        raise RemoteProtocolError(f"malformed private node record key: {key[:60]!r}")
    try:
        return PeerID.from_bytes(peer)
    except IdentityError as exc:
        raise RemoteProtocolError(f"private node record key: {exc}") from None


def _aead(records_key: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(hmac.new(_check_records_key(records_key), _SEAL_LABEL, hashlib.sha256).digest())


def seal_record(
    key: PrivateKey,
    record: CapabilityRecord,
    *,
    records_key: bytes,
    certificate: MembershipCertificate,
    seq: int,
    expires: float,
    nonce: bytes,
) -> tuple[bytes, SignedRecord]:
    """Encrypt ``record`` with our membership ``certificate`` for its organisation and sign
    the result with ``key``. Returns the DHT key to store it under and the signed value.

    ``nonce`` is :data:`NONCE_BYTES` fresh random bytes, never used twice under one records
    key: a repeated ChaCha20-Poly1305 nonce gives the plaintexts away."""
    if record.peer_id != key.peer_id:
        raise LocalProtocolError("a node seals only its own capability record")
    if certificate.member != key.peer_id:
        raise LocalProtocolError("a node seals its records with its own membership certificate")
    check_bytes("sealing nonce", nonce, min_len=NONCE_BYTES, max_len=NONCE_BYTES)
    dht_key = private_node_key(records_key, key.peer_id)
    plain = canonical.encode({"capabilities": record.to_payload(), "membership": certificate.encode()})
    sealed = _aead(records_key).encrypt(nonce, plain, dht_key)
    if len(sealed) > MAX_SEALED_BYTES:
        raise LocalProtocolError(f"a sealed record is at most {MAX_SEALED_BYTES} bytes, this one {len(sealed)}")
    payload = canonical.encode({"key": dht_key, "nonce": nonce, "sealed": sealed})
    signed = SignedRecord.sign(
        key, domain=DOMAIN, type=PRIVATE_CAPABILITY_TYPE, payload=payload, seq=seq, expires=expires
    )
    return dht_key, signed


def _outer(data: bytes, *, now: float, dht_key: bytes) -> tuple[SignedRecord, bytes, bytes]:
    """Verify the outer record for ``dht_key`` (signature, signer named by the key, expiry,
    key field); returns it with the nonce and the ciphertext. Identity errors or
    :class:`RemoteProtocolError`."""
    peer = peer_of_private_node_key(dht_key)
    record = open_record(data, now=now, domain=DOMAIN, type=PRIVATE_CAPABILITY_TYPE, signer=peer)
    fields = decode_map(record.payload, "private record")
    try:
        nonce = check_bytes("private record nonce", field(fields, "nonce", bytes), min_len=NONCE_BYTES, max_len=NONCE_BYTES)
        sealed = check_bytes("private record", field(fields, "sealed", bytes), min_len=16, max_len=MAX_SEALED_BYTES)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from None
    if field(fields, "key", bytes) != dht_key:
        raise RemoteProtocolError("private record was made for another key")
    return record, nonce, sealed


def open_private_record(
    data: bytes,
    *,
    records_key: bytes,
    org: PeerID,
    now: float,
    peer: PeerID,
    is_revoked: Callable[[PeerID, PeerID], bool],
) -> tuple[SignedRecord, CapabilityRecord, MembershipCertificate]:
    """Verify, decrypt and parse ``peer``'s private record for organisation ``org`` (whose
    records key is ``records_key``), and the membership certificate it carries.

    Raises identity errors (bad signature, expired, another signer; for the certificate an
    ``OrgError``: not signed by ``org``, issued to another peer, expired),
    :class:`UndecryptableRecord` (tampered, or sealed for another organisation),
    :class:`RevokedProvider` (``is_revoked(org, peer)``) or :class:`RemoteProtocolError`
    (malformed)."""
    dht_key = private_node_key(records_key, peer)
    record, nonce, sealed = _outer(data, now=now, dht_key=dht_key)
    try:
        plain = _aead(records_key).decrypt(nonce, sealed, dht_key)
    except InvalidTag:
        raise UndecryptableRecord(f"private record of {peer} does not decrypt (tampered, or not for this organisation)") from None
    fields = decode_map(plain, "private record content")
    capabilities = CapabilityRecord.from_payload(field(fields, "capabilities", bytes))
    if capabilities.peer_id != record.signer:
        raise RemoteProtocolError(f"private record for {capabilities.peer_id} signed by {record.signer}")
    # Anyone holding the records key could have sealed this: the organisation's certificate
    # is what shows the provider is one of its current members.
    certificate = open_certificate(field(fields, "membership", bytes), now=now, member=peer, org=org)
    if certificate.records_key_id and certificate.records_key_id != records_key_id(records_key):
        raise WrongOrganisation(f"the membership in the private record of {peer} is for another records key")
    if is_revoked(org, peer):
        raise RevokedProvider(f"the membership of {peer} in {certificate.org_name} ({org.short()}) was revoked")
    return record, capabilities, certificate


class PrivateRecordValidator:
    """DHT validator for :data:`PRIVATE_NODE_KEY_PREFIX`: what a storing node can check
    without the records key (pure: time is a parameter)."""

    prefix = PRIVATE_NODE_KEY_PREFIX

    def validate(self, key: bytes, value: bytes, now: float) -> None:
        """Raise a typed error unless ``value`` is signed by the peer in ``key``, made for
        ``key`` and not expired."""
        _outer(value, now=now, dht_key=key)

    def select(self, key: bytes, values: list[bytes]) -> int:
        """Index of the best value: highest seq, then latest expiry; invalid ones rank last."""
        try:
            peer: PeerID | None = peer_of_private_node_key(key)
        except RemoteProtocolError:
            peer = None
        return select_newest(values, domain=DOMAIN, type=PRIVATE_CAPABILITY_TYPE, signer=peer)
