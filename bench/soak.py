"""Soak: mixed traffic through a gateway and a connector (real processes) while the tunnel is
broken at random intervals; ``python -m bench.soak --minutes 10`` (or ``--seconds 20``).

Processes: the bench backend (``sink``/``hold`` servers), the bench HTTP backend, the stub ABAP
system, a gateway and a connector, all on 127.0.0.1. The connector reaches the gateway through a
TCP relay inside this process, so the tunnel can be cut without killing anybody. Traffic, from
this process, in closed loops:

- ``tcp-echo``: SOCKS5 (RFC 1929 credentials) to an echo server in this process: random
  payloads of 1 B .. 1 MiB, SHA-256 compared end to end;
- ``tcp-sink``: the port forward to ``sink``: random bytes, half-close, the sink's byte count
  must match;
- ``http``: the HTTP proxy, ``GET http://web.virtual/small`` (the 1 KiB body is compared) and
  now and then ``/big?mib=1`` (length checked);
- ``rfc``: the RFC front door, ``STFC_CONNECTION`` with a random text that must come back.

Faults, one every ``--fault-every MIN MAX`` seconds (uniformly random): ``cut`` resets the
tunnel's TCP connection at the relay (both ends see a reset; both processes live on) and
``kill`` sends SIGKILL to the connector and starts a new one (``--faults`` may add ``gateway``:
SIGKILL to the gateway and a new one on the same ports). After each fault the next fault
waits until a stream gets through again (the recovery time is reported).

The report: requests done and errors by kind, bytes verified (content compared) and counted
(length compared), faults and recovery times, and RSS / open descriptors of gateway and
connector, and tasks / descriptors of this process, at the start (after a warm-up) and at the
end (after the traffic stopped). Exit status 1 if any payload came back wrong, any request
hung past ``--request-timeout``, a process died on its own, or a kind of traffic never got
through after the last fault; 0 otherwise (errors while the tunnel is down are expected).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import trio

from backchannel import ConnectorConfig, GatewayConfig, open_connector, open_gateway
from backchannel_rfc._connection import Connection

from .http_backend import SMALL_BODY
from .procs import (
    APP,
    HTTP_VIRTUAL,
    RFC_VIRTUAL,
    SUBACCOUNT,
    Addresses,
    BenchError,
    Proc,
    WorkDir,
    backchannel_command,
    free_ports,
    spawn,
    start_backend,
    wait_listening,
)
from .rfc_scenario import start_stub

ECHO_VIRTUAL = ("echo.virtual", 7)
RFC_LOGON = {"client": "100", "user": "DEMO", "passwd": "welcome"}
KINDS = ("tcp-echo", "tcp-sink", "http", "rfc")


# ----------------------------------------------------------------------------- bookkeeping


class Mismatch(Exception):
    """A payload came back different: the one thing a soak must never see."""


@dataclass
class Tally:
    done: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bytes_verified: int = 0
    bytes_counted: int = 0
    mismatches: int = 0
    hangs: int = 0
    last_success: dict[str, float] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)


def error_kind(exc: BaseException) -> str:
    """A short, stable name for an error (so that counts group)."""
    if isinstance(exc, BaseExceptionGroup):
        return error_kind(exc.exceptions[0])
    name = type(exc).__name__
    if isinstance(exc, SocksRefused | HttpStatus):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{name}(errno {exc.errno})"
    return name


def process_figures(proc: Proc) -> dict[str, Any]:
    try:
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
    except OSError:
        fds = -1
    return {"pid": proc.pid, "rss_kib": proc.rss_kib(), "open_fds": fds}


def own_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def own_figures() -> dict[str, int]:
    tasks = 0
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        tasks += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return {"tasks": tasks, "open_fds": len(os.listdir("/proc/self/fd"))}


# ----------------------------------------------------------------------------- the relay


class Relay:
    """TCP relay connector → gateway; :meth:`cut` resets the connections it carries."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    def cut(self) -> int:
        scopes = list(self._scopes)
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    async def _relay(self, downstream: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await trio.aclose_forcefully(downstream)
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, downstream, upstream, nursery.cancel_scope)
                    nursery.start_soon(_pump, upstream, downstream, nursery.cancel_scope)
            finally:
                self._scopes.discard(scope)
        for stream in (downstream, upstream):
            with contextlib.suppress(OSError):
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await trio.aclose_forcefully(stream)


async def _pump(
    source: trio.SocketStream, destination: trio.SocketStream, scope: trio.CancelScope
) -> None:
    try:
        while data := await source.receive_some(256 * 1024):
            await destination.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def serve_echo(stream: trio.SocketStream) -> None:
    try:
        async with stream:
            while data := await stream.receive_some(256 * 1024):
                await stream.send_all(data)
            await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


# ----------------------------------------------------------------------------- clients


class SocksRefused(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"SOCKS5 reply {code:#04x}")


class HttpStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


async def socks_connect(
    port: int, user: str, password: str, host: str, target_port: int
) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(b"\x05\x01\x02")
        if await receive_exactly(stream, 2) != b"\x05\x02":
            raise SocksRefused(0xFF)
        u, p = user.encode(), password.encode()
        await stream.send_all(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        if await receive_exactly(stream, 2) != b"\x01\x00":
            raise SocksRefused(0xFE)
        name = host.encode()
        await stream.send_all(
            bytes([5, 1, 0, 3, len(name)]) + name + target_port.to_bytes(2, "big")
        )
        reply = await receive_exactly(stream, 4)
        if reply[1] != 0:
            raise SocksRefused(reply[1])
        await receive_exactly(stream, {1: 4 + 2, 4: 16 + 2}.get(reply[3], 0) or 1)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


@dataclass
class Soak:
    work: WorkDir
    addresses: Addresses
    echo_port: int
    tally: Tally
    rng: random.Random
    rfc_connections: dict[int, Connection | None] = field(default_factory=dict)

    @property
    def credentials(self) -> tuple[str, str]:
        return f"{SUBACCOUNT}/{APP}", self.work.app_secret

    async def tcp_echo(self, worker: int) -> int:
        size = self.rng.choice([1, 100, 4096, 65536, 300_000, 1 << 20])
        payload = self.rng.randbytes(size)
        user, password = self.credentials
        stream = await socks_connect(self.addresses.socks, user, password, *ECHO_VIRTUAL)
        async with stream:
            digest = hashlib.sha256()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                received = 0
                while received < size:
                    chunk = await stream.receive_some(256 * 1024)
                    if not chunk:
                        raise EOFError(f"echo ended after {received} of {size} bytes")
                    digest.update(chunk)
                    received += len(chunk)
            if digest.digest() != hashlib.sha256(payload).digest():
                raise Mismatch(f"echo of {size} bytes came back different")
        self.tally.bytes_verified += size
        return size

    async def tcp_sink(self, worker: int) -> int:
        size = self.rng.choice([1, 65536, 1 << 20, 4 << 20])
        stream = await trio.open_tcp_stream("127.0.0.1", self.addresses.forwards["sink"])
        async with stream:
            await stream.send_all(self.rng.randbytes(size))
            await stream.send_eof()
            (count,) = struct.unpack(">Q", await receive_exactly(stream, 8))
        if count != size:
            raise Mismatch(f"sink counted {count} of {size} bytes")
        self.tally.bytes_counted += size
        return size

    async def http(self, worker: int) -> int:
        big = self.rng.random() < 0.1
        path = "/big?mib=1" if big else "/small"
        host = f"{HTTP_VIRTUAL[0]}:{HTTP_VIRTUAL[1]}"
        auth = base64.b64encode(":".join(self.credentials).encode()).decode()
        assert self.addresses.http_proxy is not None
        stream = await trio.open_tcp_stream("127.0.0.1", self.addresses.http_proxy)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target=f"http://{host}{path}",
                headers=[("Host", host), ("Proxy-Authorization", f"Basic {auth}")],
            )
            await stream.send_all(
                (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b"")
            )
            body = bytearray()
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(256 * 1024))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise EOFError("the proxy closed the connection mid-response")
        if status != 200:
            raise HttpStatus(status)
        if big:
            if len(body) != 1 << 20:
                raise Mismatch(f"/big gave {len(body)} bytes")
            self.tally.bytes_counted += len(body)
        else:
            if bytes(body) != SMALL_BODY:
                raise Mismatch("/small came back different")
            self.tally.bytes_verified += len(body)
        return len(body)

    async def rfc(self, worker: int) -> int:
        text = f"soak {worker} {self.rng.getrandbits(64):016x}"
        assert self.addresses.rfc_front_door is not None
        params = {
            "gateway": f"127.0.0.1:{self.addresses.rfc_front_door}",
            "app": f"{SUBACCOUNT}/{APP}",
            "app_secret": self.work.app_secret,
            "ashost": RFC_VIRTUAL[0],
            "sysnr": "00",
            **RFC_LOGON,
        }

        def call() -> str:
            connection = self.rfc_connections.get(worker)
            if connection is None:
                connection = Connection(None, **params)
                self.rfc_connections[worker] = connection
            try:
                echoed: str = connection.call("STFC_CONNECTION", REQUTEXT=text)["ECHOTEXT"]
            except BaseException:
                self.rfc_connections[worker] = None
                with contextlib.suppress(Exception):
                    connection.close()
                raise
            return echoed

        echoed = await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        if echoed != text:
            raise Mismatch(f"STFC_CONNECTION echoed {echoed!r}, not {text!r}")
        self.tally.bytes_verified += len(text)
        return len(text)

    async def loop(self, kind: str, worker: int, request_timeout: float, stop: trio.Event) -> None:
        operation: Callable[[int], Awaitable[int]] = getattr(self, kind.replace("-", "_"))
        while not stop.is_set():
            try:
                with trio.fail_after(request_timeout):
                    await operation(worker)
            except trio.TooSlowError:
                self.tally.hangs += 1
                self.tally.errors[f"{kind}: hang"] += 1
            except Mismatch as exc:
                self.tally.mismatches += 1
                self.tally.errors[f"{kind}: MISMATCH {exc}"] += 1
            except Exception as exc:  # any other failure is counted by kind and retried
                self.tally.errors[f"{kind}: {error_kind(exc)}"] += 1
                await trio.sleep(0.05)  # pacing while the tunnel is down, not synchronisation
            else:
                self.tally.done[kind] += 1
                self.tally.last_success[kind] = time.monotonic()


# ----------------------------------------------------------------------------- processes


@dataclass
class Processes:
    """The children, and gateway and connector: processes, or (``--in-process``) objects in
    this process, where their tasks count among this process's."""

    work: WorkDir
    addresses: Addresses
    backend: Proc
    http_backend: Proc
    stub: Proc
    gateway: Proc | None
    connector: Proc | None
    connector_argv: list[str]
    gateway_argv: list[str]
    #: Set while the connector is being killed and restarted on purpose.
    restarting: bool = False

    def all(self) -> list[Proc]:
        procs = [self.backend, self.http_backend, self.stub, self.gateway, self.connector]
        return [proc for proc in procs if proc is not None]

    def check_alive(self, during: str) -> None:
        for proc in self.all():
            if not (proc in (self.connector, self.gateway) and self.restarting):
                proc.check_alive(during)

    def restart_connector(self) -> None:
        self.connector = spawn("connector", self.connector_argv, self.work.path / "connector.log")

    async def restart_gateway(self) -> None:
        """A new gateway process on the same ports (trio's listeners set SO_REUSEADDR)."""
        self.gateway = spawn("gateway", self.gateway_argv, self.work.path / "gateway.log")
        deadline = time.monotonic() + 30
        doors = (self.addresses.http_proxy, self.addresses.rfc_front_door)
        ports = [self.addresses.tunnel, self.addresses.socks, *self.addresses.forwards.values()]
        ports += [port for port in doors if port is not None]
        for port in ports:
            await trio.to_thread.run_sync(wait_listening, self.gateway, port, deadline)

    def stop(self) -> None:
        for proc in reversed(self.all()):
            with contextlib.suppress(Exception):
                proc.stop()


async def start_all(
    work: WorkDir,
    echo_port: int,
    args: argparse.Namespace,
    nursery: trio.Nursery,
    stack: contextlib.AsyncExitStack,
) -> tuple[Processes, Relay]:
    # Started from this (the main) thread: the children's PR_SET_PDEATHSIG fires when the
    # thread that forked them exits, and trio's worker threads do exit when idle.
    backend, backend_ports = start_backend(work)
    http_backend, http_ports = start_backend(
        work, module="bench.http_backend", name="http backend", args=["--big-mib", "1"]
    )
    stub, stub_port = start_stub(work)
    tunnel_port, socks_port, proxy_port, rfc_port, sink_port, hold_port = free_ports(6)
    addresses = Addresses(
        tunnel_port,
        socks_port,
        {"sink": sink_port, "hold": hold_port},
        http_proxy=proxy_port,
        rfc_front_door=rfc_port,
    )
    gateway_toml = work.path / "gateway.toml"
    gateway_toml.write_text(work.gateway_toml(addresses, {}))
    command = backchannel_command()
    gateway: Proc | None = None
    gateway_argv = [*command, "gateway", "-c", str(gateway_toml), "--log-level", args.log_level]
    if args.in_process:
        await stack.enter_async_context(open_gateway(GatewayConfig.from_file(gateway_toml)))
    else:
        gateway = spawn("gateway", gateway_argv, work.path / "gateway.log")
        deadline = time.monotonic() + 30
        for port in (tunnel_port, socks_port, proxy_port, rfc_port, sink_port, hold_port):
            await trio.to_thread.run_sync(wait_listening, gateway, port, deadline)
    relay = Relay(tunnel_port)
    await nursery.start(relay.serve)
    backends = {"sink": backend_ports["sink"], "hold": backend_ports["hold"]}
    echo_mapping = (
        f"\n[[subaccounts.{SUBACCOUNT}.mappings]]\n"
        f'virtual = "{ECHO_VIRTUAL[0]}:{ECHO_VIRTUAL[1]}"\n'
        f'internal = "127.0.0.1:{echo_port}"\nprotocol = "tcp"\n'
    )
    connector_toml = work.path / "connector.toml"
    connector_toml.write_text(
        work.connector_toml(relay.port, backends, {}, http_ports["http"], stub_port) + echo_mapping
    )
    argv = [*command, "connector", "-c", str(connector_toml), "--log-level", args.log_level]
    connector: Proc | None = None
    if args.in_process:
        await stack.enter_async_context(open_connector(ConnectorConfig.from_file(connector_toml)))
    else:
        connector = spawn("connector", argv, work.path / "connector.log")
    procs = Processes(
        work, addresses, backend, http_backend, stub, gateway, connector, argv, gateway_argv
    )
    await wait_through(procs, 30)
    return procs, relay


async def wait_through(procs: Processes, limit: float) -> float:
    """Wait until a stream gets through the tunnel again (the ``hold`` backend greets with
    ``R``); seconds it took."""
    started = time.monotonic()
    last = "no attempt"
    with trio.move_on_after(limit):
        while True:
            procs.check_alive("waiting for the tunnel")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", procs.addresses.forwards["hold"])
                async with stream:
                    with trio.move_on_after(2):
                        if await stream.receive_some(1) == b"R":
                            return time.monotonic() - started
                    last = "no greeting"
            except (OSError, trio.BrokenResourceError) as exc:
                last = str(exc)
            await trio.sleep(0.05)  # pacing of the retries
    raise BenchError(f"no stream got through the tunnel within {limit:g} s (last: {last})")


# ----------------------------------------------------------------------------- the run


async def inject_faults(
    procs: Processes,
    relay: Relay,
    tally: Tally,
    rng: random.Random,
    args: argparse.Namespace,
    stop: trio.Event,
) -> None:
    kinds = args.faults
    # No fault in the last stretch: every kind of traffic must be seen working after the last.
    last_fault_by = args.started + args.duration - max(3.0, args.fault_every[1])
    while True:
        with trio.move_on_after(rng.uniform(*args.fault_every)):
            await stop.wait()
        if stop.is_set() or time.monotonic() > last_fault_by:
            return
        kind = rng.choice(kinds)
        at = time.monotonic()
        if kind == "cut":
            relay.cut()
        else:
            # "kill" and "gateway" are refused with --in-process.
            target = procs.connector if kind == "kill" else procs.gateway
            assert target is not None
            procs.restarting = True
            target.popen.kill()  # SIGKILL
            await trio.to_thread.run_sync(target.popen.wait)
            if kind == "kill":
                procs.restart_connector()
            else:
                await procs.restart_gateway()
            procs.restarting = False
        procs.check_alive(f"recovery after a fault ({kind})")
        recovered = await wait_through(procs, args.request_timeout)
        tally.faults.append(
            {"kind": kind, "at_s": round(at - args.started, 2), "recovered_s": round(recovered, 3)}
        )


async def settle_figures(procs: Processes) -> dict[str, Any]:
    """Figures once descriptor counts stop moving (traffic stopped; at most ~5 s)."""
    previous: list[int] | None = None
    figures: dict[str, Any] = {}
    for _ in range(25):
        figures = {}
        for role, proc in (("gateway", procs.gateway), ("connector", procs.connector)):
            if proc is not None:
                figures[role] = process_figures(proc)
        figures["soak_process"] = {**own_figures(), "rss_kib": own_rss_kib()}
        now = [figures[role]["open_fds"] for role in figures]
        if now == previous:
            break
        previous = now
        await trio.sleep(0.2)
    return figures


async def run(args: argparse.Namespace, work: WorkDir) -> dict[str, Any]:
    rng = random.Random(args.seed)  # noqa: S311  # reproducible traffic, not secrets
    tally = Tally()
    async with trio.open_nursery() as nursery:
        [echo_listener] = await nursery.start(
            partial(trio.serve_tcp, serve_echo, 0, host="127.0.0.1")
        )
        echo_port = echo_listener.socket.getsockname()[1]
        stack = contextlib.AsyncExitStack()
        procs, relay = await start_all(work, echo_port, args, nursery, stack)
        try:
            soak = Soak(work, procs.addresses, echo_port, tally, rng)
            for kind in KINDS:  # warm-up: one of each, so lazy set-up is not counted as growth
                await getattr(soak, kind.replace("-", "_"))(0)
            start = await settle_figures(procs)
            before = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
            args.started = time.monotonic()
            stop = trio.Event()
            async with trio.open_nursery() as traffic:
                workers = {"tcp-echo": args.workers, "tcp-sink": 1, "http": args.workers, "rfc": 1}
                for kind, count in workers.items():
                    for worker in range(count):
                        traffic.start_soon(soak.loop, kind, worker, args.request_timeout, stop)
                traffic.start_soon(inject_faults, procs, relay, tally, rng, args, stop)
                with trio.move_on_after(args.duration):
                    while True:
                        await trio.sleep(1)
                        procs.check_alive("the soak")
                stop.set()
            elapsed = time.monotonic() - args.started
            for connection in soak.rfc_connections.values():
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await trio.to_thread.run_sync(connection.close)
            end = await settle_figures(procs)
            # RSS once glibc has handed its free memory back: growth that survives this is
            # memory in use, growth that does not was the allocator keeping freed pages.
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            end["soak_process"]["rss_kib_after_malloc_trim"] = own_rss_kib()
            growth = []
            if before is not None:
                after = tracemalloc.take_snapshot()
                for stat in after.compare_to(before, "lineno")[: args.tracemalloc]:
                    growth.append(
                        f"{stat.size_diff / 1024:+.0f} KiB {stat.count_diff:+d} {stat.traceback}"
                    )
            last_fault = max(
                (f["at_s"] + f["recovered_s"] + args.started for f in tally.faults),
                default=args.started,
            )
            recovered = {kind: tally.last_success.get(kind, 0) > last_fault for kind in KINDS}
        finally:
            await stack.aclose()
            procs.stop()
        nursery.cancel_scope.cancel()
    return {
        "seconds": round(elapsed, 1),
        "seed": args.seed,
        "faults": {
            "count": len(tally.faults),
            "by_kind": Counter(f["kind"] for f in tally.faults),
            "list": tally.faults,
        },
        "recovery_s": {
            "max": max((f["recovered_s"] for f in tally.faults), default=0),
            "median": sorted(f["recovered_s"] for f in tally.faults)[len(tally.faults) // 2]
            if tally.faults
            else 0,
        },
        "requests": dict(tally.done),
        "requests_total": sum(tally.done.values()),
        "errors": dict(sorted(tally.errors.items())),
        "errors_total": sum(tally.errors.values()),
        "bytes_verified": tally.bytes_verified,
        "bytes_counted": tally.bytes_counted,
        "mismatches": tally.mismatches,
        "hangs": tally.hangs,
        "traffic_after_last_fault": recovered,
        "start": start,
        "end": end,
        "memory_growth_by_line": growth,
        "connector_restarts": sum(1 for f in tally.faults if f["kind"] == "kill"),
        "gateway_restarts": sum(1 for f in tally.faults if f["kind"] == "gateway"),
    }


def first_bench_error(group: BaseExceptionGroup[BenchError]) -> BenchError:
    inner = group.exceptions[0]
    return first_bench_error(inner) if isinstance(inner, BaseExceptionGroup) else inner


def verdict(report: dict[str, Any]) -> list[str]:
    problems = []
    if report["mismatches"]:
        problems.append(f"{report['mismatches']} payloads came back wrong")
    if report["hangs"]:
        problems.append(f"{report['hangs']} requests hung")
    missing = [k for k, ok in report["traffic_after_last_fault"].items() if not ok]
    if missing:
        problems.append(f"no traffic after the last fault for: {', '.join(missing)}")
    return problems


def render(report: dict[str, Any]) -> str:
    lines = [
        f"soak: {report['seconds']} s, seed {report['seed']}",
        f"faults: {report['faults']['count']} {dict(report['faults']['by_kind'])}, "
        f"recovery median {report['recovery_s']['median']} s, max {report['recovery_s']['max']} s",
        f"requests: {report['requests_total']} {report['requests']}",
        f"errors: {report['errors_total']}",
        *(f"  {count:6d}  {kind}" for kind, count in report["errors"].items()),
        f"bytes verified (content): {report['bytes_verified']}, counted (length): "
        f"{report['bytes_counted']}",
        f"mismatches: {report['mismatches']}, hangs: {report['hangs']}",
    ]
    if report["memory_growth_by_line"]:
        lines.append("memory growth by line (tracemalloc):")
        lines.extend(f"  {line}" for line in report["memory_growth_by_line"])
    for role in report["start"]:
        start, end = report["start"][role], report["end"][role]
        pairs = ", ".join(f"{key} {start[key]} → {end[key]}" for key in start)
        if "rss_kib_after_malloc_trim" in end:
            pairs += f" (after malloc_trim: {end['rss_kib_after_malloc_trim']})"
        lines.append(f"{role}: {pairs}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run (default 10)")
    length.add_argument("--seconds", type=float, help="how long to run, in seconds")
    parser.add_argument(
        "--fault-every",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="seconds between faults (default 5 15; with --seconds 2 5)",
    )
    parser.add_argument(
        "--faults",
        default="cut,kill",
        help="fault kinds: cut (tunnel TCP reset), kill (SIGKILL + restart the connector), "
        "gateway (SIGKILL + restart the gateway); default cut,kill",
    )
    parser.add_argument("--workers", type=int, default=2, help="tcp-echo and http loops each")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="N",
        help="with --in-process: trace allocations, report the N lines whose memory grew most",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run gateway and connector inside this process (their tasks are then counted; "
        "faults: cut only)",
    )
    args = parser.parse_args(argv)
    args.duration = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    if args.fault_every is None:
        args.fault_every = (2.0, 5.0) if args.duration < 120 else (5.0, 15.0)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if not args.faults or set(args.faults) - {"cut", "kill", "gateway"}:
        parser.error("--faults takes cut, kill and/or gateway")
    if args.in_process and set(args.faults) - {"cut"}:
        if args.faults != ["cut", "kill"]:
            parser.error("--in-process can only cut the tunnel: use --faults cut")
        args.faults = ["cut"]
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    folder = Path(tempfile.mkdtemp(prefix="backchannel-soak-"))
    if args.in_process:  # the gateway's and connector's log lines go to a file, not the screen
        logging.basicConfig(
            filename=folder / "in-process.log",
            level=args.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    if args.tracemalloc:
        tracemalloc.start()
    failure: BenchError | None = None
    try:
        report = trio.run(run, args, WorkDir(folder))
    except* BenchError as group:
        failure = first_bench_error(group)
    if failure is not None:
        print(f"soak failed: {failure}\n(logs in {folder})", file=sys.stderr)
        return 2
    report["work_dir"] = str(folder)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    problems = verdict(report)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if not args.keep and not problems:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
