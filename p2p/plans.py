"""Executing a collaborative plan on the network, from the asking node.

:func:`execute` drives the plan's state machine (:class:`modelnet.protocols.plan.PlanRun`):
every model call it hands out is routed by :meth:`Node.ask` (so each can run on a
different node, with the router's ranking, failover and hedging), ensemble members run
concurrently in one nursery, and each call's outcome goes back into the machine, which
decides what runs next. Nothing here looks inside an output: the machine passes outputs
on as data, and the plan cannot change while it runs.

Deadline: one for the whole plan (``timeout``, default ``Config.request_timeout`` per
model call on the plan's longest serial path). A call gets an equal share of what is left
with the calls still to come after it in series: ``(deadline - now) / (1 + after)``, so
time a fast step leaves unused goes to the later ones.

Distinct providers: members of one ensemble that are the same step are sent to distinct
providers. The providers of that step are looked up once, in routing order; member ``i``
may not use the providers preferred for the other members (it keeps failing over to any
spare); if two still land on one provider, the machine counts one answer.

Progress: ``on_event`` is called, in the caller's task, with :class:`StepStarted`,
:class:`StepChunk` (streamed text, as it arrives), :class:`StepDone` (a call's trace entry,
answered or failed) and :class:`Decided` (how an ensemble aggregated).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import Any, Callable, Sequence, Union

import trio

from modelnet.errors import ModelNetError
from modelnet.identity import PeerID
from modelnet.protocols import plan as plans
from modelnet.protocols.plan import Decision, PlanNode, StepRequest, Trace, TraceStep

from .node import Answer, Node, NodeError

__all__ = [
    "Decided",
    "PlanEvent",
    "PlanFailed",
    "PlanResult",
    "StepChunk",
    "StepDone",
    "StepStarted",
    "execute",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepStarted:
    path: str
    role: str
    capability: str
    model: str | None
    timeout: float  # the call's share of the plan's deadline, seconds


@dataclasses.dataclass(frozen=True)
class StepChunk:
    path: str
    provider: PeerID
    text: str


@dataclasses.dataclass(frozen=True)
class StepDone:
    step: TraceStep


@dataclasses.dataclass(frozen=True)
class Decided:
    decision: Decision


PlanEvent = Union[StepStarted, StepChunk, StepDone, Decided]


@dataclasses.dataclass(frozen=True)
class PlanResult:
    output: Any
    trace: Trace
    decisions: tuple[Decision, ...]
    elapsed: float  # seconds, plan start to answer

    def verify(self, *, now: float | None = None) -> tuple[Decision, ...]:
        """:func:`~modelnet.protocols.plan.verify_trace` of this result's trace, by its asker."""
        return plans.verify_trace(self.trace, asker=self.trace.asker, now=now)


class PlanFailed(NodeError):
    """The plan could not produce an answer; ``trace`` records every call made."""

    def __init__(self, message: str, trace: Trace, decisions: Sequence[Decision] = ()) -> None:
        super().__init__(message)
        self.trace = trace
        self.decisions = tuple(decisions)


async def execute(
    node: Node,
    plan: PlanNode,
    text: str,
    *,
    timeout: float | None = None,
    on_event: Callable[[PlanEvent], None] | None = None,
    anonymous: bool = False,
) -> PlanResult:
    """Run ``plan`` on ``text`` through ``node``; :class:`PlanFailed` if it cannot answer.

    ``anonymous``: every step is asked without the node's organisation authority
    (:meth:`Node.ask`).

    :class:`~modelnet.protocols.plan.InvalidPlan` if the plan is not valid (checked first).
    """
    plans.validate(plan)
    budget = timeout if timeout is not None else node.config.request_timeout * plans.critical_length(plan)
    started = trio.current_time()
    deadline = started + budget
    emit = on_event or (lambda event: None)
    run = plans.PlanRun(plan, text)
    steps: list[TraceStep] = []
    reported = 0
    # Outcomes come back through one channel, so the machine is only touched here.
    send, receive = trio.open_memory_channel[tuple[StepRequest, Union[Answer, str]]](math.inf)

    async def call(request: StepRequest, exclude: frozenset[PeerID]) -> None:
        outcome: Answer | str
        share = (deadline - trio.current_time()) / (1 + request.after)
        if share <= 0:
            outcome = "the plan's deadline passed before this call"
        else:
            on_chunk = None
            if on_event is not None:

                def on_chunk(peer: PeerID, piece: str) -> None:
                    emit(StepChunk(request.path, peer, piece))

            try:
                outcome = await node.ask(
                    request.capability,
                    request.input,
                    dict(request.params),
                    model=request.model,
                    timeout=share,
                    on_chunk=on_chunk,
                    exclude=exclude,
                    anonymous=anonymous,
                )
            except ModelNetError as exc:  # NoProvider, RequestFailed, a refused input
                outcome = str(exc) or type(exc).__name__
        await send.send((request, outcome))

    async def call_group(requests: list[StepRequest]) -> None:
        # One lookup for the group; member i keeps its own preferred provider and leaves
        # the others' to them.
        first = requests[0]
        try:
            found = await node.find(first.capability, anonymous=anonymous)
        except ModelNetError as exc:
            logger.info("looking up %s for %s failed: %s", first.capability, first.group, exc)
            found = []
        ranked = [p.peer_id for p in found if first.model is None or any(m.name == first.model for m in p.models)]
        preferred = ranked[: len(requests)]
        async with trio.open_nursery() as group:
            for request in requests:
                mine = preferred[request.group_index] if request.group_index < len(preferred) else None
                group.start_soon(call, request, frozenset(peer for peer in preferred if peer != mine))

    with trio.move_on_at(deadline + node.config.network_timeout):  # calls end by the deadline; this bounds a bug
        async with trio.open_nursery() as nursery:

            def launch() -> None:
                ready = run.requests()
                sizes = Counter(request.group for request in ready if request.group is not None)
                groups: dict[str, list[StepRequest]] = {}
                for request in ready:
                    share = (deadline - trio.current_time()) / (1 + request.after)
                    emit(StepStarted(request.path, request.role, request.capability, request.model, max(share, 0.0)))
                    if request.group is not None and sizes[request.group] > 1:
                        groups.setdefault(request.group, []).append(request)
                    else:
                        nursery.start_soon(call, request, frozenset())
                for members in groups.values():
                    nursery.start_soon(call_group, members)

            launch()
            while run.state == plans.RUNNING:
                request, outcome = await receive.receive()
                if isinstance(outcome, Answer):
                    step = TraceStep(
                        path=request.path,
                        capability=request.capability,
                        model=outcome.model,
                        provider=outcome.provider,
                        input_sha256=request.input_sha256,
                        output=outcome.output,
                        receipt=outcome.receipt,
                        elapsed=outcome.elapsed,
                        route=tuple(outcome.route),
                        forwards=tuple(outcome.forwards),
                    )
                    run.complete(request.path, outcome.output, provider=outcome.provider, model=outcome.model, receipt=outcome.receipt)
                else:
                    step = TraceStep(
                        path=request.path,
                        capability=request.capability,
                        model=request.model,
                        provider=None,
                        input_sha256=request.input_sha256,
                        error=outcome[: plans.MAX_ERROR_CHARS],
                    )
                    run.fail(request.path, step.error)
                steps.append(step)
                emit(StepDone(step))
                for decision in run.decisions[reported:]:
                    emit(Decided(decision))
                reported = len(run.decisions)
                launch()
            nursery.cancel_scope.cancel()
    # Past the deadline with calls still out (only a call that overran its own share):
    # record them as failed, so the trace still accounts for every call the plan made.
    while run.state == plans.RUNNING:
        for request in run.requests() + [r for r in run.pending if r.path not in {s.path for s in steps}]:
            step = TraceStep(
                request.path, request.capability, request.model, None, request.input_sha256, error="cancelled at the plan's deadline"
            )
            steps.append(step)
            run.fail(request.path, step.error)
    elapsed = trio.current_time() - started
    if run.state == plans.DONE:
        trace = Trace(plan, text, node.peer_id, tuple(steps), output=run.output)
        return PlanResult(run.output, trace, run.decisions, elapsed)
    error = run.error if run.state == plans.FAILED else f"the plan did not finish within {budget:g} s"
    raise PlanFailed(error, Trace(plan, text, node.peer_id, tuple(steps), error=error), run.decisions)
