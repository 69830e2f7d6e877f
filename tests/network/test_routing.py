"""Tier 3: routing on the memory network -- ranking, failover, replay, hedging, budgets."""

from __future__ import annotations

import contextlib

import pytest
import trio

from modelnet.p2p.node import Config, RequestFailed
from modelnet.testing import ScriptedBackend, open_memory_swarm

from .test_forwarding import spy_on_requests

LINK = 0.002


def link(swarm, a, b, seconds: float) -> None:
    swarm.network.set_link_latency(swarm.nodes[a].peer_id, swarm.nodes[b].peer_id, seconds)


async def test_the_fastest_healthy_provider_wins(autojump_clock):
    # Provider 1 has the fastest link but a broken model; 2 and 3 are healthy, 3 is nearer.
    backends = {i: ScriptedBackend(str(i), fail=i == 1) for i in (1, 2, 3)}
    async with open_memory_swarm(6, backends_for=lambda i: [backends[i]] if i in backends else [], latency=LINK) as swarm:
        asker = swarm.nodes[5]
        link(swarm, 5, 1, 0.001)
        link(swarm, 5, 2, 0.040)
        link(swarm, 5, 3, 0.010)
        outputs = [(await asker.ask("echo", "q")).output for _ in range(6)]
        assert outputs == ["3:q"] * 6
        assert backends[1].started == 1  # tried once, then banned
        assert asker.stats[swarm.nodes[1].peer_id].banned(trio.current_time())
        assert backends[2].started == 0


async def test_a_provider_that_dies_mid_answer_is_replaced_when_nothing_was_shown(autojump_clock):
    async with dying_and_spare() as (swarm, dying, spare):
        asker = swarm.nodes[4]
        answers = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_and_keep, asker.ask("echo", "x"), answers)
            await dying.first_chunk.wait()
            await trio.sleep(1.0)  # virtual time: the first chunk reaches the asker
            assert asker.stats[swarm.nodes[1].peer_id].ttfc_samples  # it did: the dying one won the race
            swarm.network.crash(swarm.nodes[1].peer_id)
        [answer] = answers
        assert answer.output == "spare:x"
        assert answer.chunks == ("spare-0", "spare-1", "spare-2")  # nothing of the dead one's
        assert [peer for peer, _ in answer.attempts] == [swarm.nodes[1].peer_id]


@contextlib.asynccontextmanager
async def dying_and_spare():
    """Provider 1 streams slowly and is preferred (it will die); provider 2 is the spare."""
    dying = ScriptedBackend("dying", chunks=3, chunk_delay=10.0)
    spare = ScriptedBackend("spare", chunks=3)
    backends = {1: dying, 2: spare}
    async with open_memory_swarm(5, backends_for=lambda i: [backends[i]] if i in backends else [], latency=LINK) as swarm:
        link(swarm, 4, 1, 0.001)
        link(swarm, 4, 2, 0.030)
        yield swarm, dying, spare


async def run_and_keep(coro, into: list) -> None:
    into.append(await coro)


async def test_a_streamed_answer_is_not_replayed_after_the_caller_saw_chunks(autojump_clock):
    async with dying_and_spare() as (swarm, dying, spare):
        asker = swarm.nodes[4]
        seen: list[str] = []
        shown = trio.Event()

        def on_chunk(peer, text: str) -> None:
            seen.append(text)
            shown.set()

        async def crash_after_first_chunk() -> None:
            await shown.wait()
            swarm.network.crash(swarm.nodes[1].peer_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_after_first_chunk)
            with pytest.raises(RequestFailed) as failed:
                await asker.ask("echo", "x", on_chunk=on_chunk)
        assert failed.value.partial == ("dying-0",) == tuple(seen)
        assert "mid-answer" in str(failed.value)
        assert spare.started == 0  # not replayed: the user would have read two answers


async def test_hedging_cuts_the_tail_and_cancels_the_loser(autojump_clock):
    elapsed = {}
    for hedging in (False, True):
        usual = ScriptedBackend("usual", delay=0.050)
        backup = ScriptedBackend("backup", delay=0.050, chunks=2, chunk_delay=5.0)
        backends = {1: usual, 2: backup}
        config = Config(hedging=hedging)
        async with open_memory_swarm(
            5, backends_for=lambda i: [backends[i]] if i in backends else [], latency=LINK, config=config
        ) as swarm:
            asker = swarm.nodes[4]
            link(swarm, 4, 1, 0.001)
            link(swarm, 4, 2, 0.010)
            for _ in range(8):  # the usual provider answers in ~50 ms: that is its p95
                assert (await asker.ask("echo", "warm")).output == "usual:warm"
            usual.delay = 20.0  # now its model stalls
            loser_cancelled_by_then = []
            asked = trio.current_time()

            def on_chunk(peer, text: str) -> None:
                loser_cancelled_by_then.append(usual.cancelled)
                elapsed.setdefault(hedging, trio.current_time() - asked)  # to the first chunk shown

            answer = await asker.ask("echo", "tail", timeout=60, on_chunk=on_chunk)
            if hedging:
                assert answer.output == "backup:tail"
                # cancelled as soon as the backup won, not when its answer ended 5 s later
                assert loser_cancelled_by_then[-1] == 1
                assert answer.attempts == ()  # the loser was cancelled, it did not fail
                with trio.fail_after(1):
                    await usual.was_cancelled.wait()  # its stream was reset: the work stopped
                assert usual.finished == 8 and usual.cancelled == 1
                stats = asker.stats[swarm.nodes[1].peer_id]
                assert stats.failures == 0 and max(stats.ttfc_samples) > 0.050  # it lost: ranked down
            else:
                assert answer.output == "usual:tail"
                assert backup.started == 0
    assert elapsed[True] * 10 < elapsed[False]


async def test_hedging_waits_for_the_measured_p95_not_the_default(autojump_clock):
    usual = ScriptedBackend("usual", delay=0.050)
    backup = ScriptedBackend("backup", delay=0.050)
    backends = {1: usual, 2: backup}
    async with open_memory_swarm(5, backends_for=lambda i: [backends[i]] if i in backends else [], latency=LINK) as swarm:
        asker = swarm.nodes[4]
        link(swarm, 4, 1, 0.001)
        link(swarm, 4, 2, 0.010)
        for _ in range(8):
            await asker.ask("echo", "warm")
        usual.delay = 0.045  # a little faster than its p95: nobody else is asked
        assert (await asker.ask("echo", "normal")).output == "usual:normal"
        assert backup.started == 0
        # 0.2 s is far under the 1 s default but four times its p95: hedged, and the backup wins
        usual.delay = 0.200
        assert (await asker.ask("echo", "slow")).output == "backup:slow"
        assert backup.started == 1


async def test_the_budget_a_provider_gets_is_what_is_left_not_a_wall_clock_time(autojump_clock):
    slow = ScriptedBackend("slow", delay=4.0)
    async with open_memory_swarm(4, backends_for=lambda i: [slow] if i == 1 else [], latency=LINK) as swarm:
        provider, asker = swarm.nodes[1], swarm.nodes[3]
        seen = spy_on_requests(provider)
        # The provider's wall clock runs 200 s ahead (sessions tolerate 300 s of skew): an
        # absolute 10 s deadline would look expired to it; a relative budget does not care.
        provider.server.wall_clock = lambda: swarm.nodes[0].wall_clock() + 200
        provider.wall_clock = provider.server.wall_clock
        answer = await asker.ask("echo", "x", timeout=10)
        assert answer.output == "slow:x"
        assert seen and 9.9 < seen[0].budget <= 10
        with pytest.raises(RequestFailed) as failed:
            await asker.ask("echo", "y", timeout=3)  # the model needs 4 s: stopped at 3
        assert failed.value.errors[-1][0] in (provider.peer_id, asker.peer_id)
        with trio.fail_after(1):
            await slow.was_cancelled.wait()


async def test_one_request_tries_at_most_max_attempts_providers(autojump_clock):
    broken = {i: ScriptedBackend(str(i), fail=True) for i in range(1, 7)}
    config = Config(max_attempts=3)
    async with open_memory_swarm(
        8, backends_for=lambda i: [broken[i]] if i in broken else [], latency=LINK, config=config
    ) as swarm:
        asker = swarm.nodes[7]
        with pytest.raises(RequestFailed) as failed:
            await asker.ask("echo", "x")
        assert len(failed.value.errors) == 3
        assert sum(b.started for b in broken.values()) == 3  # six could have been asked


class _Unloaded(ScriptedBackend):
    """A provider whose model server no longer has the model (an upstream 404)."""

    async def run(self, model, text, params):
        from modelnet.models.base import UnknownModel

        self.started += 1
        raise UnknownModel(f"{model} was unloaded")
        yield  # an async generator, like every backend's run


async def test_a_provider_whose_model_is_gone_is_failed_over(autojump_clock):
    # UnknownModel is the provider's problem, not the request's: the asker tries the next one.
    backends = {1: _Unloaded("gone"), 2: ScriptedBackend("spare")}
    async with open_memory_swarm(5, backends_for=lambda i: [backends[i]] if i in backends else [], latency=LINK) as swarm:
        asker = swarm.nodes[4]
        link(swarm, 4, 1, 0.001)  # the broken one is the nearest, so it is tried first
        link(swarm, 4, 2, 0.030)
        answer = await asker.ask("echo", "q")
        assert answer.output == "spare:q"
        assert backends[1].started == 1
        [attempt] = answer.attempts
        assert attempt.peer == swarm.nodes[1].peer_id and attempt.code == "no-such-capability"
