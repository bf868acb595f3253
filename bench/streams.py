"""Many concurrent streams: aggregate throughput and fairness, tunnel vs direct vs peers.

For each count (1, 10, 100, 1000 by default) the bench opens that many connections to the
``source`` server through each path and waits until each is open end to end (a readiness probe
answered by the server: a TCP connect returns once the front door's kernel accepted it, before
a tunnel has opened its stream and the far end has connected to the server; without the probe
the rates below would include how long the path takes to open 1,000 streams, which the
new-stream scenario measures on its own). Then it asks every stream for the same number of bytes
(``total / count``, at least :data:`MIN_PER_STREAM`) and reads them all at once in one ``epoll``
loop. Aggregate MB/s = all bytes / (last stream done - first request); fairness = the slowest
stream's rate / the fastest stream's rate, each stream's rate being its bytes / (its last byte -
its request). Paths alternate per count, ``repeat`` times; the table shows medians.
"""

from __future__ import annotations

import select
import socket
import statistics
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .procs import BenchError, Proc
from .scenarios import MIB, RssSampler

MIN_PER_STREAM = 64 * 1024
RECV_SIZE = 256 * 1024
CONNECT_TIMEOUT = 30.0
#: A count of 0 asks the source server whether the path is open; it answers one byte.
READY_PROBE = struct.pack(">Q", 0)
READY_ANSWER = b"R"


def _open(port: int, count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _wait_open(socks: Sequence[socket.socket], deadline: float) -> None:
    """Send each (blocking) socket the source's readiness probe; wait for every answer."""
    epoll = select.epoll()
    try:
        waiting = {}
        for sock in socks:
            sock.sendall(READY_PROBE)
            sock.setblocking(False)
            waiting[sock.fileno()] = sock
            epoll.register(sock.fileno(), select.EPOLLIN)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{len(waiting)} of {len(socks)} streams not open end to end")
            for fd, _ in epoll.poll(min(left, 1.0)):
                try:
                    answer = waiting[fd].recv(1)
                except BlockingIOError:
                    continue
                if answer != READY_ANSWER:
                    raise BenchError(f"readiness probe answered {answer!r}, not {READY_ANSWER!r}")
                epoll.unregister(fd)
                del waiting[fd]
    finally:
        epoll.close()


def download_many(port: int, count: int, per_stream: int, deadline: float) -> dict[str, Any]:
    """``count`` concurrent downloads of ``per_stream`` bytes; rates and fairness."""
    socks = _open(port, count)
    try:
        _wait_open(socks, deadline)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    buffer = bytearray(RECV_SIZE)
    received = dict.fromkeys(range(count), 0)
    started: dict[int, float] = {}
    finished: dict[int, float] = {}
    epoll = select.epoll()
    try:
        by_fd = {}
        request = struct.pack(">Q", per_stream)
        for index, sock in enumerate(socks):
            by_fd[sock.fileno()] = index
            epoll.register(sock.fileno(), select.EPOLLIN)
        for index, sock in enumerate(socks):
            started[index] = time.perf_counter()
            sock.send(request)
        while len(finished) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(
                    f"{count - len(finished)} of {count} streams not done in time "
                    f"({sum(received.values())} of {count * per_stream} bytes)"
                )
            for fd, _ in epoll.poll(min(left, 1.0)):
                index = by_fd[fd]
                try:
                    size = socks[index].recv_into(buffer)
                except BlockingIOError:
                    continue
                if not size:
                    if received[index] < per_stream:
                        raise BenchError(
                            f"stream {index} ended after {received[index]} of {per_stream} bytes"
                        )
                    epoll.unregister(fd)
                    continue
                received[index] += size
                if received[index] >= per_stream and index not in finished:
                    finished[index] = time.perf_counter()
                    epoll.unregister(fd)
    finally:
        epoll.close()
        for sock in socks:
            sock.close()
    rates = [per_stream / (finished[i] - started[i]) / 1e6 for i in range(count)]
    wall = max(finished.values()) - min(started.values())
    return {
        "streams": count,
        "bytes_per_stream": per_stream,
        "seconds": round(wall, 4),
        "aggregate_mb_per_s": round(count * per_stream / wall / 1e6, 2),
        "slowest_mb_per_s": round(min(rates), 3),
        "fastest_mb_per_s": round(max(rates), 3),
        "fairness": round(min(rates) / max(rates), 3),
    }


def run_streams(
    paths: Mapping[str, tuple[int, Sequence[Proc]]],
    *,
    counts: Sequence[int],
    total_mib: int,
    repeat: int,
    progress: Callable[[str], None],
    check_alive: Callable[[str], None],
) -> dict[str, Any]:
    """Alternate the ``paths`` (name -> (source port, processes to sample)) for each count."""
    runs: list[dict[str, Any]] = []
    for count in counts:
        per_stream = max(MIN_PER_STREAM, total_mib * MIB // count)
        for index in range(repeat):
            for name, (port, procs) in paths.items():
                check_alive(f"streams {name} x{count}")
                deadline = time.monotonic() + 60 + count * per_stream / 4e6
                with RssSampler(list(procs)) as sampler:
                    result = download_many(port, count, per_stream, deadline)
                result["path"] = name
                result["repeat"] = index + 1
                if procs:
                    result["rss_peak_kib"] = [
                        sampler.summary(i)["peak_kib"] for i in range(len(procs))
                    ]
                    result["rss_start_kib"] = [
                        sampler.summary(i)["start_kib"] for i in range(len(procs))
                    ]
                runs.append(result)
                progress(
                    f"  streams x{count:<5} {name:16} run {index + 1}/{repeat}: "
                    f"{result['aggregate_mb_per_s']:8.1f} MB/s aggregate, slowest/fastest "
                    f"{result['fairness']:.2f}"
                )
    summary: dict[str, Any] = {}
    for count in counts:
        row = {}
        for name in paths:
            mine = [r for r in runs if r["streams"] == count and r["path"] == name]
            row[name] = {
                "aggregate_mb_per_s": round(
                    statistics.median(r["aggregate_mb_per_s"] for r in mine), 2
                ),
                "fairness": round(statistics.median(r["fairness"] for r in mine), 3),
            }
        summary[str(count)] = row
    return {
        "direction": "download",
        "total_mib": total_mib,
        "repeat": repeat,
        "counts": list(counts),
        "summary": summary,
        "runs": runs,
    }
