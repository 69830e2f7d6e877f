"""What travels between steps: the hand-off text of a pipeline, the candidates document.

Outputs are data, never instructions: nothing here builds a prompt. In a pipeline the next
step's input is exactly the previous output (text as is, anything else as canonical JSON,
:func:`handoff_text`). A judge or synthesiser gets one JSON document with a declared schema
(:data:`CANDIDATES_SCHEMA`) holding the ensemble's input and each candidate's output with
its provider, model and digests. No output can add, remove or name a step: which requests
run is decided by the plan alone.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any, Sequence

from modelnet.identity import PeerID

from .. import reason

CANDIDATES_SCHEMA = "modelnet.candidates/1"


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
