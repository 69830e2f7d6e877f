"""Plans served as gateway models: a plan file's tree run by :func:`modelnet.p2p.plans.execute`.

A registered plan is a ``model`` like any other. The gateway's node executes it (each
step routed to whichever provider answers it best) and the answer's ``modelnet`` object
carries the plan's provenance (:func:`extension`): every call with its provider, model
and provider-signed receipt, how each ensemble decided, and ``trace``, the lossless trace
(base64 of its canonical msgpack), which a client checks offline with

    trace = plan.Trace.decode(base64.b64decode(answer.model_extra["modelnet"]["trace"]))
    plan.verify_trace(trace, asker=PeerID.from_base58(answer.model_extra["modelnet"]["asker"]))

Streaming: a plan streams its final output, in one piece, once the plan has it. Steps'
own chunks are not the answer (a pipeline's early steps feed the later ones; an
ensemble's members answer at once and all but one are discarded), so sending them as
assistant text would show text the answer does not contain. The HTTP status therefore
waits for the whole plan, and a failed plan is a real status, never a broken stream.
"""

from __future__ import annotations

import base64
from typing import Any

from modelnet.identity import PeerID
from modelnet.protocols import plan as plans
from modelnet.protocols.plan import Decision, Trace

PLAN_TYPES = (plans.Step, plans.Pipeline, plans.Ensemble)


def is_plan(value: Any) -> bool:
    """Whether ``value`` is a plan tree (rather than a plan runner)."""
    return isinstance(value, PLAN_TYPES)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _peer(peer: PeerID | None) -> str | None:
    return None if peer is None else str(peer)


def extension(name: str, trace: Trace, decisions: tuple[Decision, ...], elapsed: float | None = None) -> dict[str, Any]:
    """The ``modelnet`` object of a plan's answer (or of its failure): its provenance."""
    return {
        "kind": "plan",
        "plan": name,
        "asker": str(trace.asker),
        "local": False,
        "elapsed_ms": None if elapsed is None else elapsed * 1000,
        "steps": [
            {
                "path": step.path,
                "capability": step.capability,
                "provider": _peer(step.provider),
                "model": step.model,
                "elapsed_ms": step.elapsed * 1000,
                "receipt": _b64(step.receipt),
                "route": [str(peer) for peer in step.route],
                "error": step.error,
            }
            for step in trace.steps
        ],
        "decisions": [
            {"path": d.path, "aggregate": d.aggregate, "ok": d.ok, "detail": d.detail, "chosen": d.chosen} for d in decisions
        ],
        "trace": _b64(trace.encode()),
    }
