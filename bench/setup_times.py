"""Set-up times: a new stream's first byte, connector start to first request served, and
reconnect after the tunnel drops.

- *New stream + first byte*: connect to the ``hold`` server (which greets every connection with
  one byte) through each path and time from ``connect()`` to the greeting, sequentially,
  ``samples`` times per path in alternating batches; p50 / p99 / max. Through backchannel this is
  a TCP accept, a stream OPEN over the tunnel, the connector's access check and backend
  connect, ACCEPT, and the greeting's DATA frame back.
- *New connection + first answer*: the same for a client that speaks first: connect to the
  ``source`` server, send its readiness probe (a count of 0) and time until its one-byte answer.
  Through backchannel the probe can travel with the stream's OPEN (the port forward sends what
  the client wrote before the stream was open that way); a server-first protocol cannot.
- *Connector start to first request served*: a fresh gateway is listening; the clock starts when
  the connector process is spawned and stops when a stream through the gateway's forward gets
  the backend's greeting (polled every 5 ms). Includes the connector's Python start-up.
- *Reconnect*: the gateway is killed (SIGKILL, the tunnel drops without a close) and restarted
  after ``down`` seconds with the same config; the clock starts when the gateway's tunnel port
  accepts TCP again and stops at the first greeting through its forward.
"""

from __future__ import annotations

import math
import socket
import statistics
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from .procs import BenchError, Pair, WorkDir, backchannel_command, spawn, wait_listening

POLL = 0.005
HOLD_BYTE = b"R"
PROBE = struct.pack(">Q", 0)  # the source server's readiness probe: answered with HOLD_BYTE


def first_byte_seconds(port: int, timeout: float = 5.0) -> float:
    """Seconds from connect() to the hold server's greeting through ``port``."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock.recv(1) != HOLD_BYTE:
            raise BenchError(f"no greeting through port {port}")
        return time.perf_counter() - started


def first_answer_seconds(port: int, timeout: float = 5.0) -> float:
    """Seconds from connect() to the source server's answer to a probe sent right after it,
    through ``port``."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(PROBE)
        if sock.recv(1) != HOLD_BYTE:
            raise BenchError(f"no answer to the probe through port {port}")
        return time.perf_counter() - started


def _try_greeting(port: int) -> bool:
    try:
        first_byte_seconds(port, timeout=1.0)
    except (OSError, BenchError):
        return False
    return True


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def rank(fraction: float) -> float:
        return round(1000 * ordered[max(0, math.ceil(fraction * len(ordered)) - 1)], 3)

    return {
        "p50_ms": rank(0.5),
        "p99_ms": rank(0.99),
        "max_ms": round(1000 * ordered[-1], 3),
        "mean_ms": round(1000 * statistics.fmean(ordered), 3),
        "samples": len(ordered),
    }


def measure_first_byte(
    ports: Mapping[str, int],
    samples: int,
    progress: Callable[[str], None],
    batch: int = 25,
    *,
    timed: Callable[[int], float] = first_byte_seconds,
    what: str = "new stream + first byte",
) -> dict[str, Any]:
    """p50/p99 of ``timed`` (connect-to-first-byte by default) per path (``ports``: name ->
    port), in alternating batches."""
    values: dict[str, list[float]] = {name: [] for name in ports}
    for port in ports.values():  # one unmeasured connection per path
        timed(port)
    while any(len(v) < samples for v in values.values()):
        for name, port in ports.items():
            for _ in range(min(batch, samples - len(values[name]))):
                values[name].append(timed(port))
    result = {name: _percentiles(v) for name, v in values.items()}
    for name, row in result.items():
        progress(f"  {what} {name:16}: p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms")
    return result


def measure_start(
    work: WorkDir, pair: Pair, connector_toml: str, deadline: float, log_level: str
) -> float:
    """Seconds from spawning a connector (the pair's own is stopped first) to the first
    greeting through the gateway's ``hold`` forward; the new connector replaces the old."""
    pair.connector.stop()
    port = pair.addresses.forwards["hold"]
    started = time.perf_counter()
    pair.connector = spawn(
        "connector",
        [*backchannel_command(), "connector", "-c", connector_toml, "--log-level", log_level],
        work.path / "connector-setup-2.log",
    )
    while not _try_greeting(port):
        pair.connector.check_alive("start-up timing")
        if time.monotonic() > deadline:
            raise BenchError("the restarted connector served no stream in time")
        time.sleep(POLL)
    return time.perf_counter() - started


def measure_reconnect(
    work: WorkDir, pair: Pair, gateway_toml: str, down: float, deadline: float, log_level: str
) -> dict[str, float]:
    """Kill the gateway, restart it after ``down`` s; seconds from its tunnel port accepting
    again to the first greeting through it."""
    pair.gateway.popen.kill()
    pair.gateway.popen.wait(10)
    time.sleep(down)
    restarted = time.perf_counter()
    pair.gateway = spawn(
        "gateway",
        [*backchannel_command(), "gateway", "-c", gateway_toml, "--log-level", log_level],
        work.path / "gateway-setup-2.log",
    )
    wait_listening(pair.gateway, pair.addresses.tunnel, deadline)
    reachable = time.perf_counter()
    port = pair.addresses.forwards["hold"]
    while not _try_greeting(port):
        pair.check_alive("reconnect timing")
        if time.monotonic() > deadline:
            raise BenchError("the connector did not reconnect in time")
        time.sleep(POLL)
    served = time.perf_counter()
    return {
        "gateway_down_seconds": down,
        "gateway_start_seconds": round(reachable - restarted, 3),
        "reconnect_seconds": round(served - reachable, 3),
    }


def run_setup(
    work: WorkDir,
    pair: Pair,
    hold_ports: Mapping[str, int],
    *,
    source_ports: Mapping[str, int] | None = None,
    samples: int,
    down: float,
    log_level: str,
    label: str,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """First byte (and, with ``source_ports``, first answer) over every path, then start-up
    and reconnect of backchannel."""
    first_byte = measure_first_byte(hold_ports, samples, progress)
    first_answer = (
        measure_first_byte(
            source_ports,
            samples,
            progress,
            timed=first_answer_seconds,
            what="new connection + first answer",
        )
        if source_ports
        else None
    )
    deadline = time.monotonic() + 60
    start = measure_start(
        work, pair, str(work.path / f"connector-{label}.toml"), deadline, log_level
    )
    progress(f"  connector start to first request served: {start:.3f} s")
    reconnect = measure_reconnect(
        work, pair, str(work.path / f"gateway-{label}.toml"), down, deadline + 30, log_level
    )
    progress(
        f"  reconnect after the gateway was down {down:g} s: {reconnect['reconnect_seconds']:.3f}"
        " s from the gateway listening again to a stream served"
    )
    result: dict[str, Any] = {"first_byte": first_byte}
    if first_answer is not None:
        result["first_answer"] = first_answer
    return result | {
        "connector_start_to_first_request_seconds": round(start, 3),
        "reconnect": reconnect,
    }
