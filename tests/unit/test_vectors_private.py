"""Byte-exact test vectors of a sealed private capability record.

Sealing is deterministic given its inputs: the membership certificate and the record are
signed with seeded Ed25519 keys, the records key is derived from the organisation's seed,
and the ChaCha20-Poly1305 nonce is a parameter. So the DHT key and the signed value below
are exact; a change to the wire format or the sealing fails here first.
"""

import pytest

from modelnet.identity import PrivateKey, issue_certificate, records_key
from modelnet.protocols import capability as cap
from modelnet.protocols import private
from modelnet.protocols.errors import LocalProtocolError

ORG = PrivateKey.from_seed(bytes(range(64, 96)))
PROVIDER = PrivateKey.from_seed(bytes(range(96, 128)))
NOW = 1_700_000_000.0
NONCE = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab")
RECORDS_KEY = records_key(ORG)
CERTIFICATE = issue_certificate(ORG, "acme", PROVIDER.peer_id, roles=("clinician",), now=NOW - 60, expires=NOW + 86400)
RECORD = cap.CapabilityRecord(
    peer_id=PROVIDER.peer_id,
    addrs=("/ip4/192.0.2.7/tcp/4001",),
    models=(cap.ModelCapability(name="triage-7b", task="classify", tags=("medical",)),),
    software="modelnet/0.1",
)

DHT_KEY = bytes.fromhex(
    "2f6d6f64656c6e65742f706e6f64652f3137323863383833366562306539613763316336613638663038393633646564"
    "2f002408011220174553b456dddfc6908ecab1c101fe6ab21e2baa0617795b7d43a63482993fd5"
)

SEALED_VALUE = bytes.fromhex(
    "87a6646f6d61696ea86d6f64656c6e6574a765787069726573cb41d954ffc4000000a36b6579c42408011220174553b4"
    "56dddfc6908ecab1c101fe6ab21e2baa0617795b7d43a63482993fd5a77061796c6f6164c5029b83a36b6579c4572f6d"
    "6f64656c6e65742f706e6f64652f31373238633838333665623065396137633163366136386630383936336465642f00"
    "2408011220174553b456dddfc6908ecab1c101fe6ab21e2baa0617795b7d43a63482993fd5a56e6f6e6365c40ca0a1a2"
    "a3a4a5a6a7a8a9aaaba67365616c6564c5021f13029cde93b70e3ae1504c327009d6654140973c3927f8a2573e0402d6"
    "9fb9595c835e7a3b4d9e46d042030ce9c44728b5942223f6207454fcbd6bf0b50ee1a9fb875423d549d572677acef817"
    "c03694b6c37b1f4a76383c564bc419f6ea76694cb4620279223cdbb9fb8e9f417712aa132ba9cc6d21c2c76ed25e1ef0"
    "68e7ab71379db4c82b650447127721d3e5d988c66d9dd3d9528cc17d37ab7b0c0d805add6bc010ef680288062353b1fc"
    "1531030d091cbe2d8481340e99152051b91f893f419863605fcb96867d076478881b14cd1aa89ac27a90ddb6a89cbdbc"
    "d841576985dd787cf5653c7e300ba509b093b073707842aaab993436b5fddbce9d28194a3e9a58914bedc65bb54170e4"
    "0b6b820f231c2bfcd8bf95cf9e84a4f8298bae69ab5fbf2ea68dfc90e6965c2e15bd4ae9044a412354598a652e882e64"
    "ad795843697f0e9dd088b022ba3ed60367a6932e3e1b3cfa0582a820f6560c38fedcf148602eef064efa02cc4177fd7a"
    "3a34dae8c59370224b42954cdd7ab8a4c0f246900b05479b1bc7225cb81cdd38a8603ddc82b4590792e5943f02eb0b25"
    "b27ad5b2e3daece2be0734994b802fbb66e8a2bc801dcf7aad65040952d07008a381a998858a1086918788a39c163068"
    "20337dd8fc0c743e53635c05c1188bdfb22f28b81acddadb3f6f85b3b4633c38ee4952c46f047f3e0a368e920d3b68a8"
    "dd5b25930d34ea020544f7ee8c7255cf8fc058dc47822f52f2ccb5ec4194b4f67e2ca373657107a3736967c440c8d406"
    "eb84caa509e1a36a81af526a8473828942416806fcffc17c93022f0c52bfc1e0bfd5220560ebd0f6d914449f21d46c65"
    "535e879b4a3542cc9de73daf01a474797065b2707269766174652d6361706162696c697479"
)


def sealed() -> tuple[bytes, bytes]:
    dht_key, signed = private.seal_record(
        PROVIDER, RECORD, records_key=RECORDS_KEY, certificate=CERTIFICATE, seq=7, expires=NOW + 3600, nonce=NONCE
    )
    return dht_key, signed.encode()


def dht_key() -> bytes:
    return sealed()[0]


def sealed_value() -> bytes:
    return sealed()[1]


def test_the_sealed_record_is_byte_exact():
    key, value = sealed()
    assert key.hex() == DHT_KEY.hex()
    assert value.hex() == SEALED_VALUE.hex()


def test_a_member_opens_the_vector():
    record, capabilities, certificate = private.open_private_record(
        SEALED_VALUE, records_key=RECORDS_KEY, org=ORG.peer_id, now=NOW, peer=PROVIDER.peer_id, is_revoked=lambda org, peer: False
    )
    assert (record.signer, record.seq, record.expires) == (PROVIDER.peer_id, 7, NOW + 3600)
    assert capabilities == RECORD
    assert certificate == CERTIFICATE
    assert private.private_node_key(RECORDS_KEY, PROVIDER.peer_id) == DHT_KEY


def test_a_storing_node_accepts_the_vector():
    validator = private.PrivateRecordValidator()
    validator.validate(DHT_KEY, SEALED_VALUE, NOW)
    assert validator.select(DHT_KEY, [b"not a record", SEALED_VALUE]) == 1


def test_the_nonce_comes_from_the_caller_and_is_checked():
    for nonce in (NONCE[:-1], NONCE + b"\x00"):
        with pytest.raises(LocalProtocolError, match="nonce"):
            private.seal_record(
                PROVIDER, RECORD, records_key=RECORDS_KEY, certificate=CERTIFICATE, seq=7, expires=NOW + 3600, nonce=nonce
            )
    _, other = private.seal_record(
        PROVIDER, RECORD, records_key=RECORDS_KEY, certificate=CERTIFICATE, seq=7, expires=NOW + 3600, nonce=bytes(12)
    )
    assert other.encode() != SEALED_VALUE  # nothing else is drawn inside
