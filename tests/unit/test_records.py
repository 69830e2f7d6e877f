"""Signed records: round trips, tampering, expiry, domain separation, signer binding."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.identity import (
    IdentityError,
    InvalidSignature,
    MalformedRecord,
    PrivateKey,
    RecordExpired,
    SignedRecord,
    WrongDomain,
    WrongKey,
    canonical,
    open_record,
)
from modelnet.identity.records import SIGNED_RECORD_PREFIX

from .test_identity import canonical_values

ALICE = PrivateKey.from_seed(b"\x01" * 32)
BOB = PrivateKey.from_seed(b"\x02" * 32)
NOW = 1_700_000_000.0
BODY = {"hello": "world"}


def make(key=ALICE, *, domain="modelnet", type="capability", body=BODY, seq=3, expires=NOW + 60):
    payload = canonical.encode(body)
    return SignedRecord.sign(key, domain=domain, type=type, payload=payload, seq=seq, expires=expires)


def test_sign_encode_decode_verify_round_trip():
    record = make()
    decoded = SignedRecord.decode(record.encode())
    assert decoded == record
    decoded.verify(now=NOW, domain="modelnet", type="capability", signer=ALICE.peer_id)
    assert decoded.signer == ALICE.peer_id
    assert decoded.body() == {"hello": "world"}
    assert open_record(record.encode(), now=NOW, domain="modelnet", type="capability") == record


def test_the_signature_covers_prefix_domain_type_payload_seq_expires_and_key():
    record = make()
    signed = canonical.encode(
        [SIGNED_RECORD_PREFIX, "modelnet", "capability", record.payload, 3, NOW + 60, ALICE.public_key.to_protobuf()]
    )
    ALICE.public_key.verify(record.signature, signed)


def test_int_expiry_is_signed_as_float():
    record = make(expires=int(NOW) + 60)
    assert record.expires == float(int(NOW) + 60) and isinstance(record.expires, float)
    open_record(record.encode(), now=NOW, domain="modelnet", type="capability")


@pytest.mark.parametrize(
    "field, value",
    [("domain", "other"), ("type", "session-grant")],
)
def test_a_signature_for_one_domain_or_type_never_verifies_in_another(field, value):
    record = make(**{field: value})
    with pytest.raises(WrongDomain):
        record.verify(now=NOW, domain="modelnet", type="capability")
    # relabelling the record doesn't help: the label is under the signature
    relabelled = SignedRecord(
        "modelnet", "capability", record.payload, record.seq, record.expires, record.public_key, record.signature
    )
    with pytest.raises(InvalidSignature):
        relabelled.verify(now=NOW, domain="modelnet", type="capability")


def test_expiry_is_exclusive():
    record = make(expires=NOW)
    with pytest.raises(RecordExpired):
        record.verify(now=NOW, domain="modelnet", type="capability")
    record.verify(now=NOW - 0.001, domain="modelnet", type="capability")


def test_extending_the_expiry_breaks_the_signature():
    record = make(expires=NOW)
    extended = SignedRecord(
        record.domain, record.type, record.payload, record.seq, NOW + 3600, record.public_key, record.signature
    )
    with pytest.raises(InvalidSignature):
        extended.verify(now=NOW + 1, domain="modelnet", type="capability")


def test_verify_signature_skips_only_the_expiry():
    record = make(expires=NOW)
    record.verify_signature(domain="modelnet", type="capability", signer=ALICE.peer_id)
    with pytest.raises(WrongKey):
        record.verify_signature(domain="modelnet", type="capability", signer=BOB.peer_id)


def test_wrong_signer_is_wrong_key():
    with pytest.raises(WrongKey):
        open_record(make().encode(), now=NOW, domain="modelnet", type="capability", signer=BOB.peer_id)


def test_another_key_claiming_the_signature_is_invalid():
    record = make()
    swapped = SignedRecord(
        record.domain, record.type, record.payload, record.seq, record.expires, BOB.public_key, record.signature
    )
    with pytest.raises(InvalidSignature):
        open_record(swapped.encode(), now=NOW, domain="modelnet", type="capability")


def test_flipping_any_byte_never_yields_a_valid_record():
    data = make().encode()
    for index in range(len(data)):
        for mask in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[index] ^= mask
            with pytest.raises((MalformedRecord, InvalidSignature, WrongDomain)):
                open_record(bytes(tampered), now=NOW, domain="modelnet", type="capability")


def test_unknown_fields_are_ignored():
    record = make()
    fields = canonical.decode(record.encode())
    fields["zz-future"] = [1, 2, 3]
    fields["aa-future"] = {"x": b"y"}
    assert open_record(canonical.encode(fields), now=NOW, domain="modelnet", type="capability") == record


RECORD_FIELDS = ["domain", "type", "payload", "seq", "expires", "key", "sig"]


@pytest.mark.parametrize("missing", RECORD_FIELDS)
def test_a_missing_field_is_malformed(missing):
    fields = canonical.decode(make().encode())
    del fields[missing]
    with pytest.raises(MalformedRecord, match=missing):
        SignedRecord.decode(canonical.encode(fields))


@pytest.mark.parametrize(
    "field, value",
    [
        ("domain", ""),
        ("domain", 5),
        ("type", "t" * 65),
        ("payload", "text"),
        ("seq", -1),
        ("seq", True),
        ("seq", 1.5),
        ("expires", "soon"),
        ("key", b"\x00" * 36),
        ("key", "text"),
        ("sig", b"\x00" * 63),
    ],
)
def test_a_field_of_the_wrong_type_or_size_is_malformed(field, value):
    fields = canonical.decode(make().encode())
    fields[field] = value
    with pytest.raises(MalformedRecord):
        SignedRecord.decode(canonical.encode(fields))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"domain": ""},
        {"type": "x" * 65},
        {"seq": -1},
        {"seq": 1 << 64},
        {"expires": math.nan},
        {"payload": "not bytes"},
    ],
)
def test_signing_checks_fields(kwargs):
    args = {"domain": "modelnet", "type": "t", "payload": b"", "seq": 0, "expires": NOW} | kwargs
    with pytest.raises(MalformedRecord):
        SignedRecord.sign(ALICE, **args)


def test_a_record_that_is_not_a_map_or_not_msgpack_is_malformed():
    for data in (canonical.encode([1, 2]), b"\xc1", b""):
        with pytest.raises(MalformedRecord):
            SignedRecord.decode(data)


def test_body_of_a_non_canonical_payload_is_malformed():
    record = SignedRecord.sign(ALICE, domain="d", type="t", payload=b"\xc1", seq=0, expires=NOW)
    with pytest.raises(MalformedRecord):
        record.body()


@settings(max_examples=100)
@given(
    domain=st.text(min_size=1, max_size=64),
    type_=st.text(min_size=1, max_size=64),
    body=canonical_values,
    seq=st.integers(min_value=0, max_value=(1 << 64) - 1),
    expires=st.floats(allow_nan=False),
)
def test_round_trip_property(domain, type_, body, seq, expires):
    record = make(domain=domain, type=type_, body=body, seq=seq, expires=expires)
    decoded = SignedRecord.decode(record.encode())
    assert decoded == record
    assert decoded.body() == body
    decoded.verify_signature(domain=domain, type=type_, signer=ALICE.peer_id)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_record_or_raise_malformed(data):
    try:
        record = SignedRecord.decode(data)
    except MalformedRecord:
        return
    assert isinstance(record, SignedRecord)
    with pytest.raises(IdentityError):  # random bytes never carry a valid signature
        record.verify(now=NOW, domain=record.domain, type=record.type)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([*RECORD_FIELDS, "x"]), canonical_values))
def test_any_map_decodes_to_a_record_or_raises_malformed(fields):
    base = canonical.decode(make().encode())
    data = canonical.encode(base | fields)
    try:
        record = SignedRecord.decode(data)
    except MalformedRecord:
        return
    try:
        record.verify(now=NOW, domain="modelnet", type="capability")
    except IdentityError:
        return
    # only a field the signature does not cover may have changed
    assert record == make()
