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
        "failed_attempts": [{"provider": str(peer), "error": why} for peer, why in answer.attempts],
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
