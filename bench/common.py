"""What every benchmark shares: statistics, the machine, command-line flags, result files.

A benchmark builds a :class:`Report` (parameters, tables, raw numbers), prints it and
writes ``bench/results/<name>.json`` and ``bench/results/<name>.md``. Numbers are what was
measured on this machine in this run; comparisons are against references measured in the
same run, never against hard-coded times, and nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

from modelnet.models.base import Backend, Chunk, ModelInfo, Output

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir(quick: bool) -> Path:
    return RESULTS_DIR / "quick" if quick else RESULTS_DIR


# ---- statistics ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN if there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    """Latency distribution of one measured row, in milliseconds."""

    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of_seconds(cls, samples: Sequence[float]) -> "Summary":
        ms = [s * 1000 for s in samples]
        mean = sum(ms) / len(ms) if ms else math.nan
        return cls(len(ms), percentile(ms, 50), percentile(ms, 95), percentile(ms, 99), mean, max(ms, default=math.nan))

    def row(self) -> list[str]:
        return [str(self.n), ms(self.p50), ms(self.p95), ms(self.p99), ms(self.mean), ms(self.max)]

    HEADERS = ("n", "p50 ms", "p95 ms", "p99 ms", "mean ms", "max ms")


def ms(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def bar_verdict(measured: float, limit: float, *, higher_is_better: bool = False) -> str:
    """``met (…)`` or ``NOT met (…)``, with the ratio to the bar."""
    if math.isnan(measured):
        return "not measured"
    if higher_is_better:
        met = measured >= limit
        ratio = measured / limit if limit else math.inf
        return f"{'met' if met else 'NOT met'} ({ratio:.2f}x the bar)"
    met = measured <= limit
    ratio = measured / limit if limit else math.inf
    return f"{'met' if met else 'NOT met'} ({ratio:.2f}x the limit)"


# ---- clocks ----------------------------------------------------------------------------


class CpuTimer:
    """Process CPU time (user + system) and wall time spent inside ``with``."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def __enter__(self) -> "CpuTimer":
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu += time.process_time() - self._cpu0
        self.wall += time.perf_counter() - self._wall0


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def settle_memory() -> None:
    gc.collect()
    gc.collect()


# ---- the machine -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=RESULTS_DIR.parent
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=False, cwd=RESULTS_DIR.parent,
        ).stdout.strip()
    except OSError:
        commit, dirty = "-", ""
    cpu_model = "-"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "-")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "trio": version("trio"),
        "libp2p": version("libp2p"),
        "commit": commit + ("+changes" if dirty else ""),
        "load_average": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews every number here."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "-"


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpus']} cores ({info['cpu_model']}), Python {info['python']}, trio {info['trio']}, "
        f"py-libp2p {info['libp2p']}, commit {info['commit']}, {info['date']}, "
        f"load average {info['load_average']} at start"
    )


# ---- tables and result files -----------------------------------------------------------


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Table:
    title: str
    headers: Sequence[str]
    rows: list[list[Any]]
    note: str = ""


class Report:
    """One benchmark's output: printed as it grows, written as JSON and Markdown at the end."""

    def __init__(self, name: str, title: str, params: dict[str, Any]) -> None:
        self.name = name
        self.title = title
        self.params = params
        self.machine = machine()
        self.tables: list[Table] = []
        self.bars: list[tuple[str, str, str]] = []  # (bar, measured, verdict)
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}
        print(f"# {title}\n{machine_line(self.machine)}\nparameters: {json.dumps(params)}\n", flush=True)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
        table = Table(title, list(headers), [list(r) for r in rows], note)
        self.tables.append(table)
        print(f"## {title}\n{text_table(table.headers, table.rows)}" + (f"\n{note}" if note else "") + "\n", flush=True)

    def bar(self, bar: str, measured: str, verdict: str) -> None:
        self.bars.append((bar, measured, verdict))
        print(f"bar: {bar}: {measured} -> {verdict}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def markdown(self) -> str:
        parts = [f"# {self.title}", "", f"Machine: {machine_line(self.machine)}.", ""]
        parts += ["Parameters: " + ", ".join(f"`{k}={v}`" for k, v in self.params.items()), ""]
        if self.bars:
            parts += ["## Against the DESIGN.md bars", "", markdown_table(["bar", "measured", "verdict"], self.bars), ""]
        for table in self.tables:
            parts += [f"## {table.title}", "", markdown_table(table.headers, table.rows), ""]
            if table.note:
                parts += [table.note, ""]
        if self.notes:
            parts += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(parts)

    def write(self, directory: Path | None = None) -> tuple[Path, Path]:
        """Into bench/results/, or bench/results/quick/ for a --quick run (so a quick run
        never replaces the full results)."""
        directory = directory or results_dir(bool(self.params.get("quick")))
        self.machine["load_average_at_end"] = load_average()
        self.notes.append(f"Load average {self.machine['load_average']} at start, {load_average()} at end (2 cores).")
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / f"{self.name}.json"
        md_path = directory / f"{self.name}.md"
        document = {
            "benchmark": self.name,
            "title": self.title,
            "machine": self.machine,
            "params": self.params,
            "bars": [{"bar": b, "measured": m, "verdict": v} for b, m, v in self.bars],
            "tables": [dataclasses.asdict(t) for t in self.tables],
            "notes": self.notes,
            "data": self.data,
        }
        json_path.write_text(json.dumps(document, indent=2, default=_json_default) + "\n")
        md_path.write_text(self.markdown())
        print(f"wrote {json_path} and {md_path.name}", flush=True)
        return json_path, md_path


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


# ---- running ---------------------------------------------------------------------------


def arguments(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--seed", type=int, default=1, help="seed of keys and random choices")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def quiet_logging() -> None:
    """Warnings and errors only: a benchmark's output is its tables."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


# ---- capabilities for network benchmarks -----------------------------------------------


CAPABILITIES = ("cap-0", "cap-1", "cap-2", "cap-3")
MAX_PROVIDERS_PER_CAPABILITY = 50


class StubBackend(Backend):
    """One model, ``stub-<j>``, serving capability ``cap-<j>``: a record to publish and find,
    at no model cost (what is measured is the network)."""

    def __init__(self, capability: str) -> None:
        self.name = f"stub-{capability}"
        self._info = ModelInfo(f"stub-{capability}", capability, description="benchmark stub")

    def models(self) -> list[ModelInfo]:
        return [self._info]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        self.info(model)
        yield Output(text)


def providers_per_capability(n: int) -> int:
    """5 % of the nodes per capability, at least 2, at most MAX_PROVIDERS_PER_CAPABILITY."""
    return min(MAX_PROVIDERS_PER_CAPABILITY, max(2, n // 20))


def provider_plan(n: int, seed: int) -> dict[int, str]:
    """Node index -> the capability it serves, for a seeded choice of distinct nodes
    (never node 0, the bootstrap node, so the entry point is not also the answer)."""
    per = providers_per_capability(n)
    chosen = random.Random(seed).sample(range(1, n), min(n - 1, per * len(CAPABILITIES)))
    return {index: CAPABILITIES[j % len(CAPABILITIES)] for j, index in enumerate(chosen)}


def stub_backends(plan: Mapping[int, str]) -> Callable[[int], list[Backend]]:
    return lambda i: [StubBackend(plan[i])] if i in plan else []


SIMULATION_GC_THRESHOLD = (50_000, 20, 100)


def simulation_gc() -> str:
    """Raise the garbage collector's thresholds for a network simulated in one process.

    N nodes in one process share one heap, so each full collection walks every node's
    objects: CPU per node grows with N, an artefact of co-location (a real node's heap is
    small). Measured here: a 100-node memory-network bring-up (every node publishing) took
    27 s of CPU with the default thresholds and 15.5 s with these. Returns a description
    for the results' parameters.
    """
    gc.set_threshold(*SIMULATION_GC_THRESHOLD)
    return f"gc.set_threshold{SIMULATION_GC_THRESHOLD} (simulations share one heap)"
