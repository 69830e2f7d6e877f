"""Tier 3: private capability records on the memory network — members find and call an
organisation's private models exactly as public ones; no one else can find them, read
them, or make a member use a tampered one."""

from __future__ import annotations

import logging
import os
from typing import Any, AsyncIterator, Mapping

import pytest
import trio

from modelnet.identity import Membership, SignedRecord, canonical, issue_certificate, make_revocation, records_key, revocation_key
from modelnet.models.base import Backend, Chunk, ModelInfo, Output
from modelnet.p2p.node import Config, NoProvider
from modelnet.protocols import capability as cap
from modelnet.p2p.exchange import next_event, open_stream
from modelnet.protocols import access, private, session
from modelnet.protocols.access import AccessPolicy
from modelnet.testing import EPOCH, open_memory_swarm, open_node, seeded_key, virtual_wall_clock

ORG = seeded_key(200, seed=7)
OTHER_ORG = seeded_key(201, seed=7)
PROVIDER, MEMBER, STRANGER, OUTSIDER, SECOND = 1, 2, 3, 4, 5


class Models(Backend):
    """A public and a private model; each answer says which model and node answered."""

    def __init__(self, label: str, shared_tag: bool = False) -> None:
        self.name = f"models-{label}"
        self.label = label
        self.shared = ("shared",) if shared_tag else ()
        self.served: list[str] = []

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(name="open-echo", task="echo", tags=self.shared),
            ModelInfo(name="secret-echo", task="secret-task", tags=("medical", *self.shared)),
        ]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        self.served.append(model)
        yield Output(f"{self.label}/{model}:{text}")


def membership(i: int, org=ORG) -> Membership:
    cert = issue_certificate(org, "acme", seeded_key(i).peer_id, now=EPOCH, expires=EPOCH + 30 * 86400)
    return Membership(cert, records_key(org))


MEMBERSHIPS = {PROVIDER: [membership(PROVIDER)], SECOND: [membership(SECOND)], MEMBER: [membership(MEMBER)],
               STRANGER: [membership(STRANGER, OTHER_ORG)]}  # fmt: skip
POLICY = {"secret-echo": AccessPolicy(orgs=(ORG.peer_id,))}


def swarm(n: int = 8, providers=(PROVIDER,), *, shared_tag: bool = False):
    backends = {i: Models(str(i), shared_tag) for i in providers}
    return backends, open_memory_swarm(
        n,
        backends_for=lambda i: [backends[i]] if i in backends else [],
        memberships_for=lambda i: MEMBERSHIPS.get(i, ()),
        policies_for=lambda i: POLICY if i in backends else {},
    )


async def test_members_find_and_call_private_models_others_see_nothing(autojump_clock):
    backends, opened = swarm()
    async with opened as s:
        provider, member, stranger, outsider = (s.nodes[i] for i in (PROVIDER, MEMBER, STRANGER, OUTSIDER))
        # A member finds the private model exactly as a public one, tagged with its organisation.
        [found] = await member.find("secret-task")
        assert found.peer_id == provider.peer_id and found.org == ORG.peer_id
        assert [m.name for m in found.models] == ["secret-echo"]
        assert [p.peer_id for p in await member.find("medical")] == [provider.peer_id]
        answer = await member.ask("secret-task", "hi")
        assert answer.output == "1/secret-echo:hi"
        # The public model is found publicly, org unset, by everyone.
        for node in (member, stranger, outsider):
            [public] = await node.find("echo")
            assert public.org is None and [m.name for m in public.models] == ["open-echo"]
        # Nobody else finds the private model: not a member of another organisation, not
        # a node in none, and it is under no public key at all.
        for node in (stranger, outsider):
            assert await node.find("secret-task") == []
            assert await node.find("model:secret-echo") == []
        for tag in ("secret-task", "medical", "model:secret-echo"):
            assert await outsider.dht.find_providers(cap.capability_key(tag)) == []
        public_record = cap.open_capability_record(
            await outsider.dht.get_value(cap.node_record_key(provider.peer_id)), now=virtual_wall_clock()
        )[1]
        assert [m.name for m in public_record.models] == ["open-echo"]
        assert backends[PROVIDER].served == ["secret-echo"]


async def test_a_provider_found_publicly_and_privately_is_one_provider_with_both_models(autojump_clock):
    backends, opened = swarm(shared_tag=True)
    async with opened as s:
        provider, member, outsider = s.nodes[PROVIDER], s.nodes[MEMBER], s.nodes[OUTSIDER]
        [found] = await member.find("shared")
        assert found.peer_id == provider.peer_id and found.org == ORG.peer_id
        assert sorted(m.name for m in found.models) == ["open-echo", "secret-echo"]
        [public] = await outsider.find("shared")
        assert public.org is None and [m.name for m in public.models] == ["open-echo"]


async def test_a_non_member_who_knows_the_exact_key_gets_only_ciphertext(autojump_clock):
    _, opened = swarm()
    async with opened as s:
        provider, outsider = s.nodes[PROVIDER], s.nodes[OUTSIDER]
        # Suppose the exact keys leaked (they are HMACs of the organisation's secret).
        secret = records_key(ORG)
        node_key = private.private_node_key(secret, provider.peer_id)
        providers = await outsider.dht.find_providers(private.private_capability_key(secret, "secret-task"))
        assert [peer for peer, _ in providers] == [provider.peer_id]  # who provides: yes
        value = await outsider.dht.get_value(node_key)
        assert value is not None
        body = canonical.decode(SignedRecord.decode(value).payload)
        assert set(body) == {"key", "nonce", "sealed"}
        assert b"secret-echo" not in value and b"medical" not in value and b"secret-task" not in value
        # Without the records key the content does not open, under any other key it has.
        for wrong in (records_key(OTHER_ORG), bytes(32)):
            try:
                private._aead(wrong).decrypt(body["nonce"], body["sealed"], node_key)
            except Exception as exc:
                assert type(exc).__name__ == "InvalidTag"
            else:
                raise AssertionError("a wrong records key opened the record")
        # It finds nothing by itself ...
        with pytest.raises(NoProvider, match="secret-task"):
            await outsider.ask("secret-task", "let me in")
        # ... and calling it needs a membership, not the key: dialled directly, the
        # session is refused.
        client = session.ClientSession(outsider.key, provider=provider.peer_id, now=virtual_wall_clock())
        async with open_stream(outsider.host, provider.peer_id, session.SESSION_PROTOCOL) as stream:
            await stream.write(client.send_offer("secret-task", (), nonce=os.urandom(session.NONCE_BYTES)))
            refusal = await next_event(stream, client)
        assert isinstance(refusal, session.Refusal) and refusal.code == session.FORBIDDEN
        assert access.NO_CREDENTIALS in refusal.reason


async def test_a_tampered_private_record_is_dropped_logged_and_the_lookup_goes_on(autojump_clock, caplog):
    backends, opened = swarm(providers=(PROVIDER, SECOND))
    async with opened as s:
        bad, good, member = s.nodes[SECOND], s.nodes[PROVIDER], s.nodes[MEMBER]
        secret = records_key(ORG)
        key = private.private_node_key(secret, bad.peer_id)
        stored = SignedRecord.decode(bad.dht.records.get(key, virtual_wall_clock()).value)
        fields = canonical.decode(stored.payload)
        fields["sealed"] = fields["sealed"][:-1] + bytes([fields["sealed"][-1] ^ 0x80])
        # Signed by the provider itself, newer: every storing node accepts it (they cannot
        # read the ciphertext), and the provider hands it out for its own key.
        tampered = SignedRecord.sign(
            bad.key, domain=cap.DOMAIN, type=private.PRIVATE_CAPABILITY_TYPE,
            payload=canonical.encode(fields), seq=stored.seq + 1, expires=stored.expires,
        )  # fmt: skip
        assert await bad.dht.put_value(key, tampered.encode()) > 0
        with caplog.at_level(logging.WARNING, logger="modelnet.p2p.node"):
            found = await member.find("secret-task")
        assert [p.peer_id for p in found] == [good.peer_id]
        assert any("does not decrypt" in r.getMessage() and bad.peer_id.short() in r.getMessage() for r in caplog.records)
        answer = await member.ask("secret-task", "still works")
        assert answer.provider == good.peer_id
        assert backends[SECOND].served == []


async def test_private_records_are_republished_and_stay_private(autojump_clock):
    _, opened = swarm()
    async with opened as s:
        provider, member = s.nodes[PROVIDER], s.nodes[MEMBER]
        first = SignedRecord.decode(await member.dht.get_value(private.private_node_key(records_key(ORG), provider.peer_id)))
        await trio.sleep(provider.config.republish_interval + 1)
        again = SignedRecord.decode(await member.dht.get_value(private.private_node_key(records_key(ORG), provider.peer_id)))
        assert again.seq > first.seq and again.expires > first.expires
        [found] = await member.find("secret-task", fresh=True)
        assert found.org == ORG.peer_id


def revoke(*members: int):
    now = virtual_wall_clock()
    return make_revocation(ORG, [seeded_key(i).peer_id for i in members], seq=1, now=now, expires=now + 86400)


async def test_a_revoked_member_holding_the_records_key_cannot_pose_as_a_provider(autojump_clock):
    # review finding 2: SECOND was revoked but keeps the records key and keeps publishing
    # sealed records for the private model; members must not find it nor send it prompts.
    backends, opened = swarm(providers=(PROVIDER, SECOND))
    async with opened as s:
        good, rogue, member = s.nodes[PROVIDER], s.nodes[SECOND], s.nodes[MEMBER]
        assert {p.peer_id for p in await member.find("secret-task")} == {good.peer_id, rogue.peer_id}
        # The organisation publishes the revocation from any node; members pick it up
        # within one refresh interval, as providers do.
        assert await s.nodes[OUTSIDER].dht.put_value(revocation_key(ORG.peer_id), revoke(SECOND).encode()) > 0
        await trio.sleep(member.config.republish_interval + member.config.network_timeout)
        assert member.revocations.is_revoked(ORG.peer_id, rogue.peer_id)
        assert [p.peer_id for p in await member.find("secret-task")] == [good.peer_id]
        assert [p.peer_id for p in await member.find("model:secret-echo", fresh=True)] == [good.peer_id]
        for i in range(4):
            answer = await member.ask("secret-task", f"prompt {i}", model="secret-echo")
            assert answer.provider == good.peer_id
        assert backends[SECOND].served == [] and backends[PROVIDER].served == ["secret-echo"] * 4


async def test_a_member_node_started_after_a_revocation_never_trusts_the_revoked_provider(autojump_clock):
    # A short-lived member (the CLI's find/ask) looks its organisations' lists up before
    # judging private records, so even its first lookup drops the revoked provider.
    backends, opened = swarm(providers=(PROVIDER, SECOND))
    async with opened as s:
        good = s.nodes[PROVIDER]
        assert await s.nodes[OUTSIDER].dht.put_value(revocation_key(ORG.peer_id), revoke(SECOND).encode()) > 0
        late = membership(9)
        async with open_node(
            s.network.open_host, seeded_key(9), (), Config(client_mode=True), bootstrap=s.bootstrap_addrs,
            wall_clock=virtual_wall_clock, memberships=[late],
        ) as member:  # fmt: skip
            assert [p.peer_id for p in await member.find("secret-task")] == [good.peer_id]
            assert (await member.ask("secret-task", "first")).provider == good.peer_id
        assert backends[SECOND].served == []
