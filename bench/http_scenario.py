"""The HTTP scenario: request rate and latency, direct vs through the gateway's HTTP proxy.

Backend: ``python -m bench.http_backend`` (its own process; ``GET /small`` answers 1 KiB,
``GET /big?mib=N`` N MiB). Load: ``python -m bench.http_load`` processes (closed loop, kept-alive
connections, one request in flight per connection), the same client for both paths:

- *direct*: origin-form ``GET /small`` to the backend's port;
- *tunnel*: absolute-form ``GET http://web.virtual:80/small`` with ``Proxy-Authorization`` to the
  gateway's ``[plugins.http] proxy_listen``; the connector maps ``web.virtual:80`` with
  ``protocol = "http"`` and one prefix resource ``/`` to the backend.

Each case (path x concurrency) warms up, then counts the responses completed in a fixed window;
direct and tunnel alternate, ``repeat`` times. Then one large download (``GET /big``) per path and
repeat, read by the bench process with a blocking socket as the bulk scenario does.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .closed_loop import (
    NAMES,
    ClosedLoop,
    latency_summary,
    median,
    rss_merge,
    spread,
)
from .procs import APP, HTTP_VIRTUAL, SUBACCOUNT, BenchError, Pair, Proc, WorkDir
from .scenarios import MIB, CpuMeter, RssSampler

SMALL_PATH = "/small"
BIG_CHUNK = 4 * MIB


class HttpRun:
    """Shared set-up of the scenario: where things listen and how to meter them."""

    def __init__(
        self,
        work: WorkDir,
        pair: Pair,
        backend: Proc,
        backend_port: int,
        progress: Callable[[str], None],
    ) -> None:
        assert pair.addresses.http_proxy is not None, "the pair was started without the proxy"
        self.work = work
        self.pair = pair
        self.backend = backend
        self.backend_port = backend_port
        self.proxy_port = pair.addresses.http_proxy
        self.progress = progress
        self.meter = CpuMeter(
            {"gateway": pair.gateway, "connector": pair.connector, "backend": backend}
        )
        self.virtual = f"{HTTP_VIRTUAL[0]}:{HTTP_VIRTUAL[1]}"
        self.loop = ClosedLoop("http", work, pair, self.meter, self._load_argv)

    def check_alive(self, during: str) -> None:
        """Raise if gateway, connector or backend has exited."""
        self.pair.check_alive(during)
        self.backend.check_alive(during)

    def _load_argv(self, path: str, connections: int, out: Path) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "bench.http_load",
            "--connections",
            str(connections),
            "--path",
            SMALL_PATH,
            "--latencies-out",
            str(out),
        ]
        if path == "direct":
            return [*argv, "--port", str(self.backend_port)]
        return [
            *argv,
            "--port",
            str(self.proxy_port),
            "--proxy-target",
            self.virtual,
            "--credentials-prefix",
            f"{SUBACCOUNT}/{APP}",
            "--secret-file",
            str(self.work.path / "app.secret"),
        ]

    def load_case(
        self,
        path: str,
        concurrency: int,
        *,
        processes: int,
        warm_up: float,
        seconds: float,
        profile_roles: Sequence[str] = (),
        profile_stem: Path | None = None,
    ) -> dict[str, Any]:
        """One measured window of closed-loop GET /small at ``concurrency``."""
        self.check_alive(f"http {path} c={concurrency}")
        window = self.loop.measure(
            path,
            concurrency,
            processes=processes,
            warm_up=warm_up,
            seconds=seconds,
            ready_within=20,
            ready_what="that its connections are open",
            profile_roles=profile_roles,
            profile_stem=profile_stem,
        )
        requests = window.completed(
            failed="failed requests/connections", nothing="no response in the measured window"
        )
        counts = {
            "requests": requests,
            "warm_up_requests": window.warm_up_completed(),
            "req_per_s": round(requests / seconds, 1),
            "latency_ms": latency_summary(window.latencies),
        }
        return window.case_json(counts, "cpu_us_per_request", "backend")

    # ------------------------------------------------------------------------- big download

    def download(self, path: str, total: int, deadline: float) -> float:
        """GET /big?mib=N on a fresh connection, read the whole body; returns seconds."""
        mib = total // MIB
        if path == "direct":
            port = self.backend_port
            head = f"GET /big?mib={mib} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
        else:
            port = self.proxy_port
            secret = (self.work.path / "app.secret").read_text().strip()
            token = base64.b64encode(f"{SUBACCOUNT}/{APP}:{secret}".encode()).decode()
            head = (
                f"GET http://{self.virtual}/big?mib={mib} HTTP/1.1\r\nHost: {self.virtual}\r\n"
                f"Proxy-Authorization: Basic {token}\r\n\r\n"
            )
        buffer = memoryview(bytearray(BIG_CHUNK))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            sock.sendall(head.encode())
            received = bytearray()
            while b"\r\n\r\n" not in received:
                count = sock.recv_into(buffer)
                if not count:
                    raise BenchError(f"big download ({path}): closed before the response head")
                received += buffer[:count]
                if len(received) > 1 << 20:
                    raise BenchError(f"big download ({path}): no end of the response head")
            end = received.index(b"\r\n\r\n")
            lines = bytes(received[:end]).decode("latin-1").split("\r\n")
            if not lines[0].startswith("HTTP/1.1 200"):
                raise BenchError(f"big download ({path}): {lines[0]!r}")
            lengths = [
                int(line.split(":", 1)[1])
                for line in lines[1:]
                if line.lower().startswith("content-length:")
            ]
            if lengths != [total]:
                raise BenchError(f"big download ({path}): Content-Length {lengths}, not {total}")
            body = len(received) - end - 4
            while body < total:
                count = sock.recv_into(buffer)
                if not count:
                    raise BenchError(f"big download ({path}) ended early: {body} of {total}")
                body += count
                if time.monotonic() > deadline:
                    raise BenchError(f"big download ({path}) not done in time ({body} of {total})")
            elapsed = time.perf_counter() - started
        if body != total:
            raise BenchError(f"big download ({path}): {body} body bytes, {total} announced")
        return elapsed

    def download_run(self, path: str, total: int, repeat: int) -> dict[str, Any]:
        """One measured big download with CPU (and for the tunnel RSS) accounting."""
        self.check_alive(f"http big download ({path})")
        budget = 20.0 + total / MIB / 4.0
        with contextlib.ExitStack() as stack:
            sampler = (
                stack.enter_context(RssSampler(self.pair.procs())) if path == "tunnel" else None
            )
            before = self.meter.snapshot()
            seconds = self.download(path, total, time.monotonic() + budget)
            after = self.meter.snapshot()
        cpu_seconds = CpuMeter.seconds(before, after)
        result: dict[str, Any] = {
            "path": path,
            "repeat": repeat,
            "seconds": round(seconds, 4),
            "mb_per_s": round(total / seconds / 1e6, 2),
            "cpu_percent": CpuMeter.percent(before, after),
            "cpu_seconds": cpu_seconds,
            "cpu_ms_per_mb": {
                name: round(1000 * cpu_seconds[name] / (total / 1e6), 2)
                for name in (*NAMES, "backend")
            },
        }
        if sampler is not None:
            if sampler.error:
                raise BenchError(sampler.error)
            result["rss"] = {name: sampler.summary(i) for i, name in enumerate(NAMES)}
        return result


def run_http(
    run: HttpRun,
    *,
    concurrencies: Sequence[int],
    processes: int,
    warm_up: float,
    seconds: float,
    repeat: int,
    big_mib: int,
) -> dict[str, Any]:
    """All cases, alternating direct and tunnel; returns the JSON section."""
    progress = run.progress
    total = big_mib * MIB
    # Warm both paths once (first stream through the tunnel, imports, allocator) before timing.
    for path in ("direct", "tunnel"):
        run.download(path, min(total, 16 * MIB), time.monotonic() + 30)
    time.sleep(0.3)
    cases: list[dict[str, Any]] = []
    downloads: list[dict[str, Any]] = []
    for index in range(repeat):
        for concurrency in concurrencies:
            for path in ("direct", "tunnel"):
                case = run.load_case(
                    path, concurrency, processes=processes, warm_up=warm_up, seconds=seconds
                )
                case["repeat"] = index + 1
                cases.append(case)
                latency = case["latency_ms"]
                cpu = case["cpu_percent"]
                progress(
                    f"  http c={concurrency:<3} {path:6} run {index + 1}/{repeat}: "
                    f"{case['req_per_s']:9.0f} req/s  p50 {latency['p50']:.3f} "
                    f"p99 {latency['p99']:.3f} p99.9 {latency['p99_9']:.3f} ms  CPU% "
                    + " ".join(f"{k} {v:.0f}" for k, v in cpu.items() if k != "bench")
                )
        for path in ("direct", "tunnel"):
            result = run.download_run(path, total, index + 1)
            downloads.append(result)
            progress(
                f"  http GET /big {big_mib} MiB {path:6} run {index + 1}/{repeat}: "
                f"{result['mb_per_s']:9.1f} MB/s ({result['seconds']:.2f} s)  CPU% "
                + " ".join(f"{k} {v:.0f}" for k, v in result["cpu_percent"].items())
            )

    summary: dict[str, Any] = {}
    for concurrency in concurrencies:
        direct = [c for c in cases if c["concurrency"] == concurrency and c["path"] == "direct"]
        tunnel = [c for c in cases if c["concurrency"] == concurrency and c["path"] == "tunnel"]
        row: dict[str, Any] = {}
        for path, group in (("direct", direct), ("tunnel", tunnel)):
            row[path] = {
                "req_per_s": spread(c["req_per_s"] for c in group),
                "latency_ms_median": {
                    key: median(c["latency_ms"][key] for c in group)
                    for key in ("p50", "p99", "p99_9", "mean")
                },
                "cpu_percent_median": {
                    key: median(c["cpu_percent"][key] for c in group)
                    for key in group[0]["cpu_percent"]
                },
                "cpu_us_per_request_median": {
                    key: median(c["cpu_us_per_request"][key] for c in group)
                    for key in group[0]["cpu_us_per_request"]
                },
            }
        row["ratio_tunnel_to_direct"] = round(
            row["tunnel"]["req_per_s"]["median"] / row["direct"]["req_per_s"]["median"], 4
        )
        row["tunnel"]["rss"] = rss_merge(tunnel)
        summary[str(concurrency)] = row
    direct_big = [d for d in downloads if d["path"] == "direct"]
    tunnel_big = [d for d in downloads if d["path"] == "tunnel"]
    big = {
        "mib": big_mib,
        "direct_mb_per_s": spread(d["mb_per_s"] for d in direct_big),
        "tunnel_mb_per_s": spread(d["mb_per_s"] for d in tunnel_big),
        "ratio_tunnel_to_direct": round(
            statistics.median(d["mb_per_s"] for d in tunnel_big)
            / statistics.median(d["mb_per_s"] for d in direct_big),
            4,
        ),
        "tunnel_cpu_percent_median": {
            key: median(d["cpu_percent"][key] for d in tunnel_big)
            for key in tunnel_big[0]["cpu_percent"]
        },
        "tunnel_cpu_ms_per_mb_median": {
            key: median(d["cpu_ms_per_mb"][key] for d in tunnel_big)
            for key in tunnel_big[0]["cpu_ms_per_mb"]
        },
        "rss": rss_merge(tunnel_big),
    }
    return {
        "backend": "bench.http_backend (Python, single-threaded epoll, pre-built responses)",
        "client": "bench.http_load (Python, epoll, closed loop, kept-alive connections)",
        "request": f"GET {SMALL_PATH} (1 KiB body)",
        "concurrencies": list(concurrencies),
        "client_processes": processes,
        "warm_up_seconds": warm_up,
        "seconds": seconds,
        "repeat": repeat,
        "summary": summary,
        "big_download": big,
        "cases": cases,
        "downloads": downloads,
    }
