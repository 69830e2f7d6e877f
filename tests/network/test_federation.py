"""Tier 3: organisations on the memory network — access policies in session negotiation,
grants re-checked on every request, revocations honoured within one refresh interval."""

from __future__ import annotations

import os
from typing import Any, AsyncIterator, Mapping

import pytest
import trio

from modelnet.identity import Membership, issue_certificate, make_revocation, records_key, revocation_key
from modelnet.identity.org import WrongOrganisation
from modelnet.p2p.kad.errors import RecordRejected
from modelnet.models.base import Backend, Chunk, ModelInfo, Output
from modelnet.p2p.exchange import next_event, open_stream
from modelnet.p2p.node import Config, RequestFailed
from modelnet.p2p.trust import PolicyError
from modelnet.protocols import access, reason, session
from modelnet.protocols.access import AccessPolicy
from modelnet.testing import EPOCH, open_memory_swarm, open_node, seeded_key, virtual_wall_clock
from modelnet.p2p.memory import MemoryNetwork

ORG = seeded_key(100, seed=3)
OTHER_ORG = seeded_key(101, seed=3)
PROVIDER, MEMBER, ENGINEER, STRANGER, REVOKED = range(5)
REFRESH = 60.0
CONFIG = Config(revocation_refresh=REFRESH)


class Models(Backend):
    """A public and a private model that both answer ``echo``; each says who it is."""

    name = "two"

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name="public-echo", task="echo"), ModelInfo(name="secret-echo", task="echo", tags=("secret",))]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        yield Output(f"{model}:{text}")


def membership(i: int, *, roles=("dev",), org=ORG, lifetime=30 * 86400.0) -> Membership:
    cert = issue_certificate(org, "acme", seeded_key(i).peer_id, roles=roles, now=EPOCH, expires=EPOCH + lifetime)
    return Membership(cert, records_key(org))


MEMBERSHIPS = {
    PROVIDER: [membership(PROVIDER, roles=("provider",))],  # a provider publishes privately only for its orgs
    MEMBER: [membership(MEMBER)],
    ENGINEER: [membership(ENGINEER, roles=("intern",))],
    REVOKED: [membership(REVOKED)],
    STRANGER: [membership(STRANGER, org=OTHER_ORG)],
}
POLICY = {"secret-echo": AccessPolicy(orgs=(ORG.peer_id,), roles={ORG.peer_id: ("dev",)})}


def swarm():
    return open_memory_swarm(
        6,
        backends_for=lambda i: [Models()] if i == PROVIDER else [],
        config=CONFIG,
        memberships_for=lambda i: MEMBERSHIPS.get(i, ()),
        policies_for=lambda i: POLICY if i == PROVIDER else {},
    )


async def offer(node, provider, capability: str, credentials=()):
    """A raw session offer, as an attacker would send it."""
    client = session.ClientSession(node.key, provider=provider.peer_id, now=virtual_wall_clock())
    async with open_stream(node.host, provider.peer_id, session.SESSION_PROTOCOL) as stream:
        await stream.write(client.send_offer(capability, tuple(credentials), nonce=os.urandom(session.NONCE_BYTES)))
        return await next_event(stream, client)


async def request(node, provider, grant: session.Grant, capability: str, model: str | None = None):
    """A raw reasoning request on ``grant``; the provider's first answer event."""
    client = reason.ReasonClient(provider=provider.peer_id, client=node.peer_id)
    message = reason.Request(
        request_id=os.urandom(16),
        capability=capability,
        input="hi",
        params={},
        budget=30.0,
        hop_limit=4,
        visited=(node.peer_id,),
        grant=grant.encode(),
        model=model,
    )
    async with open_stream(node.host, provider.peer_id, reason.REASON_PROTOCOL) as stream:
        await stream.write(client.send_request(message))
        return await next_event(stream, client)


async def test_a_member_with_the_role_is_served_the_private_model(autojump_clock):
    async with swarm() as s:
        answer = await s.nodes[MEMBER].ask("secret", "hello")
        assert answer.output == "secret-echo:hello"
        assert answer.provider == s.nodes[PROVIDER].peer_id


async def test_a_member_without_the_role_is_refused_and_told_why(autojump_clock):
    async with swarm() as s:
        with pytest.raises(RequestFailed) as info:
            await s.nodes[ENGINEER].ask("secret", "hello")
        message = str(info.value)
        assert "forbidden" in message and access.MISSING_ROLE in message and "dev" in message
        # the provider keeps serving others
        assert (await s.nodes[MEMBER].ask("secret", "again")).output == "secret-echo:again"


@pytest.mark.parametrize(
    "credentials, code",
    [
        (lambda s: [], access.NO_CREDENTIALS),
        # a genuine certificate of another member, replayed by the stranger
        (lambda s: [MEMBERSHIPS[MEMBER][0].certificate.encode()], access.WRONG_MEMBER),
        # a certificate the stranger signed itself, calling itself "acme"
        (
            lambda s: [issue_certificate(seeded_key(STRANGER), "acme", s.nodes[STRANGER].peer_id, roles=("dev",), now=EPOCH, expires=EPOCH + 1e6).encode()],
            access.WRONG_ORG,
        ),
        # a real membership, of another organisation
        (lambda s: [MEMBERSHIPS[STRANGER][0].certificate.encode()], access.WRONG_ORG),
        # the right organisation, but expired
        (
            lambda s: [issue_certificate(ORG, "acme", s.nodes[STRANGER].peer_id, roles=("dev",), now=EPOCH - 100, expires=EPOCH + 1).encode()],
            access.EXPIRED,
        ),
    ],
    ids=["none", "another-members", "self-signed-org", "other-org", "expired"],
)
async def test_a_stranger_is_refused_whatever_it_presents(autojump_clock, credentials, code):
    async with swarm() as s:
        await trio.sleep(2)  # past the expiry of the short certificate
        provider, stranger = s.nodes[PROVIDER], s.nodes[STRANGER]
        answer = await offer(stranger, provider, "secret", credentials(s))
        assert isinstance(answer, session.Refusal)
        assert answer.code == session.FORBIDDEN and code in answer.reason
        # nothing was served, and the provider still serves its members and the public
        assert (await s.nodes[MEMBER].ask("secret", "x")).output == "secret-echo:x"
        assert (await offer(stranger, provider, "model:public-echo")).__class__ is session.Grant


async def test_a_grant_won_through_a_public_model_does_not_open_the_private_one(autojump_clock):
    async with swarm() as s:
        provider, stranger = s.nodes[PROVIDER], s.nodes[STRANGER]
        grant = await offer(stranger, provider, "echo")  # admitted: public-echo answers echo
        assert isinstance(grant, session.Grant)
        result = await request(stranger, provider, grant, "echo")
        assert isinstance(result, reason.Result) and result.model == "public-echo"
        refused = await request(stranger, provider, grant, "echo", model="secret-echo")
        assert isinstance(refused, reason.Error)
        assert refused.code == reason.UNAUTHORIZED and "forbidden" in refused.message


async def test_a_grant_never_outlives_the_certificate(autojump_clock):
    short = membership(MEMBER, lifetime=100.0)
    async with swarm() as s:
        node, provider = s.nodes[MEMBER], s.nodes[PROVIDER]
        grant = await offer(node, provider, "secret", [short.certificate.encode()])
        assert isinstance(grant, session.Grant)
        assert grant.expires == short.certificate.expires < virtual_wall_clock() + CONFIG.session_ttl


async def test_a_revoked_member_is_cut_off_within_one_refresh_interval(autojump_clock):
    async with swarm() as s:
        provider, revoked, member = s.nodes[PROVIDER], s.nodes[REVOKED], s.nodes[MEMBER]
        assert (await revoked.ask("secret", "before")).output == "secret-echo:before"
        grant = await offer(revoked, provider, "secret", [MEMBERSHIPS[REVOKED][0].certificate.encode()])
        assert isinstance(grant, session.Grant)
        # The organisation publishes its revocation from any node (here: a plain one).
        revocation = make_revocation(ORG, [revoked.peer_id], seq=1, now=virtual_wall_clock(), expires=virtual_wall_clock() + 86400)
        await s.nodes[5].dht.put_value(revocation_key(ORG.peer_id), revocation.encode())
        published = trio.current_time()
        await trio.sleep(REFRESH + CONFIG.network_timeout)
        assert provider.revocations.is_revoked(ORG.peer_id, revoked.peer_id)
        # the grant it already holds stops working ...
        error = await request(revoked, provider, grant, "secret")
        assert isinstance(error, reason.Error) and error.code == reason.UNAUTHORIZED and access.REVOKED in error.message
        # ... and so does asking afresh, with the reason shown
        with pytest.raises(RequestFailed, match="revoked"):
            await revoked.ask("secret", "after")
        assert trio.current_time() - published < REFRESH + 2 * CONFIG.network_timeout
        # other members are unaffected
        assert (await member.ask("secret", "still")).output == "secret-echo:still"


async def test_an_older_or_forged_revocation_changes_nothing(autojump_clock):
    async with swarm() as s:
        provider, revoked = s.nodes[PROVIDER], s.nodes[REVOKED]
        newer = make_revocation(ORG, [], seq=5, now=virtual_wall_clock(), expires=virtual_wall_clock() + 86400)
        await s.nodes[5].dht.put_value(revocation_key(ORG.peer_id), newer.encode())
        await trio.sleep(REFRESH + CONFIG.network_timeout)
        older = make_revocation(ORG, [revoked.peer_id], seq=4, now=virtual_wall_clock(), expires=virtual_wall_clock() + 86400)
        forged = make_revocation(OTHER_ORG, [revoked.peer_id], seq=9, now=virtual_wall_clock(), expires=virtual_wall_clock() + 86400)
        with pytest.raises(RecordRejected, match="better value"):  # the newer list is held
            await s.nodes[4].dht.put_value(revocation_key(ORG.peer_id), older.encode())
        with pytest.raises(WrongOrganisation):  # not signed by the org the key names
            await s.nodes[4].dht.put_value(revocation_key(ORG.peer_id), forged.encode())
        provider.revocations.learn(older)
        await trio.sleep(REFRESH + CONFIG.network_timeout)
        assert not provider.revocations.is_revoked(ORG.peer_id, revoked.peer_id)
        assert (await revoked.ask("secret", "ok")).output == "secret-echo:ok"


async def test_a_peer_list_policy_admits_only_the_listed_peers(autojump_clock):
    network = MemoryNetwork()
    listed, other = seeded_key(7), seeded_key(8)
    policy = {"secret-echo": AccessPolicy(peers=(listed.peer_id,))}
    async with open_node(network.open_host, seeded_key(6), [Models()], CONFIG, wall_clock=virtual_wall_clock, policies=policy) as provider:
        async with open_node(network.open_host, listed, (), CONFIG, bootstrap=provider.addrs, wall_clock=virtual_wall_clock) as a:
            async with open_node(network.open_host, other, (), CONFIG, bootstrap=provider.addrs, wall_clock=virtual_wall_clock) as b:
                assert isinstance(await offer(a, provider, "secret"), session.Grant)
                refused = await offer(b, provider, "secret")
                assert isinstance(refused, session.Refusal) and access.NOT_LISTED in refused.reason


async def test_a_policy_for_a_model_not_served_is_an_error(autojump_clock):
    network = MemoryNetwork()
    with pytest.raises(PolicyError, match="secret-ech0"):
        async with open_node(network.open_host, seeded_key(6), [Models()], CONFIG, wall_clock=virtual_wall_clock, policies={"secret-ech0": AccessPolicy(peers=(ORG.peer_id,))}):
            pass
