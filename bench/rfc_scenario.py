"""The RFC scenario: STFC_CONNECTION calls per second and latency, direct vs through the tunnel.

System: the stub ABAP system, ``python -m backchannel_rfc serve --port 0`` (its own process; a trio
loop that runs each module call in a worker thread, so one GIL; demo logon client 100, user DEMO).
Load: ``python -m bench.rfc_load`` processes, the same client (``backchannel_rfc.Connection``,
pyrfc's API) for both paths:

- *direct*: ``Connection(ashost="127.0.0.1", port=<stub>, ...)``, straight to the stub;
- *tunnel*: ``Connection(gateway=<front door>, app="bench/app", app_secret=..., ashost=
  "erp.virtual", sysnr="00", ...)``: the gateway's RFC front door (``[plugins.rfc] listen``), the
  tunnel, the connector's ``rfc`` mapping ``erp.virtual:3300`` (functions STFC_CONNECTION and
  RFC_PING allowed; ``[plugins.rfc] backend = "stub"``) and a pooled connection to the stub.

Each connection logs on once and stays open; one call is in flight on each (closed loop). Each case
(path x concurrency) warms up, then counts the calls that return in a fixed window; direct and
tunnel alternate, ``repeat`` times.

**Why worker processes, not threads.** pyrfc's ``call`` blocks its thread, so N concurrent clients
need N threads or N processes. ``backchannel_rfc.Connection`` is pure Python: a call costs the
client about 100 µs of CPU at concurrency 1 (parameters filled and encoded, the result decoded),
nearly all of it under the GIL. N threads in one process take turns on that GIL, so a threaded
client is capped at one core and adds GIL hand-over waits to the latencies it measures; N processes
have no such cap, however fast the system under test. That is why each connection gets its own
process by default, as in ``bench.http_load``. The price, measured on the 2-vCPU machine of
docs/performance.md at concurrency 8: 100-180 µs of client CPU per call with eight processes
against 60-120 µs with eight threads in one or two processes, and no difference in calls/s beyond
the run-to-run noise (the stub, one Python process, is the limit there). ``--rfc-clients N`` packs
the connections into N processes with a thread per connection, to compare.
"""

from __future__ import annotations

import re
import selectors
import statistics
import sys
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .closed_loop import ClosedLoop, latency_summary, median, profile_windows, rss_merge, spread
from .procs import APP, RFC_VIRTUAL, SUBACCOUNT, BenchError, Pair, Proc, WorkDir, spawn
from .scenarios import CpuMeter

FUNCTION = "STFC_CONNECTION"
PATHS = ("direct", "tunnel")
#: p99.9 is given only for windows of at least this many calls, so that at least five calls lie
#: above it; with fewer it would be one of the few slowest calls, not a percentile.
P99_9_MIN_CALLS = 5000
_LISTENING = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+) ")


def start_stub(work: WorkDir, timeout: float = 15.0) -> tuple[Proc, int]:
    """Start ``python -m backchannel_rfc serve --port 0``; the process and the port it chose."""
    proc = spawn(
        "stub ABAP system",
        [sys.executable, "-m", "backchannel_rfc", "serve", "--port", "0"],
        work.path / "rfc-stub.log",
        stdout_pipe=True,
    )
    assert proc.popen.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.popen.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)
    line = proc.popen.stdout.readline().decode(errors="replace") if ready else ""
    found = _LISTENING.search(line)
    if found is None:
        proc.stop()
        raise BenchError(
            f"the stub ABAP system did not say where it listens within {timeout:g} s "
            f"(output {line!r}):\n{proc.log_tail()}"
        )
    return proc, int(found["port"])


# ----------------------------------------------------------------------------- the run


class RfcRun:
    """Shared set-up of the scenario: where things listen and how to meter them."""

    def __init__(
        self,
        work: WorkDir,
        pair: Pair,
        stub: Proc,
        stub_port: int,
        progress: Callable[[str], None],
    ) -> None:
        assert pair.addresses.rfc_front_door is not None, "the pair has no RFC front door"
        self.work = work
        self.pair = pair
        self.stub = stub
        self.stub_port = stub_port
        self.front_door = pair.addresses.rfc_front_door
        self.progress = progress
        self.meter = CpuMeter({"gateway": pair.gateway, "connector": pair.connector, "stub": stub})
        self.loop = ClosedLoop("rfc", work, pair, self.meter, self._load_argv)

    def check_alive(self, during: str) -> None:
        """Raise if gateway, connector or stub has exited."""
        self.pair.check_alive(during)
        self.stub.check_alive(during)

    def _load_argv(self, path: str, connections: int, out: Path) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "bench.rfc_load",
            "--connections",
            str(connections),
            "--latencies-out",
            str(out),
        ]
        if path == "direct":
            return [*argv, "--port", str(self.stub_port)]
        return [
            *argv,
            "--gateway",
            f"127.0.0.1:{self.front_door}",
            "--app",
            f"{SUBACCOUNT}/{APP}",
            "--secret-file",
            str(self.work.path / "app.secret"),
            "--ashost",
            RFC_VIRTUAL[0],
            "--sysnr",
            f"{RFC_VIRTUAL[1] - 3300:02d}",  # system number NN: gateway port 33NN
        ]

    def load_case(
        self,
        path: str,
        concurrency: int,
        *,
        processes: int | None,
        warm_up: float,
        seconds: float,
        profile_roles: Sequence[str] = (),
        profile_stem: Path | None = None,
    ) -> tuple[dict[str, Any], array[int]]:
        """One measured window of closed-loop STFC_CONNECTION calls at ``concurrency``: the
        case's JSON and the latency of every call in the window (ns)."""
        self.check_alive(f"rfc {path} c={concurrency}")
        what = "that its connections are logged on"
        if path == "tunnel":
            # A cloud connection holds a backend connection for its lifetime; beyond the
            # connector's [plugins.rfc] max_connections (20) a logon waits for one.
            what += " (more connections than the connector's max_connections?)"
        window = self.loop.measure(
            path,
            concurrency,
            processes=processes,
            warm_up=warm_up,
            seconds=seconds,
            ready_within=30,
            ready_what=what,
            profile_roles=profile_roles,
            profile_stem=profile_stem,
        )
        calls = window.completed(
            failed="connection(s) failed", nothing="no call returned in the window"
        )
        counts = {
            "calls": calls,
            "warm_up_calls": window.warm_up_completed(),
            "calls_per_s": round(calls / seconds, 1),
            "latency_ms": latency_summary(window.latencies, p99_9_from=P99_9_MIN_CALLS),
            "logon_ms": [ms for r in window.reports for ms in r["logon_ms"]],
        }
        return window.case_json(counts, "cpu_us_per_call", "stub"), window.latencies


def _summary_side(group: Sequence[dict[str, Any]], latencies: array[int]) -> dict[str, Any]:
    first = group[0]
    return {
        "calls_per_s": spread(c["calls_per_s"] for c in group),
        "latency_ms_pooled": latency_summary(latencies, p99_9_from=P99_9_MIN_CALLS),
        "logon_ms_median": round(statistics.median(ms for c in group for ms in c["logon_ms"]), 3),
        "cpu_percent_median": {
            key: median([c["cpu_percent"][key] for c in group]) for key in first["cpu_percent"]
        },
        "cpu_us_per_call_median": {
            key: median([c["cpu_us_per_call"][key] for c in group])
            for key in first["cpu_us_per_call"]
        },
    }


def run_rfc(
    run: RfcRun,
    *,
    concurrencies: Sequence[int],
    processes: int | None,
    warm_up: float,
    seconds: float,
    repeat: int,
) -> dict[str, Any]:
    """All cases, alternating direct and tunnel; returns the JSON section. Latency percentiles
    of the summary are over the calls of all repeats together (more calls, so a p99.9 more
    often); calls/s is the median over the repeats."""
    cases: list[dict[str, Any]] = []
    pooled = {(c, path): array("q") for c in concurrencies for path in PATHS}
    for index in range(repeat):
        for concurrency in concurrencies:
            for path in PATHS:
                case, latencies = run.load_case(
                    path, concurrency, processes=processes, warm_up=warm_up, seconds=seconds
                )
                case["repeat"] = index + 1
                cases.append(case)
                pooled[concurrency, path].extend(latencies)
                latency = case["latency_ms"]
                p99_9 = "-" if latency["p99_9"] is None else f"{latency['p99_9']:.3f}"
                run.progress(
                    f"  rfc c={concurrency:<3} {path:6} run {index + 1}/{repeat}: "
                    f"{case['calls_per_s']:8.0f} calls/s  p50 {latency['p50']:.3f} "
                    f"p99 {latency['p99']:.3f} p99.9 {p99_9} ms  CPU% "
                    + " ".join(
                        f"{k} {v:.0f}" for k, v in case["cpu_percent"].items() if k != "bench"
                    )
                )
    summary: dict[str, Any] = {}
    for concurrency in concurrencies:
        row: dict[str, Any] = {
            path: _summary_side(
                [c for c in cases if c["concurrency"] == concurrency and c["path"] == path],
                pooled[concurrency, path],
            )
            for path in PATHS
        }
        tunnel = [c for c in cases if c["concurrency"] == concurrency and c["path"] == "tunnel"]
        direct_rate = row["direct"]["calls_per_s"]["median"]
        direct_p50 = row["direct"]["latency_ms_pooled"]["p50"]
        row["ratio_tunnel_to_direct"] = round(
            row["tunnel"]["calls_per_s"]["median"] / direct_rate, 4
        )
        row["p50_ratio_tunnel_to_direct"] = round(
            row["tunnel"]["latency_ms_pooled"]["p50"] / direct_p50, 2
        )
        row["tunnel"]["rss"] = rss_merge(tunnel)
        summary[str(concurrency)] = row
    return {
        "system": "python -m backchannel_rfc serve (stub ABAP system, one Python process)",
        "client": "bench.rfc_load (backchannel_rfc.Connection, one call in flight per connection)",
        "call": f"{FUNCTION} REQUTEXT=<short text>, ECHOTEXT checked",
        "concurrencies": list(concurrencies),
        "client_processes": processes,
        "warm_up_seconds": warm_up,
        "seconds": seconds,
        "repeat": repeat,
        "p99_9_min_calls": P99_9_MIN_CALLS,
        "summary": summary,
        "cases": cases,
    }


def profile_rfc(
    run: RfcRun,
    roles: Sequence[str],
    *,
    concurrencies: Sequence[int],
    processes: int | None,
    warm_up: float,
    seconds: float,
    stamp: str,
) -> dict[str, Any]:
    """One extra tunnel window per concurrency with py-spy on gateway and/or connector."""
    return profile_windows(
        "rfc",
        lambda concurrency, stem: run.load_case(
            "tunnel",
            concurrency,
            processes=processes,
            warm_up=warm_up,
            seconds=seconds,
            profile_roles=roles,
            profile_stem=stem,
        )[0],
        concurrencies,
        stamp=stamp,
        rate_key="calls_per_s",
        rate_unit="calls/s",
        progress=run.progress,
    )
