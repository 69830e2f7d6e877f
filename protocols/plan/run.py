"""Running a plan: :class:`PlanRun`, the plan's state machine.

It hands out :class:`StepRequest` values, is told each one's outcome
(:meth:`PlanRun.complete` / :meth:`PlanRun.fail`) and decides what runs next and what the
answer is. The network executor (``modelnet.p2p.plans``) drives it with routed requests;
:func:`~modelnet.protocols.plan.verify_trace` drives the same machine from a recorded
trace, checking every receipt, so a verifier recomputes the chain, every vote and every
judge's choice instead of trusting them.

Failed members (decided here, documented for users): an ensemble needs ``quorum`` members
to answer (default: a strict majority of its members). A vote's winner needs at least
``quorum`` identical votes too, so by default a failed member never sinks a vote that a
majority still carries, and two members can never both "win". A quorum lowered to half or
less can tie; a tie fails the ensemble rather than picking arbitrarily. A judge's or
synthesiser's failure fails its ensemble.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Mapping

from modelnet.identity import PeerID, canonical

from .. import reason
from .errors import InvalidTrace
from .handoff import Candidate, candidates_document, canonical_json, handoff_text
from .tree import ROOT, Aggregate, Ensemble, Judge, Pipeline, PlanNode, Step, Synthesize, Vote, critical_length

# a request's role
STEP = "step"
MEMBER = "member"
JUDGE = "judge"
SYNTHESIZE = "synthesize"
# a run's state
RUNNING = "running"
DONE = "done"
FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """One model call the plan wants made now."""

    path: str
    role: str  # STEP, MEMBER, JUDGE or SYNTHESIZE
    capability: str
    model: str | None
    params: Mapping[str, reason.Param]
    input: str
    after: int  # model calls in series still to come after this one (for sharing the deadline)
    group: str | None = None  # members with the same group are the same step: distinct providers
    group_index: int = 0  # this request's place in its group

    @property
    def input_sha256(self) -> bytes:
        return reason.input_digest(self.input)


@dataclasses.dataclass(frozen=True)
class Decision:
    """How an ensemble decided: what was counted or chosen, and by what."""

    path: str
    aggregate: str  # "vote", "judge" or "synthesize"
    ok: bool
    detail: str  # one human line, e.g. "2 of 3 members agree"
    chosen: str | None = None  # path of the member whose output was taken (vote, judge)
    tally: tuple[tuple[str, int], ...] = ()  # vote: (canonical JSON of the value, votes), best first


class _Parent:
    def child_done(self, child: "_Act", output: Any, answer: Candidate | None) -> None: ...
    def child_failed(self, child: "_Act", why: str) -> None: ...


class _Act:
    def __init__(self, run: "PlanRun", parent: _Parent, path: str, after: int) -> None:
        self.run, self.parent, self.path, self.after = run, parent, path, after

    def start(self, text: str) -> None:
        raise NotImplementedError


class _StepAct(_Act):
    def __init__(self, run, parent, path, after, step: Step, role: str, group: str | None = None, index: int = 0) -> None:
        super().__init__(run, parent, path, after)
        self.step, self.role, self.group, self.index = step, role, group, index

    def start(self, text: str) -> None:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > reason.MAX_INPUT_BYTES:
            self.parent.child_failed(self, f"{self.path}: its input of {size} bytes exceeds {reason.MAX_INPUT_BYTES}")
            return
        request = StepRequest(
            self.path, self.role, self.step.capability, self.step.model, self.step.params, text, self.after, self.group, self.index
        )
        self.run._want(request, self)


class _PipelineAct(_Act, _Parent):
    def __init__(self, run, parent, path, after, plan: Pipeline) -> None:
        super().__init__(run, parent, path, after)
        remaining = [critical_length(step) for step in plan.steps]
        self.children = [
            _activate(run, self, f"{path}.pipeline[{i}]", after + sum(remaining[i + 1 :]), step)
            for i, step in enumerate(plan.steps)
        ]

    def start(self, text: str) -> None:
        self.children[0].start(text)

    def child_done(self, child, output, answer) -> None:
        index = self.children.index(child)
        if index + 1 == len(self.children):
            self.parent.child_done(self, output, answer)
        else:
            self.children[index + 1].start(handoff_text(output))

    def child_failed(self, child, why: str) -> None:
        self.parent.child_failed(self, why)


class _EnsembleAct(_Act, _Parent):
    def __init__(self, run, parent, path, after, plan: Ensemble) -> None:
        super().__init__(run, parent, path, after)
        self.plan = plan
        extra = 0 if isinstance(plan.aggregate, Vote) else 1
        groups: dict[Any, str] = {}  # step identity -> the path of its first member
        self.children: list[_Act] = []
        counts: Counter[str] = Counter()
        for i, member in enumerate(plan.members):
            member_path = f"{path}.ensemble.members[{i}]"
            if isinstance(member, Step):
                key = _step_key(member)
                group = groups.setdefault(key, member_path)
                self.children.append(_StepAct(run, self, member_path, after + extra, member, MEMBER, group, counts[group]))
                counts[group] += 1
            else:
                self.children.append(_activate(run, self, member_path, after + extra, member))
        self.outcomes: list[tuple[Any, Candidate | None] | str | None] = [None] * len(self.children)
        self.candidates: list[Candidate] = []
        self.text = ""

    def start(self, text: str) -> None:
        self.text = text
        for child in self.children:
            child.start(text)

    def child_done(self, child, output, answer) -> None:
        index = self.children.index(child)
        if isinstance(child, _StepAct) and answer is not None and answer.provider is not None:
            for other, outcome in zip(self.children, self.outcomes):
                if (
                    isinstance(other, _StepAct)
                    and other.group == child.group
                    and isinstance(outcome, tuple)
                    and outcome[1] is not None
                    and outcome[1].provider == answer.provider
                ):
                    # One provider, one vote: a second answer of the same step from the
                    # same provider is not a second opinion.
                    self.child_failed(child, f"the same provider as {other.path} answered")
                    return
        self.outcomes[index] = (output, answer)
        self._settle()

    def child_failed(self, child, why: str) -> None:
        self.outcomes[self.children.index(child)] = why
        self._settle()

    def _settle(self) -> None:
        if any(outcome is None for outcome in self.outcomes):
            return
        answered = [
            (child, outcome) for child, outcome in zip(self.children, self.outcomes) if isinstance(outcome, tuple)
        ]
        needed = self.plan.needed
        name = _aggregate_name(self.plan.aggregate)
        if len(answered) < needed:
            failures = "; ".join(o for o in self.outcomes if isinstance(o, str))
            self._decide(False, name, f"only {len(answered)} of {len(self.children)} members answered, {needed} needed ({failures})")
            return
        # A candidate is named by its member's path and carries the provenance of the
        # call that produced its output (a nested member's last or chosen step).
        self.candidates = [
            dataclasses.replace(answer, path=child.path, output=output)
            if answer is not None
            else Candidate(child.path, output, None, None, None)
            for child, (output, answer) in answered
        ]
        aggregate = self.plan.aggregate
        if isinstance(aggregate, Vote):
            self._vote(aggregate, answered, needed)
            return
        role = JUDGE if isinstance(aggregate, Judge) else SYNTHESIZE
        self.aggregator = _StepAct(self.run, _AggregatorParent(self), f"{self.path}.ensemble.{role}", self.after, aggregate.step, role)
        self.aggregator.start(candidates_document(self.text, self.candidates))

    def _vote(self, vote: Vote, answered, needed: int) -> None:
        ballots: dict[str, list[_Act]] = {}
        spoiled = []
        for child, (output, _) in answered:
            if vote.field is None:
                value = output
            elif isinstance(output, dict) and vote.field in output:
                value = output[vote.field]
            else:
                spoiled.append(child.path)
                continue
            ballots.setdefault(canonical_json(value), []).append(child)
        tally = tuple(sorted(((value, len(voters)) for value, voters in ballots.items()), key=lambda item: -item[1]))
        total = len(self.children)
        note = f"; no {vote.field!r} in {', '.join(spoiled)}" if spoiled else ""
        if not tally or tally[0][1] < needed:
            best = tally[0][1] if tally else 0
            self._decide(False, "vote", f"no majority: at most {best} of {total} agree, {needed} needed{note}", tally=tally)
            return
        if len(tally) > 1 and tally[1][1] == tally[0][1]:
            self._decide(False, "vote", f"tie: {tally[0][1]} votes each for {len(ballots)} answers{note}", tally=tally)
            return
        winner = ballots[tally[0][0]][0]
        output = dict(answered)[winner][0]
        self._decide(True, "vote", f"{tally[0][1]} of {total} members agree{note}", chosen=winner.path, tally=tally, output=output)

    def aggregated(self, output: Any, answer: Candidate | None) -> None:
        if isinstance(self.plan.aggregate, Synthesize):
            self._decide(
                True, "synthesize", f"synthesised from {len(self.candidates)} candidates", output=output, answer=answer
            )
            return
        choice = output.get("choice") if isinstance(output, dict) else None
        if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(self.candidates):
            self._decide(False, "judge", f"the judge's answer names no candidate 0..{len(self.candidates) - 1}: {canonical_json(output)[:200]}")
            return
        chosen = self.candidates[choice]
        self._decide(True, "judge", f"the judge chose candidate {choice} of {len(self.candidates)}", chosen=chosen.path, output=chosen.output)

    def aggregator_failed(self, why: str) -> None:
        self._decide(False, _aggregate_name(self.plan.aggregate), f"the {_aggregate_name(self.plan.aggregate)} step failed: {why}")

    def _decide(self, ok: bool, name: str, detail: str, *, chosen=None, tally=(), output=None, answer=None) -> None:
        self.run._decisions.append(Decision(self.path, name, ok, detail, chosen, tally))
        if ok:
            if answer is None:
                answer = next((c for c in self.candidates if c.path == chosen), None)
            self.parent.child_done(self, output, answer)
        else:
            self.parent.child_failed(self, f"{self.path}: {detail}")


class _AggregatorParent(_Parent):
    def __init__(self, ensemble: _EnsembleAct) -> None:
        self.ensemble = ensemble

    def child_done(self, child, output, answer) -> None:
        self.ensemble.aggregated(output, answer)

    def child_failed(self, child, why: str) -> None:
        self.ensemble.aggregator_failed(why)


def _step_key(step: Step) -> Any:
    return (step.capability, step.model, canonical.encode(dict(step.params)))


def _aggregate_name(aggregate: Aggregate) -> str:
    return "vote" if isinstance(aggregate, Vote) else "judge" if isinstance(aggregate, Judge) else "synthesize"


def _activate(run: "PlanRun", parent: _Parent, path: str, after: int, node: PlanNode) -> _Act:
    if isinstance(node, Step):
        return _StepAct(run, parent, path, after, node, STEP)
    if isinstance(node, Pipeline):
        return _PipelineAct(run, parent, path, after, node)
    return _EnsembleAct(run, parent, path, after, node)


class PlanRun(_Parent):
    """A plan's state machine: which model calls to make, and what comes of their answers.

    ::

        run = PlanRun(plan, text)
        while run.state == RUNNING:
            for request in run.requests():      # calls that may start now
                ...                              # later: run.complete(path, output, ...)
            ...                                  #     or run.fail(path, why)
        run.output / run.error

    Answers may come in any order; nothing here reads a clock or does I/O.
    """

    def __init__(self, plan: PlanNode, text: str) -> None:
        self.plan = plan
        self.input = text
        self.state = RUNNING
        self.output: Any = None
        self.error: str | None = None
        self._ready: list[StepRequest] = []
        self._waiting: dict[str, tuple[StepRequest, _StepAct]] = {}
        self._decisions: list[Decision] = []
        self._root = _activate(self, self, ROOT, 0, plan)
        self._root.start(text)

    @property
    def decisions(self) -> tuple[Decision, ...]:
        return tuple(self._decisions)

    @property
    def pending(self) -> tuple[StepRequest, ...]:
        """Requests handed out and not yet answered."""
        return tuple(request for request, _ in self._waiting.values())

    def requests(self) -> list[StepRequest]:
        """The requests that may start now (each handed out once)."""
        ready, self._ready = self._ready, []
        return ready

    def complete(
        self, path: str, output: Any, *, provider: PeerID | None = None, model: str | None = None, receipt: bytes | None = None
    ) -> None:
        """The request at ``path`` was answered with ``output``."""
        _, act = self._take(path)
        act.parent.child_done(act, output, Candidate(path, output, provider, model, receipt))

    def fail(self, path: str, why: str) -> None:
        """The request at ``path`` failed (every provider tried, or the deadline passed)."""
        _, act = self._take(path)
        act.parent.child_failed(act, f"{path}: {why}")

    def _take(self, path: str) -> tuple[StepRequest, _StepAct]:
        if self.state != RUNNING:
            raise InvalidTrace(path, f"the plan already {self.state}")
        taken = self._waiting.pop(path, None)
        if taken is None:
            raise InvalidTrace(path, "no such request is pending")
        return taken

    def _want(self, request: StepRequest, act: _StepAct) -> None:
        self._waiting[request.path] = (request, act)
        self._ready.append(request)

    # the root's parent
    def child_done(self, child, output, answer) -> None:
        self.state, self.output = DONE, output

    def child_failed(self, child, why: str) -> None:
        self.state, self.error = FAILED, why
