"""Collaborative plans: several capabilities working on one request, as data (sans-IO).

A plan is a tree, fixed before it runs: steps, pipelines of steps, and ensembles whose
members' answers an aggregator (vote, judge, synthesiser) turns into one. The package
follows the life of a plan:

- :mod:`.tree` — the plan tree (:class:`Step`, :class:`Pipeline`, :class:`Ensemble`, …);
- :mod:`.form` — its dict form (plan files) and wire form, both validated;
- :mod:`.handoff` — what travels between steps: hand-off text and the candidates document;
- :mod:`.run` — :class:`PlanRun`, the state machine that decides which calls to make;
- :mod:`.trace` — provenance: :class:`Trace` and :func:`verify_trace`.

Everything is re-exported here: ``from modelnet.protocols import plan`` and
``plan.Step``, ``plan.PlanRun``, ``plan.verify_trace`` are the way to use it.
"""

from .errors import InvalidPlan, InvalidTrace
from .form import (
    MAX_FIELD_CHARS,
    MAX_MEMBERS,
    MAX_NESTING,
    MAX_PIPELINE,
    MAX_PLAN_BYTES,
    MAX_STEPS,
    PLAN_VERSION,
    decode,
    encode,
    from_dict,
    to_dict,
    validate,
)
from .handoff import CANDIDATES_SCHEMA, Candidate, candidates_document, canonical_json, handoff_text
from .run import (
    DONE,
    FAILED,
    JUDGE,
    MEMBER,
    RUNNING,
    STEP,
    SYNTHESIZE,
    Decision,
    PlanRun,
    StepRequest,
)
from .trace import MAX_ERROR_CHARS, MAX_PATH_CHARS, MAX_TRACE_BYTES, TRACE_VERSION, Trace, TraceStep, verify_trace
from .tree import (
    ROOT,
    Aggregate,
    Ensemble,
    Judge,
    Pipeline,
    PlanNode,
    Step,
    Synthesize,
    Vote,
    count_steps,
    critical_length,
)

__all__ = [
    "CANDIDATES_SCHEMA",
    "DONE",
    "FAILED",
    "JUDGE",
    "MAX_ERROR_CHARS",
    "MAX_FIELD_CHARS",
    "MAX_MEMBERS",
    "MAX_NESTING",
    "MAX_PATH_CHARS",
    "MAX_PIPELINE",
    "MAX_PLAN_BYTES",
    "MAX_STEPS",
    "MAX_TRACE_BYTES",
    "MEMBER",
    "PLAN_VERSION",
    "ROOT",
    "RUNNING",
    "STEP",
    "SYNTHESIZE",
    "TRACE_VERSION",
    "Aggregate",
    "Candidate",
    "Decision",
    "Ensemble",
    "InvalidPlan",
    "InvalidTrace",
    "Judge",
    "Pipeline",
    "PlanNode",
    "PlanRun",
    "Step",
    "StepRequest",
    "Synthesize",
    "Trace",
    "TraceStep",
    "Vote",
    "candidates_document",
    "canonical_json",
    "count_steps",
    "critical_length",
    "decode",
    "encode",
    "from_dict",
    "handoff_text",
    "to_dict",
    "validate",
    "verify_trace",
]
