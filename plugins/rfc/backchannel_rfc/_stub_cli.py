"""The ``backchannel-rfc-stub`` command (also ``python -m backchannel_rfc``): serve the demo ABAP
system on TCP, for trying out pyrfc code and the RFC plugin without a real system.

``serve`` listens on 33NN for ``--sysnr NN`` (a real gateway's port; default 00), or on
``--port`` (0: any free port), prints one line saying where, and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from ._demo_data import demo_system
from ._stub_server import serve_stub

#: The demo system's logon, as the listening line tells it.
DEMO_CLIENT = "100"
DEMO_USER = "DEMO"


def _system_number(text: str) -> str:
    if len(text) != 2 or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a system number (two digits, 00-99)")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return int(text)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="A stub ABAP system speaking the backchannel RFC stub protocol."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the demo system until SIGINT or SIGTERM")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    where = serve.add_mutually_exclusive_group()
    where.add_argument(
        "--sysnr", type=_system_number, default="00", help="system number NN: port 33NN (00)"
    )
    where.add_argument("--port", type=_port, help="port to listen on instead (0: any free port)")
    return parser


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, also when trio wrapped it in (nested) exception groups."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _os_error(inner)
            if found is not None:
                return found
    return None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _serve(host: str, port: int) -> None:
    system = demo_system()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_stub, system, host, port)
            print(
                f"stub ABAP system {system.sysid} listening on {_address(host, bound)}"
                f" (client {DEMO_CLIENT}, user {DEMO_USER})",
                flush=True,
            )
            async for _signum in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None, prog: str | None = "backchannel-rfc-stub") -> int:
    """Run the command line; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    port = args.port if args.port is not None else 3300 + int(args.sysnr)
    try:
        trio.run(_serve, args.host, port)
    except KeyboardInterrupt:
        pass  # a SIGINT before the signal receiver was installed: stopping is what it asked
    except (OSError, BaseExceptionGroup) as exc:
        # A port in use or an unknown host: one line, not a traceback.
        error = _os_error(exc)
        if error is None:
            raise
        print(
            f"{prog}: cannot listen on {_address(args.host, port)}: {error}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0
