"""Compare two checkouts of backchannel on this machine: ``python -m bench`` for each, in
alternating order, round after round, and backchannel's own figures side by side.

    python -m bench.compare --tree ../before --tree . --rounds 3 -- --only bulk --peers none

Each round runs ``python -m bench <bench args>`` once per tree (first A then B, the next round
B then A, so that a machine that speeds up or slows down during the session favours neither),
with ``PYTHONPATH`` at that tree's ``core``, plugins and root, from the tree's own folder (its
own ``bench`` package too). From each run's JSON it takes backchannel's figures (bulk MB/s and
CPU per MB, many-stream rates and fairness, HTTP req/s and CPU per request, new stream first
byte, idle KiB per stream) and prints, per figure, the median of each tree, B/A of every round
and in how many rounds B was better. A single run on a 2-CPU VM moves by 10-30% within minutes
(docs/performance.md): count the rounds, not one ratio. ``git worktree add ../before <commit>``
gives a second tree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .targets import lookup

#: What a ``python -m bench`` run prints last: where its JSON is, relative to the tree.
_RESULTS_LINE = re.compile(r"^results: (\S+\.json) ", re.MULTILINE)


@dataclass(frozen=True)
class Figure:
    """One of backchannel's figures in a bench result."""

    name: str
    value: float
    #: True when a larger value is better (MB/s, req/s), False for costs (CPU, latency).
    higher_is_better: bool


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bulk(document: Mapping[str, Any]) -> list[Figure]:
    figures = []
    for direction in ("upload", "download"):
        summary = lookup(document, "bulk", "summary", direction)
        if summary is None:
            continue
        rate = _number(lookup(summary, "tunnel_mb_per_s", "median"))
        if rate is not None:
            figures.append(Figure(f"bulk {direction} MB/s", rate, True))
        for side in ("gateway", "connector"):
            cost = _number(lookup(summary, "tunnel_cpu_ms_per_mb_median", side))
            if cost is not None:
                figures.append(Figure(f"bulk {direction} {side} CPU ms/MB", cost, False))
    return figures


def _streams(document: Mapping[str, Any]) -> list[Figure]:
    figures = []
    for count, paths in (lookup(document, "streams", "summary") or {}).items():
        row = lookup(paths, "backchannel") or {}
        rate, fairness = _number(row.get("aggregate_mb_per_s")), _number(row.get("fairness"))
        if rate is not None:
            figures.append(Figure(f"streams x{count} MB/s", rate, True))
        if fairness is not None:
            figures.append(Figure(f"streams x{count} slowest/fastest", fairness, True))
    return figures


def _http(document: Mapping[str, Any]) -> list[Figure]:
    figures = []
    for concurrency, paths in (lookup(document, "http-peers", "summary") or {}).items():
        for path in ("proxy", "forward"):
            row = lookup(paths, path)
            if row is None:
                continue
            rate, p99 = _number(row.get("req_per_s")), _number(row.get("p99"))
            if rate is not None:
                figures.append(Figure(f"http c={concurrency} {path} req/s", rate, True))
            if p99 is not None:
                figures.append(Figure(f"http c={concurrency} {path} p99 ms", p99, False))
            cpu = row.get("cpu_us_per_request")
            if isinstance(cpu, list) and len(cpu) == 2:
                for side, value in zip(("gateway", "connector"), cpu, strict=True):
                    number = _number(value)
                    if number is not None:
                        figures.append(
                            Figure(f"http c={concurrency} {path} {side} CPU us/req", number, False)
                        )
    return figures


def _setup(document: Mapping[str, Any]) -> list[Figure]:
    figures = []
    for key, name in (
        ("first_byte", "new stream first byte"),
        ("first_answer", "new conn first answer"),
    ):
        p50 = _number(lookup(document, "setup", key, "backchannel", "p50_ms"))
        if p50 is not None:
            figures.append(Figure(f"{name} p50 ms", p50, False))
    return figures


def _idle(document: Mapping[str, Any]) -> list[Figure]:
    figures = []
    for entry in lookup(document, "idle", "counts") or []:
        for side in ("gateway", "connector"):
            cost = _number(lookup(entry, "sides", side, "per_stream_kib"))
            if cost is not None:
                figures.append(Figure(f"idle x{entry.get('streams')} {side} KiB", cost, False))
    return figures


_EXTRACTORS: tuple[Callable[[Mapping[str, Any]], list[Figure]], ...] = (
    _bulk,
    _streams,
    _http,
    _setup,
    _idle,
)


def figures_of(document: Mapping[str, Any]) -> dict[str, Figure]:
    """backchannel's figures in one ``python -m bench`` result, by name."""
    return {figure.name: figure for extract in _EXTRACTORS for figure in extract(document)}


@dataclass
class Comparison:
    """One figure over the rounds: A's and B's values, in round order."""

    name: str
    higher_is_better: bool
    a: list[float]
    b: list[float]

    @property
    def ratios(self) -> list[float]:
        """B / A per round (rounds where A is 0 left out)."""
        return [b / a for a, b in zip(self.a, self.b, strict=True) if a]

    @property
    def b_better(self) -> int:
        """In how many rounds B's value was better than A's."""
        pairs = zip(self.a, self.b, strict=True)
        return sum((b > a) if self.higher_is_better else (b < a) for a, b in pairs)


def compare(rounds: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[Comparison]:
    """Figures present in every run of both trees, over ``rounds`` of (A result, B result)."""
    per_round = [(figures_of(a), figures_of(b)) for a, b in rounds]
    if not per_round:
        return []
    names = [name for name in per_round[0][0] if all(name in a and name in b for a, b in per_round)]
    return [
        Comparison(
            name,
            per_round[0][0][name].higher_is_better,
            [a[name].value for a, _ in per_round],
            [b[name].value for _, b in per_round],
        )
        for name in names
    ]


def render(comparisons: Sequence[Comparison], labels: tuple[str, str]) -> str:
    """The comparison as a text table."""
    a_label, b_label = labels
    lines = [
        f"A = {a_label}",
        f"B = {b_label}",
        f"{'figure':42} {'A median':>10} {'B median':>10}  {'B/A per round':28} B better",
    ]
    for item in comparisons:
        ratios = " ".join(f"{ratio:.3f}" for ratio in item.ratios)
        lines.append(
            f"{item.name:42} {statistics.median(item.a):10.3f} {statistics.median(item.b):10.3f}"
            f"  {ratios:28} {item.b_better} of {len(item.a)}"
            + ("" if item.higher_is_better else "  (lower is better)")
        )
    return "\n".join(lines)


def tree_environment(tree: Path, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with PYTHONPATH at ``tree``'s core, plugins and root (the tree's code first)."""
    parts = [tree / "core", *(tree / "plugins" / name for name in ("tcp", "http", "rfc")), tree]
    return {**base, "PYTHONPATH": os.pathsep.join(str(part) for part in parts)}


def run_bench(tree: Path, bench_args: Sequence[str]) -> dict[str, Any]:
    """``python -m bench <bench_args>`` in ``tree`` with its own code; its JSON result."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *bench_args],
        cwd=tree,
        env=tree_environment(tree, os.environ),
        capture_output=True,
        text=True,
        check=False,
    )
    found = _RESULTS_LINE.search(completed.stdout)
    if found is None:
        tail = (completed.stdout + completed.stderr)[-2000:]
        raise SystemExit(
            f"python -m bench in {tree} wrote no result (exit {completed.returncode}):\n{tail}"
        )
    document: dict[str, Any] = json.loads((tree / found[1]).read_text())
    return document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--tree", action="append", type=Path, required=True, help="a checkout (twice: A then B)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds, each one run per tree (default 3)"
    )
    parser.add_argument("--json", type=Path, help="also write the comparison to this JSON file")
    parser.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="after --: python -m bench's own options"
    )
    args = parser.parse_args(argv)
    if len(args.tree) != 2:
        parser.error("give --tree twice: A (the reference) and B")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    trees = [tree.resolve() for tree in args.tree]
    rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for index in range(args.rounds):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        results: dict[int, dict[str, Any]] = {}
        for which in order:
            print(f"compare: round {index + 1}/{args.rounds}: {trees[which]}", flush=True)
            results[which] = run_bench(trees[which], bench_args)
        rounds.append((results[0], results[1]))
    comparisons = compare(rounds)
    print(render(comparisons, (str(trees[0]), str(trees[1]))))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "trees": [str(tree) for tree in trees],
                    "bench_args": list(bench_args),
                    "comparisons": [
                        {"figure": item.name, "a": item.a, "b": item.b, "b_better": item.b_better}
                        for item in comparisons
                    ],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
