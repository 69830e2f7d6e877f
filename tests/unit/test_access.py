"""Tier 1: access policies, the access check, the revocation validator (protocols/access.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.errors import ModelNetError
from modelnet.identity import IdentityError, canonical, issue_certificate, make_revocation, revocation_key
from modelnet.p2p.trust import Revocations, credentials_for
from modelnet.identity import Membership, records_key
from modelnet.protocols import access
from modelnet.protocols.access import AccessDenied, AccessPolicy, RevocationValidator, check_access
from modelnet.protocols.errors import LocalProtocolError, RemoteProtocolError
from modelnet.protocols.session import MAX_CREDENTIALS
from modelnet.testing import seeded_key

ORG = seeded_key(1, seed=88)
OTHER_ORG = seeded_key(2, seed=88)
MEMBER = seeded_key(3, seed=88)
STRANGER = seeded_key(4, seed=88)
NOW = 1_800_000_000.0
ACME = AccessPolicy(orgs=(ORG.peer_id,))


def cert(org=ORG, member=MEMBER, *, roles=(), expires=NOW + 3600):
    return issue_certificate(org, "acme", member.peer_id, roles=roles, now=NOW - 10, expires=expires).encode()


def never_revoked(org, member):
    return False


def check(policy=ACME, *, peer=MEMBER, credentials=(), now=NOW, is_revoked=never_revoked):
    return check_access(policy, peer=peer.peer_id, credentials=list(credentials), now=now, is_revoked=is_revoked)


def denied(**kwargs) -> AccessDenied:
    with pytest.raises(AccessDenied) as info:
        check(**kwargs)
    return info.value


# ---- the check -------------------------------------------------------------------------


def test_public_admits_anyone_without_credentials():
    assert check(AccessPolicy(), peer=STRANGER) is None


def test_a_member_is_admitted_with_its_certificate():
    admitted = check(credentials=[cert()])
    assert admitted is not None and admitted.member == MEMBER.peer_id and admitted.org == ORG.peer_id


def test_no_credentials():
    assert denied().code == access.NO_CREDENTIALS


def test_expired_certificate():
    error = denied(credentials=[cert(expires=NOW - 1)])
    assert error.code == access.EXPIRED and "expired" in error.reason


def test_revoked_member():
    error = denied(credentials=[cert()], is_revoked=lambda org, member: (org, member) == (ORG.peer_id, MEMBER.peer_id))
    assert error.code == access.REVOKED and "revoked" in error.reason


def test_certificate_of_another_org():
    error = denied(credentials=[cert(org=OTHER_ORG)])
    assert error.code == access.WRONG_ORG and str(ORG.peer_id) in error.reason


def test_certificate_issued_by_a_non_organisation_key():
    # the member signs its own "acme" certificate: a valid signature, but not the org's key
    error = denied(credentials=[cert(org=MEMBER)])
    assert error.code == access.WRONG_ORG


def test_certificate_of_another_peer_presented_by_an_attacker():
    error = denied(peer=STRANGER, credentials=[cert()])
    assert error.code == access.WRONG_MEMBER and str(MEMBER.peer_id) in error.reason


def test_tampered_certificate():
    data = bytearray(cert())
    data[-70] ^= 1  # inside the signature
    error = denied(credentials=[bytes(data)])
    assert error.code in (access.BAD_SIGNATURE, access.MALFORMED)


def test_garbage_credential():
    assert denied(credentials=[b"\x00garbage"]).code == access.MALFORMED


def test_member_with_the_wrong_role():
    policy = AccessPolicy(orgs=(ORG.peer_id,), roles={ORG.peer_id: ("admin",)})
    error = denied(policy=policy, credentials=[cert(roles=("dev",))])
    assert error.code == access.MISSING_ROLE and "admin" in error.reason
    assert check(policy, credentials=[cert(roles=("dev", "admin"))]) is not None


def test_roles_bind_only_their_own_organisation():
    # review finding 5: roles written for A must not apply to B, nor B's absence of roles to A
    policy = AccessPolicy.parse(f"org:{ORG.peer_id}:role=admin,org:{OTHER_ORG.peer_id}:role=guest")
    assert denied(policy=policy, credentials=[cert(roles=("guest",))]).code == access.MISSING_ROLE
    assert check(policy, credentials=[cert(roles=("admin",))]).org == ORG.peer_id
    assert check(policy, credentials=[cert(OTHER_ORG, roles=("guest",))]).org == OTHER_ORG.peer_id
    assert denied(policy=policy, credentials=[cert(OTHER_ORG, roles=("admin",))]).code == access.MISSING_ROLE
    mixed = AccessPolicy.parse(f"org:{ORG.peer_id}:role=admin,org:{OTHER_ORG.peer_id}")
    assert check(mixed, credentials=[cert(OTHER_ORG)]).org == OTHER_ORG.peer_id  # B's plain members
    assert denied(policy=mixed, credentials=[cert()]).code == access.MISSING_ROLE  # A's plain members: no
    assert str(mixed) == f"org:{ORG.peer_id}:role=admin,org:{OTHER_ORG.peer_id}"


def test_several_roles_for_one_organisation_add_up():
    policy = AccessPolicy.parse(f"org:{ORG.peer_id}:role=admin,org:{ORG.peer_id}:role=ops")
    assert policy.orgs == (ORG.peer_id,) and policy.roles_of(ORG.peer_id) == ("admin", "ops")
    assert check(policy, credentials=[cert(roles=("ops",))]) is not None
    assert AccessPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"orgs": (), "roles": {ORG.peer_id: ("a",)}},  # roles for an organisation not named
        {"orgs": (ORG.peer_id,), "roles": ("admin",)},  # the old pooled form
        {"orgs": (ORG.peer_id,), "roles": {ORG.peer_id: "admin"}},  # a string, not a sequence of roles
        {"orgs": (ORG.peer_id,), "roles": ((ORG.peer_id, ("a",)), (ORG.peer_id, ("b",)))},
        {"orgs": (ORG.peer_id,), "roles": {ORG.peer_id: ("a b",)}},
    ],
)
def test_policy_roles_must_be_per_named_organisation(kwargs):
    with pytest.raises(LocalProtocolError):
        AccessPolicy(**kwargs)


def test_peer_list_policy():
    policy = AccessPolicy(peers=(MEMBER.peer_id,))
    assert check(policy) is None
    assert denied(policy=policy, peer=STRANGER, credentials=[cert(member=STRANGER)]).code == access.NOT_LISTED


def test_one_good_certificate_among_bad_ones_admits():
    admitted = check(credentials=[b"junk", cert(org=OTHER_ORG), cert(expires=NOW + 50), cert(expires=NOW + 500)])
    assert admitted.expires == NOW + 500  # the one that lasts longest


def test_the_most_telling_reason_wins():
    error = denied(credentials=[cert(org=OTHER_ORG), cert()], is_revoked=lambda org, member: org == ORG.peer_id)
    assert error.code == access.REVOKED


# ---- text and wire forms ---------------------------------------------------------------


def test_parse_text_forms():
    assert AccessPolicy.parse("public").public
    policy = AccessPolicy.parse(f"org:{ORG.peer_id}:role=admin, peer:{STRANGER.peer_id},org:{OTHER_ORG.peer_id}")
    assert policy.orgs == (ORG.peer_id, OTHER_ORG.peer_id)
    assert policy.roles == ((ORG.peer_id, ("admin",)),) and policy.peers == (STRANGER.peer_id,)
    assert policy.roles_of(ORG.peer_id) == ("admin",) and policy.roles_of(OTHER_ORG.peer_id) == ()
    assert AccessPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize(
    "text",
    [
        "", "private", "org:", "org:nope", f"org:{ORG.peer_id}:admin", f"public,org:{ORG.peer_id}", "peer:12D3Koo",
        f"org:{ORG.peer_id}:role=a b",
        f"org:{ORG.peer_id}:role=admin,org:{ORG.peer_id}",  # with and without a role: one would be moot
        f"org:{ORG.peer_id},org:{ORG.peer_id}:role=admin",
    ],
)
def test_parse_refuses_bad_text(text):
    with pytest.raises(LocalProtocolError):
        AccessPolicy.parse(text)


def test_wire_form_round_trips():
    policy = AccessPolicy(orgs=(ORG.peer_id, OTHER_ORG.peer_id), roles={ORG.peer_id: ("a", "b")}, peers=(MEMBER.peer_id,))
    assert canonical.decode(policy.encode()) == {
        "orgs": [{"org": ORG.peer_id.bytes, "roles": ["a", "b"]}, {"org": OTHER_ORG.peer_id.bytes, "roles": []}],
        "peers": [MEMBER.peer_id.bytes],
    }
    assert AccessPolicy.decode(policy.encode()) == policy
    assert AccessPolicy.decode(AccessPolicy().encode()).public


@pytest.mark.parametrize(
    "fields",
    [
        {"orgs": [ORG.peer_id.bytes], "roles": ["admin"]},  # the old pooled form: refused, never read without its roles
        {"orgs": [{"org": ORG.peer_id.bytes}, {"org": ORG.peer_id.bytes, "roles": ["a"]}]},
        {"orgs": [{"roles": ["a"]}]},
        {"orgs": [{"org": ORG.peer_id.bytes, "roles": "a"}]},
    ],
)
def test_policy_decoder_refuses_pooled_duplicate_or_partial_orgs(fields):
    with pytest.raises(RemoteProtocolError):
        AccessPolicy.decode(canonical.encode(fields))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.builds(lambda p, i, b: p[:i] + bytes([b]) + p[i + 1 :],
       st.just(AccessPolicy(orgs=(ORG.peer_id, OTHER_ORG.peer_id), roles={ORG.peer_id: ("x",)}, peers=(MEMBER.peer_id,)).encode()),
       st.integers(0, 140), st.integers(0, 255))))
def test_policy_decoder_raises_typed_errors_or_returns_a_policy(data):
    try:
        policy = AccessPolicy.decode(data)
    except RemoteProtocolError:
        return
    assert AccessPolicy.decode(policy.encode()) == policy


@settings(max_examples=50, deadline=None)
@given(
    orgs=st.dictionaries(
        st.integers(0, 30), st.lists(st.text("abc-_.9", min_size=1, max_size=8), max_size=3), max_size=5
    ),
    peers=st.lists(st.integers(0, 30), max_size=5),
)
def test_policy_forms_round_trip(orgs, peers):
    ids = {i: seeded_key(i, 1).peer_id for i in orgs}
    policy = AccessPolicy(
        orgs=tuple(ids.values()),
        roles={ids[i]: tuple(roles) for i, roles in orgs.items()},
        peers=tuple(seeded_key(i, 2).peer_id for i in peers),
    )
    for i, roles in orgs.items():
        assert policy.roles_of(ids[i]) == tuple(dict.fromkeys(roles))
    assert AccessPolicy.decode(policy.encode()) == policy
    assert AccessPolicy.parse(str(policy)) == policy


# ---- revocations -----------------------------------------------------------------------


def test_validator_accepts_only_the_orgs_own_revocation_and_prefers_newer():
    validator = RevocationValidator()
    key = revocation_key(ORG.peer_id)
    older = make_revocation(ORG, [MEMBER.peer_id], seq=1, now=NOW, expires=NOW + 100).encode()
    newer = make_revocation(ORG, [MEMBER.peer_id, STRANGER.peer_id], seq=2, now=NOW, expires=NOW + 100).encode()
    forged = make_revocation(OTHER_ORG, [], seq=99, now=NOW, expires=NOW + 100).encode()
    validator.validate(key, newer, NOW)
    with pytest.raises(IdentityError):
        validator.validate(key, forged, NOW)
    with pytest.raises(IdentityError):
        validator.validate(key, newer, NOW + 100)
    assert validator.select(key, [older, newer]) == 1
    assert validator.select(key, [newer, older]) == 0
    assert validator.select(key, [forged, older]) == 1


def test_revocations_keep_the_newest_list_and_never_shrink_by_an_older_one():
    revocations = Revocations()
    assert revocations.learn(make_revocation(ORG, [MEMBER.peer_id], seq=2, now=NOW, expires=NOW + 100))
    assert not revocations.learn(make_revocation(ORG, [], seq=1, now=NOW, expires=NOW + 100))
    assert revocations.is_revoked(ORG.peer_id, MEMBER.peer_id)
    assert not revocations.is_revoked(OTHER_ORG.peer_id, MEMBER.peer_id)
    assert revocations.learn(make_revocation(ORG, [], seq=3, now=NOW, expires=NOW + 100))  # the org reinstated it
    assert not revocations.is_revoked(ORG.peer_id, MEMBER.peer_id)


def test_credentials_presented_are_the_orgs_asked_for_or_all_valid_ones_bounded():
    def membership(org, expires):
        return Membership(issue_certificate(org, "o", MEMBER.peer_id, now=NOW, expires=expires), records_key(org))

    held = [membership(ORG, NOW + 10), membership(OTHER_ORG, NOW + 20)]
    assert len(credentials_for(held, None, now=NOW)) == 2
    assert credentials_for(held, [ORG.peer_id], now=NOW) == (held[0].certificate.encode(),)
    assert credentials_for(held, None, now=NOW + 15) == (held[1].certificate.encode(),)  # expired ones stay home
    many = [membership(seeded_key(i, 9), NOW + 100 + i) for i in range(MAX_CREDENTIALS + 3)]
    assert len(credentials_for(many, None, now=NOW)) == MAX_CREDENTIALS


def test_access_denied_is_a_modelnet_error():
    assert issubclass(AccessDenied, ModelNetError)
