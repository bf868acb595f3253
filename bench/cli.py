"""``python -m bench``: argument parsing and the run order of the scenarios."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from . import (
    chart,
    components,
    http_scenario,
    identity,
    rfc_scenario,
    scenarios,
    targets,
    versus,
)
from .peers import PEER_NAMES, PeerSet, bulk_paths, start_peers
from .procs import BenchError, Pair, Proc, WorkDir, start_backend, start_pair
from .profile import Profiler, py_spy_path
from .report import RESULTS_DIR, command_line, machine_info, render_table, write_json

QUICK: dict[str, Any] = {
    "bulk_mib": 128,
    "idle_streams": [200],
    "streams_mib": 64,
    "stream_counts": [1, 10, 100],
    "first_byte_samples": 50,
    "repeat": 1,
    "http_seconds": 2.0,
    "http_warm_up": 0.5,
    "http_big_mib": 64,
    "rfc_seconds": 2.0,
    "rfc_warm_up": 0.5,
    "identity_runs": 200,
}
FULL: dict[str, Any] = {
    "bulk_mib": 1024,
    "idle_streams": [1000, 10000],
    "streams_mib": 256,
    "stream_counts": [1, 10, 100, 1000],
    "first_byte_samples": 200,
    "repeat": 3,
    "http_seconds": 5.0,
    "http_warm_up": 1.0,
    "http_big_mib": 256,
    "rfc_seconds": 5.0,
    "rfc_warm_up": 1.0,
    "identity_runs": 1000,
}
SCENARIOS = ("idle", "bulk", "streams", "http", "http-peers", "setup", "rfc")
#: Scenarios that use the peers (started once per run when one of these runs).
PEER_SCENARIOS = ("bulk", "streams", "http-peers", "setup")
#: Scenarios that run only when asked for with --only (identity needs nginx).
EXTRA_SCENARIOS = ("identity",)


class TimeLimit(BaseException):
    """The whole run exceeded --time-limit (a BaseException so nothing swallows it)."""


def build_parser() -> argparse.ArgumentParser:
    """The options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark backchannel on 127.0.0.1: gateway, connector and backend as "
        "separate processes; bulk throughput vs a direct connection, RSS per idle stream, HTTP "
        "requests per second and latency through the HTTP proxy vs direct, RFC calls per second "
        "and latency through the RFC front door vs direct to a stub ABAP system.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 128 MiB, 200 streams, 1 repeat, HTTP 2 s per case and a 64 MiB "
        "download, RFC 2 s per case",
    )
    parser.add_argument(
        "--bulk-mib", type=int, help="MiB per bulk transfer (default 1024; quick 128)"
    )
    parser.add_argument(
        "--repeat", type=int, help="runs per path and direction (default 3; quick 1)"
    )
    parser.add_argument(
        "--idle-streams",
        type=int,
        action="append",
        help="concurrent idle streams (repeatable, a fresh pair each; default 1000 and 10000; "
        "quick 200)",
    )
    parser.add_argument(
        "--peers",
        action="append",
        choices=[*PEER_NAMES, "none"],
        help="peers to compare with (repeatable; default all: OpenSSH ssh -R with aes128-gcm "
        "and chacha20, websocket-tunnel, websockify); 'none' for backchannel alone",
    )
    parser.add_argument(
        "--stream-count",
        type=int,
        action="append",
        help="streams: concurrent streams per case (repeatable; default 1, 10, 100, 1000)",
    )
    parser.add_argument(
        "--streams-mib", type=int, help="streams: MiB per case, shared out (default 256)"
    )
    parser.add_argument(
        "--http-peers-concurrency",
        type=int,
        action="append",
        help="http-peers: connections (repeatable; default 1, 32, 64)",
    )
    parser.add_argument(
        "--first-byte-samples",
        type=int,
        help="setup: new streams timed per path (default 200; quick 50)",
    )
    parser.add_argument(
        "--reconnect-down",
        type=float,
        default=3.0,
        help="setup: seconds the gateway stays down before it is restarted (default 3)",
    )
    parser.add_argument(
        "--idle-via",
        choices=["forward", "socks5"],
        default="forward",
        help="front door for idle streams",
    )
    parser.add_argument(
        "--only",
        "--scenario",
        dest="only",
        choices=[*SCENARIOS, *EXTRA_SCENARIOS],
        action="append",
        help="run only this scenario (repeatable); 'identity' (principal propagation, needs "
        "nginx) runs only when named here",
    )
    parser.add_argument(
        "--http-seconds",
        type=float,
        help="HTTP: measured seconds per case (default 5; quick 2)",
    )
    parser.add_argument(
        "--http-warm-up",
        type=float,
        help="HTTP: warm-up seconds before each measured window (default 1; quick 0.5)",
    )
    parser.add_argument(
        "--http-concurrency",
        type=int,
        action="append",
        help="HTTP: connections with one request in flight each (repeatable; default 1 and 64)",
    )
    parser.add_argument(
        "--http-clients",
        type=int,
        default=2,
        help="HTTP: load-generating processes sharing the connections when concurrency > 1 "
        "(default 2: one Python process cannot keep 64 direct connections busy)",
    )
    parser.add_argument(
        "--http-big-mib",
        type=int,
        help="HTTP: MiB of the large download (default 256; quick 64)",
    )
    parser.add_argument(
        "--rfc-seconds",
        type=float,
        help="RFC: measured seconds per case (default 5; quick 2)",
    )
    parser.add_argument(
        "--rfc-warm-up",
        type=float,
        help="RFC: warm-up seconds before each measured window (default 1; quick 0.5)",
    )
    parser.add_argument(
        "--rfc-concurrency",
        type=int,
        action="append",
        help="RFC: connections with one call in flight each (repeatable; default 1 and 8)",
    )
    parser.add_argument(
        "--rfc-clients",
        type=int,
        help="RFC: load-generating processes sharing the connections, a thread per connection "
        "(default: one process per connection)",
    )
    parser.add_argument(
        "--identity-concurrency",
        type=int,
        action="append",
        help="identity: connections with one request in flight each (repeatable; default 1 and "
        "8); window, warm-up and client processes as for --http-*",
    )
    parser.add_argument(
        "--identity-runs",
        type=int,
        help="identity: calls per in-process step (default 1000; quick 200; RSA key "
        "generation a twentieth, at least 10)",
    )
    parser.add_argument(
        "--direction",
        choices=["upload", "download"],
        action="append",
        help="bulk direction(s) (default both)",
    )
    parser.add_argument(
        "--tunnel",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [tunnel] setting for both gateway and connector, e.g. initial_window=4194304",
    )
    parser.add_argument(
        "--profile",
        choices=["gateway", "connector", "both"],
        help="after the measured runs, one extra tunnel transfer per direction (bulk) and one "
        "extra tunnel window per concurrency (http, rfc) under py-spy",
    )
    parser.add_argument(
        "--components",
        action="store_true",
        help="also measure the CPU cost per MB of each layer in-process (bench.components)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of gateway and connector (default info, as deployed)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS for the machine to be idle (<25%% of one CPU busy for 3 s) first",
    )
    parser.add_argument("--time-limit", type=float, default=1800, help="seconds for the whole run")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    return parser


def _parse_tunnel(items: Sequence[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--tunnel expects KEY=VALUE, got {item!r}")
        try:
            settings[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            settings[key.strip()] = value.strip()
    return settings


def _raise_nofile() -> dict[str, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": before, "soft": soft, "hard": hard}


def _wait_quiet(limit: float, threshold: float = 25.0) -> float:
    """Background load in percent of one CPU; with ``limit`` > 0, wait for a quiet machine."""
    load = scenarios.background_load()
    if limit <= 0:
        return load
    deadline = time.monotonic() + limit
    quiet = 0
    while time.monotonic() < deadline:
        quiet = quiet + 1 if load < threshold else 0
        if quiet >= 3:
            return load
        load = scenarios.background_load()
    print(f"bench: the machine did not become quiet within {limit:g} s; running anyway", flush=True)
    return load


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeLimit


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; 0 if every scenario succeeded."""
    args = build_parser().parse_args(argv)
    preset = QUICK if args.quick else FULL
    bulk_mib = args.bulk_mib or preset["bulk_mib"]
    repeat = args.repeat or preset["repeat"]
    idle_counts = args.idle_streams or preset["idle_streams"]
    streams = min(idle_counts)
    wanted = args.only or list(SCENARIOS)
    directions = args.direction or ["upload", "download"]
    http_options = {
        "seconds": args.http_seconds or preset["http_seconds"],
        "warm_up": preset["http_warm_up"] if args.http_warm_up is None else args.http_warm_up,
        "concurrencies": sorted(set(args.http_concurrency or [1, 64])),
        "processes": args.http_clients,
        "big_mib": args.http_big_mib or preset["http_big_mib"],
    }
    rfc_options = {
        "seconds": args.rfc_seconds or preset["rfc_seconds"],
        "warm_up": preset["rfc_warm_up"] if args.rfc_warm_up is None else args.rfc_warm_up,
        "concurrencies": sorted(set(args.rfc_concurrency or [1, 8])),
        "processes": args.rfc_clients,
    }
    identity_runs = args.identity_runs or preset["identity_runs"]
    versus_options = versus.VersusOptions(
        stream_counts=sorted(set(args.stream_count or preset["stream_counts"])),
        streams_mib=args.streams_mib or preset["streams_mib"],
        http_concurrencies=sorted(set(args.http_peers_concurrency or [1, 32, 64])),
        http_seconds=http_options["seconds"],
        http_warm_up=http_options["warm_up"],
        first_byte_samples=args.first_byte_samples or preset["first_byte_samples"],
        reconnect_down=args.reconnect_down,
        repeat=repeat,
        log_level=args.log_level,
    )
    peer_names = [] if "none" in (args.peers or []) else list(args.peers or PEER_NAMES)
    identity_options = {
        "seconds": http_options["seconds"],
        "warm_up": http_options["warm_up"],
        "concurrencies": sorted(set(args.identity_concurrency or [1, 8])),
        "processes": args.http_clients,
        "micro_runs": identity_runs,
        "slow_runs": max(10, identity_runs // 20),
    }
    if (
        min(bulk_mib, repeat, streams, http_options["big_mib"], args.http_clients) < 1
        or min(http_options["concurrencies"]) < 1
        or min(rfc_options["concurrencies"]) < 1
        or min(identity_options["concurrencies"]) < 1
        or identity_runs < 1
        or (args.rfc_clients is not None and args.rfc_clients < 1)
    ):
        print(
            "bench: --bulk-mib, --repeat, --idle-streams and the --http-*, --rfc-* and "
            "--identity-* counts must be positive",
            file=sys.stderr,
        )
        return 2
    for name, options in (("http", http_options), ("rfc", rfc_options)):
        if options["seconds"] <= 0 or options["warm_up"] < 0:
            print(
                f"bench: --{name}-seconds must be positive, --{name}-warm-up not negative",
                file=sys.stderr,
            )
            return 2
    try:
        tunnel = _parse_tunnel(args.tunnel)
        if args.profile:
            py_spy_path()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    started = time.monotonic()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    document: dict[str, Any] = {
        "schema": 1,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "cwd": str(Path.cwd()),
        "machine": machine_info(),
        "options": {
            "bulk_mib": bulk_mib,
            "repeat": repeat,
            "idle_streams": idle_counts,
            "peers": peer_names,
            "versus": dataclasses.asdict(versus_options),
            "idle_via": args.idle_via,
            "scenarios": wanted,
            "directions": directions,
            "http": http_options,
            "rfc": rfc_options,
            "identity": identity_options,
            "tunnel_settings": tunnel,
            "log_level": args.log_level,
            "profile": args.profile,
            "quick": args.quick,
        },
        "errors": [],
    }
    document["nofile"] = {"bench": _raise_nofile()}
    load = _wait_quiet(args.wait_quiet)
    document["background_load_percent_before"] = load
    if load > 20:
        print(
            f"bench: warning: the machine is already busy ({load:.0f}% of one CPU in use before "
            "the bench started); throughput numbers will be noisy",
            flush=True,
        )

    def progress(line: str) -> None:
        print(line, flush=True)

    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(max(1, int(args.time_limit)))
    work_path = Path(tempfile.mkdtemp(prefix="backchannel-bench-"))
    backend: Proc | None = None
    http_backend: Proc | None = None
    stub: Proc | None = None
    peers = PeerSet()
    try:
        work = WorkDir(work_path)
        progress(f"bench: work folder {work_path}")
        backend, ports = start_backend(work)
        document["nofile"]["backend"] = dict(
            zip(("soft", "hard"), backend.nofile_limit(), strict=True)
        )
        if "http" in wanted or "http-peers" in wanted:
            http_backend, http_ports = start_backend(
                work,
                module="bench.http_backend",
                name="http backend",
                args=["--big-mib", str(http_options["big_mib"])],
            )
            ports["http"] = http_ports["http"]
            ports["web"] = http_ports["http"]  # the same server as plain TCP, for forwards
        if "rfc" in wanted:
            stub, ports["rfc"] = rfc_scenario.start_stub(work)
        if peer_names and any(name in wanted for name in PEER_SCENARIOS):
            forwarded = {k: v for k, v in ports.items() if k in ("sink", "source", "hold", "web")}
            peers = start_peers(work, forwarded, peer_names, progress)
        document["peers"] = peers.as_json()
        for scenario in (*SCENARIOS, *EXTRA_SCENARIOS):
            if scenario not in wanted:
                continue
            try:
                result = _run_scenario(
                    scenario,
                    work,
                    backend,
                    ports,
                    args,
                    tunnel,
                    bulk_mib,
                    repeat,
                    streams,
                    directions,
                    document,
                    stamp,
                    progress,
                    http_backend,
                    http_options,
                    stub,
                    rfc_options,
                    identity_options,
                    peers,
                    versus_options,
                    idle_counts,
                )
                document[scenario] = result
            except BenchError as exc:
                document["errors"].append({"scenario": scenario, "message": str(exc)})
                progress(f"bench: {scenario} failed: {exc}")
            backend.check_alive(f"after the {scenario} scenario")
            for extra in (http_backend, stub):
                if extra is not None:
                    extra.check_alive(f"after the {scenario} scenario")
        if args.components:
            progress("bench: components (CPU per MB of each layer, in this process)")
            document["components"] = components.run(
                64 if args.quick else 128, 1 if args.quick else 3, progress
            )
    except KeyboardInterrupt:
        document["errors"].append({"scenario": "run", "message": "interrupted"})
        progress("bench: interrupted; stopping the processes")
    except TimeLimit:
        document["errors"].append(
            {"scenario": "run", "message": f"time limit of {args.time_limit:g} s exceeded"}
        )
        progress(f"bench: time limit of {args.time_limit:g} s exceeded; stopping the processes")
    except (BenchError, OSError) as exc:
        document["errors"].append({"scenario": "setup", "message": str(exc)})
        progress(f"bench: {exc}")
    finally:
        signal.alarm(0)
        peers.stop()
        if stub is not None:
            stub.stop()
        if http_backend is not None:
            http_backend.stop()
        if backend is not None:
            backend.stop()
        if args.keep_workdir:
            progress(f"bench: configs and logs kept in {work_path}")
        else:
            shutil.rmtree(work_path, ignore_errors=True)
    document["duration_seconds"] = round(time.monotonic() - started, 1)
    document["chart"] = chart.write_chart(document, RESULTS_DIR / f"{stamp}.png")
    document["targets"] = targets.evaluate(document)
    path = write_json(document, stamp)
    print()
    print(render_table(document))
    print(
        f"\nresults: {path.relative_to(RESULTS_DIR.parent.parent)} "
        f"({document['duration_seconds']:.0f} s)"
    )
    return 1 if document["errors"] else 0


def _run_scenario(
    scenario: str,
    work: WorkDir,
    backend: Proc,
    ports: dict[str, int],
    args: argparse.Namespace,
    tunnel: dict[str, Any],
    bulk_mib: int,
    repeat: int,
    streams: int,
    directions: list[str],
    document: dict[str, Any],
    stamp: str,
    progress: Any,
    http_backend: Proc | None,
    http_options: dict[str, Any],
    stub: Proc | None,
    rfc_options: dict[str, Any],
    identity_options: dict[str, Any],
    peers: PeerSet,
    versus_options: versus.VersusOptions,
    idle_counts: list[int],
) -> dict[str, Any]:
    """Fresh gateway + connector processes for each scenario, so one does not skew the other."""
    tcp_ports = {name: port for name, port in ports.items() if name not in ("http", "rfc")}
    if scenario == "idle":  # a fresh pair per count: freed memory would hide the cost
        return {
            "counts": [
                _run_idle(work, tcp_ports, args, tunnel, count, document, progress)
                for count in idle_counts
            ]
        }
    if scenario == "identity":  # its own configs and backend (nginx)
        return identity.run_identity(
            work,
            tcp_ports,
            tunnel=tunnel,
            log_level=args.log_level,
            repeat=repeat,
            progress=progress,
            **identity_options,
        )
    progress(f"bench: {scenario}: starting gateway and connector")
    pair = start_pair(
        work,
        tcp_ports,
        label=scenario,
        tunnel=tunnel,
        log_level=args.log_level,
        http_backend=ports["http"] if scenario in ("http", "http-peers") else None,
        rfc_backend=ports["rfc"] if scenario == "rfc" else None,
    )
    try:
        document["nofile"][f"{scenario}_gateway"] = pair.gateway.nofile_limit()
        document["nofile"][f"{scenario}_connector"] = pair.connector.nofile_limit()
        if scenario == "streams":
            return versus.run_streams(pair, ports, peers, versus_options, progress)
        if scenario == "http-peers":
            return versus.run_http(work, pair, ports, peers, versus_options, progress)
        if scenario == "setup":
            return versus.run_setup(work, pair, ports, peers, versus_options, scenario, progress)
        if scenario == "http":
            assert http_backend is not None
            run = http_scenario.HttpRun(work, pair, http_backend, ports["http"], progress)
            result = http_scenario.run_http(run, repeat=repeat, **http_options)
            if args.profile:
                document["http_profile"] = _profile_http(run, args.profile, http_options, stamp)
            return result
        if scenario == "rfc":
            assert stub is not None
            rfc = rfc_scenario.RfcRun(work, pair, stub, ports["rfc"], progress)
            result = rfc_scenario.run_rfc(rfc, repeat=repeat, **rfc_options)
            if args.profile:
                roles = ["gateway", "connector"] if args.profile == "both" else [args.profile]
                document["rfc_profile"] = rfc_scenario.profile_rfc(
                    rfc, roles, stamp=stamp, **rfc_options
                )
            return result
        result = scenarios.run_bulk(
            pair,
            backend,
            ports,
            mib=bulk_mib,
            repeat=repeat,
            directions=directions,
            progress=progress,
            peers=bulk_paths(peers, directions, work.tls.ca_file),
        )
        if args.profile:
            document["profile"] = _profile(
                pair, args.profile, bulk_mib, directions, stamp, progress
            )
        return result
    finally:
        pair.stop()


def _run_idle(
    work: WorkDir,
    tcp_ports: dict[str, int],
    args: argparse.Namespace,
    tunnel: dict[str, Any],
    count: int,
    document: dict[str, Any],
    progress: Any,
) -> dict[str, Any]:
    """``count`` idle streams on a fresh gateway and connector."""
    progress(f"bench: idle x{count}: starting gateway and connector")
    pair = start_pair(
        work, tcp_ports, label=f"idle-{count}", tunnel=tunnel, log_level=args.log_level
    )
    try:
        document["nofile"][f"idle_{count}_gateway"] = pair.gateway.nofile_limit()
        document["nofile"][f"idle_{count}_connector"] = pair.connector.nofile_limit()
        return scenarios.run_idle(
            pair, streams=count, via=args.idle_via, secret=work.app_secret, progress=progress
        )
    finally:
        pair.stop()


def _profile_http(
    run: http_scenario.HttpRun, which: str, options: dict[str, Any], stamp: str
) -> dict[str, Any]:
    """One extra tunnel window per concurrency with py-spy on gateway and/or connector."""
    roles = ["gateway", "connector"] if which == "both" else [which]
    RESULTS_DIR.mkdir(exist_ok=True)
    profiles: dict[str, Any] = {}
    for concurrency in options["concurrencies"]:
        case = run.load_case(
            "tunnel",
            concurrency,
            processes=options["processes"],
            warm_up=options["warm_up"],
            seconds=options["seconds"],
            profile_roles=roles,
            profile_stem=RESULTS_DIR / f"{stamp}-http-c{concurrency}",
        )
        run.progress(
            f"  profiled http c={concurrency} tunnel: {case['req_per_s']:.0f} req/s under py-spy"
        )
        for role, summary in case["profiles"].items():
            summary["req_per_s_while_profiled"] = case["req_per_s"]
            summary["raw_file"] = str(
                Path(summary["raw_file"]).relative_to(RESULTS_DIR.parent.parent)
            )
            profiles[f"{role}-c{concurrency}"] = summary
    return profiles


def _profile(
    pair: Pair, which: str, mib: int, directions: list[str], stamp: str, progress: Any
) -> dict[str, Any]:
    roles = ["gateway", "connector"] if which == "both" else [which]
    procs = {"gateway": pair.gateway, "connector": pair.connector}
    RESULTS_DIR.mkdir(exist_ok=True)
    profiles: dict[str, Any] = {}
    for direction in directions:
        server, transfer = scenarios.TRANSFERS[direction]
        with contextlib.ExitStack() as stack:
            profilers = {
                role: stack.enter_context(
                    Profiler(procs[role], RESULTS_DIR / f"{stamp}-{role}-{direction}.pyspy.txt")
                )
                for role in roles
            }
            seconds = transfer(
                pair.addresses.forwards[server],
                mib * scenarios.MIB,
                time.monotonic() + 20 + mib / 4,
            )
        rate = mib * scenarios.MIB / seconds / 1e6
        progress(f"  profiled {direction} run: {rate:.1f} MB/s under py-spy")
        for role, profiler in profilers.items():
            summary = profiler.summary()
            summary["mb_per_s_while_profiled"] = round(rate, 1)
            summary["raw_file"] = str(profiler.output.relative_to(RESULTS_DIR.parent.parent))
            profiles[f"{role}-{direction}"] = summary
    return profiles
