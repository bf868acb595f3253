"""websockify (PyPI) as a peer: a WebSocket-to-TCP bridge, one WebSocket per TCP connection.

websockify has no TCP client side and no multiplexing: the cloud app itself must speak
WebSocket (wss) to it, and it opens one TCP connection to its single target per WebSocket. So
the harness runs one ``websockify`` per target, and the bench's client for this peer is the
``websockets`` package's synchronous client (its masking runs in C). Only transfers that fit
a WebSocket can be measured: a download from the ``source`` server (the client cannot
half-close a WebSocket, which the ``sink`` server's upload protocol needs).
"""

from __future__ import annotations

import shutil
import ssl
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ..procs import BenchError, WorkDir, free_ports, spawn, wait_listening
from . import Peer, PeerSkipped

START_TIMEOUT = 20.0
#: The targets websockify is started for (one process each).
TARGETS = ("source",)


def _command() -> str:
    beside = Path(sys.executable).parent / "websockify"
    if beside.exists():
        return str(beside)
    found = shutil.which("websockify")
    if found is None:
        raise PeerSkipped("websockify is not installed (pip install websockify)")
    return found


def start(work: WorkDir, targets: Mapping[str, int]) -> Peer:
    """One ``websockify --ssl-only`` per target of :data:`TARGETS`."""
    command = _command()
    try:
        import websockets.sync.client  # noqa: F401  (the bench's client for this peer)
    except ImportError as exc:
        raise PeerSkipped("the websockets package (the client for websockify) is missing") from exc
    wanted = [name for name in TARGETS if name in targets]
    ports = free_ports(len(wanted))
    forwards = dict(zip(wanted, ports, strict=True))
    deadline = time.monotonic() + START_TIMEOUT
    procs = []
    try:
        for name in wanted:
            proc = spawn(
                f"websockify ({name})",
                [
                    command,
                    "--ssl-only",
                    f"--cert={work.tls.cert_file}",
                    f"--key={work.tls.key_file}",
                    f"127.0.0.1:{forwards[name]}",
                    f"127.0.0.1:{targets[name]}",
                ],
                work.path / f"websockify-{name}.log",
            )
            procs.append(proc)
            wait_listening(proc, forwards[name], deadline)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return Peer(
        "websockify",
        "websockify (wss, client speaks WebSocket)",
        forwards,
        procs[0],
        None,
        kind="websocket",
        extra=procs[1:],
    )


def download(port: int, total: int, deadline: float, *, ca_file: Path) -> float:
    """Ask the source for ``total`` bytes over ``wss://127.0.0.1:port``; returns seconds."""
    from websockets.sync.client import connect

    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    with connect(
        f"wss://127.0.0.1:{port}/",
        ssl=context,
        max_size=None,
        compression=None,
        subprotocols=["binary"],  # type: ignore[list-item]
    ) as ws:
        started = time.perf_counter()
        ws.send(struct.pack(">Q", total))
        received = 0
        while received < total:
            message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            received += len(message)
            if time.monotonic() > deadline:
                raise BenchError(f"download not done in time ({received} of {total} bytes)")
        return time.perf_counter() - started
