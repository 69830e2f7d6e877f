"""Access policies of served models, and the check a provider runs in session negotiation.

A policy admits a peer if it is public, if the peer's id is listed, or if the peer presents
a valid membership certificate of one of the listed organisations (issued to the very peer
id the Noise handshake authenticated, not expired, not revoked, with one of the policy's
roles when it names any). Roles apply to members of every organisation of the policy.

Text form (the CLI's ``--policy MODEL=…``): ``public``, or comma-separated terms
``org:<org peer id>``, ``org:<org peer id>:role=<role>``, ``peer:<peer id>``.

Wire form (canonical msgpack map; unknown fields ignored)::

    {"orgs": [peer id bytes…], "roles": [str…], "peers": [peer id bytes…]}

Revocation lists live in the DHT under ``/modelnet/org/<org>/revoked``;
:class:`RevocationValidator` is the rule of that namespace (signed by the org the key
names, newer seq wins).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

from modelnet.identity import InvalidPeerId, PeerID, canonical
from modelnet.identity.org import (
    MAX_ROLE_CHARS,
    REVOCATION_KEY_PREFIX,
    REVOCATION_TYPE,
    ORG_DOMAIN,
    CertificateExpired,
    MalformedOrgRecord,
    MembershipCertificate,
    OrgError,
    OrgSignatureInvalid,
    WrongMember,
    open_certificate,
    open_revocation,
    org_of_revocation_key,
)

from .capability import select_newest
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import decode_map, field, peer_input

MAX_POLICY_ORGS = 16
MAX_POLICY_ROLES = 16
MAX_POLICY_PEERS = 256
MAX_POLICY_BYTES = 16 << 10

# denial codes, most telling first: the reason shown is that of the best certificate tried
REVOKED = "revoked"
MISSING_ROLE = "missing-role"
EXPIRED = "expired"
WRONG_MEMBER = "wrong-member"
BAD_SIGNATURE = "bad-signature"
WRONG_ORG = "wrong-org"
MALFORMED = "malformed-certificate"
NO_CREDENTIALS = "no-credentials"
NOT_LISTED = "not-listed"
_PRECEDENCE = (REVOKED, MISSING_ROLE, EXPIRED, WRONG_MEMBER, BAD_SIGNATURE, WRONG_ORG, MALFORMED)

IsRevoked = Callable[[PeerID, PeerID], bool]  # (org, member) -> revoked?


class AccessDenied(ProtocolError):
    """A peer that does not satisfy a model's policy; ``code`` says why in one word."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def _peers(values: Iterable[Any], what: str) -> tuple[PeerID, ...]:
    out = []
    for value in values:
        if not isinstance(value, PeerID):
            raise LocalProtocolError(f"{what} must be PeerIDs")
        out.append(value)
    return tuple(dict.fromkeys(out))


def _check_role(role: Any) -> str:
    if (
        not isinstance(role, str)
        or not 1 <= len(role) <= MAX_ROLE_CHARS
        or not all(c.isalnum() or c in "._-" for c in role)
    ):
        raise LocalProtocolError(f"a role is 1..{MAX_ROLE_CHARS} chars of letters, digits . _ -, not {role!r}")
    return role


@dataclasses.dataclass(frozen=True)
class AccessPolicy:
    orgs: tuple[PeerID, ...] = ()
    roles: tuple[str, ...] = ()
    peers: tuple[PeerID, ...] = ()

    def __post_init__(self) -> None:
        for name, limit in (("orgs", MAX_POLICY_ORGS), ("roles", MAX_POLICY_ROLES), ("peers", MAX_POLICY_PEERS)):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise LocalProtocolError(f"policy {name} must be a sequence")
            value = _peers(value, f"policy {name}") if name != "roles" else tuple(dict.fromkeys(map(_check_role, value)))
            if len(value) > limit:
                raise LocalProtocolError(f"a policy names at most {limit} {name}")
            object.__setattr__(self, name, value)
        if self.roles and not self.orgs:
            raise LocalProtocolError("a policy with roles must name an organisation")

    @property
    def public(self) -> bool:
        return not self.orgs and not self.peers

    def __str__(self) -> str:
        if self.public:
            return "public"
        terms = [f"org:{org}" for org in self.orgs]
        if self.roles:  # roles bind every org; written once per org they apply to
            terms = [f"{term}:role={role}" for term in terms for role in self.roles]
        return ",".join(terms + [f"peer:{peer}" for peer in self.peers])

    # -- wire form ----------------------------------------------------------------------

    def encode(self) -> bytes:
        return canonical.encode(
            {"orgs": [o.bytes for o in self.orgs], "roles": list(self.roles), "peers": [p.bytes for p in self.peers]}
        )

    @classmethod
    def decode(cls, data: bytes) -> "AccessPolicy":
        """Parse the wire form; :class:`RemoteProtocolError` on anything bad."""
        with peer_input("access policy"):
            fields = decode_map(data, "access policy", max_size=MAX_POLICY_BYTES)
            orgs, roles, peers = (field(fields, name, list, []) for name in ("orgs", "roles", "peers"))
            for name, items, limit in (("orgs", orgs, MAX_POLICY_ORGS), ("peers", peers, MAX_POLICY_PEERS)):
                if len(items) > limit or not all(isinstance(item, bytes) for item in items):
                    raise RemoteProtocolError(f"policy {name} must be at most {limit} peer ids")
            return cls(
                orgs=tuple(PeerID.from_bytes(o) for o in orgs),
                roles=tuple(roles),
                peers=tuple(PeerID.from_bytes(p) for p in peers),
            )

    # -- text form ----------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> "AccessPolicy":
        """``public`` or ``org:<id>[:role=<r>]`` / ``peer:<id>`` terms joined by commas;
        :class:`LocalProtocolError` naming the bad term."""
        if not isinstance(text, str) or not text.strip():
            raise LocalProtocolError("an access policy is `public` or terms like org:<id>, org:<id>:role=<r>, peer:<id>")
        terms = [term.strip() for term in text.split(",")]
        if terms == ["public"]:
            return cls()
        orgs: list[PeerID] = []
        roles: list[str] = []
        peers: list[PeerID] = []
        for term in terms:
            kind, _, rest = term.partition(":")
            if kind == "org" and rest:
                ident, _, role = rest.partition(":")
                orgs.append(_parse_peer(ident, term))
                if role:
                    name, sep, value = role.partition("=")
                    if name != "role" or not sep:
                        raise LocalProtocolError(f"policy term {term!r}: after the org id only role=<role> may follow")
                    roles.append(_check_role(value))
            elif kind == "peer" and rest:
                peers.append(_parse_peer(rest, term))
            elif term == "public":
                raise LocalProtocolError("`public` cannot be combined with other policy terms")
            else:
                raise LocalProtocolError(f"policy term {term!r} is not org:<id>, org:<id>:role=<r> or peer:<id>")
        return cls(tuple(orgs), tuple(roles), tuple(peers))


def _parse_peer(text: str, term: str) -> PeerID:
    try:
        return PeerID.from_base58(text)
    except InvalidPeerId as exc:
        raise LocalProtocolError(f"policy term {term!r}: {exc}") from None


PUBLIC = AccessPolicy()


def _denial_for(exc: OrgError) -> str:
    if isinstance(exc, CertificateExpired):
        return EXPIRED
    if isinstance(exc, WrongMember):
        return WRONG_MEMBER
    if isinstance(exc, OrgSignatureInvalid):
        return BAD_SIGNATURE
    return MALFORMED


Denial = tuple[str, str]  # (code, reason)


def open_credentials(
    credentials: Sequence[bytes], *, peer: PeerID, now: float
) -> tuple[list[MembershipCertificate], list[Denial]]:
    """The certificates among ``credentials`` that verify and were issued to ``peer``, and
    why each of the others was dropped."""
    certificates: list[MembershipCertificate] = []
    denials: list[Denial] = []
    for data in credentials:
        try:
            certificates.append(open_certificate(data, now=now, member=peer))
        except OrgError as exc:
            denials.append((_denial_for(exc), str(exc)))
    return certificates, denials


def admit(
    policy: AccessPolicy,
    *,
    peer: PeerID,
    certificates: Sequence[MembershipCertificate],
    now: float,
    is_revoked: IsRevoked,
    denials: Sequence[Denial] = (),
) -> MembershipCertificate | None:
    """:func:`check_access` on certificates already opened (and kept: expiry, revocation and
    binding are checked again here). ``denials`` are reasons from credentials that did not open."""
    if policy.public or peer in policy.peers:
        return None
    if not policy.orgs:
        raise AccessDenied(NOT_LISTED, f"{peer} is not among the peers this model admits")
    wanted = ", ".join(str(org) for org in policy.orgs)
    if not certificates and not denials:
        raise AccessDenied(NO_CREDENTIALS, f"membership of an organisation is required ({wanted}); no certificate was presented")
    found = list(denials)
    admitted: list[MembershipCertificate] = []
    for certificate in certificates:
        label = f"{certificate.org_name} ({certificate.org})"
        if certificate.member != peer:
            found.append((WRONG_MEMBER, f"certificate was issued to {certificate.member}, not to {peer}"))
        elif certificate.org not in policy.orgs:
            found.append((WRONG_ORG, f"certificate of {label} is not from an organisation this model admits ({wanted})"))
        elif not now < certificate.expires:
            found.append((EXPIRED, f"membership of {label} expired at {certificate.expires:.0f}"))
        elif is_revoked(certificate.org, peer):
            found.append((REVOKED, f"membership of {peer} in {label} was revoked"))
        elif policy.roles and not set(policy.roles) & set(certificate.roles):
            have = ", ".join(certificate.roles) or "none"
            found.append((MISSING_ROLE, f"a role among {', '.join(policy.roles)} is required in {label}; the member has {have}"))
        else:
            admitted.append(certificate)
    if admitted:
        return max(admitted, key=lambda c: c.expires)
    code, reason = min(found, key=lambda d: _PRECEDENCE.index(d[0]))
    raise AccessDenied(code, reason)


def check_access(
    policy: AccessPolicy,
    *,
    peer: PeerID,
    credentials: Sequence[bytes],
    now: float,
    is_revoked: IsRevoked,
) -> MembershipCertificate | None:
    """Whether ``peer`` (the Noise-authenticated id) may use a model under ``policy``.

    Returns the certificate that admits it (the one expiring last), or None when no
    certificate is needed (public, or the peer is listed). Raises :class:`AccessDenied`
    with the most telling reason among the certificates presented.
    """
    certificates, denials = open_credentials(credentials, peer=peer, now=now)
    return admit(policy, peer=peer, certificates=certificates, now=now, is_revoked=is_revoked, denials=denials)


class RevocationValidator:
    """DHT validator for ``/modelnet/org/<org>/revoked`` (pure: time is a parameter)."""

    prefix = REVOCATION_KEY_PREFIX

    def validate(self, key: bytes, value: bytes, now: float) -> None:
        """Raise a typed error unless ``value`` is a valid revocation signed by the key's org."""
        open_revocation(value, now=now, org=org_of_revocation_key(key))

    def select(self, key: bytes, values: list[bytes]) -> int:
        """Index of the best value: highest seq, then latest expiry; unverifiable ones last."""
        try:
            org: PeerID | None = org_of_revocation_key(key)
        except MalformedOrgRecord:
            org = None
        return select_newest(values, domain=ORG_DOMAIN, type=REVOCATION_TYPE, signer=org)
