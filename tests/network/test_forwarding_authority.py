"""Tier 3: forwarding lends no authority, and nobody's offers or answers cost a provider more
than they should -- anonymous forwarding, tampering forwarders, typed refusals of requests
and answers the protocol cannot carry, and session throttling."""

from __future__ import annotations

import contextlib
import os
from typing import Any, AsyncIterator, Mapping

import pytest
import trio
import trio.testing

from modelnet.identity import Membership, issue_certificate, records_key
from modelnet.models.base import Backend, Chunk, ModelInfo, Output
from modelnet.p2p.exchange import next_event, open_stream
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.node import Config, RequestFailed
from modelnet.protocols import access, reason, session
from modelnet.protocols.access import AccessPolicy
from modelnet.testing import EPOCH, ScriptedBackend, open_node, seeded_key, virtual_wall_clock

from .test_forwarding import spy_on_requests


ORG = seeded_key(300, seed=11)
OTHER_ORG = seeded_key(301, seed=11)
PROVIDER, FORWARDER, STRANGER, MEMBER = 1, 2, 3, 4


class Models(Backend):
    """A public and an organisation-private model; ``served`` lists what ran."""

    name = "models"

    def __init__(self) -> None:
        self.served: list[str] = []

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name="open-llm", task="chat"), ModelInfo(name="secret-llm", task="chat", tags=("secret",))]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        self.served.append(model)
        yield Chunk(f"{model}:")
        yield Output(f"{model}:{text}")


def membership(i: int, org=ORG) -> Membership:
    cert = issue_certificate(org, "acme", seeded_key(i).peer_id, roles=("dev",), now=EPOCH, expires=EPOCH + 86400)
    return Membership(cert, records_key(org))


@contextlib.asynccontextmanager
async def organisation() -> AsyncIterator[tuple[Models, dict[int, Any]]]:
    """A provider of a private model, a member that forwards (``--forward``), another member,
    and a stranger that can only reach the forwarder."""
    network = MemoryNetwork(latency=0.001)
    models = Models()
    async with contextlib.AsyncExitStack() as stack:

        async def start(i, backends=(), config=Config(), bootstrap=(), **kw):
            return await stack.enter_async_context(
                open_node(network.open_host, seeded_key(i), backends, config, bootstrap=bootstrap, wall_clock=virtual_wall_clock, **kw)
            )

        provider = await start(
            PROVIDER, [models], memberships=[membership(PROVIDER)], policies={"secret-llm": AccessPolicy(orgs=(ORG.peer_id,))}
        )
        forwarder = await start(FORWARDER, config=Config(forwarding=True), bootstrap=provider.addrs, memberships=[membership(FORWARDER)])
        member = await start(MEMBER, config=Config(client_mode=True), bootstrap=provider.addrs, memberships=[membership(MEMBER)])
        stranger = await start(STRANGER, config=Config(client_mode=True))
        stranger.host.add_addrs(provider.peer_id, list(provider.host.listen_addrs()))  # it may dial, not look up
        yield models, {PROVIDER: provider, FORWARDER: forwarder, MEMBER: member, STRANGER: stranger}


async def send_raw(asker, target, request: reason.Request) -> reason.Result | reason.Error:
    """Send ``request`` as it is; the result or error it ends with (chunks skipped)."""
    client = reason.ReasonClient()
    async with open_stream(asker.host, target.peer_id, reason.REASON_PROTOCOL) as stream:
        await stream.write(client.send_request(request))
        while isinstance(event := await next_event(stream, client), reason.Chunk):
            pass
    return event


# ---- a member that forwards lends strangers none of its authority -----------------------------


async def test_a_member_forwarder_never_opens_private_models_to_strangers(autojump_clock):
    async with organisation() as (models, nodes):
        forwarder, stranger = nodes[FORWARDER], nodes[STRANGER]
        # The forwarder, a member, is served the private model itself: its own lookups, grants
        # and certificates are warm when the stranger comes.
        assert (await forwarder.ask("secret", "mine")).output == "secret-llm:mine"
        reached = spy_on_requests(nodes[PROVIDER])
        failures = {}
        for capability in ("secret", "model:secret-llm", "no-such-thing"):
            with pytest.raises(RequestFailed) as failed:
                await stranger.ask(capability, "what is the merger plan?", via=forwarder.addrs)
            failures[capability] = failed.value
        assert models.served == ["secret-llm"]  # the forwarder's own request only
        assert reached == []  # the forwarder did not even look privately: nothing was sent
        # A private capability looks exactly like one nobody serves: same code, same words.
        for capability, failure in failures.items():
            assert failure.code == reason.NO_SUCH_CAPABILITY
            assert str(failure).replace(capability, "X") == str(failures["no-such-thing"]).replace("no-such-thing", "X")
        # Public models still flow through the forwarder, on a session of their own: the
        # forwarder's member grant for the same capability is not reused, and the new offer
        # carries no certificate.
        assert (await forwarder.ask("chat", "mine")).output == "open-llm:mine"
        offers: list[tuple] = []
        remember = nodes[PROVIDER].server._remember
        nodes[PROVIDER].server._remember = lambda peer, credentials, now: offers.append((peer, credentials)) or remember(
            peer, credentials, now
        )
        answer = await stranger.ask("chat", "hello", via=forwarder.addrs)
        assert answer.output == "open-llm:hello" and answer.route == (forwarder.peer_id,)
        answer.verify(stranger.peer_id)
        assert offers == [(forwarder.peer_id, ())]
        assert (await nodes[MEMBER].ask("secret", "ours")).output == "secret-llm:ours"
        assert (await forwarder.ask("model:secret-llm", "again")).output == "secret-llm:again"


async def test_a_forwarded_request_is_never_served_a_private_model_whatever_grant_it_carries(autojump_clock):
    # Defence in depth at the provider: a forwarder that did present its membership (an
    # older or careless node) still gets no private model for someone else's request.
    async with organisation() as (models, nodes):
        provider, member, stranger = nodes[PROVIDER], nodes[MEMBER], nodes[STRANGER]
        grant = (await member._grant_for(provider.peer_id, "secret")).encode()

        def request(visited):
            return reason.Request(os.urandom(16), "secret", "x", {}, 10.0, 4, visited, grant)

        served = await send_raw(member, provider, request((member.peer_id,)))
        assert isinstance(served, reason.Result) and served.model == "secret-llm"
        refused = await send_raw(member, provider, request((stranger.peer_id, member.peer_id)))
        assert isinstance(refused, reason.Error) and refused.code == reason.NO_SUCH_CAPABILITY
        assert models.served == ["secret-llm"]


# ---- a forwarder cannot alter what it passes on ----------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda r: (r.__class__(**{**_fields(r), "params": {**r.params, "temperature": 2.0}}), None), id="params"),
        pytest.param(lambda r: (r.__class__(**{**_fields(r), "model": "scripted-small"}), None), id="model"),
        pytest.param(lambda r: (r, lambda text: text.upper()), id="chunks"),
    ],
)
async def test_a_forwarder_that_alters_params_model_or_chunks_is_caught(autojump_clock, tamper):
    network = MemoryNetwork(latency=0.001)
    big, small = ScriptedBackend("big", chunks=2), ScriptedBackend("small", chunks=2)
    async with contextlib.AsyncExitStack() as stack:
        provider = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(1), [big, small], Config(), wall_clock=virtual_wall_clock)
        )
        forwarder = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(2), [], Config(forwarding=True), bootstrap=provider.addrs, wall_clock=virtual_wall_clock)
        )
        asker = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(3), [], Config(client_mode=True), wall_clock=virtual_wall_clock)
        )
        ask = dict(model="scripted-big", params={"temperature": 0.1}, via=forwarder.addrs)
        honest = await asker.ask("echo", "x", **ask)
        assert honest.output == "big:x" and honest.route == (forwarder.peer_id,)

        real = forwarder.server.forwarder

        async def dishonest(request, remote, emit):
            request, rewrite = tamper(request)
            relay = emit if rewrite is None else (lambda text: emit(rewrite(text)))
            return await real(request, remote, relay)

        forwarder.server.forwarder = dishonest
        shown: list[str] = []
        with pytest.raises(RequestFailed) as failed:
            await asker.ask("echo", "x", **ask, on_chunk=lambda peer, text: shown.append(text))
        [(peer, message)] = failed.value.errors  # the answer did not verify: no code, no retry
        assert peer == forwarder.peer_id and failed.value.code is None
        assert any(word in message for word in ("params", "model", "chunks")), message


def _fields(request: reason.Request) -> dict[str, Any]:
    return {name: getattr(request, name) for name in reason.Request.__slots__}


# ---- typed refusals instead of resets --------------------------------------------------------


async def test_a_full_visited_list_is_refused_as_hop_limit(autojump_clock):
    network = MemoryNetwork()
    async with contextlib.AsyncExitStack() as stack:
        provider = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(1), [ScriptedBackend("p")], Config(), wall_clock=virtual_wall_clock)
        )
        forwarder = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(2), [], Config(forwarding=True), bootstrap=provider.addrs, wall_clock=virtual_wall_clock)
        )
        asker = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(3), [], Config(client_mode=True), bootstrap=forwarder.addrs, wall_clock=virtual_wall_clock)
        )
        grant = (await asker._grant_for(forwarder.peer_id, "echo")).encode()
        visited = tuple(seeded_key(1000 + i).peer_id for i in range(reason.MAX_VISITED))
        for count, expected in ((reason.MAX_VISITED, reason.HOP_LIMIT), (reason.MAX_VISITED - 1, None)):
            request = reason.Request(os.urandom(16), "echo", "hi", {}, 10.0, 5, visited[:count], grant)
            answer = await send_raw(asker, forwarder, request)
            if expected is None:  # one place left: the forwarder takes it
                assert isinstance(answer, reason.Result) and answer.output == "p:hi"
            else:
                assert isinstance(answer, reason.Error) and answer.code == expected and not answer.retryable
        await trio.testing.wait_all_tasks_blocked()  # the handlers finish unwinding
        assert forwarder.server.in_flight == 0


class Huge(Backend):
    """Answers with an output (or a chunk) of ``size`` characters."""

    name = "huge"

    def __init__(self, size: int, *, as_chunk: bool = False) -> None:
        self.size = size
        self.as_chunk = as_chunk

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name="huge", task="echo")]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        if self.as_chunk:
            yield Chunk("x" * self.size)
        yield Output("x" * self.size)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(Huge(reason.REASON_MAX_FRAME + 1), id="output-over-the-receipt-bound"),
        pytest.param(Huge(reason.REASON_MAX_FRAME - 64), id="result-over-a-frame"),
        pytest.param(Huge(reason.MAX_TEXT_BYTES + 1, as_chunk=True), id="chunk-over-its-bound"),
    ],
)
async def test_an_answer_too_large_to_send_is_a_typed_internal_error(autojump_clock, backend):
    network = MemoryNetwork()
    async with contextlib.AsyncExitStack() as stack:
        provider = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(1), [backend], Config(), wall_clock=virtual_wall_clock)
        )
        asker = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(3), [], Config(client_mode=True), wall_clock=virtual_wall_clock)
        )
        with pytest.raises(RequestFailed) as failed:
            await asker.ask("echo", "x", via=provider.addrs)
        assert failed.value.code == reason.INTERNAL
        assert "output too large" in failed.value.errors[0].message
        await trio.testing.wait_all_tasks_blocked()
        assert provider.server.in_flight == 0


# ---- sessions: throttled per peer, unnamed organisations' credentials not verified --------------


async def offer(asker, provider, credentials=()) -> session.Grant | session.Refusal:
    client = session.ClientSession(asker.key, provider=provider.peer_id, now=virtual_wall_clock())
    async with open_stream(asker.host, provider.peer_id, session.SESSION_PROTOCOL) as stream:
        await stream.write(client.send_offer("echo", tuple(credentials), nonce=os.urandom(session.NONCE_BYTES)))
        return await next_event(stream, client)


@contextlib.asynccontextmanager
async def provider_and_asker(config: Config, **kw):
    network = MemoryNetwork(latency=0.001)
    async with contextlib.AsyncExitStack() as stack:
        provider = await stack.enter_async_context(
            open_node(network.open_host, seeded_key(1), [ScriptedBackend("p")], config, wall_clock=virtual_wall_clock, **kw)
        )
        asker, other = [
            await stack.enter_async_context(
                open_node(network.open_host, seeded_key(i), [], Config(client_mode=True), bootstrap=provider.addrs, wall_clock=virtual_wall_clock)
            )
            for i in (3, 4)
        ]
        yield provider, asker, other


async def test_session_negotiations_are_limited_per_peer_per_minute(autojump_clock):
    async with provider_and_asker(Config(sessions_per_minute_per_peer=3)) as (provider, asker, other):
        await trio.sleep(60 - trio.current_time() % 60)  # the start of a window
        answers = [await offer(asker, provider) for _ in range(4)]
        assert [type(a).__name__ for a in answers] == ["Grant", "Grant", "Grant", "Refusal"]
        assert answers[-1].code == session.OVERLOADED
        assert isinstance(await offer(other, provider), session.Grant)  # another peer has its own budget
        await trio.sleep(60)
        assert isinstance(await offer(asker, provider), session.Grant)  # a new minute


async def test_session_negotiations_in_progress_are_limited_per_peer(autojump_clock):
    async with provider_and_asker(Config(max_sessions_per_peer=1)) as (provider, asker, other):
        # One negotiation held open (no offer sent yet), then a second one.
        async with open_stream(asker.host, provider.peer_id, session.SESSION_PROTOCOL):
            await trio.sleep(0.1)
            refusal = await offer(asker, provider)
            assert isinstance(refusal, session.Refusal) and refusal.code == session.OVERLOADED
            assert isinstance(await offer(other, provider), session.Grant)
        await trio.sleep(provider.config.network_timeout + 1)  # the held one timed out
        assert isinstance(await offer(asker, provider), session.Grant)


async def test_credentials_of_organisations_no_policy_names_are_not_verified(autojump_clock, monkeypatch):
    policies = {"scripted-p": AccessPolicy(orgs=(ORG.peer_id,))}
    async with provider_and_asker(Config(), memberships=[membership(1)], policies=policies) as (provider, asker, other):
        opened: list[bytes] = []
        real = access.open_credentials

        def spy(credentials, **kw):
            opened.extend(credentials)
            return real(credentials, **kw)

        monkeypatch.setattr(access, "open_credentials", spy)
        ours, theirs = (membership(3, org).certificate.encode() for org in (ORG, OTHER_ORG))
        assert isinstance(await offer(asker, provider, [theirs, ours]), session.Grant)
        assert opened == [ours]
        refusal = await offer(other, provider, [membership(4, OTHER_ORG).certificate.encode()])
        assert isinstance(refusal, session.Refusal) and refusal.code == session.FORBIDDEN
        assert access.WRONG_ORG in refusal.reason  # still told why
        assert opened == [ours]
