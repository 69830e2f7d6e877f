"""How the CLI shows things to people (tables, answers, progress) and to scripts (JSON)."""

from __future__ import annotations

import json
from typing import Any, Sequence, TextIO


class Progress:
    """Steps while joining and asking, on stderr: redrawn in place on a terminal, one line
    per finished step otherwise (logs and CI stay readable)."""

    def __init__(self, out: TextIO, *, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self.tty = out.isatty()

    def step(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.out.write(f"\r\x1b[K… {text}")
            self.out.flush()

    def done(self, text: str) -> None:
        if self.quiet:
            return
        prefix = "\r\x1b[K" if self.tty else ""
        self.out.write(f"{prefix}✓ {text}\n")
        self.out.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def providers_table(providers: Sequence) -> str:
    if not providers:
        return "no providers found"
    rows = []
    for p in providers:
        rows.append([str(p.peer_id), ", ".join(m.name for m in p.models), p.addrs[0] if p.addrs else "-"])
    return table(["provider", "models", "address"], rows)


def provider_json(p) -> dict[str, Any]:
    return {
        "peer_id": str(p.peer_id),
        "addrs": list(p.addrs),
        "models": [{"name": m.name, "task": m.task, "tags": list(m.tags), "streaming": m.streaming} for m in p.models],
    }


def answer_json(answer) -> dict[str, Any]:
    return {
        "capability": answer.capability,
        "provider": str(answer.provider),
        "model": answer.model,
        "output": answer.output,
        "chunks": list(answer.chunks),
        "elapsed_ms": round(answer.elapsed * 1000, 3),
        "usage": {
            "input_bytes": answer.usage.input_bytes,
            "output_bytes": answer.usage.output_bytes,
            "compute_ms": round(answer.usage.compute_ms, 3),
        },
        "receipt": answer.receipt.hex(),
        "failed_attempts": [{"provider": str(a.peer), "error": a.message, "code": a.code} for a in answer.attempts],
    }


def output_text(output: Any, width: int = 0) -> str:
    """A one-glance rendering of a model's output, by the shape of the output."""
    if isinstance(output, str):
        text = output
    elif isinstance(output, dict) and "label" in output:
        extra = f" (compound {output['compound']:+.2f})" if isinstance(output.get("compound"), (int, float)) else ""
        text = f"{output['label']}{extra}"
    elif isinstance(output, dict) and "language" in output:
        conf = output.get("confidence")
        text = f"{output['language']}" + (f" ({conf:.2f})" if isinstance(conf, (int, float)) else "")
    elif isinstance(output, dict) and isinstance(output.get("keywords"), list):
        text = ", ".join(str(k.get("keyword", k)) if isinstance(k, dict) else str(k) for k in output["keywords"])
    else:
        text = json.dumps(output, ensure_ascii=False)
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text


# -- plans ------------------------------------------------------------------------------


class PlanProgress:
    """``on_event`` for :func:`modelnet.p2p.plans.execute`: one line per call and decision."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __call__(self, event) -> None:
        from modelnet.p2p import plans

        if isinstance(event, plans.StepStarted):
            self.progress.step(f"{event.path}: asking {event.capability}")
        elif isinstance(event, plans.StepDone):
            step = event.step
            if step.ok:
                self.progress.done(
                    f"{step.path}: {step.capability} by {step.provider.short()} ({step.model}) in {step.elapsed * 1000:.0f} ms"
                )
            else:
                self.progress.done(f"{step.path}: {step.capability} failed: {step.error}")
        elif isinstance(event, plans.Decided):
            mark = "" if event.decision.ok else "failed: "
            self.progress.done(f"{event.decision.path}: {event.decision.aggregate}: {mark}{event.decision.detail}")


def trace_json(trace, decisions: Sequence = (), elapsed: float | None = None) -> dict[str, Any]:
    """A plan's whole trace for scripts; ``trace`` (base64) is the lossless, verifiable form."""
    import base64

    from modelnet.protocols import plan as plans

    def peer(value) -> str | None:
        return None if value is None else str(value)

    return {
        "plan": plans.to_dict(trace.plan),
        "input": trace.input,
        "asker": str(trace.asker),
        "output": trace.output,
        "error": trace.error,
        "elapsed_ms": None if elapsed is None else round(elapsed * 1000, 3),
        "steps": [
            {
                "path": step.path,
                "capability": step.capability,
                "provider": peer(step.provider),
                "model": step.model,
                "elapsed_ms": round(step.elapsed * 1000, 3),
                "input_sha256": step.input_sha256.hex(),
                "output": step.output,
                "receipt": None if step.receipt is None else step.receipt.hex(),
                "route": [str(p) for p in step.route],
                "error": step.error,
            }
            for step in trace.steps
        ],
        "decisions": [
            {
                "path": d.path,
                "aggregate": d.aggregate,
                "ok": d.ok,
                "detail": d.detail,
                "chosen": d.chosen,
                "tally": [{"value": value, "votes": votes} for value, votes in d.tally],
            }
            for d in decisions
        ],
        "trace": base64.b64encode(trace.encode()).decode("ascii"),
    }


def trace_table(trace) -> str:
    rows = []
    for step in trace.steps:
        who = step.provider.short() if step.provider is not None else "-"
        result = output_text(step.output, 48) if step.ok else f"failed: {step.error}"
        rows.append([step.path, step.capability, who, step.model or "-", f"{step.elapsed * 1000:.0f}", result])
    return table(["step", "capability", "provider", "model", "ms", "output"], rows)
