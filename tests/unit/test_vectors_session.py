"""Byte-exact test vectors of ``/modelnet/session/1.0.0``: offer, grant, refusal.

The machines are deterministic (the clock and the random values are parameters, Ed25519
signatures are deterministic), so seeded keys, a fixed time and fixed random bytes give the
exact frames below. A change to the wire format fails here first; if it is meant, it is a
new protocol version, not a new vector.
"""

import pytest

from modelnet.identity import PrivateKey
from modelnet.protocols import session
from modelnet.protocols.errors import LocalProtocolError
from modelnet.protocols.session import ClientSession, Grant, Limits, Offer, ProviderSession, Refusal, open_grant

CLIENT = PrivateKey.from_seed(bytes(range(32)))
PROVIDER = PrivateKey.from_seed(bytes(range(32, 64)))
NOW = 1_700_000_000.0
NONCE = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
GRANT_ID = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
CREDENTIALS = (b"an organisation certificate",)
LIMITS = Limits(max_concurrent=4, max_input_bytes=65536, requests_per_minute=120)

OFFER_FRAME = bytes.fromhex(
    "b00282a46b696e64a56f66666572a67265636f7264c5011a87a6646f6d61696ea86d6f64656c6e6574a7657870697265"
    "73cb41d954fc8b000000a36b6579c4240801122003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664"
    "125531b8a77061796c6f6164c46684aa6361706162696c697479a463686174ab63726564656e7469616c7391c41b616e"
    "206f7267616e69736174696f6e206365727469666963617465a56e6f6e6365c410000102030405060708090a0b0c0d0e"
    "0fa974696d657374616d70cb41d954fc40000000a373657100a3736967c440472effebe0e478148c77658efef65b4613"
    "d3749139f4d6903ae32484922c149480bb79192572d0eaead0c4a922f8789bc3f1f4038c27e281dcea5cfc8c76e707a4"
    "74797065ad73657373696f6e2d6f66666572"
)

GRANT_FRAME = bytes.fromhex(
    "900382a46b696e64a56772616e74a67265636f7264c5017a87a6646f6d61696ea86d6f64656c6e6574a7657870697265"
    "73cb41d954fcd6000000a36b6579c4240801122029acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc93"
    "22966dd7a77061796c6f6164c4c687aa6361706162696c697479a463686174a8636170616369747905a6636c69656e74"
    "c42600240801122003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8a86772616e745f69"
    "64c410f0f1f2f3f4f5f6f7f8f9fafbfcfdfeffa66c696d69747383ae6d61785f636f6e63757272656e7404af6d61785f"
    "696e7075745f6279746573ce00010000b372657175657374735f7065725f6d696e75746578a56e6f6e6365c410000102"
    "030405060708090a0b0c0d0e0fa5717565756502a373657100a3736967c440d884c2320557bf04d7d2d15216049f68c5"
    "20c209cd1735f0f5025f373878fe06ddfaff2f70769296938101277f0c6f68fa0d27643a8f058552d438fba1872706a4"
    "74797065ad73657373696f6e2d6772616e74"
)

REFUSAL_FRAME = bytes.fromhex(
    "3183a4636f6465a9666f7262696464656ea46b696e64a77265667573616ca6726561736f6eac6d656d62657273206f6e"
    "6c79"
)


def client() -> ClientSession:
    return ClientSession(CLIENT, provider=PROVIDER.peer_id, now=NOW)


def provider() -> ProviderSession:
    return ProviderSession(PROVIDER, remote=CLIENT.peer_id, now=NOW)


def offer_frame() -> bytes:
    return client().send_offer("chat", CREDENTIALS, nonce=NONCE)


def provider_deciding() -> ProviderSession:
    machine = provider()
    machine.receive_data(offer_frame())
    assert machine.next_event() is not None
    return machine


def grant_frame() -> bytes:
    data, _ = provider_deciding().send_grant(grant_id=GRANT_ID, limits=LIMITS, expires=NOW + 600, queue=2, capacity=5)
    return data


def refusal_frame() -> bytes:
    return provider_deciding().send_refusal(session.FORBIDDEN, "members only")


def client_awaiting_answer() -> ClientSession:
    machine = client()
    assert machine.send_offer("chat", CREDENTIALS, nonce=NONCE) == OFFER_FRAME
    return machine


def test_the_offer_is_byte_exact():
    assert offer_frame().hex() == OFFER_FRAME.hex()


def test_the_provider_accepts_the_offer_vector():
    machine = provider()
    machine.receive_data(OFFER_FRAME)
    assert machine.next_event() == Offer("chat", NONCE, NOW, CREDENTIALS)
    assert machine.state == session.DECIDING


def test_the_grant_is_byte_exact():
    assert grant_frame().hex() == GRANT_FRAME.hex()


def test_the_client_accepts_the_grant_vector():
    machine = client_awaiting_answer()
    machine.receive_data(GRANT_FRAME)
    grant = machine.next_event()
    assert isinstance(grant, Grant)
    assert (grant.grant_id, grant.client, grant.provider, grant.capability, grant.nonce) == (
        GRANT_ID,
        CLIENT.peer_id,
        PROVIDER.peer_id,
        "chat",
        NONCE,
    )
    assert (grant.limits, grant.expires, grant.queue, grant.capacity) == (LIMITS, NOW + 600, 2, 5)
    assert machine.state == session.DONE
    # re-presented later on its own, the same bytes open to the same grant
    assert open_grant(grant.encode(), now=NOW + 1, client=CLIENT.peer_id, provider=PROVIDER.peer_id, capability="chat") == grant


def test_the_refusal_is_byte_exact():
    assert refusal_frame().hex() == REFUSAL_FRAME.hex()


def test_the_client_accepts_the_refusal_vector():
    machine = client_awaiting_answer()
    machine.receive_data(REFUSAL_FRAME)
    assert machine.next_event() == Refusal(session.FORBIDDEN, "members only")
    assert machine.state == session.DONE


def test_the_random_values_come_from_the_caller_and_are_checked():
    with pytest.raises(LocalProtocolError, match="nonce"):
        client().send_offer("chat", nonce=NONCE[:-1])
    with pytest.raises(LocalProtocolError, match="grant id"):
        provider_deciding().send_grant(grant_id=GRANT_ID + b"\x00", limits=LIMITS, expires=NOW + 600)
    # another nonce or grant id is another frame: nothing else is drawn inside
    assert client().send_offer("chat", CREDENTIALS, nonce=bytes(16)) != OFFER_FRAME
    other, _ = provider_deciding().send_grant(grant_id=bytes(16), limits=LIMITS, expires=NOW + 600, queue=2, capacity=5)
    assert other != GRANT_FRAME
