"""Organisations: membership certificates, the records key, revocations.

An organisation is an Ed25519 key; it is identified by the key's peer id (its name is a
label, not unique). It signs, in the domain :data:`ORG_DOMAIN`:

- a **membership certificate** (type ``membership``) binding a member's peer id to the
  organisation, with roles, an issue time and an expiry (the record's own, so it is signed);
- a **revocation** (type ``revocation``): the cumulative set of revoked members. The seq
  grows with every revocation and a newer seq wins, so a stale list can't undo a newer one.

The organisation's **records key** is derived from its seed (HKDF, label-separated); members
get it inside their :class:`Membership` file and use it to find and read the organisation's
private records. It is a shared secret: a revoked member keeps the records key it was given
until the organisation rotates it (rotation is not implemented yet). The certificate carries
a short id of the records key, so a membership file whose key was swapped does not load.

Payloads are canonical msgpack maps; unknown fields are ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import canonical
from .errors import IdentityError, InvalidPeerId, MalformedKey, MalformedRecord, WrongDomain, WrongKey
from .keys import PeerID, PrivateKey
from .records import SignedRecord

ORG_DOMAIN = "modelnet-org"
CERTIFICATE_TYPE = "membership"
REVOCATION_TYPE = "revocation"
MEMBERSHIP_FILE_VERSION = 1
REVOCATION_KEY_PREFIX = b"/modelnet/org/"
REVOCATION_KEY_SUFFIX = b"/revoked"

MAX_ORG_NAME_CHARS = 64
MAX_ROLES = 16
MAX_ROLE_CHARS = 32
MAX_REVOKED = 1024  # a revocation must fit one DHT value (64 KiB); 38-byte ids -> ~41 KiB
MAX_CERTIFICATE_BYTES = 4096
MAX_MEMBERSHIP_BYTES = 8192
MAX_REVOCATION_BYTES = 60 << 10
CLOCK_SKEW = 300.0  # a certificate issued this far in the future is still accepted
RECORDS_KEY_BYTES = 32
RECORDS_KEY_ID_BYTES = 16
_RECORDS_KEY_INFO = b"modelnet-org/records-key/1"
_RECORDS_KEY_ID_LABEL = b"modelnet-org/records-key-id/1"


# ---- errors ----------------------------------------------------------------------------


class OrgError(IdentityError):
    """Base of organisation errors: a certificate, membership or revocation that is not valid."""


class MalformedOrgRecord(OrgError):
    """Bytes that do not decode as a certificate, membership file or revocation."""


class OrgSignatureInvalid(OrgError):
    """A certificate or revocation whose signature does not verify (forged or altered)."""


class WrongOrganisation(OrgError):
    """Signed by a key other than the organisation expected (not issued by that org)."""


class WrongMember(OrgError):
    """A certificate issued to another peer id than the one presenting it."""


class CertificateExpired(OrgError):
    """A membership certificate past its expiry (or not valid yet)."""


class RevocationExpired(OrgError):
    """A revocation list past its expiry."""


# ---- helpers ---------------------------------------------------------------------------


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_ORG_NAME_CHARS or not name.isprintable():
        raise MalformedOrgRecord(f"an organisation name is 1..{MAX_ORG_NAME_CHARS} printable chars")
    return name


def _check_roles(roles: Any) -> tuple[str, ...]:
    if not isinstance(roles, (list, tuple)) or len(roles) > MAX_ROLES:
        raise MalformedOrgRecord(f"roles must be a list of at most {MAX_ROLES}")
    for role in roles:
        if (
            not isinstance(role, str)
            or not 1 <= len(role) <= MAX_ROLE_CHARS
            or not all(c.isalnum() or c in "._-" for c in role)
        ):
            raise MalformedOrgRecord(f"a role is 1..{MAX_ROLE_CHARS} chars of letters, digits . _ -")
    return tuple(dict.fromkeys(roles))


def _check_time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedOrgRecord(f"{name} must be a finite number of unix seconds")
    return float(value)


def _payload_map(record: SignedRecord, what: str) -> dict[str, Any]:
    try:
        body = record.body()
    except MalformedRecord as exc:
        raise MalformedOrgRecord(f"{what}: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedOrgRecord(f"{what}: payload is not a map")
    return body


def _peer(value: Any, what: str) -> PeerID:
    if not isinstance(value, bytes):
        raise MalformedOrgRecord(f"{what} must be peer id bytes")
    try:
        return PeerID.from_bytes(value)
    except (InvalidPeerId, MalformedKey) as exc:
        raise MalformedOrgRecord(f"{what}: {exc}") from None


def _open_signed(data: bytes, *, type: str, org: PeerID | None, max_bytes: int, what: str) -> SignedRecord:
    """Decode and check the signature (not expiry), translating identity errors into ours."""
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedOrgRecord(f"a {what} is bytes")
    if len(data) > max_bytes:
        raise MalformedOrgRecord(f"a {what} of {len(data)} bytes exceeds {max_bytes}")
    try:
        record = SignedRecord.decode(bytes(data))
    except MalformedRecord as exc:
        raise MalformedOrgRecord(f"not a {what}: {exc}") from None
    try:
        record.verify_signature(domain=ORG_DOMAIN, type=type, signer=org)
    except WrongDomain as exc:
        raise MalformedOrgRecord(f"not a {what}: {exc}") from None
    except WrongKey:
        raise WrongOrganisation(f"{what} issued by {record.signer}, not by the organisation {org}") from None
    except IdentityError:
        raise OrgSignatureInvalid(f"{what} signature from {record.signer} does not verify") from None
    return record


# ---- certificates ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MembershipCertificate:
    org: PeerID
    org_name: str
    member: PeerID
    roles: tuple[str, ...]
    issued: float
    expires: float
    record: SignedRecord = dataclasses.field(repr=False)
    records_key_id: bytes = dataclasses.field(default=b"", repr=False)

    def encode(self) -> bytes:
        return self.record.encode()


def records_key(org_key: PrivateKey) -> bytes:
    """The organisation's 32-byte records key: HKDF-SHA256 of its seed, label-separated."""
    return HKDF(algorithm=hashes.SHA256(), length=RECORDS_KEY_BYTES, salt=None, info=_RECORDS_KEY_INFO).derive(
        org_key.seed
    )


def records_key_id(key: bytes) -> bytes:
    """A public id of a records key (a label-separated hash): names it without revealing it."""
    return hashlib.sha256(_RECORDS_KEY_ID_LABEL + key).digest()[:RECORDS_KEY_ID_BYTES]


def issue_certificate(
    org_key: PrivateKey,
    org_name: str,
    member: PeerID,
    *,
    roles: Iterable[str] = (),
    now: float,
    expires: float,
) -> MembershipCertificate:
    """Sign a certificate making ``member`` a member of the organisation until ``expires``."""
    org_name = _check_name(org_name)
    roles = _check_roles(tuple(roles))
    if not isinstance(member, PeerID):
        raise MalformedOrgRecord("member must be a PeerID")
    issued, expires = _check_time("issued", now), _check_time("expires", expires)
    if expires <= issued:
        raise MalformedOrgRecord("a certificate must expire after it is issued")
    key_id = records_key_id(records_key(org_key))
    payload = canonical.encode(
        {"org_name": org_name, "member": member.bytes, "roles": list(roles), "issued": issued, "key_id": key_id}
    )
    record = SignedRecord.sign(
        org_key, domain=ORG_DOMAIN, type=CERTIFICATE_TYPE, payload=payload, seq=0, expires=expires
    )
    return MembershipCertificate(org_key.peer_id, org_name, member, roles, issued, expires, record, key_id)


def _certificate_from_record(record: SignedRecord) -> MembershipCertificate:
    body = _payload_map(record, "certificate")
    key_id = body.get("key_id", b"")
    if not isinstance(key_id, bytes) or len(key_id) not in (0, RECORDS_KEY_ID_BYTES):
        raise MalformedOrgRecord(f"certificate key_id must be {RECORDS_KEY_ID_BYTES} bytes")
    return MembershipCertificate(
        org=record.signer,
        org_name=_check_name(body.get("org_name")),
        member=_peer(body.get("member"), "certificate member"),
        roles=_check_roles(body.get("roles", [])),
        issued=_check_time("issued", body.get("issued")),
        expires=record.expires,
        record=record,
        records_key_id=key_id,
    )


def open_certificate(
    data: bytes, *, now: float, member: PeerID | None = None, org: PeerID | None = None
) -> MembershipCertificate:
    """Decode and verify a certificate: signature (by ``org`` if given), validity at ``now``,
    and that it was issued to ``member`` (if given). Raises an :class:`OrgError`."""
    record = _open_signed(data, type=CERTIFICATE_TYPE, org=org, max_bytes=MAX_CERTIFICATE_BYTES, what="certificate")
    certificate = _certificate_from_record(record)
    if not now < certificate.expires:
        raise CertificateExpired(
            f"membership of {certificate.org_name} ({certificate.org.short()}) expired at {certificate.expires:.0f}"
        )
    if certificate.issued > now + CLOCK_SKEW:
        raise CertificateExpired(f"membership of {certificate.org_name} is not valid before {certificate.issued:.0f}")
    if member is not None and certificate.member != member:
        raise WrongMember(f"certificate was issued to {certificate.member}, not to {member}")
    return certificate


# ---- the membership file ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Membership:
    """What a member node holds: its certificate and the organisation's records key.

    Sensitive (the records key is the organisation's shared secret): store it like a key.
    """

    certificate: MembershipCertificate
    records_key: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.records_key, bytes) or len(self.records_key) != RECORDS_KEY_BYTES:
            raise MalformedOrgRecord(f"a records key is {RECORDS_KEY_BYTES} bytes")
        key_id = self.certificate.records_key_id
        if key_id and key_id != records_key_id(self.records_key):
            raise WrongOrganisation("the records key in this membership is not the organisation's")

    @property
    def org(self) -> PeerID:
        return self.certificate.org

    @property
    def org_name(self) -> str:
        return self.certificate.org_name

    def encode(self) -> bytes:
        return canonical.encode(
            {
                "version": MEMBERSHIP_FILE_VERSION,
                "certificate": self.certificate.encode(),
                "records_key": self.records_key,
            }
        )

    @classmethod
    def decode(cls, data: bytes, *, now: float) -> "Membership":
        """Parse and verify a membership file (the certificate must be valid at ``now``)."""
        if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_MEMBERSHIP_BYTES:
            raise MalformedOrgRecord(f"a membership file is at most {MAX_MEMBERSHIP_BYTES} bytes")
        try:
            body = canonical.decode(bytes(data), max_size=MAX_MEMBERSHIP_BYTES)
        except MalformedRecord as exc:
            raise MalformedOrgRecord(f"not a membership file: {exc}") from None
        if not isinstance(body, dict):
            raise MalformedOrgRecord("not a membership file: not a map")
        version = body.get("version")
        if version != MEMBERSHIP_FILE_VERSION or isinstance(version, bool):
            raise MalformedOrgRecord(
                f"membership file version {version!r}; this modelnet reads {MEMBERSHIP_FILE_VERSION}"
            )
        certificate, key = body.get("certificate"), body.get("records_key")
        if not isinstance(certificate, bytes) or not isinstance(key, bytes):
            raise MalformedOrgRecord("a membership file holds a certificate and a records key (bytes)")
        return cls(open_certificate(certificate, now=now), key)


# ---- revocations -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Revocation:
    org: PeerID
    revoked: frozenset[PeerID]
    seq: int
    record: SignedRecord = dataclasses.field(repr=False)

    @property
    def expires(self) -> float:
        return self.record.expires

    def encode(self) -> bytes:
        return self.record.encode()


def make_revocation(
    org_key: PrivateKey, revoked: Iterable[PeerID], *, seq: int, now: float, expires: float
) -> Revocation:
    """Sign the cumulative list of revoked members; a higher ``seq`` supersedes lower ones."""
    members = frozenset(revoked)
    if len(members) > MAX_REVOKED:
        raise MalformedOrgRecord(f"a revocation lists at most {MAX_REVOKED} members")
    if not all(isinstance(m, PeerID) for m in members):
        raise MalformedOrgRecord("revoked members must be PeerIDs")
    issued, expires = _check_time("now", now), _check_time("expires", expires)
    if expires <= issued:
        raise MalformedOrgRecord("a revocation must expire after it is made")
    payload = canonical.encode({"revoked": [m.bytes for m in sorted(members)], "issued": issued})
    try:
        record = SignedRecord.sign(org_key, domain=ORG_DOMAIN, type=REVOCATION_TYPE, payload=payload, seq=seq, expires=expires)
    except MalformedRecord as exc:
        raise MalformedOrgRecord(str(exc)) from None
    return Revocation(org_key.peer_id, members, seq, record)


def open_revocation(data: bytes, *, now: float, org: PeerID | None = None) -> Revocation:
    """Decode and verify a revocation (signed by ``org`` if given, not expired at ``now``)."""
    record = _open_signed(data, type=REVOCATION_TYPE, org=org, max_bytes=MAX_REVOCATION_BYTES, what="revocation")
    body = _payload_map(record, "revocation")
    items = body.get("revoked")
    if not isinstance(items, list) or len(items) > MAX_REVOKED:
        raise MalformedOrgRecord(f"revocation must list at most {MAX_REVOKED} peer ids")
    revoked = frozenset(_peer(item, "revoked member") for item in items)
    if not now < record.expires:
        raise RevocationExpired(f"revocation {record.seq} of {record.signer.short()} expired at {record.expires:.0f}")
    return Revocation(record.signer, revoked, record.seq, record)


def revocation_key(org: PeerID) -> bytes:
    """The DHT key of ``org``'s revocation list: ``/modelnet/org/<org b58>/revoked``."""
    return REVOCATION_KEY_PREFIX + str(org).encode("ascii") + REVOCATION_KEY_SUFFIX


def org_of_revocation_key(key: bytes) -> PeerID:
    """The organisation a revocation key names (:class:`MalformedOrgRecord` if it is not one)."""
    if (
        not isinstance(key, bytes)
        or not key.startswith(REVOCATION_KEY_PREFIX)
        or not key.endswith(REVOCATION_KEY_SUFFIX)
    ):
        raise MalformedOrgRecord(f"not a revocation key: {key[:80]!r}")
    middle = key[len(REVOCATION_KEY_PREFIX) : -len(REVOCATION_KEY_SUFFIX)]
    try:
        return PeerID.from_base58(middle.decode("ascii"))
    except (UnicodeDecodeError, InvalidPeerId) as exc:
        raise MalformedOrgRecord(f"revocation key names no organisation: {exc}") from None


__all__ = [
    "CERTIFICATE_TYPE",
    "CertificateExpired",
    "MalformedOrgRecord",
    "Membership",
    "MembershipCertificate",
    "ORG_DOMAIN",
    "OrgError",
    "OrgSignatureInvalid",
    "REVOCATION_TYPE",
    "Revocation",
    "RevocationExpired",
    "WrongMember",
    "WrongOrganisation",
    "issue_certificate",
    "make_revocation",
    "open_certificate",
    "open_revocation",
    "org_of_revocation_key",
    "records_key",
    "records_key_id",
    "revocation_key",
]
