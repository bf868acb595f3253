"""HTTP 1 KiB keep-alive GETs through every path: direct, the gateway's HTTP proxy, a gateway
TCP port forward, and each peer's forward; req/s and p50/p99/p99.9 latency.

The load generator is ``wrk`` (Debian package ``wrk``) with a generated Lua script that sets the
request line (absolute-form plus ``Proxy-Authorization`` for the proxy) and prints one JSON line
with wrk's own percentiles; ``-t`` is min(2, connections). Without wrk the bench's own client
(``python -m bench.http_load``, 2 processes above one connection) runs the same cases. Paths
alternate for each concurrency, ``repeat`` times; the table shows medians.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .closed_loop import latency_summary, split
from .procs import BenchError, Proc, WorkDir, spawn

SMALL_PATH = "/small"

_LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "p99_9_us": %d, '
    .. '"max_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class HttpPath:
    """Where one path's load goes: a port, and for the proxy the virtual target and the
    ``subaccount/app:secret`` credentials of ``Proxy-Authorization``."""

    name: str
    port: int
    proxy_target: str | None = None
    credentials: str | None = None
    #: The processes on the path (server side, client side) whose CPU per request is reported.
    procs: tuple[Proc, ...] = ()


def wrk_path() -> str | None:
    """wrk's path, or None."""
    return shutil.which("wrk")


def _lua(path: HttpPath) -> str:
    lines = ['wrk.method = "GET"']
    if path.proxy_target is None:
        lines.append(f'wrk.path = "{SMALL_PATH}"')
    else:
        lines.append(f'wrk.path = "http://{path.proxy_target}{SMALL_PATH}"')
        lines.append(f'wrk.headers["Host"] = "{path.proxy_target}"')
    if path.credentials is not None:
        token = base64.b64encode(path.credentials.encode()).decode()
        lines.append(f'wrk.headers["Proxy-Authorization"] = "Basic {token}"')
    return "\n".join(lines) + "\n" + _LUA_DONE


def run_wrk(
    wrk: str, work: WorkDir, path: HttpPath, connections: int, seconds: float
) -> dict[str, Any]:
    """One wrk window; wrk's own percentiles (µs resolution) in ms."""
    script = work.path / f"wrk-{path.name}.lua"
    script.write_text(_lua(path))
    script.chmod(0o600)  # holds the app's credentials
    argv = [
        wrk,
        f"-t{min(2, connections)}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://127.0.0.1:{path.port}{SMALL_PATH}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("{")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed on {path.name} (exit {done.returncode}): {done.stderr[-500:]}"
        )
    report = json.loads(line)
    errors = sum(report[k] for k in ("connect", "read", "write", "status", "timeout"))
    if errors:
        raise BenchError(f"http {path.name} c={connections}: wrk counted {errors} errors: {report}")
    return {
        "req_per_s": round(report["requests"] / (report["duration_us"] / 1e6), 1),
        "latency_ms": {
            "p50": report["p50_us"] / 1000,
            "p99": report["p99_us"] / 1000,
            "p99_9": report["p99_9_us"] / 1000,
            "mean": round(report["mean_us"] / 1000, 3),
            "max": report["max_us"] / 1000,
        },
        "requests": report["requests"],
    }


def run_own_client(
    work: WorkDir, path: HttpPath, connections: int, seconds: float, warm_up: float
) -> dict[str, Any]:
    """One window of ``python -m bench.http_load`` (2 processes above one connection)."""
    processes = 1 if connections == 1 else 2
    measure_from = time.monotonic() + 3.0 + warm_up  # time for the processes to start
    until = measure_from + seconds
    secret_file = work.path / "http-versus.secret"
    loads = []
    try:
        for index, share in enumerate(split(connections, processes)):
            argv = [
                sys.executable, "-m", "bench.http_load", "--port", str(path.port),
                "--connections", str(share), "--path", SMALL_PATH,
                "--window", repr(measure_from), repr(until),
                "--latencies-out", str(work.path / f"http-versus-{index}.lat"),
            ]  # fmt: skip
            if path.proxy_target is not None and path.credentials is not None:
                prefix, _, secret = path.credentials.partition(":")
                secret_file.write_text(secret)
                secret_file.chmod(0o600)
                argv += ["--proxy-target", path.proxy_target, "--credentials-prefix", prefix]
                argv += ["--secret-file", str(secret_file)]
            loads.append(
                spawn(f"http load {index}", argv, work.path / "http-versus.log", stdout_pipe=True)
            )
        latencies: array[int] = array("q")
        for index, proc in enumerate(loads):
            proc.popen.wait(until - time.monotonic() + 30)
            assert proc.popen.stdout is not None
            report = json.loads(proc.popen.stdout.read().decode().strip().splitlines()[-1])
            if report["error_count"]:
                raise BenchError(f"http {path.name} c={connections}: {report['errors'][:3]}")
            out = work.path / f"http-versus-{index}.lat"
            latencies.frombytes(out.read_bytes())
            out.unlink()
    finally:
        for proc in loads:
            proc.stop()
    summary = latency_summary(latencies)
    return {
        "req_per_s": round(len(latencies) / seconds, 1),
        "latency_ms": summary,
        "requests": len(latencies),
    }


def run_http_versus(
    work: WorkDir,
    paths: Sequence[HttpPath],
    *,
    concurrencies: Sequence[int],
    seconds: float,
    warm_up: float,
    repeat: int,
    progress: Callable[[str], None],
    check_alive: Callable[[str], None],
) -> dict[str, Any]:
    """Every path at every concurrency, alternating; returns the JSON section."""
    wrk = wrk_path()
    client = "wrk" if wrk else "bench.http_load"
    runs: list[dict[str, Any]] = []
    for concurrency in concurrencies:
        for index in range(repeat):
            for path in paths:
                check_alive(f"http {path.name} c={concurrency}")
                if wrk is not None and warm_up > 0:
                    run_wrk(wrk, work, path, concurrency, max(1.0, warm_up))
                cpu_before = [proc.cpu_seconds() for proc in path.procs]
                if wrk is not None:
                    result = run_wrk(wrk, work, path, concurrency, seconds)
                else:
                    result = run_own_client(work, path, concurrency, seconds, warm_up)
                if path.procs and result["requests"]:
                    result["cpu_us_per_request"] = [
                        round(1e6 * (proc.cpu_seconds() - before) / result["requests"], 1)
                        for proc, before in zip(path.procs, cpu_before, strict=True)
                    ]
                result |= {"path": path.name, "concurrency": concurrency, "repeat": index + 1}
                runs.append(result)
                ms = result["latency_ms"]
                progress(
                    f"  http c={concurrency:<3} {path.name:16} run {index + 1}/{repeat}: "
                    f"{result['req_per_s']:9.0f} req/s  p50 {ms['p50']:.3f} p99 {ms['p99']:.3f}"
                    f" p99.9 {ms['p99_9']:.3f} ms"
                )
    return {
        "client": client,
        "request": f"GET {SMALL_PATH} (1 KiB body), kept-alive connections",
        "seconds": seconds,
        "repeat": repeat,
        "paths": [p.name for p in paths],
        "summary": _summary(runs, concurrencies, [p.name for p in paths]),
        "runs": runs,
    }


def _median(values: Sequence[float | None]) -> float:
    items = [v for v in values if v is not None]
    return round(statistics.median(items), 3) if items else math.nan


def _summary(
    runs: Sequence[dict[str, Any]], concurrencies: Sequence[int], names: Sequence[str]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for concurrency in concurrencies:
        row: dict[str, Any] = {}
        for name in names:
            mine = [r for r in runs if r["concurrency"] == concurrency and r["path"] == name]
            row[name] = {
                "req_per_s": round(statistics.median(r["req_per_s"] for r in mine), 1),
                **{
                    key: _median([r["latency_ms"][key] for r in mine])
                    for key in ("p50", "p99", "p99_9")
                },
            }
            costs = [r["cpu_us_per_request"] for r in mine if "cpu_us_per_request" in r]
            if costs:
                row[name]["cpu_us_per_request"] = [
                    round(statistics.median(c[i] for c in costs), 1) for i in range(len(costs[0]))
                ]
        summary[str(concurrency)] = row
    return summary


def http_paths(
    backend_port: int,
    proxy_port: int | None,
    forward_port: int | None,
    proxy_target: str,
    credentials: str,
    peer_ports: Mapping[str, tuple[int, tuple[Proc, ...]]],
    pair_procs: tuple[Proc, ...] = (),
) -> list[HttpPath]:
    """direct, proxy, forward (when the pair has them), then each peer's forward."""
    paths = [HttpPath("direct", backend_port)]
    if proxy_port is not None:
        paths.append(HttpPath("proxy", proxy_port, proxy_target, credentials, pair_procs))
    if forward_port is not None:
        paths.append(HttpPath("forward", forward_port, procs=pair_procs))
    paths += [HttpPath(name, port, procs=procs) for name, (port, procs) in peer_ports.items()]
    return paths
