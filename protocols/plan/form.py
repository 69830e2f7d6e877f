"""A plan's two forms: the dict form of plan files, and the wire form.

The dict form is what YAML/JSON plan files hold (:func:`from_dict`, :func:`to_dict`)::

    pipeline:
      - step: {capability: summarize, params: {sentences: 2}}
      - ensemble: {step: sentiment, k: 3, aggregate: {vote: {field: label}}}

The wire form is canonical msgpack of ``{"modelnet_plan": 1, "plan": <dict form>}``
(:func:`encode`, :func:`decode`), strict and capped in size, depth and step count.
Validation errors (:class:`InvalidPlan`) name the path of the offending node, e.g.
``plan.pipeline[1].ensemble.aggregate: unknown aggregator 'mean'``.
"""

from __future__ import annotations

from typing import Any, Mapping

from modelnet.identity import IdentityError, canonical

from ..errors import ProtocolError
from .errors import InvalidPlan
from .tree import ROOT, Aggregate, Ensemble, Judge, Pipeline, PlanNode, Step, Synthesize, Vote

PLAN_VERSION = 1
MAX_PLAN_BYTES = 64 << 10
MAX_NESTING = 8  # pipelines and ensembles inside each other
MAX_STEPS = 64  # model calls in one plan, aggregators included
MAX_PIPELINE = 32
MAX_MEMBERS = 16
MAX_FIELD_CHARS = 64


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


def validate(plan: PlanNode) -> PlanNode:
    """Check a plan built in code the way :func:`from_dict` checks a file; returns it."""
    from_dict(to_dict(plan))
    return plan
