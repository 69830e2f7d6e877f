"""Tier 1: private capability records (protocols/private.py): keys, sealing, the validator."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.errors import ModelNetError
from modelnet.identity import (
    InvalidSignature,
    PrivateKey,
    RecordExpired,
    SignedRecord,
    WrongKey,
    canonical,
    issue_certificate,
    records_key,
)
from modelnet.identity.org import CertificateExpired, WrongMember, WrongOrganisation
from modelnet.protocols import capability as cap
from modelnet.protocols import private
from modelnet.protocols.errors import LocalProtocolError, RemoteProtocolError

NOW = 1_800_000_000.0
ORG = PrivateKey.from_seed(b"\x03" * 32)
OTHER_ORG = PrivateKey.from_seed(b"\x04" * 32)
ACME = records_key(ORG)
OTHER = records_key(OTHER_ORG)
KEY = PrivateKey.from_seed(b"\x01" * 32)
MALLORY = PrivateKey.from_seed(b"\x02" * 32)
NONCE = bytes(range(private.NONCE_BYTES))  # the caller draws it; fixed here, so runs repeat exactly


def certificate(member: PrivateKey = KEY, org: PrivateKey = ORG, *, expires: float = NOW + 3600):
    return issue_certificate(org, "acme", member.peer_id, now=NOW - 10, expires=expires)


def never_revoked(org, member) -> bool:
    return False


def open_record(value: bytes, *, records_key: bytes = ACME, org=ORG, now: float = NOW, peer=KEY.peer_id, is_revoked=never_revoked):
    return private.open_private_record(value, records_key=records_key, org=org.peer_id, now=now, peer=peer, is_revoked=is_revoked)


def record_of(key: PrivateKey, *names: str) -> cap.CapabilityRecord:
    models = tuple(cap.ModelCapability(name=n, task="classify", tags=("medical",)) for n in names or ("secret-model",))
    return cap.CapabilityRecord(peer_id=key.peer_id, addrs=("/memory/1",), models=models)


def sealed(
    key: PrivateKey = KEY, records_key: bytes = ACME, *, seq: int = 1, expires: float = NOW + 60, cert=None
) -> tuple[bytes, bytes]:
    cert = cert or certificate(key, ORG if records_key == ACME else OTHER_ORG)
    dht_key, signed = private.seal_record(key, record_of(key), records_key=records_key, certificate=cert, seq=seq, expires=expires, nonce=NONCE)
    return dht_key, signed.encode()


def test_keys_depend_on_the_records_key_tag_and_peer():
    a = private.private_capability_key(ACME, "classify")
    assert a.startswith(private.PRIVATE_CAP_KEY_PREFIX)
    assert a == private.private_capability_key(ACME, " Classify ")  # normalised like public tags
    assert a != private.private_capability_key(OTHER, "classify")
    assert a != private.private_capability_key(ACME, "chat")
    assert b"classify" not in a  # the tag is not readable in the key
    node = private.private_node_key(ACME, KEY.peer_id)
    assert node.startswith(private.PRIVATE_NODE_KEY_PREFIX) and node.endswith(KEY.peer_id.bytes)
    assert private.peer_of_private_node_key(node) == KEY.peer_id
    assert node != private.private_node_key(OTHER, KEY.peer_id)
    # the organisation part differs per peer: keys do not link a node's organisations
    assert node[:48] != private.private_node_key(ACME, MALLORY.peer_id)[:48]
    with pytest.raises(LocalProtocolError):
        private.private_capability_key(b"short", "classify")


def test_a_member_opens_what_was_sealed():
    dht_key, value = sealed()
    assert dht_key == private.private_node_key(ACME, KEY.peer_id)
    signed, record, cert = open_record(value)
    assert cert == certificate()
    assert record == record_of(KEY)
    assert signed.signer == KEY.peer_id and signed.seq == 1
    assert b"secret-model" not in value  # the content is encrypted


def test_a_non_member_with_the_exact_key_gets_only_ciphertext():
    dht_key, value = sealed()
    # A storing node (or anyone who learnt the DHT key) can check the signature...
    private.PrivateRecordValidator().validate(dht_key, value, NOW)
    # ...but another organisation's key does not open it.
    with pytest.raises(RemoteProtocolError):  # the key is derived from the records key: no such record for OTHER
        open_record(value, records_key=OTHER)
    fields = canonical.decode(SignedRecord.decode(value).payload)
    with pytest.raises(Exception) as excinfo:
        private._aead(OTHER).decrypt(fields["nonce"], fields["sealed"], dht_key)
    assert type(excinfo.value).__name__ == "InvalidTag"


@pytest.mark.parametrize("where", ["sealed", "nonce"])
def test_tampered_ciphertext_is_refused(where):
    dht_key, value = sealed()
    outer = SignedRecord.decode(value)
    fields = canonical.decode(outer.payload)
    fields[where] = bytes([fields[where][0] ^ 1]) + fields[where][1:]
    # re-signed by the provider itself: the signature is fine, the ciphertext is not
    forged = SignedRecord.sign(KEY, domain=cap.DOMAIN, type=private.PRIVATE_CAPABILITY_TYPE,
                               payload=canonical.encode(fields), seq=2, expires=NOW + 60).encode()  # fmt: skip
    private.PrivateRecordValidator().validate(dht_key, forged, NOW)  # storing nodes cannot tell
    with pytest.raises(private.UndecryptableRecord):
        open_record(forged)


def test_forged_signed_by_another_key_or_expired_records_are_refused():
    dht_key, value = sealed()
    validator = private.PrivateRecordValidator()
    # Mallory seals a record under the victim's key: signed by the wrong peer.
    _, mallory_value = private.seal_record(MALLORY, record_of(MALLORY), records_key=ACME, certificate=certificate(MALLORY), seq=9, expires=NOW + 60, nonce=NONCE)
    with pytest.raises(WrongKey):
        validator.validate(dht_key, mallory_value.encode(), NOW)
    with pytest.raises(WrongKey):
        open_record(mallory_value.encode())
    # A flipped signature bit.
    outer = SignedRecord.decode(value)
    bad = SignedRecord(outer.domain, outer.type, outer.payload, outer.seq, outer.expires, outer.public_key,
                       bytes([outer.signature[0] ^ 1]) + outer.signature[1:]).encode()  # fmt: skip
    with pytest.raises(InvalidSignature):
        validator.validate(dht_key, bad, NOW)
    # Past its expiry.
    with pytest.raises(RecordExpired):
        validator.validate(dht_key, value, NOW + 61)
    with pytest.raises(RecordExpired):
        open_record(value, now=NOW + 61)


def test_a_record_moved_under_another_key_is_refused():
    _, value = sealed(records_key=OTHER)  # KEY's record for another organisation
    with pytest.raises(RemoteProtocolError, match="another key"):
        private.PrivateRecordValidator().validate(private.private_node_key(ACME, KEY.peer_id), value, NOW)


def seal_plain(plain: bytes, key: PrivateKey = KEY) -> bytes:
    """What a holder of the records key can make: any content, sealed and signed by itself."""
    dht_key = private.private_node_key(ACME, key.peer_id)
    nonce = bytes(private.NONCE_BYTES)
    payload = canonical.encode({"key": dht_key, "nonce": nonce, "sealed": private._aead(ACME).encrypt(nonce, plain, dht_key)})
    return SignedRecord.sign(key, domain=cap.DOMAIN, type=private.PRIVATE_CAPABILITY_TYPE, payload=payload, seq=1, expires=NOW + 60).encode()


def content(key: PrivateKey = KEY, cert=None) -> dict:
    return {"capabilities": record_of(key).to_payload(), "membership": (cert or certificate(key)).encode()}


def test_knowing_the_records_key_is_not_enough_to_pose_as_a_provider():
    # review finding 2: the certificate inside must be the organisation's, for the signer, valid, unrevoked
    assert open_record(seal_plain(canonical.encode(content())))[1] == record_of(KEY)
    without = dict(content())
    del without["membership"]
    cases = [
        (canonical.encode(without), RemoteProtocolError),  # no membership at all
        (record_of(KEY).to_payload(), RemoteProtocolError),  # the bare capability record
        (canonical.encode(content(cert=certificate(KEY, OTHER_ORG))), WrongOrganisation),  # another org's member
        (canonical.encode(content(cert=issue_certificate(KEY, "acme", KEY.peer_id, now=NOW, expires=NOW + 60))), WrongOrganisation),
        (canonical.encode(content(cert=certificate(MALLORY))), WrongMember),  # a real member's certificate, replayed
        (canonical.encode(content(cert=certificate(expires=NOW + 5))), CertificateExpired),
    ]
    for plain, error in cases:
        with pytest.raises(error):
            open_record(seal_plain(plain), now=NOW + 10)
    revoked = {(ORG.peer_id, KEY.peer_id)}
    with pytest.raises(private.RevokedProvider):
        open_record(sealed()[1], is_revoked=lambda org, member: (org, member) in revoked)
    open_record(sealed()[1], is_revoked=lambda org, member: org != ORG.peer_id)  # revoked elsewhere only


@settings(max_examples=100, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda i, b: (lambda p: p[:i] + bytes([b]) + p[i + 1 :])(canonical.encode(content())), st.integers(0, 600), st.integers(0, 255)),
))
def test_any_sealed_content_gives_a_typed_error_or_the_record(plain):
    try:
        _, record, cert = open_record(seal_plain(plain))
    except ModelNetError:
        return
    assert record.peer_id == cert.member == KEY.peer_id and cert.org == ORG.peer_id


def test_a_sealed_record_must_name_its_signer():
    with pytest.raises(LocalProtocolError):
        private.seal_record(MALLORY, record_of(KEY), records_key=ACME, certificate=certificate(MALLORY), seq=1, expires=NOW + 60, nonce=NONCE)
    with pytest.raises(LocalProtocolError):  # nor with another member's certificate
        private.seal_record(KEY, record_of(KEY), records_key=ACME, certificate=certificate(MALLORY), seq=1, expires=NOW + 60, nonce=NONCE)


def test_select_keeps_the_newest_valid_value():
    dht_key, old = sealed(seq=1)
    _, new = sealed(seq=5)
    _, forged = private.seal_record(MALLORY, record_of(MALLORY), records_key=ACME, certificate=certificate(MALLORY), seq=99, expires=NOW + 60, nonce=NONCE)
    validator = private.PrivateRecordValidator()
    assert validator.select(dht_key, [old, new]) == 1
    assert validator.select(dht_key, [new, old]) == 0
    assert validator.select(dht_key, [forged.encode(), old]) == 1
    assert validator.select(dht_key, [b"junk", old]) == 1


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_typed_error(data):
    dht_key = private.private_node_key(ACME, KEY.peer_id)
    for check in (
        lambda: private.PrivateRecordValidator().validate(dht_key, data, NOW),
        lambda: open_record(data),
    ):
        with pytest.raises(ModelNetError):
            check()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=120))
def test_any_key_bytes_parse_or_give_a_typed_error(data):
    key = private.PRIVATE_NODE_KEY_PREFIX + data
    try:
        peer = private.peer_of_private_node_key(key)
    except RemoteProtocolError:
        return
    assert key.endswith(peer.bytes)


@settings(max_examples=40, deadline=None)
@given(
    names=st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True), min_size=1, max_size=4, unique=True),
    org_seed=st.binary(min_size=32, max_size=32),
    seq=st.integers(0, 2**63),
)
def test_round_trip(names, org_seed, seq):
    org = PrivateKey.from_seed(org_seed)
    record, cert = record_of(KEY, *names), certificate(KEY, org)
    _, signed = private.seal_record(KEY, record, records_key=records_key(org), certificate=cert, seq=seq, expires=NOW + 10, nonce=NONCE)
    opened, back, inside = open_record(signed.encode(), records_key=records_key(org), org=org)
    assert back == record and opened.seq == seq and inside == cert
