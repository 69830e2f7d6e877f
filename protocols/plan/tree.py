"""The plan tree: steps, pipelines and ensembles with their aggregators, as frozen values.

- :class:`Step` — one routed request (a capability, optionally one model, parameters);
- :class:`Pipeline` — steps in series: the output of one is the whole input of the next;
- :class:`Ensemble` — the same input to several members in parallel, then one aggregator:
  :class:`Vote` (majority over canonical outputs), :class:`Judge` (a judge capability
  picks one candidate) or :class:`Synthesize` (a capability merges the candidates).

Members that are the same step (``step`` × ``k``) go to distinct providers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Union

from .. import reason
from ..capability import normalize_tag
from .errors import InvalidPlan

ROOT = "plan"  # the path of a plan's root node, the first word of every error path


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
