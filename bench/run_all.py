"""Run every benchmark, one process each, then write the summary.

    python -m bench.run_all [--quick] [--only overhead,lookup]

Each benchmark writes ``bench/results/<name>.json`` and ``<name>.md``; this then writes
``bench/results/summary.md`` (every DESIGN.md bar with its verdict, the run times) and
copies the summary and each benchmark's main tables into ``bench/README.md`` between its
``results`` markers. ``--quick`` runs write to ``bench/results/quick/`` instead and leave
the README alone. ``--summary-only`` rebuilds the summary from the files already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import machine, machine_line, markdown_table, results_dir

BENCHMARKS = ("overhead", "lookup", "bringup", "memory", "session", "hedging", "plans", "gateway")
README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
# Tables copied into the README per benchmark (by position); the rest stay in results/.
MAIN_TABLES = {
    "overhead": (0, 1, 2, 3),
    "lookup": (0, 1, 2, 3),
    "bringup": (0, 1),
    "memory": (0, 1, 2),
    "session": (0, 1, 2, 3),
    "hedging": (1,),
    "plans": (0,),
    "gateway": (1,),
}


def run(name: str, quick: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if quick else [])
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, check=False)
    return {"benchmark": name, "seconds": time.perf_counter() - started, "returncode": done.returncode}


def load(name: str, quick: bool) -> dict[str, Any] | None:
    path = results_dir(quick) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def summary(runs: list[dict[str, Any]], quick: bool) -> str:
    documents = {name: load(name, quick) for name in BENCHMARKS}
    bars = [
        [name, bar["bar"], bar["measured"], bar["verdict"]]
        for name, document in documents.items()
        if document is not None
        for bar in document["bars"]
    ]
    parts = ["## Where we stand against the DESIGN.md bars", "", markdown_table(["benchmark", "bar", "measured", "verdict"], bars), ""]
    dates = {name: f"{d['machine']['date']}, {'quick' if _quick(d) else 'full'} run" for name, d in documents.items() if d}
    parts += ["Runs: " + "; ".join(f"`{name}` {when}" for name, when in dates.items()) + ".", ""]
    if runs:
        parts += [markdown_table(["benchmark", "wall time s", "exit code"], [[r["benchmark"], f"{r['seconds']:.0f}", r["returncode"]] for r in runs]), ""]
    for name, document in documents.items():
        if document is None:
            continue
        parts += [f"### {document['title']} (`{name}`)", "", f"Machine: {machine_line(document['machine'])}.", ""]
        for index in MAIN_TABLES[name]:
            if index < len(document["tables"]):
                table = document["tables"][index]
                parts += [f"**{table['title']}**", "", markdown_table(table["headers"], table["rows"]), ""]
                if table["note"]:
                    parts += [table["note"], ""]
        parts += [f"All tables and notes: [results/{name}.md](results/{name}.md).", ""]
    return "\n".join(parts)


def _quick(document: dict[str, Any]) -> bool:
    return bool(document["params"].get("quick"))


def write(runs: list[dict[str, Any]], quick: bool) -> None:
    """The summary beside the results; the README is updated from full runs only."""
    text = summary(runs, quick)
    directory = results_dir(quick)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.md").write_text(f"# Benchmark summary\n\nWritten by bench/run_all.py on {machine_line(machine())}.\n\n{text}")
    (directory / "summary.json").write_text(json.dumps({"runs": runs, "machine": machine()}, indent=2) + "\n")
    if README.exists() and not quick:
        readme = README.read_text()
        if START in readme and END in readme:
            head, _, rest = readme.partition(START)
            _, _, tail = rest.partition(END)
            README.write_text(f"{head}{START}\n\n{text}\n{END}{tail}")
    print(f"\nwrote {directory / 'summary.md'}" + ("" if quick else " and bench/README.md"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (each benchmark under a minute)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the summary from existing results (with --quick: the quick ones)")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    if not args.summary_only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; there are {list(BENCHMARKS)}")
        runs = [run(name, args.quick) for name in names]
    write(runs, args.quick)
    if any(r["returncode"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
