"""Typed failures: every failed attempt carries its error code, and the gateway decides
its HTTP status on the codes, never on the wording of the messages."""

from __future__ import annotations

import pickle

import pytest
import trio

from modelnet.gateway.app import _failure
from modelnet.p2p.node import Attempt, Config, RequestFailed
from modelnet.protocols import reason
from modelnet.testing import ScriptedBackend, open_memory_swarm, seeded_key

PEER, OTHER = seeded_key(1).peer_id, seeded_key(2).peer_id


def test_an_attempt_is_a_peer_message_pair_with_a_code():
    attempt = Attempt(PEER, "overloaded: 3 requests in progress", reason.OVERLOADED)
    peer, message = attempt  # what existing callers (the CLI's JSON, logs) unpack
    assert (peer, message) == (PEER, attempt.message) and attempt == (PEER, message)
    assert attempt.code == reason.OVERLOADED and attempt.peer == PEER
    assert pickle.loads(pickle.dumps(attempt)).code == reason.OVERLOADED
    assert Attempt(PEER, "no code").code is None
    failed = RequestFailed("x", [(PEER, "a plain pair")])  # pairs are still accepted
    assert failed.errors == [(PEER, "a plain pair")] and failed.errors[0].code is None


@pytest.mark.parametrize(
    ("attempts", "status"),
    [
        ([Attempt(PEER, "busy", reason.OVERLOADED), Attempt(OTHER, "queue full", reason.OVERLOADED)], 429),
        # the message reads like a busy provider, the code says otherwise
        ([Attempt(PEER, "overloaded: something", None)], 502),
        ([Attempt(PEER, "busy", reason.OVERLOADED), Attempt(OTHER, "internal: broken", reason.INTERNAL)], 502),
        ([], 502),
    ],
)
def test_the_gateway_decides_on_codes(attempts, status):
    error = _failure(RequestFailed("echo: failed", attempts), deadline_passed=False)
    assert error.status == status
    assert error.code == ("overloaded" if status == 429 else "provider_failed")


async def test_failed_attempts_carry_the_providers_codes(autojump_clock):
    busy = Config(max_concurrent_requests=0)
    async with open_memory_swarm(4, backends_for=lambda i: [ScriptedBackend(str(i))] if i in (1, 2) else [], config=busy) as swarm:
        with pytest.raises(RequestFailed) as failed:
            await swarm.nodes[3].ask("echo", "hi")
        assert len(failed.value.errors) == 2
        assert {a.code for a in failed.value.errors} == {reason.OVERLOADED}
        assert {a.peer for a in failed.value.errors} == {swarm.nodes[1].peer_id, swarm.nodes[2].peer_id}
        assert _failure(failed.value, deadline_passed=False).status == 429

    backends = {1: [ScriptedBackend("broken", fail=True)], 2: [ScriptedBackend("slow", delay=60.0)]}
    async with open_memory_swarm(4, backends_for=lambda i: backends.get(i, [])) as swarm:
        with pytest.raises(RequestFailed) as failed:
            await swarm.nodes[3].ask("echo", "hi", timeout=5.0)
        codes = {a.peer: a.code for a in failed.value.errors}
        assert codes[swarm.nodes[1].peer_id] == reason.INTERNAL  # the model raised
        assert failed.value.errors[-1].code == reason.DEADLINE_EXCEEDED  # the slow one ran out of time
        assert _failure(failed.value, deadline_passed=False).status == 502
        with trio.fail_after(1):
            await backends[2][0].was_cancelled.wait()
