"""The session protocol: offers, grants, refusals, replay, state-machine misuse."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.identity import (
    InvalidSignature,
    PrivateKey,
    RecordExpired,
    SignedRecord,
    WrongDomain,
    WrongKey,
    canonical,
)
from modelnet.protocols import session
from modelnet.protocols.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from modelnet.protocols.framing import encode_frame
from modelnet.protocols.messages import pack_message
from modelnet.protocols.session import (
    ClientSession,
    Grant,
    GrantMismatch,
    Limits,
    Offer,
    ProviderSession,
    Refusal,
    open_grant,
)

from .test_identity import canonical_values

CLIENT = PrivateKey.from_seed(b"\x21" * 32)
PROVIDER = PrivateKey.from_seed(b"\x22" * 32)
MALLORY = PrivateKey.from_seed(b"\x23" * 32)
NOW = 1_700_000_000.0
LIMITS = Limits(max_concurrent=4, max_input_bytes=65536, requests_per_minute=120)
NONCE = bytes(range(16))  # the caller draws it; fixed here, so runs repeat exactly
EARLIER_NONCE = bytes(range(16, 32))  # of an earlier offer
GRANT_ID = bytes(range(32, 48))


def pair(client=CLIENT, provider=PROVIDER):
    return (
        ClientSession(client, provider=provider.peer_id, now=NOW),
        ProviderSession(provider, remote=client.peer_id, now=NOW),
    )


def offer_exchange(capability="Chat", credentials=()):
    client, provider = pair()
    provider.receive_data(client.send_offer(capability, credentials=credentials, nonce=NONCE))
    offer = provider.next_event()
    return client, provider, offer


def test_grant_round_trip():
    client, provider, offer = offer_exchange(credentials=(b"org-cert",))
    assert offer == Offer("chat", client.offer.nonce, NOW, (b"org-cert",))
    assert provider.state == session.DECIDING
    data, grant = provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW + 600, queue=2, capacity=5, capability="CHAT")
    assert client.next_event() is None  # nothing received yet
    client.receive_data(data)
    received = client.next_event()
    assert received == grant
    assert (grant.client, grant.provider, grant.capability) == (CLIENT.peer_id, PROVIDER.peer_id, "chat")
    assert (grant.nonce, grant.limits, grant.expires, grant.queue, grant.capacity) == (
        offer.nonce,
        LIMITS,
        NOW + 600,
        2,
        5,
    )
    assert client.state == provider.state == session.DONE
    assert client.next_event() is None
    # the grant is re-presentable on its own
    assert open_grant(grant.encode(), now=NOW + 3, client=CLIENT.peer_id, provider=PROVIDER.peer_id) == grant


def test_refusal_round_trip():
    client, provider, _ = offer_exchange()
    client.receive_data(provider.send_refusal(session.OVERLOADED, "queue full"))
    assert client.next_event() == Refusal(session.OVERLOADED, "queue full")
    assert provider.state == client.state == session.DONE


def test_bytes_arriving_one_at_a_time():
    client, provider = pair()
    for byte in client.send_offer("chat", nonce=NONCE):
        assert provider.next_event() is None
        provider.receive_data(bytes([byte]))
    assert isinstance(provider.next_event(), Offer)


def test_unknown_refusal_codes_from_the_peer_are_accepted_but_never_sent():
    client, provider, _ = offer_exchange()
    client.receive_data(pack_message("refusal", {"code": "maintenance", "reason": ""}, max_frame=1 << 16))
    assert client.next_event() == Refusal("maintenance", "")
    with pytest.raises(LocalProtocolError):
        provider.send_refusal("maintenance", "")
    assert provider.state == session.DECIDING  # a refused send changes nothing


# ---- forged, stale and replayed offers -------------------------------------------------------


def offer_record(key, *, capability="chat", timestamp=NOW, expires=None, type=session.OFFER_TYPE, nonce=b"n" * 16):
    payload = canonical.encode({"capability": capability, "nonce": nonce, "timestamp": timestamp, "credentials": []})
    return SignedRecord.sign(
        key,
        domain="modelnet",
        type=type,
        payload=payload,
        seq=0,
        expires=timestamp + session.MAX_CLOCK_SKEW if expires is None else expires,
    )


def provider_receiving(record: SignedRecord) -> ProviderSession:
    provider = ProviderSession(PROVIDER, remote=CLIENT.peer_id, now=NOW)
    provider.receive_data(pack_message("offer", {"record": record.encode()}, max_frame=1 << 16))
    return provider


@pytest.mark.parametrize(
    "record, cause",
    [
        (offer_record(MALLORY), WrongKey),  # signed by someone other than the Noise peer
        (offer_record(CLIENT, type="session-grant"), WrongDomain),
        (offer_record(CLIENT, expires=NOW), RecordExpired),
    ],
)
def test_forged_or_expired_offers_are_remote_errors(record, cause):
    provider = provider_receiving(record)
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert isinstance(info.value.__cause__, cause)
    assert provider.state == session.ERROR


@pytest.mark.parametrize("skew", [-301.0, 301.0])
def test_offer_timestamp_skew_beyond_five_minutes_is_refused(skew):
    provider = provider_receiving(offer_record(CLIENT, timestamp=NOW + skew, expires=NOW + 3600))
    with pytest.raises(RemoteProtocolError, match="timestamp"):
        provider.next_event()


def test_offer_timestamp_within_the_skew_is_accepted():
    provider = provider_receiving(offer_record(CLIENT, timestamp=NOW + 299.0))
    assert provider.next_event().timestamp == NOW + 299.0


@pytest.mark.parametrize(
    "payload",
    [
        {"capability": "no good", "nonce": b"n" * 16, "timestamp": NOW},
        {"capability": "chat", "nonce": b"short", "timestamp": NOW},
        {"capability": "chat", "nonce": b"n" * 16, "timestamp": "now"},
        {"capability": "chat", "nonce": b"n" * 16, "timestamp": NOW, "credentials": [b"c"] * 9},
        {"capability": "chat", "nonce": b"n" * 16, "timestamp": NOW, "credentials": ["text"]},
        {"nonce": b"n" * 16, "timestamp": NOW},
    ],
)
def test_malformed_offer_payloads_are_remote_errors(payload):
    record = SignedRecord.sign(
        CLIENT, domain="modelnet", type=session.OFFER_TYPE, payload=canonical.encode(payload), seq=0, expires=NOW + 9
    )
    with pytest.raises(RemoteProtocolError):
        provider_receiving(record).next_event()


def test_a_bad_offer_can_still_be_refused_and_the_error_state_sticks():
    provider = provider_receiving(offer_record(MALLORY))
    with pytest.raises(RemoteProtocolError):
        provider.next_event()
    with pytest.raises(RemoteProtocolError):
        provider.next_event()  # the error state sticks
    with pytest.raises(LocalProtocolError):
        provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW + 60)
    assert provider.send_refusal(session.BAD_OFFER, "signer mismatch")
    assert provider.state == session.DONE


# ---- replayed and mismatched grants -------------------------------------------------------


def grant_for(client_key, *, capability="chat", expires=NOW + 600):
    client, provider = pair(client=client_key)
    provider.receive_data(client.send_offer(capability, nonce=EARLIER_NONCE))
    provider.next_event()
    data, grant = provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=expires)
    return data, grant


def test_a_grant_issued_to_another_client_is_refused():
    data, _ = grant_for(MALLORY)
    client, provider = pair()
    provider.receive_data(client.send_offer("chat", nonce=NONCE))
    client.receive_data(data)
    with pytest.raises(GrantMismatch, match="issued to"):
        client.next_event()
    assert client.state == session.ERROR


@pytest.mark.parametrize(
    "capability, message",
    [
        ("chat", "nonce"),  # a genuine grant to this client, but from an earlier offer
        ("embed", "embed"),  # a grant for another capability
    ],
)
def test_a_grant_for_another_offer_is_refused(capability, message):
    data, _ = grant_for(CLIENT, capability=capability)
    client, _ = pair()
    client.send_offer("chat", nonce=NONCE)
    client.receive_data(data)
    with pytest.raises(GrantMismatch, match=message):
        client.next_event()


def test_an_expired_grant_is_refused():
    client, provider, _ = offer_exchange()
    data, _ = provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW + 10)
    client.receive_data(data)
    client.now = NOW + 10
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert isinstance(info.value.__cause__, RecordExpired)


def test_a_grant_signed_by_another_provider_is_refused():
    client = ClientSession(CLIENT, provider=MALLORY.peer_id, now=NOW)
    provider = ProviderSession(PROVIDER, remote=CLIENT.peer_id, now=NOW)
    provider.receive_data(client.send_offer("chat", nonce=NONCE))
    provider.next_event()
    client.receive_data(provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW + 60)[0])
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert isinstance(info.value.__cause__, WrongKey)


def test_a_tampered_grant_is_refused():
    client, provider, _ = offer_exchange()
    data, grant = provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW + 60)
    record = grant.record
    inflated = canonical.decode(record.payload)
    inflated["limits"]["max_concurrent"] = 1000
    forged = SignedRecord(
        record.domain, record.type, canonical.encode(inflated), 0, record.expires, record.public_key, record.signature
    )
    client.receive_data(pack_message("grant", {"record": forged.encode()}, max_frame=1 << 16))
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert isinstance(info.value.__cause__, InvalidSignature)


def test_open_grant_binding():
    _, grant = grant_for(CLIENT)
    data = grant.encode()
    assert open_grant(data, now=NOW, client=CLIENT.peer_id, provider=PROVIDER.peer_id, capability="CHAT") == grant
    with pytest.raises(GrantMismatch):
        open_grant(data, now=NOW, client=MALLORY.peer_id, provider=PROVIDER.peer_id)
    with pytest.raises(GrantMismatch):
        open_grant(data, now=NOW, client=CLIENT.peer_id, provider=PROVIDER.peer_id, capability="embed")
    with pytest.raises(WrongKey):
        open_grant(data, now=NOW, client=CLIENT.peer_id, provider=MALLORY.peer_id)
    with pytest.raises(RecordExpired):
        open_grant(data, now=NOW + 600, client=CLIENT.peer_id, provider=PROVIDER.peer_id)
    offer = offer_record(CLIENT).encode()
    with pytest.raises(WrongDomain):  # an offer is not a grant
        open_grant(offer, now=NOW, client=CLIENT.peer_id, provider=CLIENT.peer_id)


@pytest.mark.parametrize(
    "change",
    [
        {"grant_id": b"short"},
        {"client": b"\x00"},
        {"limits": {"max_concurrent": 0, "max_input_bytes": 1, "requests_per_minute": 1}},
        {"limits": "none"},
        {"queue": -1},
        {"capacity": True},
    ],
)
def test_open_grant_refuses_malformed_payloads(change):
    _, grant = grant_for(CLIENT)
    payload = canonical.decode(grant.record.payload) | change
    record = SignedRecord.sign(
        PROVIDER, domain="modelnet", type=session.GRANT_TYPE, payload=canonical.encode(payload), seq=0, expires=NOW + 9
    )
    with pytest.raises(RemoteProtocolError):
        open_grant(record.encode(), now=NOW, client=CLIENT.peer_id, provider=PROVIDER.peer_id)


# ---- state-machine misuse ----------------------------------------------------------------------


def test_client_misuse():
    client, _ = pair()
    client.send_offer("chat", nonce=NONCE)
    with pytest.raises(LocalProtocolError):
        client.send_offer("chat", nonce=NONCE)
    with pytest.raises(LocalProtocolError):
        ClientSession(CLIENT, provider=PROVIDER.peer_id, now=NOW).send_offer("not a tag", nonce=NONCE)
    with pytest.raises(LocalProtocolError):
        ClientSession(CLIENT, provider=PROVIDER.peer_id, now=NOW).send_offer("chat", credentials=(b"x",) * 9, nonce=NONCE)


def test_provider_misuse():
    _, provider = pair()
    with pytest.raises(LocalProtocolError):
        provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW)  # no offer yet
    client, provider, _ = offer_exchange()
    with pytest.raises(LocalProtocolError):
        provider.send_grant(grant_id=GRANT_ID, limits=(1, 2, 3), expires=NOW)
    with pytest.raises(LocalProtocolError):
        provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=float("nan"))
    with pytest.raises(LocalProtocolError, match="the offer was for 'chat'"):
        provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW + 60, capability="embed")
    provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW + 60)
    with pytest.raises(LocalProtocolError):
        provider.send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW + 60)
    with pytest.raises(LocalProtocolError):
        provider.send_refusal(session.INTERNAL, "too late")


@pytest.mark.parametrize("side", [0, 1])
def test_an_answer_to_no_offer_is_a_remote_error(side):
    endpoint = pair()[side]  # the client before its offer, or a provider
    endpoint.receive_data(pack_message("refusal", {"code": "forbidden", "reason": ""}, max_frame=1 << 16))
    with pytest.raises(RemoteProtocolError, match="unexpected 'refusal'"):
        endpoint.next_event()


def test_anything_after_the_answer_is_a_remote_error():
    client, provider, _ = offer_exchange()
    refusal = provider.send_refusal(session.FORBIDDEN, "members only")
    client.receive_data(refusal + refusal)
    assert isinstance(client.next_event(), Refusal)
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_end_of_stream():
    client, provider, _ = offer_exchange()
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="ended"):
        client.next_event()
    provider.receive_data(b"")  # the client may close after its offer
    assert provider.next_event() is None
    truncated = ProviderSession(PROVIDER, remote=CLIENT.peer_id, now=NOW)
    truncated.receive_data(ClientSession(CLIENT, provider=PROVIDER.peer_id, now=NOW).send_offer("chat", nonce=NONCE)[:-1])
    truncated.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        truncated.next_event()


def test_an_oversized_frame_is_refused_on_arrival():
    _, provider = pair()
    with pytest.raises(FrameTooLarge):
        provider.receive_data(b"\xff\xff\xff\x7f")
    assert provider.state == session.ERROR


def test_events_validate_their_fields():
    with pytest.raises(LocalProtocolError):
        Limits(0, 1, 1)
    with pytest.raises(LocalProtocolError):
        Refusal("Not A Code", "")
    with pytest.raises(LocalProtocolError):
        Refusal("forbidden", "r" * 1025)
    with pytest.raises(LocalProtocolError):
        Offer("chat", b"n" * 15, NOW)


# ---- properties ---------------------------------------------------------------------------------


@settings(max_examples=50)
@given(
    capability=st.from_regex(r"[a-z0-9._:-]{1,64}", fullmatch=True),
    credentials=st.lists(st.binary(max_size=64), max_size=8),
    limits=st.builds(Limits, *[st.integers(1, (1 << 31) - 1)] * 3),
    ttl=st.floats(1, 1e6),
    queue=st.integers(0, 1000),
)
def test_round_trip_property(capability, credentials, limits, ttl, queue):
    client, provider = pair()
    provider.receive_data(client.send_offer(capability, credentials=tuple(credentials), nonce=NONCE))
    offer = provider.next_event()
    assert (offer.capability, offer.credentials) == (capability, tuple(credentials))
    data, grant = provider.send_grant(grant_id=GRANT_ID, limits=limits, expires=NOW + ttl, queue=queue)
    client.receive_data(data)
    assert client.next_event() == grant


def expect_typed(endpoint, data):
    """Feeding ``data`` yields events or a RemoteProtocolError; nothing else escapes."""
    try:
        endpoint.receive_data(data)
        while (event := endpoint.next_event()) is not None:
            assert isinstance(event, (Offer, Grant, Refusal))
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_into_either_side(data):
    client, provider = pair()
    client.send_offer("chat", nonce=NONCE)
    expect_typed(client, data)
    expect_typed(provider, data)
    expect_typed(ProviderSession(PROVIDER, remote=CLIENT.peer_id, now=NOW), encode_frame(data))


@settings(max_examples=300)
@given(
    st.sampled_from(["offer", "grant", "refusal", "other"]),
    st.dictionaries(st.sampled_from(["record", "code", "reason", "x"]), canonical_values),
)
def test_any_message_into_either_side(kind, fields):
    data = pack_message(kind, fields, max_frame=1 << 20)
    client, provider = pair()
    client.send_offer("chat", nonce=NONCE)
    expect_typed(client, data)
    expect_typed(provider, data)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["capability", "nonce", "timestamp", "credentials", "x"]), canonical_values))
def test_any_offer_payload(fields):
    payload = {"capability": "chat", "nonce": b"n" * 16, "timestamp": NOW} | fields
    record = SignedRecord.sign(
        CLIENT, domain="modelnet", type=session.OFFER_TYPE, payload=canonical.encode(payload), seq=0, expires=NOW + 9
    )
    try:
        offer = provider_receiving(record).next_event()
    except RemoteProtocolError:
        return
    assert isinstance(offer, Offer)
