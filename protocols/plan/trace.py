"""Provenance: a plan's :class:`Trace` (every call it made, with receipts), its wire form,
and :func:`verify_trace`, which re-runs the plan from the trace and checks everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

from modelnet.identity import IdentityError, PeerID, canonical

from .. import forward, reason
from ..errors import ProtocolError
from .errors import InvalidPlan, InvalidTrace
from .form import MAX_STEPS, from_dict, to_dict
from .run import DONE, RUNNING, Decision, PlanRun, StepRequest
from .tree import PlanNode

TRACE_VERSION = 1
MAX_TRACE_BYTES = 64 << 20  # a trace holds every step's output (each up to a frame)
MAX_ERROR_CHARS = 1024
MAX_PATH_CHARS = 1024


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
