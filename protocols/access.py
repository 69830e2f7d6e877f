"""Access policies of served models, and the check a provider runs in session negotiation.

A policy admits a peer if it is public, if the peer's id is listed, or if the peer presents
a valid membership certificate of one of the listed organisations (issued to the very peer
id the Noise handshake authenticated, not expired, not revoked, and holding one of the
roles the policy gives for *that* organisation, if it gives any). Roles are per
organisation: ``org:A:role=admin,org:B`` admits A's admins and every member of B.

Text form (the CLI's ``--policy MODEL=…``): ``public``, or comma-separated terms
``org:<org peer id>``, ``org:<org peer id>:role=<role>``, ``peer:<peer id>``. Several
``role=`` terms for one organisation add roles (any one suffices); naming an organisation
both with and without roles is an error (one of the two would be meaningless).

Wire form (canonical msgpack map; unknown fields ignored)::

    {"orgs": [{"org": peer id bytes, "roles": [str…]}…], "peers": [peer id bytes…]}

An empty ``roles`` admits every member. A top-level ``roles`` field (the pooled form of
earlier versions) is refused rather than ignored, so roles are never lost on the way.

Revocation lists live in the DHT under ``/modelnet/org/<org>/revoked``;
:class:`RevocationValidator` is the rule of that namespace (signed by the org the key
names, newer seq wins).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

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
MAX_POLICY_ROLES = 16  # per organisation
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


OrgRoles = tuple[tuple[PeerID, tuple[str, ...]], ...]  # ((org, roles), …): only orgs that name roles


def _org_roles(value: Any, orgs: tuple[PeerID, ...]) -> OrgRoles:
    """``roles`` as given (a mapping or ``(org, roles)`` pairs) in the order of ``orgs``."""
    if not isinstance(value, (Mapping, tuple, list)):
        raise LocalProtocolError("policy roles must map organisations to roles")
    pairs = value.items() if isinstance(value, Mapping) else value
    by_org: dict[PeerID, tuple[str, ...]] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], PeerID):
            raise LocalProtocolError("policy roles are per organisation: {org PeerID: (role, …)}")
        org, roles = pair
        if org not in orgs:
            raise LocalProtocolError(f"policy gives roles to {org}, which it does not name")
        if org in by_org:
            raise LocalProtocolError(f"policy gives roles to {org} twice")
        if isinstance(roles, str) or not isinstance(roles, (tuple, list)):
            raise LocalProtocolError("the roles of an organisation must be a sequence of role names")
        roles = tuple(dict.fromkeys(map(_check_role, roles)))
        if len(roles) > MAX_POLICY_ROLES:
            raise LocalProtocolError(f"a policy names at most {MAX_POLICY_ROLES} roles per organisation")
        if roles:
            by_org[org] = roles
    return tuple((org, by_org[org]) for org in orgs if org in by_org)


@dataclasses.dataclass(frozen=True)
class AccessPolicy:
    """Who may use a model. ``roles`` gives, per organisation, the roles that admit its
    members (at least one needed); an organisation without an entry admits every member."""

    orgs: tuple[PeerID, ...] = ()
    roles: OrgRoles = ()
    peers: tuple[PeerID, ...] = ()

    def __post_init__(self) -> None:
        for name, limit in (("orgs", MAX_POLICY_ORGS), ("peers", MAX_POLICY_PEERS)):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise LocalProtocolError(f"policy {name} must be a sequence")
            value = _peers(value, f"policy {name}")
            if len(value) > limit:
                raise LocalProtocolError(f"a policy names at most {limit} {name}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "roles", _org_roles(self.roles, self.orgs))

    @property
    def public(self) -> bool:
        return not self.orgs and not self.peers

    def roles_of(self, org: PeerID) -> tuple[str, ...]:
        """The roles that admit members of ``org`` (empty: any member)."""
        return dict(self.roles).get(org, ())

    def __str__(self) -> str:
        if self.public:
            return "public"
        terms = []
        for org in self.orgs:
            roles = self.roles_of(org)
            terms += [f"org:{org}:role={role}" for role in roles] if roles else [f"org:{org}"]
        return ",".join(terms + [f"peer:{peer}" for peer in self.peers])

    # -- wire form ----------------------------------------------------------------------

    def encode(self) -> bytes:
        orgs = [{"org": org.bytes, "roles": list(self.roles_of(org))} for org in self.orgs]
        return canonical.encode({"orgs": orgs, "peers": [p.bytes for p in self.peers]})

    @classmethod
    def decode(cls, data: bytes) -> "AccessPolicy":
        """Parse the wire form; :class:`RemoteProtocolError` on anything bad."""
        with peer_input("access policy"):
            fields = decode_map(data, "access policy", max_size=MAX_POLICY_BYTES)
            if "roles" in fields:
                raise RemoteProtocolError("policy roles belong to each organisation (orgs[].roles), not to the policy")
            orgs, peers = field(fields, "orgs", list, []), field(fields, "peers", list, [])
            if len(orgs) > MAX_POLICY_ORGS or not all(isinstance(item, dict) for item in orgs):
                raise RemoteProtocolError(f"policy orgs must be at most {MAX_POLICY_ORGS} maps")
            if len(peers) > MAX_POLICY_PEERS or not all(isinstance(item, bytes) for item in peers):
                raise RemoteProtocolError(f"policy peers must be at most {MAX_POLICY_PEERS} peer ids")
            terms = [(PeerID.from_bytes(field(o, "org", bytes)), tuple(field(o, "roles", list, []))) for o in orgs]
            if len({org for org, _ in terms}) != len(terms):
                raise RemoteProtocolError("policy names an organisation twice")
            return cls(
                orgs=tuple(org for org, _ in terms),
                roles=tuple(terms),
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
        roles: dict[PeerID, list[str]] = {}  # per org, in the order written; [] = any member
        peers: list[PeerID] = []
        for term in terms:
            kind, _, rest = term.partition(":")
            if kind == "org" and rest:
                ident, _, role = rest.partition(":")
                org = _parse_peer(ident, term)
                if role:
                    name, sep, value = role.partition("=")
                    if name != "role" or not sep:
                        raise LocalProtocolError(f"policy term {term!r}: after the org id only role=<role> may follow")
                    value = _check_role(value)
                if org in roles and bool(roles[org]) != bool(role):
                    raise LocalProtocolError(f"policy names {ident} both with and without a role: write only one of the two")
                roles.setdefault(org, []).extend([value] if role else [])
            elif kind == "peer" and rest:
                peers.append(_parse_peer(rest, term))
            elif term == "public":
                raise LocalProtocolError("`public` cannot be combined with other policy terms")
            else:
                raise LocalProtocolError(f"policy term {term!r} is not org:<id>, org:<id>:role=<r> or peer:<id>")
        return cls(tuple(roles), tuple((org, tuple(r)) for org, r in roles.items()), tuple(peers))


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
        elif (roles := policy.roles_of(certificate.org)) and not set(roles) & set(certificate.roles):
            have = ", ".join(certificate.roles) or "none"
            found.append((MISSING_ROLE, f"a role among {', '.join(roles)} is required in {label}; the member has {have}"))
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
