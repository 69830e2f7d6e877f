"""Tier 3: what a misbehaving peer cannot do, end to end on the memory network.

Each attack is refused, nothing is served for it, the node under attack keeps serving
everyone else, and the refusal says why. (Also elsewhere: a forged record PUT into the
DHT and a grant stolen by another peer, tests/network/test_node_swarm.py; certificates
and revocations, test_federation.py; private records, test_private_records.py; a
stranger to a private swarm, tests/loopback/test_pnet.py.)
"""

from __future__ import annotations

import logging
import os
from typing import Any, AsyncIterator, Mapping

import pytest
import trio

from modelnet.identity import PrivateKey, SignedRecord
from modelnet.models.base import Backend, Chunk, ModelInfo, Output
from modelnet.p2p.exchange import next_event, open_stream
from modelnet.p2p.kad.store import StoredRecord
from modelnet.p2p.node import Config
from modelnet.protocols import capability as cap
from modelnet.protocols import reason, session
from modelnet.testing import open_memory_swarm, virtual_wall_clock

HONEST, LIAR, ASKER, OTHER_ASKER = 1, 2, 3, 4
SESSION_TTL = 60.0


class Counting(Backend):
    """Echo models that count what they served."""

    def __init__(self, label: str, tasks=("echo",)) -> None:
        self.name = f"counting-{label}"
        self.label = label
        self.tasks = tasks
        self.served = 0

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name=f"{self.label}-{task}", task=task) for task in self.tasks]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        self.served += 1
        yield Output(f"{self.label}:{text}")


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def forged_by_another_key(liar, now: float) -> bytes:
    """The liar's own record, signed by a key that is not the liar's."""
    return SignedRecord.sign(
        PrivateKey.from_seed(b"\x07" * 32), domain=cap.DOMAIN, type=cap.CAPABILITY_TYPE,
        payload=liar.capability_record().to_payload(), seq=10**15, expires=now + 3600,
    ).encode()  # fmt: skip


def forged_signature(liar, now: float) -> bytes:
    """The liar's record with one bit of its signature flipped (content changed after signing)."""
    record = liar.capability_record().sign(liar.key, seq=10**15, expires=now + 3600)
    return SignedRecord(record.domain, record.type, record.payload, record.seq, record.expires,
                        record.public_key, _flip(record.signature)).encode()  # fmt: skip


def expired(liar, now: float) -> bytes:
    """The liar's genuine record, past its expiry."""
    return liar.capability_record().sign(liar.key, seq=10**15, expires=now - 1).encode()


@pytest.mark.parametrize(
    "make, why",
    [(forged_by_another_key, "signed by"), (forged_signature, "does not verify"), (expired, "expired")],
    ids=["signed-by-another-key", "forged-signature", "expired"],
)
async def test_a_provider_handing_out_a_bad_record_is_dropped_and_the_lookup_goes_on(autojump_clock, caplog, make, why):
    backends = {HONEST: Counting("honest"), LIAR: Counting("liar")}
    async with open_memory_swarm(6, backends_for=lambda i: [backends[i]] if i in backends else []) as swarm:
        liar, asker = swarm.nodes[LIAR], swarm.nodes[ASKER]
        key = cap.node_record_key(liar.peer_id)
        now = virtual_wall_clock()
        # The liar runs modified code: its store hands out whatever it likes for its own key,
        # and so does every node that would have stored it (they refuse it: see test_node_swarm).
        for node in swarm.nodes:
            node.dht.records._records.pop(key, None)
        liar.dht.records._records[key] = StoredRecord(key, make(liar, now), now, now + 3600)
        with caplog.at_level(logging.INFO):
            providers = await asker.find("echo")
        assert [p.peer_id for p in providers] == [swarm.nodes[HONEST].peer_id]
        assert any(why in r.getMessage() and liar.peer_id.short() in r.getMessage() for r in caplog.records), why
        for _ in range(3):
            assert (await asker.ask("echo", "hi")).output == "honest:hi"
        assert backends[LIAR].served == 0


def raw_request(asker, grant: bytes, capability: str = "echo") -> reason.Request:
    return reason.Request(
        request_id=os.urandom(16), capability=capability, input="replayed", params={},
        budget=30.0, hop_limit=4, visited=(asker.peer_id,), grant=grant,
    )  # fmt: skip


async def send_raw(asker, provider, request: reason.Request) -> reason.Error | reason.Result:
    client = reason.ReasonClient(provider=provider.peer_id, client=asker.peer_id)
    with trio.fail_after(10):
        async with open_stream(asker.host, provider.peer_id, reason.REASON_PROTOCOL) as stream:
            await stream.write(client.send_request(request))
            while isinstance(event := await next_event(stream, client), reason.Chunk):
                pass
    return event


def replay_swarm(backends):
    return open_memory_swarm(
        6, backends_for=lambda i: [backends[i]] if i in backends else [], config=Config(session_ttl=SESSION_TTL)
    )


async def test_a_grant_replayed_after_its_expiry_is_refused(autojump_clock):
    backends = {HONEST: Counting("p")}
    async with replay_swarm(backends) as swarm:
        provider, asker, other = swarm.nodes[HONEST], swarm.nodes[ASKER], swarm.nodes[OTHER_ASKER]
        grant = await asker._grant_for(provider.peer_id, "echo")
        assert isinstance(await send_raw(asker, provider, raw_request(asker, grant.encode())), reason.Result)
        await trio.sleep(SESSION_TTL + 1)
        refused = await send_raw(asker, provider, raw_request(asker, grant.encode()))
        assert isinstance(refused, reason.Error) and refused.code == reason.UNAUTHORIZED
        assert "expired" in refused.message
        assert backends[HONEST].served == 1
        # The asker itself renegotiates without being told (its grant cache knows the expiry),
        # and the provider keeps serving everyone.
        assert (await asker.ask("echo", "again")).output == "p:again"
        assert (await other.ask("echo", "others")).output == "p:others"


@pytest.mark.parametrize("where", ["another-capability", "another-provider", "tampered"])
async def test_a_grant_from_another_session_is_refused(autojump_clock, where):
    backends = {HONEST: Counting("p", tasks=("echo", "shout")), LIAR: Counting("q", tasks=("echo", "shout"))}
    async with replay_swarm(backends) as swarm:
        provider, second, asker = swarm.nodes[HONEST], swarm.nodes[LIAR], swarm.nodes[ASKER]
        grant = await asker._grant_for(provider.peer_id, "echo")
        if where == "another-capability":  # an echo grant for the shout model
            target, request = provider, raw_request(asker, grant.encode(), "shout")
            message = "not 'shout'"
        elif where == "another-provider":  # a grant of one provider shown to another
            target, request = second, raw_request(asker, grant.encode())
            message = "signed by"
        else:  # its expiry extended by the client: the provider's signature breaks
            record = grant.record
            forged = SignedRecord(record.domain, record.type, record.payload, record.seq,
                                  record.expires + 3600, record.public_key, record.signature).encode()  # fmt: skip
            target, request = provider, raw_request(asker, forged)
            message = "does not verify"
        refused = await send_raw(asker, target, request)
        assert isinstance(refused, reason.Error) and refused.code == reason.UNAUTHORIZED
        assert message in refused.message
        assert backends[HONEST].served == backends[LIAR].served == 0
        # The attacked provider serves the very same asker with a proper grant.
        assert (await asker.ask("shout", "fair", model=f"{'p' if target is provider else 'q'}-shout")).output.endswith(":fair")


async def test_an_offer_replayed_on_another_connection_gets_no_grant(autojump_clock):
    backends = {HONEST: Counting("p")}
    async with replay_swarm(backends) as swarm:
        provider, alice, mallory = swarm.nodes[HONEST], swarm.nodes[ASKER], swarm.nodes[OTHER_ASKER]
        # Mallory captured Alice's signed offer and sends it as her own.
        offer = session.ClientSession(alice.key, provider=provider.peer_id, now=virtual_wall_clock()).send_offer("echo", nonce=os.urandom(session.NONCE_BYTES))
        with trio.fail_after(10):
            async with open_stream(mallory.host, provider.peer_id, session.SESSION_PROTOCOL) as stream:
                await stream.write(offer)
                data = b""
                while chunk := await stream.read():
                    data += chunk
        answer = session.ClientSession(mallory.key, provider=provider.peer_id, now=virtual_wall_clock())
        answer.send_offer("echo", nonce=os.urandom(session.NONCE_BYTES))
        answer.receive_data(data)
        refusal = answer.next_event()
        assert isinstance(refusal, session.Refusal) and refusal.code == session.BAD_OFFER
        assert "signed by" in refusal.reason
        assert (await alice.ask("echo", "mine")).output == "p:mine"
