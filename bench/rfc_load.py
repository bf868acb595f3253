"""RFC load generator, in its own process: ``python -m bench.rfc_load``.

Opens ``--connections`` ``backchannel_rfc.Connection`` objects (pyrfc's blocking API), either
straight to a stub ABAP system (``--port``) or through a gateway's RFC front door
(``--gateway`` with the app's credentials and the virtual system), and keeps one
``STFC_CONNECTION`` call in flight on each: closed loop, the next call goes out as soon as the
previous one returned, on the same connection (logged on once, kept open). Every connection has
its own thread; the bench gives each connection its own process by default (``--connections
1``), so the GIL never serialises two calls.

Each connection logs on and makes one call before the process prints ``{"ready": true}``; then it
reads ``FROM UNTIL`` from stdin (``time.monotonic()`` values, the same clock in every process on
Linux; or give ``--window FROM UNTIL``), so all load processes of a case share one window. It
records the latency of every call that returns in ``[FROM, UNTIL)``; what returns before is
warm-up, and each connection stops at UNTIL. Latencies (ns, int64) go to ``--latencies-out``; one
JSON line on stdout sums up. A failed call ends its connection's loop and is reported (the bench
then fails the case): a benchmark of calls that fail is not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from array import array
from collections.abc import Sequence
from typing import Any

from backchannel_rfc import Connection

FUNCTION = "STFC_CONNECTION"
LOGON = {"client": "100", "user": "DEMO", "passwd": "welcome"}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def connection_parameters(args: argparse.Namespace, secret: str | None) -> dict[str, str]:
    """The ``Connection`` keyword arguments for the direct or the tunnel path."""
    if args.gateway is None:
        return {"ashost": args.host, "port": str(args.port), **LOGON}
    assert secret is not None
    return {
        "gateway": args.gateway,
        "app": args.app,
        "app_secret": secret,
        "ashost": args.ashost,
        "sysnr": args.sysnr,
        **LOGON,
    }


class Caller:
    """One connection and the closed loop of calls on it."""

    def __init__(self, index: int, params: dict[str, str]) -> None:
        self.text = f"bench {os.getpid()}/{index}"
        started = time.monotonic_ns()
        self.connection = Connection(None, **params)
        self.logon_ns = time.monotonic_ns() - started
        self.call()  # fetches and caches the function description, as any first call does
        self.latencies = array("q")
        self.warm_up_completed = 0
        self.error: str | None = None

    def call(self) -> None:
        """One STFC_CONNECTION; raises RFCError, or ValueError if the echo is wrong."""
        result = self.connection.call(FUNCTION, REQUTEXT=self.text)
        if result.get("ECHOTEXT") != self.text:
            raise ValueError(f"ECHOTEXT {result.get('ECHOTEXT')!r}, sent {self.text!r}")

    def run(self, measure_from: float, until: float) -> None:
        """Call until ``until``; keep the latencies of the calls returning inside the window."""
        start_ns = int(measure_from * 1e9)
        until_ns = int(until * 1e9)
        latencies = self.latencies
        call = self.call
        try:
            while True:
                sent = time.monotonic_ns()
                if sent >= until_ns:
                    return
                call()
                done = time.monotonic_ns()
                if done >= until_ns:
                    return
                if done >= start_ns:
                    latencies.append(done - sent)
                else:
                    self.warm_up_completed += 1
        except Exception as exc:  # whatever it is, the bench reports it and fails the case
            self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        """Log off (close the connection)."""
        self.connection.close()


def run_window(callers: Sequence[Caller], measure_from: float, until: float) -> dict[str, float]:
    """Run every caller in its own thread over the window; CPU and wall seconds of the measured
    part (this thread only sleeps, to take the start mark)."""
    threads = [
        threading.Thread(target=caller.run, args=(measure_from, until), name=f"caller-{i}")
        for i, caller in enumerate(callers)
    ]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, measure_from - time.monotonic()))
    cpu_start, wall_start = _cpu_seconds(), time.monotonic()
    for thread in threads:
        thread.join()
    return {
        "cpu_seconds": _cpu_seconds() - cpu_start,
        "wall_seconds": time.monotonic() - wall_start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run one load process; prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.rfc_load")
    parser.add_argument("--host", default="127.0.0.1", help="the stub system (direct path)")
    parser.add_argument("--port", type=int, help="the stub system's port (direct path)")
    parser.add_argument("--gateway", metavar="HOST:PORT", help="the gateway's RFC front door")
    parser.add_argument("--app", help="'subaccount/app' (tunnel path)")
    parser.add_argument("--secret-file", help="file holding the app secret (tunnel path)")
    parser.add_argument("--ashost", default="erp.virtual", help="virtual host (tunnel path)")
    parser.add_argument("--sysnr", default="00", help="virtual system number (tunnel path)")
    parser.add_argument("--connections", type=int, default=1, help="connections, a thread each")
    parser.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("FROM", "UNTIL"),
        help="measured window in time.monotonic() seconds; without it, print a 'ready' line "
        "once connected and read 'FROM UNTIL' from stdin",
    )
    parser.add_argument("--latencies-out", required=True, help="int64 ns, native byte order")
    args = parser.parse_args(argv)
    if (args.port is None) == (args.gateway is None):
        parser.error("give --port (direct) or --gateway (tunnel), not both")
    if args.gateway is not None and (args.app is None or args.secret_file is None):
        parser.error("--gateway needs --app and --secret-file")
    secret = None
    if args.secret_file is not None:
        with open(args.secret_file, encoding="utf-8") as handle:
            secret = handle.read().strip()
    params = connection_parameters(args, secret)
    callers = [Caller(index, params) for index in range(max(1, args.connections))]
    if args.window:
        measure_from, until = args.window
    else:
        print(json.dumps({"ready": True}), flush=True)
        measure_from, until = (float(v) for v in sys.stdin.readline().split())
    window = run_window(callers, measure_from, until)
    latencies: array[int] = array("q")
    for caller in callers:
        latencies.extend(caller.latencies)
    with open(args.latencies_out, "wb") as out:
        latencies.tofile(out)
    errors = [caller.error for caller in callers if caller.error is not None]
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "connections": len(callers),
        "completed": len(latencies),
        "warm_up_completed": sum(caller.warm_up_completed for caller in callers),
        "logon_ms": [round(caller.logon_ns / 1e6, 3) for caller in callers],
        "error_count": len(errors),
        "errors": errors[:20],
        **window,
    }
    for caller in callers:
        caller.close()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
