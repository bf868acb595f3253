"""Measured windows over closed-loop load processes, and the statistics taken over them.

The HTTP and RFC scenarios measure the same way. The bench spawns load processes
(``python -m bench.http_load``, ``python -m bench.rfc_load``), each with a share of the
connections. Each process connects, prints a ready line and reads the window ``FROM UNTIL``
(``time.monotonic()`` seconds, one clock for every process on Linux) from stdin, so all load
processes of a case share one window. It keeps one request in flight per connection, records the
latency of every one that completes inside the window (what completes before is warm-up), writes
them (int64 ns, native byte order) to its ``--latencies-out`` file and prints one JSON report line.
Over the same window the bench takes CPU snapshots of its processes, samples the RSS of gateway
and connector on the tunnel path, and can attach py-spy.

This module is the bench's side of that exchange (:class:`ClosedLoop`, :class:`Window`) and the
statistics both scenarios take over the windows. The load processes do not import it: it pulls in
the bench's process machinery (and with it backchannel, trio and cryptography), which would cost
each load process 0.2-0.4 s of start-up CPU (the HTTP client also 30 MiB more RSS).
"""

from __future__ import annotations

import contextlib
import json
import math
import selectors
import statistics
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import BenchError, Pair, Proc, WorkDir, spawn
from .profile import Profiler
from .report import RESULTS_DIR
from .scenarios import CpuMeter, RssSampler

#: The bench's processes whose RSS is sampled on the tunnel path, and whose CPU cost is reported.
NAMES = ("gateway", "connector")
#: py-spy samples per second in a load window (a 5 s window at py-spy's 100 Hz is too few samples).
PROFILE_RATE = 500


# ----------------------------------------------------------------------------- statistics


def percentile(ordered: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile of sorted ns values, in ms (NaN for no values)."""
    if not ordered:
        return math.nan
    index = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[index] / 1e6


def latency_summary(values: array[int], *, p99_9_from: int = 0) -> dict[str, float | None]:
    """p50, p99, p99.9, mean and max of ns latencies, in ms; p99.9 is None for fewer than
    ``p99_9_from`` values (too few calls lie above it to call it a percentile)."""
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 0.50), 3),
        "p99": round(percentile(ordered, 0.99), 3),
        "p99_9": round(percentile(ordered, 0.999), 3) if len(ordered) >= p99_9_from else None,
        "mean": round(sum(ordered) / len(ordered) / 1e6, 3) if ordered else math.nan,
        "max": round(ordered[-1] / 1e6, 3) if ordered else math.nan,
    }


def median(values: Iterable[float | None]) -> float | None:
    """Median over the repeats, to 3 places; None if there are none or any repeat lacks it."""
    items = list(values)
    if not items or any(v is None for v in items):
        return None
    return round(statistics.median(v for v in items if v is not None), 3)


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min and max over the repeats, to 2 places."""
    items = list(values)
    return {
        "median": round(statistics.median(items), 2),
        "min": round(min(items), 2),
        "max": round(max(items), 2),
    }


def split(total: int, parts: int) -> list[int]:
    """``total`` shared out over ``parts`` as evenly as it goes, the larger shares first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def rss_merge(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """One RSS summary per process over several runs (those with ``rss``): the first run's
    start, the highest peak, the last run's end."""
    merged = {}
    for name in NAMES:
        parts = [r["rss"][name] for r in runs if "rss" in r]
        merged[name] = {
            "start_kib": parts[0]["start_kib"],
            "peak_kib": max(p["peak_kib"] for p in parts),
            "end_kib": parts[-1]["end_kib"],
        }
    return merged


# ----------------------------------------------------------------------------- windows


def read_line(proc: Proc, deadline: float, what: str) -> dict[str, Any]:
    """One JSON line from the process's stdout, or BenchError (with its log) at the deadline."""
    assert proc.popen.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.popen.stdout, selectors.EVENT_READ)
        left = deadline - time.monotonic()
        if left <= 0 or not selector.select(left):
            raise BenchError(f"{proc.name} did not report {what} in time:\n{proc.log_tail()}")
    line = proc.popen.stdout.readline()
    try:
        data = json.loads(line)
    except ValueError as exc:
        proc.popen.wait(5)
        raise BenchError(
            f"{proc.name} did not report {what} (exit code {proc.popen.returncode}, "
            f"output {line!r}):\n{proc.log_tail()}"
        ) from exc
    if not isinstance(data, dict):
        raise BenchError(f"{proc.name} reported {line!r} instead of {what}")
    return data


@dataclass(frozen=True)
class Window:
    """What one measured window gave: the load processes' reports, the latency of every
    completion in it (ns), CPU snapshots around it, and the RSS sampler and profilers that ran."""

    case: str  # "http tunnel c=8": names the case in error messages
    path: str
    concurrency: int
    processes: int
    seconds: float
    reports: list[dict[str, Any]]
    latencies: array[int]
    before: dict[str, float]
    after: dict[str, float]
    sampler: RssSampler | None
    profilers: list[tuple[str, Profiler]]

    def completed(self, *, failed: str, nothing: str) -> int:
        """How many completed in the window; BenchError if any load process reported failures
        (``"<n> <failed>, e.g. ..."``) or nothing completed (``nothing``)."""
        errors = sum(int(r["error_count"]) for r in self.reports)
        if errors:
            messages = [m for r in self.reports for m in r["errors"]][:5]
            raise BenchError(f"{self.case}: {errors} {failed}, e.g. " + "; ".join(messages))
        if not self.latencies:
            raise BenchError(f"{self.case}: {nothing}")
        return len(self.latencies)

    def warm_up_completed(self) -> int:
        """How many completed before the window, over all load processes."""
        return sum(int(r["warm_up_completed"]) for r in self.reports)

    def case_json(self, counts: Mapping[str, Any], cost_key: str, server: str) -> dict[str, Any]:
        """The case's JSON: what was measured, then the scenario's ``counts``, then CPU (percent
        of one core, seconds, and under ``cost_key`` the µs per completion of gateway,
        connector, ``server`` and the load processes), RSS (tunnel) and profiles (if any)."""
        completed = len(self.latencies)
        wall = self.after["_wall"] - self.before["_wall"]
        cpu = CpuMeter.percent(self.before, self.after)
        cpu_seconds = CpuMeter.seconds(self.before, self.after)
        client_seconds = sum(float(r["cpu_seconds"]) for r in self.reports)
        cpu["client"] = round(100 * client_seconds / wall, 1)
        cpu["other"] = round(max(0.0, cpu["other"] - cpu["client"]), 1)
        result: dict[str, Any] = {
            "path": self.path,
            "concurrency": self.concurrency,
            "client_processes": self.processes,
            "seconds": round(self.seconds, 3),
            **counts,
            "cpu_percent": cpu,
            "cpu_seconds": cpu_seconds,
            cost_key: {
                name: round(1e6 * cpu_seconds[name] / completed, 1)
                for name in (*NAMES, server, *(f"{n}_sys" for n in NAMES))
            }
            | {"client": round(1e6 * client_seconds / completed, 1)},
        }
        if self.sampler is not None:
            if self.sampler.error:
                raise BenchError(self.sampler.error)
            result["rss"] = {name: self.sampler.summary(i) for i, name in enumerate(NAMES)}
        if self.profilers:
            result["profiles"] = {}
            for role, profiler in self.profilers:
                summary = profiler.summary()
                summary["raw_file"] = str(profiler.output)
                result["profiles"][role] = summary
        return result


class ClosedLoop:
    """Measured windows of one kind of load process (``python -m bench.<kind>_load``) against
    the pair's gateway and connector; ``argv(path, connections, latencies_out)`` is the command
    line of one load process."""

    def __init__(
        self,
        kind: str,
        work: WorkDir,
        pair: Pair,
        meter: CpuMeter,
        argv: Callable[[str, int, Path], list[str]],
    ) -> None:
        self.kind = kind
        self.work = work
        self.pair = pair
        self.meter = meter
        self.argv = argv
        self._serial = 0

    def measure(
        self,
        path: str,
        concurrency: int,
        *,
        processes: int | None,
        warm_up: float,
        seconds: float,
        ready_within: float,
        ready_what: str,
        profile_roles: Sequence[str] = (),
        profile_stem: Path | None = None,
    ) -> Window:
        """One window: ``concurrency`` connections over ``processes`` load processes (None: one
        each), ready within ``ready_within`` seconds, ``warm_up`` then ``seconds`` measured; RSS
        sampled on the tunnel path, py-spy on ``profile_roles``. The processes are stopped."""
        count = max(1, min(processes or concurrency, concurrency))
        loads: list[tuple[Proc, Path]] = []
        try:
            for index, connections in enumerate(split(concurrency, count)):
                self._serial += 1
                out = self.work.path / f"{self.kind}-load-{self._serial}.lat"
                proc = spawn(
                    f"{self.kind} load client {index + 1}",
                    self.argv(path, connections, out),
                    self.work.path / f"{self.kind}-load.log",
                    stdout_pipe=True,
                    stdin_pipe=True,
                )
                loads.append((proc, out))
            ready_by = time.monotonic() + ready_within
            for proc, _ in loads:
                read_line(proc, ready_by, ready_what)
            measure_from = time.monotonic() + warm_up
            until = measure_from + seconds
            for proc, _ in loads:
                assert proc.popen.stdin is not None
                proc.popen.stdin.write(f"{measure_from!r} {until!r}\n".encode())
                proc.popen.stdin.flush()
            with contextlib.ExitStack() as stack:
                time.sleep(max(0.0, measure_from - time.monotonic()))
                profilers = [
                    (
                        role,
                        stack.enter_context(
                            Profiler(
                                self.pair.gateway if role == "gateway" else self.pair.connector,
                                Path(f"{profile_stem}-{role}.pyspy.txt"),
                                rate=PROFILE_RATE,
                            )
                        ),
                    )
                    for role in profile_roles
                ]
                sampler = (
                    stack.enter_context(RssSampler(self.pair.procs())) if path == "tunnel" else None
                )
                before = self.meter.snapshot()
                time.sleep(max(0.0, until - time.monotonic()))
                after = self.meter.snapshot()
            reports = [read_line(proc, until + 30, "its results") for proc, _ in loads]
            latencies: array[int] = array("q")
            for _, out in loads:
                with out.open("rb") as handle:
                    latencies.frombytes(handle.read())
                out.unlink()
        finally:
            for proc, _ in loads:
                proc.stop()
        return Window(
            case=f"{self.kind} {path} c={concurrency}",
            path=path,
            concurrency=concurrency,
            processes=count,
            seconds=seconds,
            reports=reports,
            latencies=latencies,
            before=before,
            after=after,
            sampler=sampler,
            profilers=profilers,
        )


def profile_windows(
    kind: str,
    measure: Callable[[int, Path], dict[str, Any]],
    concurrencies: Sequence[int],
    *,
    stamp: str,
    rate_key: str,
    rate_unit: str,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """One extra tunnel window per concurrency under py-spy: ``measure(concurrency, stem)``
    gives the case's JSON with its ``profiles``; returns them by ``<role>-c<concurrency>``,
    each with the rate measured while profiled and its raw file relative to the repository."""
    RESULTS_DIR.mkdir(exist_ok=True)
    profiles: dict[str, Any] = {}
    for concurrency in concurrencies:
        case = measure(concurrency, RESULTS_DIR / f"{stamp}-{kind}-c{concurrency}")
        progress(
            f"  profiled {kind} c={concurrency} tunnel: {case[rate_key]:.0f} {rate_unit} "
            "under py-spy"
        )
        for role, summary in case["profiles"].items():
            summary[f"{rate_key}_while_profiled"] = case[rate_key]
            summary["raw_file"] = str(
                Path(summary["raw_file"]).relative_to(RESULTS_DIR.parent.parent)
            )
            profiles[f"{role}-c{concurrency}"] = summary
    return profiles
