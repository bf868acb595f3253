"""websocket-tunnel (PyPI ``websocket-tunnel``, command ``wtunnel``) as a peer.

A Python (asyncio + ``websockets``) tunnel that multiplexes TCP connections over one WebSocket,
frp-style. The harness writes a ``server.toml`` (wss with the bench's throwaway certificate, a
random token) and a ``client.toml`` whose ``[[proxies]]`` listen on the server side
(``listen_side = "peer"``) and reach the backends from the client side (``backend_side =
"local"``): the cloud app connects to the server, the client dialled out, as in backchannel.
``tls_skip_verify = true`` because the tool cannot be given a CA file.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from ..procs import WorkDir, free_ports, spawn, wait_listening
from . import Peer, PeerSkipped

START_TIMEOUT = 20.0


def _toml(value: str) -> str:
    return json.dumps(value)


def wtunnel_command() -> str:
    """The ``wtunnel`` script next to this interpreter or on PATH; PeerSkipped if absent."""
    import sys

    beside = Path(sys.executable).parent / "wtunnel"
    if beside.exists():
        return str(beside)
    found = shutil.which("wtunnel")
    if found is None:
        raise PeerSkipped("websocket-tunnel is not installed (pip install websocket-tunnel)")
    return found


def start(work: WorkDir, targets: Mapping[str, int]) -> Peer:
    """Start ``wtunnel server`` and ``wtunnel client`` forwarding every target."""
    command = wtunnel_command()
    folder = work.path / "wtunnel"
    folder.mkdir()
    token = secrets.token_urlsafe(24)
    port, *forward_ports = free_ports(1 + len(targets))
    forwards = dict(zip(targets, forward_ports, strict=True))
    (folder / "server.toml").write_text(
        f"listen = {_toml(f'127.0.0.1:{port}')}\ntoken = {_toml(token)}\n"
        f"tls = {{ cert = {_toml(str(work.tls.cert_file))}, "
        f"key = {_toml(str(work.tls.key_file))} }}\n"
        'allow_peer_listens = ["127.0.0.1/32"]\n'
    )
    proxies = "".join(
        f"\n[[proxies]]\nname = {_toml(name)}\nlisten = {_toml(f'127.0.0.1:{forwards[name]}')}\n"
        f'listen_side = "peer"\nbackend = {_toml(f"127.0.0.1:{backend}")}\n'
        'backend_side = "local"\n'
        for name, backend in targets.items()
    )
    (folder / "client.toml").write_text(
        f"server = {_toml(f'127.0.0.1:{port}')}\ntoken = {_toml(token)}\n"
        'tls = true\ntls_skip_verify = true\nallow_peer_backends = ["127.0.0.1/32"]\n' + proxies
    )
    for name in ("server.toml", "client.toml"):
        (folder / name).chmod(0o600)
    deadline = time.monotonic() + START_TIMEOUT
    server = spawn(
        "wtunnel server",
        [command, "server", "-c", str(folder / "server.toml")],
        folder / "server.log",
    )
    try:
        wait_listening(server, port, deadline)
        client = spawn(
            "wtunnel client",
            [command, "client", "-c", str(folder / "client.toml")],
            folder / "client.log",
        )
        try:
            for forward in forwards.values():
                wait_listening(server, forward, deadline)
        except BaseException:
            client.stop()
            raise
    except BaseException:
        server.stop()
        raise
    return Peer("websocket-tunnel", "websocket-tunnel (wss)", forwards, server, client)
