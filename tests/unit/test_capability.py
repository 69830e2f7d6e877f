"""Capability records, their DHT keys and the node record validator."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.errors import ModelNetError
from modelnet.identity import (
    IdentityError,
    InvalidSignature,
    PrivateKey,
    RecordExpired,
    SignedRecord,
    WrongDomain,
    WrongKey,
    canonical,
)
from modelnet.protocols.capability import (
    CAPABILITY_KEY_PREFIX,
    CAPABILITY_TYPE,
    DOMAIN,
    MAX_ADDRS,
    MAX_MODELS,
    NODE_KEY_PREFIX,
    CapabilityRecord,
    ModelCapability,
    NodeRecordValidator,
    capability_key,
    node_record_key,
    normalize_tag,
    open_capability_record,
)
from modelnet.protocols.errors import LocalProtocolError, RemoteProtocolError

from .test_identity import canonical_values

NODE = PrivateKey.from_seed(b"\x11" * 32)
MALLORY = PrivateKey.from_seed(b"\x12" * 32)
NOW = 1_700_000_000.0
LLAMA = ModelCapability("Llama3.2:1b", "Chat", tags=("Medical", " legal ", "medical"), description="small")
EMBED = ModelCapability("minilm", "embed", max_input_bytes=4096, streaming=True)


def record(peer=NODE.peer_id, models=(LLAMA, EMBED)):
    return CapabilityRecord(peer, ("/ip4/127.0.0.1/tcp/4001", "/ip6/::1/tcp/4001"), models)


def signed(key=NODE, rec=None, *, seq=1, expires=NOW + 60):
    return (rec or record()).sign(key, seq=seq, expires=expires).encode()


def test_normalize_tag():
    assert normalize_tag("  Chat ") == "chat"
    assert normalize_tag("model:llama3.2-1b_q4") == "model:llama3.2-1b_q4"
    assert normalize_tag("x" * 64) == "x" * 64


@pytest.mark.parametrize("text", ["", "   ", "x" * 65, "has space", "a/b", "ünï", "tab\tin", 5, None, b"chat"])
def test_normalize_tag_refuses(text):
    with pytest.raises(LocalProtocolError):
        normalize_tag(text)


def test_dht_keys():
    assert capability_key(" Chat") == CAPABILITY_KEY_PREFIX + b"chat" == b"/modelnet/cap/chat"
    assert node_record_key(NODE.peer_id) == NODE_KEY_PREFIX + NODE.peer_id.bytes
    with pytest.raises(LocalProtocolError):
        capability_key("no good")


def test_model_capability_normalizes_and_lists_its_tags():
    assert LLAMA.task == "chat"
    assert LLAMA.tags == ("medical", "legal")
    assert LLAMA.capability_tags() == ("chat", "model:llama3.2:1b", "medical", "legal")
    assert LLAMA.matches("MEDICAL") and LLAMA.matches("model:llama3.2:1b")
    assert not LLAMA.matches("embed")
    with pytest.raises(LocalProtocolError):
        LLAMA.matches("not a tag")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "x" * 59},  # "model:" + 59 chars > 64
        {"name": "org/model"},
        {"task": "two words"},
        {"tags": tuple(f"t{i}" for i in range(17))},
        {"tags": "chat"},  # a str is not a tuple of tags
        {"description": "d" * 1025},
        {"max_input_bytes": 0},
        {"max_input_bytes": True},
        {"streaming": 1},
    ],
)
def test_model_capability_checks_fields(kwargs):
    args = {"name": "m", "task": "chat"} | kwargs
    with pytest.raises(LocalProtocolError):
        ModelCapability(**args)


def test_capability_record_tags_and_models_for():
    rec = record()
    assert rec.capability_tags() == {"chat", "model:llama3.2:1b", "medical", "legal", "embed", "model:minilm"}
    assert rec.models_for("embed") == (EMBED,)
    assert rec.models_for("Chat") == (LLAMA,)
    assert rec.models_for("classify") == ()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"peer_id": str(NODE.peer_id)},
        {"addrs": tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(MAX_ADDRS + 1))},
        {"addrs": ("127.0.0.1:4001",)},
        {"addrs": ("/" + "x" * 256,)},
        {"models": (LLAMA,) * (MAX_MODELS + 1)},
        {"models": ("chat",)},
        {"software": ""},
    ],
)
def test_capability_record_checks_fields(kwargs):
    args = {"peer_id": NODE.peer_id, "addrs": (), "models": ()} | kwargs
    with pytest.raises(LocalProtocolError):
        CapabilityRecord(**args)


def test_payload_round_trip_and_unknown_fields_ignored():
    rec = record()
    assert CapabilityRecord.from_payload(rec.to_payload()) == rec
    fields = canonical.decode(rec.to_payload())
    fields["future"] = {"x": 1}
    fields["models"][0]["future"] = [1]
    assert CapabilityRecord.from_payload(canonical.encode(fields)) == rec


def test_optional_payload_fields_take_defaults():
    payload = canonical.encode(
        {"peer": NODE.peer_id.bytes, "addrs": [], "models": [{"name": "m", "task": "chat"}]}
    )
    rec = CapabilityRecord.from_payload(payload)
    assert rec.models == (ModelCapability("m", "chat"),)


def payload_with(**changes):
    fields = canonical.decode(record().to_payload())
    fields.update(changes)
    return canonical.encode(fields)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1", "malformed"),
        (canonical.encode([1]), "not a map"),
        (payload_with(peer=b"\x00\x01"), "peer id"),
        (payload_with(peer="text"), "'peer'"),
        (payload_with(addrs="one"), "'addrs'"),
        (payload_with(addrs=[5]), "address"),
        (payload_with(models=[{"name": "m"}] * (MAX_MODELS + 1)), "more than 64 models"),
        (payload_with(models=["chat"]), "model entry"),
        (payload_with(models=[{"name": "m", "task": 5}]), "'task'"),
        (payload_with(models=[{"name": "m", "task": "chat", "tags": ["a b"]}]), "capability tag"),
        (payload_with(models=[{"name": "m", "task": "chat", "streaming": 1}]), "'streaming'"),
        (payload_with(models=[{"name": "m", "task": "chat", "max_input_bytes": True}]), "'max_input_bytes'"),
        (payload_with(software=""), "software"),
    ],
)
def test_from_payload_refuses_bad_fields_with_a_clear_message(payload, message):
    with pytest.raises(RemoteProtocolError, match=re.escape(message)):
        CapabilityRecord.from_payload(payload)


def test_open_capability_record():
    rec, caps = open_capability_record(signed(), now=NOW, peer=NODE.peer_id)
    assert caps == record() and rec.seq == 1 and rec.signer == NODE.peer_id
    assert rec.domain == DOMAIN and rec.type == CAPABILITY_TYPE


def test_a_record_naming_another_peer_is_wrong_key():
    forged = record().sign(MALLORY, seq=9, expires=NOW + 60)
    with pytest.raises(WrongKey):
        open_capability_record(forged.encode(), now=NOW)
    with pytest.raises(WrongKey):
        NodeRecordValidator().validate(node_record_key(NODE.peer_id), forged.encode(), NOW)


def test_open_checks_expiry_peer_type_and_signature():
    with pytest.raises(RecordExpired):
        open_capability_record(signed(expires=NOW), now=NOW)
    with pytest.raises(WrongKey):
        open_capability_record(signed(), now=NOW, peer=MALLORY.peer_id)
    offer = SignedRecord.sign(
        NODE, domain=DOMAIN, type="session-offer", payload=record().to_payload(), seq=1, expires=NOW + 60
    )
    with pytest.raises(WrongDomain):
        open_capability_record(offer.encode(), now=NOW)
    tampered = bytearray(signed())
    tampered[tampered.index(b"Llama")] ^= 0x20
    with pytest.raises(InvalidSignature):
        open_capability_record(bytes(tampered), now=NOW)


def test_open_refuses_a_signed_record_with_a_bad_payload():
    bad = SignedRecord.sign(NODE, domain=DOMAIN, type=CAPABILITY_TYPE, payload=b"\xc1", seq=1, expires=NOW + 60)
    with pytest.raises(RemoteProtocolError):
        open_capability_record(bad.encode(), now=NOW)


def test_validator_accepts_the_peers_own_record_only_under_its_key():
    validator = NodeRecordValidator()
    validator.validate(node_record_key(NODE.peer_id), signed(), NOW)
    with pytest.raises(WrongKey):
        validator.validate(node_record_key(MALLORY.peer_id), signed(), NOW)
    with pytest.raises(RemoteProtocolError):
        validator.validate(b"/modelnet/cap/chat", signed(), NOW)
    with pytest.raises(IdentityError):
        validator.validate(NODE_KEY_PREFIX + b"\x00\x01", signed(), NOW)
    with pytest.raises(RecordExpired):
        validator.validate(node_record_key(NODE.peer_id), signed(expires=NOW), NOW)


def test_select_prefers_highest_seq_then_latest_expiry():
    key = node_record_key(NODE.peer_id)
    validator = NodeRecordValidator()
    values = [signed(seq=1, expires=NOW + 500), signed(seq=3, expires=NOW + 10), signed(seq=3, expires=NOW + 20)]
    assert validator.select(key, values) == 2
    assert validator.select(key, [values[1], values[1]]) == 0  # a tie keeps the first


def test_select_ranks_undecodable_and_foreign_values_last():
    key = node_record_key(NODE.peer_id)
    forged = SignedRecord.sign(
        MALLORY, domain=DOMAIN, type=CAPABILITY_TYPE, payload=record().to_payload(), seq=99, expires=NOW + 999
    ).encode()
    tampered = bytearray(signed(seq=50))
    tampered[-1] ^= 1
    assert NodeRecordValidator().select(key, [b"junk", forged, bytes(tampered), signed(seq=0)]) == 3
    with pytest.raises(LocalProtocolError):
        NodeRecordValidator().select(key, [])


tags = st.from_regex(r"[a-z0-9._:-]{1,20}", fullmatch=True)
models = st.builds(
    ModelCapability,
    name=st.from_regex(r"[a-z0-9._:-]{1,20}", fullmatch=True),
    task=tags,
    tags=st.lists(tags, max_size=4).map(tuple),
    description=st.text(max_size=30),
    max_input_bytes=st.integers(1, 1 << 30),
    streaming=st.booleans(),
)
records = st.builds(
    CapabilityRecord,
    peer_id=st.just(NODE.peer_id),
    addrs=st.lists(st.from_regex(r"/[a-z0-9/.]{0,30}", fullmatch=True), max_size=4).map(tuple),
    models=st.lists(models, max_size=4).map(tuple),
    software=st.text(min_size=1, max_size=20),
)


@settings(max_examples=100)
@given(records, st.integers(0, 1 << 32))
def test_round_trip_property(rec, seq):
    assert CapabilityRecord.from_payload(rec.to_payload()) == rec
    opened, caps = open_capability_record(rec.sign(NODE, seq=seq, expires=NOW + 1).encode(), now=NOW)
    assert caps == rec and opened.seq == seq
    for model in rec.models:
        for tag in model.capability_tags():
            assert model in rec.models_for(tag)


@settings(max_examples=200)
@given(st.text(max_size=80))
def test_normalize_tag_yields_a_fixed_point_or_refuses(text):
    try:
        tag = normalize_tag(text)
    except LocalProtocolError:
        return
    assert re.fullmatch(r"[a-z0-9._:-]{1,64}", tag)
    assert normalize_tag(tag) == tag


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_into_from_payload(data):
    try:
        rec = CapabilityRecord.from_payload(data)
    except RemoteProtocolError:
        return
    assert isinstance(rec, CapabilityRecord)


@settings(max_examples=300)
@given(
    st.dictionaries(st.sampled_from(["peer", "addrs", "models", "software", "x"]), canonical_values),
    st.lists(
        st.dictionaries(st.sampled_from(["name", "task", "tags", "streaming", "max_input_bytes"]), canonical_values),
        max_size=2,
    ),
)
def test_any_map_into_from_payload(fields, model_fields):
    base = canonical.decode(record().to_payload())
    base["models"] = base["models"] + [dict(base["models"][0], **m) for m in model_fields]
    try:
        rec = CapabilityRecord.from_payload(canonical.encode(base | fields))
    except RemoteProtocolError:
        return
    assert CapabilityRecord.from_payload(rec.to_payload()) == rec


@settings(max_examples=200)
@given(st.binary(max_size=200), st.binary(max_size=60))
def test_any_bytes_into_the_validator(value, key_suffix):
    validator = NodeRecordValidator()
    with pytest.raises(ModelNetError):
        validator.validate(NODE_KEY_PREFIX + key_suffix, value, NOW)
    assert validator.select(node_record_key(NODE.peer_id), [value, signed()]) == 1
