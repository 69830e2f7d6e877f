"""Tier 1: organisation certificates, membership files, revocations (identity/org.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.errors import ModelNetError
from modelnet.identity import (
    CertificateExpired,
    MalformedOrgRecord,
    Membership,
    OrgError,
    OrgSignatureInvalid,
    RevocationExpired,
    SignedRecord,
    WrongMember,
    WrongOrganisation,
    issue_certificate,
    make_revocation,
    open_certificate,
    open_revocation,
    records_key,
    revocation_key,
)
from modelnet.identity.org import ORG_DOMAIN, org_of_revocation_key, records_key_id
from modelnet.testing import seeded_key

ORG = seeded_key(1, seed=77)
OTHER_ORG = seeded_key(2, seed=77)
MEMBER = seeded_key(3, seed=77)
STRANGER = seeded_key(4, seed=77)
NOW = 1_800_000_000.0


def certificate(**overrides):
    args = dict(roles=("dev",), now=NOW, expires=NOW + 3600)
    args.update(overrides)
    return issue_certificate(ORG, "acme", MEMBER.peer_id, **args)


def test_certificate_round_trips_and_binds_member_and_org():
    cert = certificate()
    opened = open_certificate(cert.encode(), now=NOW + 10, member=MEMBER.peer_id, org=ORG.peer_id)
    assert (opened.org, opened.org_name, opened.member, opened.roles) == (ORG.peer_id, "acme", MEMBER.peer_id, ("dev",))
    assert opened.issued == NOW and opened.expires == NOW + 3600
    assert opened.encode() == cert.encode()


def test_expired_certificate_is_refused():
    cert = certificate()
    with pytest.raises(CertificateExpired):
        open_certificate(cert.encode(), now=NOW + 3600)
    open_certificate(cert.encode(), now=NOW + 3599)


def test_certificate_issued_in_the_future_is_refused():
    cert = certificate(now=NOW + 3000, expires=NOW + 9000)
    with pytest.raises(CertificateExpired, match="not valid before"):
        open_certificate(cert.encode(), now=NOW)


def test_certificate_for_another_peer_is_refused():
    with pytest.raises(WrongMember):
        open_certificate(certificate().encode(), now=NOW, member=STRANGER.peer_id)


def test_certificate_of_another_org_is_refused():
    cert = issue_certificate(OTHER_ORG, "acme", MEMBER.peer_id, now=NOW, expires=NOW + 60)
    with pytest.raises(WrongOrganisation):
        open_certificate(cert.encode(), now=NOW, org=ORG.peer_id)


def test_altered_certificate_does_not_verify():
    cert = certificate()
    record = cert.record
    # the same signature over a payload naming the stranger: a forgery
    forged = SignedRecord(
        record.domain,
        record.type,
        record.payload.replace(MEMBER.peer_id.bytes, STRANGER.peer_id.bytes),
        record.seq,
        record.expires,
        record.public_key,
        record.signature,
    )
    assert forged.payload != record.payload
    with pytest.raises(OrgSignatureInvalid):
        open_certificate(forged.encode(), now=NOW, member=STRANGER.peer_id)


def test_a_record_of_another_domain_is_not_a_certificate():
    record = SignedRecord.sign(ORG, domain="modelnet", type="membership", payload=certificate().record.payload, seq=0, expires=NOW + 60)
    with pytest.raises(MalformedOrgRecord):
        open_certificate(record.encode(), now=NOW)


def test_records_key_is_stable_secret_and_label_separated():
    key = records_key(ORG)
    assert len(key) == 32 and key == records_key(ORG)
    assert key != records_key(OTHER_ORG)
    assert key != ORG.seed


def test_membership_round_trips():
    membership = Membership(certificate(), records_key(ORG))
    decoded = Membership.decode(membership.encode(), now=NOW)
    assert decoded.org == ORG.peer_id and decoded.org_name == "acme"
    assert decoded.records_key == records_key(ORG)
    assert decoded.certificate.records_key_id == records_key_id(records_key(ORG))


def test_membership_with_a_swapped_records_key_is_refused():
    membership = Membership(certificate(), records_key(ORG))
    swapped = membership.encode().replace(records_key(ORG), records_key(OTHER_ORG))
    with pytest.raises(WrongOrganisation):
        Membership.decode(swapped, now=NOW)


def test_membership_of_an_expired_certificate_is_refused():
    membership = Membership(certificate(), records_key(ORG))
    with pytest.raises(CertificateExpired):
        Membership.decode(membership.encode(), now=NOW + 7200)


def test_revocation_round_trips_and_is_signed_by_the_org():
    revocation = make_revocation(ORG, [MEMBER.peer_id, STRANGER.peer_id], seq=3, now=NOW, expires=NOW + 100)
    opened = open_revocation(revocation.encode(), now=NOW + 1, org=ORG.peer_id)
    assert opened.revoked == {MEMBER.peer_id, STRANGER.peer_id} and opened.seq == 3 and opened.org == ORG.peer_id
    with pytest.raises(WrongOrganisation):
        open_revocation(revocation.encode(), now=NOW + 1, org=OTHER_ORG.peer_id)
    with pytest.raises(RevocationExpired):
        open_revocation(revocation.encode(), now=NOW + 100)


def test_a_certificate_is_not_a_revocation():
    with pytest.raises(MalformedOrgRecord):
        open_revocation(certificate().encode(), now=NOW)


def test_revocation_key_names_the_org():
    key = revocation_key(ORG.peer_id)
    assert key == b"/modelnet/org/" + str(ORG.peer_id).encode() + b"/revoked"
    assert org_of_revocation_key(key) == ORG.peer_id
    for bad in (b"/modelnet/org/xyz/revoked", b"/modelnet/org/" + str(ORG.peer_id).encode(), b"/modelnet/node/x"):
        with pytest.raises(MalformedOrgRecord):
            org_of_revocation_key(bad)


def test_org_errors_are_identity_errors():
    assert issubclass(OrgError, ModelNetError)
    for error in (CertificateExpired, WrongMember, WrongOrganisation, OrgSignatureInvalid, MalformedOrgRecord):
        assert issubclass(error, OrgError)


# ---- decoders: any bytes in, a typed error or a valid value out ------------------------

_SAMPLES = [
    certificate().encode(),
    Membership(certificate(), records_key(ORG)).encode(),
    make_revocation(ORG, [MEMBER.peer_id], seq=1, now=NOW, expires=NOW + 60).encode(),
]


def _mutations():
    sample = st.sampled_from(_SAMPLES)
    flipped = st.tuples(sample, st.integers(0, 10_000), st.integers(1, 255)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes([t[0][t[1] % len(t[0])] ^ t[2]]) + t[0][t[1] % len(t[0]) + 1 :]
    )
    truncated = st.tuples(sample, st.integers(0, 10_000)).map(lambda t: t[0][: t[1] % len(t[0])])
    return st.one_of(st.binary(max_size=300), flipped, truncated, sample)


@settings(max_examples=300, deadline=None)
@given(_mutations())
def test_decoders_raise_typed_errors_or_return_values(data):
    for decode in (
        lambda d: open_certificate(d, now=NOW),
        lambda d: Membership.decode(d, now=NOW),
        lambda d: open_revocation(d, now=NOW),
    ):
        try:
            value = decode(data)
        except OrgError:
            continue
        assert value.encode() == data


@settings(max_examples=50, deadline=None)
@given(
    roles=st.lists(st.text("abcxyz0123._-", min_size=1, max_size=32), max_size=16),
    lifetime=st.floats(1, 1e8),
    revoked=st.sets(st.integers(0, 50), max_size=20),
    seq=st.integers(0, 2**64 - 1),
)
def test_encodings_round_trip(roles, lifetime, revoked, seq):
    cert = issue_certificate(ORG, "acme", MEMBER.peer_id, roles=roles, now=NOW, expires=NOW + lifetime)
    assert open_certificate(cert.encode(), now=NOW, member=MEMBER.peer_id, org=ORG.peer_id).roles == tuple(dict.fromkeys(roles))
    members = {seeded_key(i, seed=5).peer_id for i in revoked}
    revocation = make_revocation(ORG, members, seq=seq, now=NOW, expires=NOW + lifetime)
    opened = open_revocation(revocation.encode(), now=NOW, org=ORG.peer_id)
    assert opened.revoked == members and opened.seq == seq


def test_org_domain_is_its_own():
    assert certificate().record.domain == ORG_DOMAIN == "modelnet-org"
