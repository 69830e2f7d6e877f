"""Collaborative plans: several capabilities working on one request, as data (sans-IO).

A plan is a tree, fixed before it runs:

- :class:`Step` — one routed request (a capability, optionally one model, parameters);
- :class:`Pipeline` — steps in series: the output of one is the whole input of the next;
- :class:`Ensemble` — the same input to several members in parallel, then one aggregator:
  :class:`Vote` (majority over canonical outputs), :class:`Judge` (a judge capability
  picks one candidate) or :class:`Synthesize` (a capability merges the candidates).

Members that are the same step (``step`` × ``k``) go to distinct providers.

Forms. The dict form is what YAML/JSON plan files hold (:func:`from_dict`, :func:`to_dict`)::

    pipeline:
      - step: {capability: summarize, params: {sentences: 2}}
      - ensemble: {step: sentiment, k: 3, aggregate: {vote: {field: label}}}

The wire form is canonical msgpack of ``{"modelnet_plan": 1, "plan": <dict form>}``
(:func:`encode`, :func:`decode`), strict and capped in size, depth and step count.
Validation errors (:class:`InvalidPlan`) name the path of the offending node, e.g.
``plan.pipeline[1].ensemble.aggregate: unknown aggregator 'mean'``.

Guarding the chain. Outputs are data, never instructions: nothing here builds a prompt.
In a pipeline the next step's input is exactly the previous output (text as is, anything
else as canonical JSON, :func:`handoff_text`). A judge or synthesiser gets one JSON
document with a declared schema (:data:`CANDIDATES_SCHEMA`) holding the ensemble's input
and each candidate's output with its provider, model and digests. No output can add,
remove or name a step: which requests run is decided by the plan alone.

Running. :class:`PlanRun` is the plan's state machine: it hands out :class:`StepRequest`
values, is told each one's outcome (:meth:`PlanRun.complete` / :meth:`PlanRun.fail`) and
decides what runs next and what the answer is. The network executor
(``modelnet.p2p.plans``) drives it with routed requests; :func:`verify_trace` drives the
same machine from a recorded :class:`Trace`, checking every receipt, so a verifier
recomputes the chain, every vote and every judge's choice instead of trusting them.

Failed members (decided here, documented for users): an ensemble needs ``quorum`` members
to answer (default: a strict majority of its members). A vote's winner needs at least
``quorum`` identical votes too, so by default a failed member never sinks a vote that a
majority still carries, and two members can never both "win". A quorum lowered to half or
less can tie; a tie fails the ensemble rather than picking arbitrarily. A judge's or
synthesiser's failure fails its ensemble.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections import Counter
from typing import Any, Callable, Mapping, Sequence, Union

from modelnet.identity import IdentityError, PeerID, canonical

from . import forward, reason
from .capability import normalize_tag
from .errors import ProtocolError

PLAN_VERSION = 1
TRACE_VERSION = 1
MAX_PLAN_BYTES = 64 << 10
MAX_TRACE_BYTES = 64 << 20  # a trace holds every step's output (each up to a frame)
MAX_NESTING = 8  # pipelines and ensembles inside each other
MAX_STEPS = 64  # model calls in one plan, aggregators included
MAX_PIPELINE = 32
MAX_MEMBERS = 16
MAX_FIELD_CHARS = 64
MAX_ERROR_CHARS = 1024
MAX_PATH_CHARS = 1024
CANDIDATES_SCHEMA = "modelnet.candidates/1"
ROOT = "plan"


class InvalidPlan(ProtocolError):
    """A plan (dict, file or wire bytes) that is not valid; ``path`` names where."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


class InvalidTrace(ProtocolError):
    """A trace whose receipts, chaining or decisions do not check out; ``path`` names the step."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


# ---- the plan tree ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=True)
class Step:
    capability: str
    model: str | None = None
    params: Mapping[str, reason.Param] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "capability", normalize_tag(self.capability))
        if self.model is not None and (not isinstance(self.model, str) or not 1 <= len(self.model) <= reason.MAX_MODEL_CHARS):
            raise InvalidPlan("", f"model must be 1..{reason.MAX_MODEL_CHARS} chars")
        object.__setattr__(self, "params", reason._check_params(dict(self.params) if isinstance(self.params, Mapping) else self.params))


@dataclasses.dataclass(frozen=True)
class Vote:
    """Majority over canonical outputs; with ``field``, over ``output[field]`` of map outputs."""

    field: str | None = None


@dataclasses.dataclass(frozen=True)
class Judge:
    """A judge step gets the candidates document and answers ``{"choice": <index>, …}``."""

    step: Step = Step("judge")


@dataclasses.dataclass(frozen=True)
class Synthesize:
    """A synthesis step gets the candidates document; its output is the ensemble's."""

    step: Step = Step("synthesize")


Aggregate = Union[Vote, Judge, Synthesize]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    steps: tuple["PlanNode", ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))


@dataclasses.dataclass(frozen=True)
class Ensemble:
    members: tuple["PlanNode", ...]
    aggregate: Aggregate = Vote()
    quorum: int | None = None  # members that must answer (and votes that must agree)

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))

    @classmethod
    def replicate(cls, step: Step, k: int, aggregate: Aggregate = Vote(), quorum: int | None = None) -> "Ensemble":
        """The same step on ``k`` distinct providers."""
        return cls((step,) * k, aggregate, quorum)

    @property
    def needed(self) -> int:
        return self.quorum if self.quorum is not None else len(self.members) // 2 + 1


PlanNode = Union[Step, Pipeline, Ensemble]


def validate(plan: PlanNode) -> PlanNode:
    """Check a plan built in code the way :func:`from_dict` checks a file; returns it."""
    from_dict(to_dict(plan))
    return plan


def _calls(plan: PlanNode, members: Callable[[list[int]], int]) -> int:
    if isinstance(plan, Step):
        return 1
    if isinstance(plan, Pipeline):
        return sum(_calls(step, members) for step in plan.steps)
    extra = 0 if isinstance(plan.aggregate, Vote) else 1
    return members([_calls(member, members) for member in plan.members]) + extra


def critical_length(plan: PlanNode) -> int:
    """Model calls in series on the longest path: what a plan's deadline is shared by."""
    return _calls(plan, max)


def count_steps(plan: PlanNode) -> int:
    """Model calls the plan makes when every member answers."""
    return _calls(plan, sum)


# ---- dict form --------------------------------------------------------------------------


def _step_dict(step: Step) -> dict[str, Any]:
    out: dict[str, Any] = {"capability": step.capability}
    if step.model is not None:
        out["model"] = step.model
    if step.params:
        out["params"] = dict(step.params)
    return out


def to_dict(plan: PlanNode) -> dict[str, Any]:
    """The expanded dict form (what :func:`from_dict` reads back to an equal plan)."""
    if isinstance(plan, Step):
        return {"step": _step_dict(plan)}
    if isinstance(plan, Pipeline):
        return {"pipeline": [to_dict(step) for step in plan.steps]}
    if isinstance(plan, Ensemble):
        body: dict[str, Any]
        first = plan.members[0] if plan.members else None
        if len(plan.members) > 1 and isinstance(first, Step) and all(m == first for m in plan.members):
            body = {"step": _step_dict(first), "k": len(plan.members)}
        else:
            body = {"members": [to_dict(member) for member in plan.members]}
        aggregate = plan.aggregate
        if isinstance(aggregate, Vote):
            body["aggregate"] = {"vote": {} if aggregate.field is None else {"field": aggregate.field}}
        elif isinstance(aggregate, Judge):
            body["aggregate"] = {"judge": _step_dict(aggregate.step)}
        else:
            body["aggregate"] = {"synthesize": _step_dict(aggregate.step)}
        if plan.quorum is not None:
            body["quorum"] = plan.quorum
        return {"ensemble": body}
    raise InvalidPlan(ROOT, f"not a plan node: {type(plan).__name__}")


class _Reader:
    """Reads the dict form; every error names its path. Counts steps as it goes, so a
    YAML file whose aliases multiply one node stops at the cap, not after expanding."""

    def __init__(self) -> None:
        self.steps = 0

    def node(self, data: Any, path: str, depth: int) -> PlanNode:
        if depth > MAX_NESTING:
            raise InvalidPlan(path, f"plans nest at most {MAX_NESTING} deep")
        if not isinstance(data, Mapping):
            raise InvalidPlan(path, f"a plan node is a map with one of 'step', 'pipeline', 'ensemble', not {_kind(data)}")
        keys = sorted(str(key) for key in data)
        if len(keys) != 1 or keys[0] not in ("step", "pipeline", "ensemble"):
            raise InvalidPlan(path, f"a plan node has exactly one of 'step', 'pipeline', 'ensemble', not {keys}")
        (kind,) = keys
        body = data[kind]
        if kind == "step":
            return self.step(body, f"{path}.step")
        if kind == "pipeline":
            here = f"{path}.pipeline"
            if not isinstance(body, list) or not 1 <= len(body) <= MAX_PIPELINE:
                raise InvalidPlan(here, f"a pipeline is a list of 1..{MAX_PIPELINE} plan nodes")
            return Pipeline(tuple(self.node(item, f"{here}[{i}]", depth + 1) for i, item in enumerate(body)))
        return self.ensemble(body, f"{path}.ensemble", depth)

    def step(self, data: Any, path: str, default: str | None = None) -> Step:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise InvalidPlan(path, f"a plan makes at most {MAX_STEPS} model calls")
        if isinstance(data, str):
            data = {"capability": data}
        elif data is None and default is not None:
            data = {"capability": default}
        if not isinstance(data, Mapping):
            raise InvalidPlan(path, f"a step is a capability name or a map with 'capability', not {_kind(data)}")
        data = dict(data)
        if default is not None:
            data.setdefault("capability", default)
        _only(data, path, {"capability", "model", "params"})
        if "capability" not in data:
            raise InvalidPlan(path, "a step needs a 'capability'")
        params = data.get("params", {})
        if params is None:
            params = {}
        try:
            return Step(data["capability"], data.get("model"), params)
        except ProtocolError as exc:
            raise InvalidPlan(path, _reason(exc)) from None

    def ensemble(self, data: Any, path: str, depth: int) -> Ensemble:
        if not isinstance(data, Mapping):
            raise InvalidPlan(path, f"an ensemble is a map with 'members' or 'step' and 'k', not {_kind(data)}")
        _only(data, path, {"members", "step", "k", "aggregate", "quorum"})
        if ("members" in data) == ("step" in data):
            raise InvalidPlan(path, "an ensemble has either 'members' or 'step' with 'k'")
        if "members" in data:
            if "k" in data:
                raise InvalidPlan(f"{path}.k", "'k' goes with 'step', not with 'members'")
            members = data["members"]
            if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
                raise InvalidPlan(f"{path}.members", f"members is a list of 1..{MAX_MEMBERS} plan nodes")
            nodes = tuple(self.node(item, f"{path}.members[{i}]", depth + 1) for i, item in enumerate(members))
        else:
            k = data.get("k")
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_MEMBERS:
                raise InvalidPlan(f"{path}.k", f"k must be an integer in 1..{MAX_MEMBERS}, not {k!r}")
            step = self.step(data["step"], f"{path}.step")
            self.steps += k - 1
            if self.steps > MAX_STEPS:
                raise InvalidPlan(path, f"a plan makes at most {MAX_STEPS} model calls")
            nodes = (step,) * k
        aggregate = self.aggregate(data.get("aggregate", "vote"), f"{path}.aggregate")
        quorum = data.get("quorum")
        if quorum is not None and (isinstance(quorum, bool) or not isinstance(quorum, int) or not 1 <= quorum <= len(nodes)):
            raise InvalidPlan(f"{path}.quorum", f"quorum must be an integer in 1..{len(nodes)}, not {quorum!r}")
        return Ensemble(nodes, aggregate, quorum)

    def aggregate(self, data: Any, path: str) -> Aggregate:
        if isinstance(data, str):
            name, options = data, None
        elif isinstance(data, Mapping) and len(data) == 1:
            ((name, options),) = data.items()
        else:
            raise InvalidPlan(path, "an aggregator is 'vote', 'judge' or 'synthesize', or a map of one of them to its options")
        if name == "vote":
            if options is None:
                options = {}
            if not isinstance(options, Mapping):
                raise InvalidPlan(f"{path}.vote", f"vote options are a map, not {_kind(options)}")
            _only(options, f"{path}.vote", {"field"})
            field = options.get("field")
            if field is not None and (not isinstance(field, str) or not 1 <= len(field) <= MAX_FIELD_CHARS):
                raise InvalidPlan(f"{path}.vote.field", f"field must be a name of 1..{MAX_FIELD_CHARS} chars")
            return Vote(field)
        if name == "judge":
            return Judge(self.step(options, f"{path}.judge", default="judge"))
        if name == "synthesize":
            return Synthesize(self.step(options, f"{path}.synthesize", default="synthesize"))
        raise InvalidPlan(path, f"unknown aggregator {name!r}; one of 'vote', 'judge', 'synthesize'")


def _only(data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        raise InvalidPlan(path, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, InvalidPlan) else str(exc)


def from_dict(data: Any) -> PlanNode:
    """A plan from its dict form (a parsed YAML or JSON file); :class:`InvalidPlan` otherwise."""
    return _Reader().node(data, ROOT, 1)


def encode(plan: PlanNode) -> bytes:
    body = canonical.encode({"modelnet_plan": PLAN_VERSION, "plan": to_dict(plan)})
    if len(body) > MAX_PLAN_BYTES:
        raise InvalidPlan(ROOT, f"the encoded plan is {len(body)} bytes, over {MAX_PLAN_BYTES}")
    return body


def decode(data: bytes) -> PlanNode:
    """A plan from its wire form; :class:`InvalidPlan` for anything else."""
    try:
        envelope = canonical.decode(data, max_size=MAX_PLAN_BYTES)
    except IdentityError as exc:
        raise InvalidPlan(ROOT, f"malformed plan: {exc}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"modelnet_plan", "plan"}:
        raise InvalidPlan(ROOT, "a plan on the wire is a map of 'modelnet_plan' and 'plan'")
    if envelope["modelnet_plan"] != PLAN_VERSION or isinstance(envelope["modelnet_plan"], bool):
        raise InvalidPlan(ROOT, f"unsupported plan version {envelope['modelnet_plan']!r}")
    return from_dict(envelope["plan"])


# ---- what travels between steps ---------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not an output value")


def canonical_json(value: Any) -> str:
    """One JSON text per value (sorted keys, no spaces), so digests can be recomputed."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def handoff_text(output: Any) -> str:
    """The next pipeline step's whole input: text as is, any other output as canonical JSON."""
    return output if isinstance(output, str) else canonical_json(output)


@dataclasses.dataclass(frozen=True)
class Candidate:
    path: str
    output: Any
    provider: PeerID | None
    model: str | None
    receipt: bytes | None


def candidates_document(text: str, candidates: Sequence[Candidate]) -> str:
    """The input of a judge or synthesiser: JSON of schema :data:`CANDIDATES_SCHEMA`.

    ``{"schema", "input", "candidates": [{"index", "path", "model", "provider", "output",
    "output_sha256", "receipt_sha256"}]}``; ``choice`` in a judge's answer is an ``index``.
    """
    return canonical_json(
        {
            "schema": CANDIDATES_SCHEMA,
            "input": text,
            "candidates": [
                {
                    "index": index,
                    "path": candidate.path,
                    "model": candidate.model,
                    "provider": None if candidate.provider is None else str(candidate.provider),
                    "output": candidate.output,
                    "output_sha256": reason.output_digest(candidate.output).hex(),
                    "receipt_sha256": None if candidate.receipt is None else hashlib.sha256(candidate.receipt).hexdigest(),
                }
                for index, candidate in enumerate(candidates)
            ],
        }
    )


# ---- running: the state machine ---------------------------------------------------------

STEP = "step"
MEMBER = "member"
JUDGE = "judge"
SYNTHESIZE = "synthesize"
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


# ---- provenance -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TraceStep:
    """One model call of a plan, as the asker recorded it."""

    path: str
    capability: str
    model: str | None  # the model that answered (or was asked for, if it failed)
    provider: PeerID | None
    input_sha256: bytes
    output: Any = None
    receipt: bytes | None = None  # the provider-signed receipt; None if the call failed
    elapsed: float = 0.0  # seconds, as the asker measured
    error: str | None = None
    route: tuple[PeerID, ...] = ()  # forwarders between the asker and the provider
    forwards: tuple[bytes, ...] = ()  # their signed forward statements

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass(frozen=True)
class Trace:
    """A plan's whole provenance: the plan, its input, every call in the order they ended,
    and the final output (or error)."""

    plan: PlanNode
    input: str
    asker: PeerID
    steps: tuple[TraceStep, ...]
    output: Any = None
    error: str | None = None

    def encode(self) -> bytes:
        body = {
            "modelnet_trace": TRACE_VERSION,
            "plan": to_dict(self.plan),
            "input": self.input,
            "asker": self.asker.bytes,
            "steps": [_step_wire(step) for step in self.steps],
            "output": self.output,
            "error": self.error,
        }
        return canonical.encode(body)

    @classmethod
    def decode(cls, data: bytes) -> "Trace":
        """A trace from :meth:`encode`'s bytes; :class:`InvalidTrace` for anything else."""
        try:
            body = canonical.decode(data, max_size=MAX_TRACE_BYTES)
        except IdentityError as exc:
            raise InvalidTrace("", f"malformed trace: {exc}") from None
        try:
            if not isinstance(body, dict) or body.get("modelnet_trace") != TRACE_VERSION:
                raise InvalidTrace("", "not a version-1 trace")
            steps = body.get("steps")
            if not isinstance(steps, list) or len(steps) > 2 * MAX_STEPS:
                raise InvalidTrace("", f"steps must be a list of at most {2 * MAX_STEPS}")
            return cls(
                plan=from_dict(body.get("plan")),
                input=_typed(body, "input", str),
                asker=PeerID.from_bytes(_typed(body, "asker", bytes)),
                steps=tuple(_step_from_wire(step) for step in steps),
                output=body.get("output"),
                error=_error_text(body.get("error")),
            )
        except (InvalidPlan, IdentityError) as exc:
            raise InvalidTrace("", f"malformed trace: {exc}") from None


def _step_wire(step: TraceStep) -> dict[str, Any]:
    return {
        "path": step.path,
        "capability": step.capability,
        "model": step.model,
        "provider": None if step.provider is None else step.provider.bytes,
        "input_sha256": step.input_sha256,
        "output": step.output,
        "receipt": step.receipt,
        "elapsed": float(step.elapsed),
        "error": step.error,
        "route": [peer.bytes for peer in step.route],
        "forwards": list(step.forwards),
    }


def _typed(body: Mapping[str, Any], name: str, kind: type, *, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InvalidTrace("", f"field {name!r} must be a {kind.__name__}")
    return value


def _error_text(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_ERROR_CHARS * 4):
        raise InvalidTrace("", "error must be text")
    return value


def _step_from_wire(data: Any) -> TraceStep:
    if not isinstance(data, dict):
        raise InvalidTrace("", "a trace step is a map")
    path = _typed(data, "path", str)
    if not 1 <= len(path) <= MAX_PATH_CHARS:
        raise InvalidTrace("", "a step path is 1..1024 chars")
    provider = _typed(data, "provider", bytes, optional=True)
    digest = _typed(data, "input_sha256", bytes)
    if len(digest) != 32:
        raise InvalidTrace(path, "input_sha256 must be 32 bytes")
    elapsed = data.get("elapsed")
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed < 1e9:
        raise InvalidTrace(path, "elapsed must be a number of seconds")
    model = _typed(data, "model", str, optional=True)
    route = data.get("route", [])
    forwards = data.get("forwards", [])
    if not isinstance(route, list) or not isinstance(forwards, list) or len(route) > 32 or len(forwards) > 32:
        raise InvalidTrace(path, "route and forwards are lists of at most 32")
    if not all(isinstance(item, bytes) for item in route + forwards):
        raise InvalidTrace(path, "route and forwards hold bytes")
    return TraceStep(
        path=path,
        capability=_typed(data, "capability", str),
        model=model,
        provider=None if provider is None else PeerID.from_bytes(provider),
        input_sha256=digest,
        output=data.get("output"),
        receipt=_typed(data, "receipt", bytes, optional=True),
        elapsed=float(elapsed),
        error=_error_text(data.get("error")),
        route=tuple(PeerID.from_bytes(peer) for peer in route),
        forwards=tuple(forwards),
    )


def verify_trace(trace: Trace, *, asker: PeerID, now: float | None = None) -> tuple[Decision, ...]:
    """Re-run the plan from the trace and check everything; raise :class:`InvalidTrace`.

    Every answered call's receipt must verify (signed by the provider named, unexpired at
    ``now`` when given, issued to ``asker``) and commit to the capability, the model, the
    input the plan semantics give that call (so step n+1's input digest is the digest of
    what step n output, and a judge's input is the document of its candidates) and the
    recorded output. Votes and judge choices are recomputed; the final output must be
    what the plan makes of the recorded answers; no receipt may be used twice and no
    recorded call may be one the plan never made. Returns the recomputed decisions.
    """
    if trace.asker != asker:
        raise InvalidTrace("", f"the trace was made by {trace.asker}, not {asker}")
    entries: dict[str, TraceStep] = {}
    for step in trace.steps:
        if step.path in entries:
            raise InvalidTrace(step.path, "recorded twice")
        entries[step.path] = step
    run = PlanRun(trace.plan, trace.input)
    seen: set[bytes] = set()
    while run.state == RUNNING:
        requests = run.requests()
        if not requests:
            raise InvalidTrace("", "the plan stalled")  # cannot happen: every request is answered below
        for request in requests:
            entry = entries.pop(request.path, None)
            if entry is None:
                raise InvalidTrace(request.path, "the plan made this call but the trace has no record of it")
            _check_entry(request, entry, asker, now, seen)
            if entry.error is not None:
                run.fail(request.path, entry.error)
            else:
                run.complete(request.path, entry.output, provider=entry.provider, model=entry.model, receipt=entry.receipt)
    if entries:
        raise InvalidTrace(sorted(entries)[0], "the trace records a call the plan never made")
    if run.state == DONE:
        if trace.error is not None:
            raise InvalidTrace("", "the trace says the plan failed, but its answers carry it")
        if _canonical(run.output) != _canonical(trace.output):
            raise InvalidTrace("", "the final output is not what the plan makes of the recorded answers")
    elif trace.error is None:
        raise InvalidTrace("", f"the trace claims an output, but the plan failed: {run.error}")
    return run.decisions


def _canonical(value: Any) -> bytes:
    try:
        return reason.encode_output(value)
    except ProtocolError as exc:
        raise InvalidTrace("", f"an output cannot be encoded: {exc}") from None


def _check_entry(request: StepRequest, entry: TraceStep, asker: PeerID, now: float | None, seen: set[bytes]) -> None:
    path = request.path
    if entry.capability != request.capability:
        raise InvalidTrace(path, f"records capability {entry.capability!r}, the plan asks {request.capability!r}")
    if entry.input_sha256 != request.input_sha256:
        raise InvalidTrace(path, "records another input than the plan gave this call")
    if entry.error is not None:
        return
    if entry.receipt is None or entry.provider is None or entry.model is None:
        raise InvalidTrace(path, "an answered call needs its provider, model and receipt")
    if request.model is not None and entry.model != request.model:
        raise InvalidTrace(path, f"answered by model {entry.model!r}, the plan asks {request.model!r}")
    try:
        receipt = reason.open_receipt(entry.receipt, provider=entry.provider, now=now)
        client = asker
        if entry.forwards or entry.route:
            # Forwarded: each forwarder signed that it passed this request on for its
            # client; the receipt names the last forwarder, the chain leads back to us.
            if not entry.route:
                raise InvalidTrace(path, "forward statements without a route")
            route, provider = forward.check_route(
                entry.forwards, request_id=receipt.request_id, asker=asker, first_hop=entry.route[0], receipt=entry.receipt
            )
            if route != entry.route or provider != entry.provider:
                raise InvalidTrace(path, "the forward statements describe another route")
            client = route[-1]
    except (IdentityError, ProtocolError) as exc:
        if isinstance(exc, InvalidTrace):
            raise
        raise InvalidTrace(path, f"the receipt does not verify: {exc}") from None
    if receipt.client != client:
        raise InvalidTrace(path, "the receipt was issued to another asker")
    if receipt.capability != request.capability or receipt.model != entry.model:
        raise InvalidTrace(path, "the receipt is for another capability or model")
    if receipt.input_sha256 != request.input_sha256:
        raise InvalidTrace(path, "the receipt commits to another input than the plan gave this call")
    if receipt.output_sha256 != hashlib.sha256(_canonical(entry.output)).digest():
        raise InvalidTrace(path, "the recorded output is not the one the receipt commits to")
    if receipt.request_id in seen:
        raise InvalidTrace(path, "the same receipt answers two calls")
    seen.add(receipt.request_id)
