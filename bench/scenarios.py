"""The measurements: bulk TCP over one stream, and many idle streams.

The client side runs in the bench process with plain blocking sockets (the kernel does the work;
the GIL is released while a socket call waits), so the client costs as little CPU as possible and
the gateway and connector processes get the cores.
"""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .procs import APP, SUBACCOUNT, VIRTUAL, BenchError, Pair, Proc

MIB = 1 << 20
CLIENT_CHUNK = 1 << 20
STALL_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.1


# ----------------------------------------------------------------------------- sampling


class RssSampler:
    """Samples VmRSS of some processes every 100 ms in a thread."""

    def __init__(self, procs: Sequence[Proc], interval: float = SAMPLE_INTERVAL) -> None:
        self._procs = list(procs)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._origin = time.monotonic()
        #: (seconds since start, rss KiB of each process)
        self.samples: list[tuple[float, list[int]]] = []
        self.error: str | None = None

    def _sample(self) -> None:
        self.samples.append(
            (time.monotonic() - self._origin, [proc.rss_kib() for proc in self._procs])
        )

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                self._sample()
        except BenchError as exc:
            self.error = str(exc)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(BenchError):
            self._sample()

    def summary(self, index: int) -> dict[str, Any]:
        """start / peak / end KiB of the index-th process, and the sample count."""
        values = [rss[index] for _, rss in self.samples]
        return {
            "start_kib": values[0],
            "peak_kib": max(values),
            "end_kib": values[-1],
            "samples": len(values),
        }

    def series(self, index: int) -> list[list[float]]:
        """[[t, rss KiB], ...] for the JSON file."""
        return [[round(t, 3), rss[index]] for t, rss in self.samples]


# ----------------------------------------------------------------------------- CPU accounting


def _system_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat (steal counts as busy)."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]) - idle, sum(values[:8])


def _self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """CPU used by each of our processes, by the bench itself, and by everything else."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self._procs = procs

    def snapshot(self) -> dict[str, float]:
        """Cumulative CPU seconds per process, plus the machine's busy ticks."""
        busy, _ = _system_ticks()
        snap: dict[str, float] = {}
        for name, proc in self._procs.items():
            user, system = proc.cpu_times()
            snap[name] = user + system
            snap[f"_sys_{name}"] = system
        snap["bench"] = _self_cpu_seconds()
        snap["_busy"] = busy / CLOCK_TICKS
        snap["_wall"] = time.monotonic()
        return snap

    @staticmethod
    def seconds(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """CPU seconds per process over the interval (``<name>_sys``: the kernel part of it)."""
        result = {k: round(after[k] - before[k], 3) for k in before if not k.startswith("_")}
        for key in before:
            if key.startswith("_sys_"):
                result[key[5:] + "_sys"] = round(after[key] - before[key], 3)
        return result

    @staticmethod
    def percent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Percent of one CPU per process over the interval; ``other`` is everything not ours."""
        wall = after["_wall"] - before["_wall"]
        ours = {k: after[k] - before[k] for k in before if not k.startswith("_")}
        result = {k: round(100 * v / wall, 1) for k, v in ours.items()}
        other = (after["_busy"] - before["_busy"]) - sum(ours.values())
        result["other"] = round(max(0.0, 100 * other / wall), 1)
        return result


def background_load(seconds: float = 1.0) -> float:
    """Percent of one CPU in use on the machine over ``seconds`` (call before starting anything)."""
    busy_before, _ = _system_ticks()
    time.sleep(seconds)
    busy_after, _ = _system_ticks()
    return round(100 * (busy_after - busy_before) / CLOCK_TICKS / seconds, 1)


# ----------------------------------------------------------------------------- bulk


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=STALL_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise BenchError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def upload(port: int, total: int, deadline: float) -> float:
    """Send ``total`` bytes to the sink, wait for its byte count; returns seconds."""
    payload = memoryview(bytes(range(256)) * (CLIENT_CHUNK // 256))
    with _connect(port) as sock:
        started = time.perf_counter()
        remaining = total
        while remaining:
            size = min(remaining, CLIENT_CHUNK)
            sock.sendall(payload[:size])
            remaining -= size
            if time.monotonic() > deadline:
                raise BenchError(
                    f"upload not done in time ({total - remaining} of {total} bytes sent)"
                )
        sock.shutdown(socket.SHUT_WR)
        (received,) = struct.unpack(">Q", _recv_exactly(sock, 8))
        elapsed = time.perf_counter() - started
    if received != total:
        raise BenchError(f"the sink counted {received} bytes, {total} were sent")
    return elapsed


def download(port: int, total: int, deadline: float) -> float:
    """Ask the source for ``total`` bytes and read them all; returns seconds."""
    buffer = memoryview(bytearray(4 * CLIENT_CHUNK))
    with _connect(port) as sock:
        started = time.perf_counter()
        sock.sendall(struct.pack(">Q", total))
        received = 0
        while received < total:
            count = sock.recv_into(buffer)
            if not count:
                raise BenchError(f"download ended early: {received} of {total} bytes")
            received += count
            if time.monotonic() > deadline:
                raise BenchError(f"download not done in time ({received} of {total} bytes)")
        elapsed = time.perf_counter() - started
        if sock.recv(1):
            raise BenchError("the source sent more bytes than asked for")
    return elapsed


@dataclass
class BulkRun:
    """One measured transfer."""

    direction: str
    path: str
    repeat: int
    seconds: float
    mb_per_s: float
    cpu_percent: dict[str, float] | None = None
    cpu_seconds: dict[str, float] | None = None
    rss: dict[str, dict[str, Any]] | None = None
    rss_series: dict[str, list[list[float]]] | None = None

    def as_json(self) -> dict[str, Any]:
        """The run as a JSON-ready dict."""
        data: dict[str, Any] = {
            "direction": self.direction,
            "path": self.path,
            "repeat": self.repeat,
            "seconds": round(self.seconds, 4),
            "mb_per_s": round(self.mb_per_s, 2),
        }
        if self.cpu_percent is not None:
            data["cpu_percent"] = self.cpu_percent
        if self.cpu_seconds is not None:
            data["cpu_seconds"] = self.cpu_seconds
        if self.rss is not None:
            data["rss"] = self.rss
            data["rss_series"] = self.rss_series
        return data


TRANSFERS: dict[str, tuple[str, Callable[[int, int, float], float]]] = {
    "upload": ("sink", upload),
    "download": ("source", download),
}


@dataclass(frozen=True)
class BulkPath:
    """A path measured beside direct and tunnel (a peer): per direction a transfer taking
    ``(total bytes, deadline)`` and returning seconds, and the processes on the path (server
    side, client side) whose RSS is sampled and CPU metered during its runs."""

    name: str
    transfers: dict[str, Callable[[int, float], float]]
    procs: tuple[tuple[str, Proc], ...]


def _base_paths(
    pair: Pair, backend_ports: dict[str, int], directions: Sequence[str]
) -> list[BulkPath]:
    direct: dict[str, Callable[[int, float], float]] = {}
    tunnel: dict[str, Callable[[int, float], float]] = {}
    for direction in directions:
        server, transfer = TRANSFERS[direction]
        direct[direction] = functools.partial(transfer, backend_ports[server])
        tunnel[direction] = functools.partial(transfer, pair.addresses.forwards[server])
    gateway, connector = pair.procs()
    return [
        BulkPath("direct", direct, ()),
        BulkPath("tunnel", tunnel, (("gateway", gateway), ("connector", connector))),
    ]


def run_bulk(
    pair: Pair,
    backend: Proc,
    backend_ports: dict[str, int],
    *,
    mib: int,
    repeat: int,
    directions: Sequence[str],
    progress: Callable[[str], None],
    peers: Sequence[BulkPath] = (),
) -> dict[str, Any]:
    """Alternate direct, tunnel and each peer's transfers of ``mib`` MiB; returns the JSON
    section (``peers``: the same figures per peer, and the tunnel's ratio to it)."""
    total = mib * MIB
    budget = 20.0 + mib / 4.0  # assumes at least 4 MiB/s; a slower run is reported as a failure
    names = ("gateway", "connector")
    paths = [*_base_paths(pair, backend_ports, directions), *peers]
    metered: dict[str, Proc] = {"backend": backend}
    for path in paths:
        for role, proc in path.procs:
            metered[role if path.name == "tunnel" else f"{path.name}/{role}"] = proc
    meter = CpuMeter(metered)

    warm_up = min(total, 16 * MIB)
    for direction in directions:
        for path in paths:
            if direction in path.transfers:
                path.transfers[direction](warm_up, time.monotonic() + budget)
    time.sleep(0.5)

    runs: list[BulkRun] = []
    for index in range(repeat):
        for direction in directions:
            for path in paths:
                if direction not in path.transfers:
                    continue
                pair.check_alive(f"bulk {direction} ({path.name})")
                cpu_before = meter.snapshot()
                with RssSampler([proc for _, proc in path.procs]) as sampler:
                    seconds = path.transfers[direction](total, time.monotonic() + budget)
                cpu_after = meter.snapshot()
                if sampler.error:
                    raise BenchError(sampler.error)
                cpu = CpuMeter.percent(cpu_before, cpu_after)
                roles = [role for role, _ in path.procs]
                run = BulkRun(
                    direction,
                    path.name,
                    index + 1,
                    seconds,
                    total / seconds / 1e6,
                    cpu,
                    CpuMeter.seconds(cpu_before, cpu_after),
                    rss={role: sampler.summary(i) for i, role in enumerate(roles)} or None,
                    rss_series={role: sampler.series(i) for i, role in enumerate(roles)} or None,
                )
                runs.append(run)
                progress(
                    f"  bulk {direction:8} {path.name:16} run {index + 1}/{repeat}: "
                    f"{run.mb_per_s:9.1f} MB/s ({run.seconds:.2f} s)  CPU% "
                    + " ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v >= 1)
                )

    summary: dict[str, Any] = {}
    for direction in directions:
        direct = [r for r in runs if r.direction == direction and r.path == "direct"]
        tunnel = [r for r in runs if r.direction == direction and r.path == "tunnel"]
        direct_median = statistics.median(r.mb_per_s for r in direct)
        tunnel_median = statistics.median(r.mb_per_s for r in tunnel)
        cpu_keys = tunnel[0].cpu_percent.keys() if tunnel[0].cpu_percent else ()
        summary[direction] = {
            "direct_mb_per_s": _spread(r.mb_per_s for r in direct),
            "tunnel_mb_per_s": _spread(r.mb_per_s for r in tunnel),
            "ratio_tunnel_to_direct": round(tunnel_median / direct_median, 4),
            "tunnel_cpu_percent_median": {
                key: statistics.median(r.cpu_percent[key] for r in tunnel if r.cpu_percent)
                for key in cpu_keys
            },
            # CPU cost per MB moved: robust against a busy machine (waiting costs no CPU),
            # and 1000 / ms_per_mb is the MB/s ceiling of a side that had a core to itself.
            "tunnel_cpu_ms_per_mb_median": _ms_per_mb(tunnel, total, names),
            "rss": _rss_over(tunnel, names),
            "peers": {},
        }
        for peer in peers:
            mine = [r for r in runs if r.direction == direction and r.path == peer.name]
            if not mine:
                continue
            roles = [role for role, _ in peer.procs]
            peer_median = statistics.median(r.mb_per_s for r in mine)
            summary[direction]["peers"][peer.name] = {
                "mb_per_s": _spread(r.mb_per_s for r in mine),
                "ratio_tunnel_to_peer": round(tunnel_median / peer_median, 3),
                "cpu_ms_per_mb_median": _ms_per_mb(
                    mine, total, [f"{peer.name}/{role}" for role in roles]
                ),
                "rss": _rss_over(mine, roles),
            }
    return {
        "mib": mib,
        "repeat": repeat,
        "warm_up_mib": warm_up // MIB,
        "summary": summary,
        "runs": [r.as_json() for r in runs],
    }


def _ms_per_mb(runs: Sequence[BulkRun], total: int, keys: Iterable[str]) -> dict[str, float]:
    keys = list(keys)
    result = {}
    for key in (*keys, *(f"{k}_sys" for k in keys)):
        values = [1000 * r.cpu_seconds[key] / (total / 1e6) for r in runs if r.cpu_seconds]
        result[key] = round(statistics.median(values), 2)
    return result


def _rss_over(runs: Sequence[BulkRun], roles: Iterable[str]) -> dict[str, dict[str, int]]:
    rss = {}
    for role in roles:
        parts = [r.rss[role] for r in runs if r.rss is not None]
        rss[role] = {
            "start_kib": parts[0]["start_kib"],
            "peak_kib": max(p["peak_kib"] for p in parts),
            "end_kib": parts[-1]["end_kib"],
        }
    return rss


def _spread(values: Iterable[float]) -> dict[str, float]:
    items = list(values)
    return {
        "median": round(statistics.median(items), 2),
        "min": round(min(items), 2),
        "max": round(max(items), 2),
    }


# ----------------------------------------------------------------------------- idle streams


def _socks_handshake(sock: socket.socket, secret: str, host: str, port: int) -> None:
    """RFC 1928 CONNECT with RFC 1929 username/password, on a blocking socket."""
    sock.sendall(b"\x05\x01\x02")
    if _recv_exactly(sock, 2) != b"\x05\x02":
        raise BenchError("the SOCKS5 front door refused username/password authentication")
    user, password = f"{SUBACCOUNT}/{APP}".encode(), secret.encode()
    sock.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
    if _recv_exactly(sock, 2)[1] != 0:
        raise BenchError("the SOCKS5 front door rejected the bench credentials")
    raw_host = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(raw_host)]) + raw_host + struct.pack(">H", port))
    reply = _recv_exactly(sock, 10)
    if reply[1] != 0:
        raise BenchError(f"SOCKS5 reply code {reply[1]:#04x} for {host}:{port}")


def _open_batch(
    pair: Pair, count: int, via: str, secret: str, deadline: float
) -> list[socket.socket]:
    """Open ``count`` streams to the hold server and wait for each greeting."""
    opened: list[socket.socket] = []
    refused: list[socket.socket] = []
    try:
        for _ in range(count):
            if via == "socks5":
                sock = socket.create_connection(
                    ("127.0.0.1", pair.addresses.socks), timeout=STALL_TIMEOUT
                )
                opened.append(sock)
                host, port = VIRTUAL["hold"]
                _socks_handshake(sock, secret, host, port)
            else:
                sock = socket.create_connection(
                    ("127.0.0.1", pair.addresses.forwards["hold"]), timeout=STALL_TIMEOUT
                )
                opened.append(sock)
            sock.setblocking(False)
        waiting = set(opened)
        with selectors.DefaultSelector() as selector:
            for sock in opened:
                selector.register(sock, selectors.EVENT_READ)
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        f"{len(waiting)} streams got no greeting from the backend in time"
                    )
                for key, _ in selector.select(min(left, 1.0)):
                    sock = key.fileobj  # type: ignore[assignment]
                    data = sock.recv(1)
                    selector.unregister(sock)
                    waiting.discard(sock)
                    if data != b"R":
                        refused.append(sock)
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    if refused:
        # At the tunnel's stream limit, streams of the previous round that are still closing
        # count: give them a moment, and open the refused ones again.
        for sock in refused:
            sock.close()
            opened.remove(sock)
        if time.monotonic() + 0.2 >= deadline:
            raise BenchError(
                f"{len(refused)} streams were closed before the backend greeted them (refused "
                "by the gateway or connector? see their logs)"
            )
        time.sleep(0.2)
        opened += _open_batch(pair, len(refused), via, secret, deadline)
    return opened


def _settled_rss(procs: Sequence[Proc], settle: float) -> list[int]:
    time.sleep(settle)
    return [proc.rss_kib() for proc in procs]


def _hold_round(
    pair: Pair,
    streams: int,
    via: str,
    secret: str,
    progress: Callable[[str], None],
    batch: int,
    settle: float,
    round_number: int,
) -> tuple[float, list[int], list[int]]:
    """Open and hold ``streams`` streams, read RSS, close them, read RSS again."""
    procs = pair.procs()
    held: list[socket.socket] = []
    deadline = time.monotonic() + 30.0 + streams / 20.0
    started = time.perf_counter()
    try:
        while len(held) < streams:
            try:
                held += _open_batch(pair, min(batch, streams - len(held)), via, secret, deadline)
            except OSError as exc:
                pair.check_alive("opening idle streams")
                raise BenchError(
                    f"opening stream {len(held) + 1} of {streams} failed: {exc}"
                ) from exc
        open_seconds = time.perf_counter() - started
        progress(
            f"  idle round {round_number}: {streams} streams via {via} established in "
            f"{open_seconds:.2f} s"
        )
        pair.check_alive("holding idle streams")
        with_streams = _settled_rss(procs, settle)
    finally:
        for sock in held:
            sock.close()
    after_close = _settled_rss(procs, 2 * settle)
    pair.check_alive("closing idle streams")
    return open_seconds, with_streams, after_close


def run_idle(
    pair: Pair,
    *,
    streams: int,
    via: str,
    secret: str,
    progress: Callable[[str], None],
    batch: int = 100,
    settle: float = 1.0,
) -> dict[str, Any]:
    """Open ``streams`` held streams, measure RSS before/with/after; returns the JSON section."""
    procs = pair.procs()
    names = ("gateway", "connector")
    limits = {name: proc.nofile_limit() for name, proc in zip(names, procs, strict=True)}
    needed = streams + 64
    for name, (soft, _) in limits.items():
        if soft != -1 and soft < needed:
            raise BenchError(
                f"the {name}'s open-file limit ({soft}) is below the {needed} descriptors that "
                f"{streams} streams need; raise `ulimit -n` or use --idle-streams"
            )
    before = _settled_rss(procs, settle)
    rounds = []
    for round_number in (1, 2):
        # The second round shows whether memory freed by closing is reused (no growth) or leaks.
        rounds.append(
            _hold_round(pair, streams, via, secret, progress, batch, settle, round_number)
        )
    (open_seconds, with_streams, after_close), (_, with_again, after_again) = rounds
    sides = {}
    for i, name in enumerate(names):
        sides[name] = {
            "before_kib": before[i],
            "with_streams_kib": with_streams[i],
            "after_close_kib": after_close[i],
            "per_stream_kib": round((with_streams[i] - before[i]) / streams, 2),
            "second_round_with_streams_kib": with_again[i],
            "second_round_after_close_kib": after_again[i],
            "nofile_soft_limit": limits[name][0],
        }
    return {
        "streams": streams,
        "via": via,
        "open_seconds": round(open_seconds, 3),
        "streams_per_second": round(streams / open_seconds, 1),
        "settle_seconds": settle,
        "sides": sides,
    }
