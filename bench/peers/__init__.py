"""The tools backchannel is compared with, each set up by the bench on 127.0.0.1.

Every peer is a reverse tunnel in the same shape as backchannel: a *server* side that the cloud
app connects to (gateway-like: sshd, the ``wtunnel server``, websockify) and a *client* side that
dialled out to it and reaches the backends (connector-like: ``ssh -R``, the ``wtunnel client``).
A peer forwards some of the backend's servers (``sink``, ``source``, ``hold``, ``web``) and says
on which local port each one is reachable. A peer whose program is not installed is *skipped*
with the reason, never replaced by something else.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..procs import BenchError, Proc, WorkDir
from ..scenarios import BulkPath


class PeerSkipped(Exception):
    """The peer cannot run on this machine (not installed); the message says what is missing."""


@dataclass
class Peer:
    """A running peer: its forwarded ports by target name and its two processes.

    ``kind`` is ``"tcp"`` when each forward is a plain TCP port the bench's own clients can use,
    ``"websocket"`` when the cloud app has to speak WebSocket itself (websockify).
    """

    name: str
    label: str
    forwards: dict[str, int]
    server: Proc
    client: Proc | None
    kind: str = "tcp"
    extra: list[Proc] = field(default_factory=list)

    def procs(self) -> tuple[Proc, Proc | None]:
        """(server side, client side)."""
        return self.server, self.client

    def check_alive(self, during: str) -> None:
        """Raise if a process of the peer has exited."""
        for proc in (self.server, self.client, *self.extra):
            if proc is not None:
                proc.check_alive(during)

    def stop(self) -> None:
        """Stop the client side first, then the server side."""
        for proc in (self.client, *self.extra, self.server):
            if proc is not None:
                proc.stop()


#: Starts a peer forwarding ``targets`` (name -> backend port); raises PeerSkipped / BenchError.
Starter = Callable[[WorkDir, Mapping[str, int]], Peer]


@dataclass
class PeerSet:
    """The peers of one run: those that started, and why the others did not."""

    running: dict[str, Peer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def tcp(self, target: str) -> dict[str, Peer]:
        """Running plain-TCP peers that forward ``target``."""
        return {
            name: peer
            for name, peer in self.running.items()
            if peer.kind == "tcp" and target in peer.forwards
        }

    def stop(self) -> None:
        """Stop every running peer."""
        for peer in self.running.values():
            peer.stop()

    def as_json(self) -> dict[str, object]:
        """What ran (with its ports) and what was skipped (with the reason)."""
        return {
            "running": {
                name: {"label": peer.label, "kind": peer.kind, "forwards": peer.forwards}
                for name, peer in self.running.items()
            },
            "skipped": self.skipped,
        }


def all_starters() -> dict[str, Starter]:
    """Every peer the bench knows, by name (imported here so each module stays independent)."""
    from . import ssh, websockify, wstunnel

    return {
        "ssh-aes128-gcm": ssh.starter("aes128-gcm@openssh.com"),
        "ssh-chacha20": ssh.starter("chacha20-poly1305@openssh.com"),
        "websocket-tunnel": wstunnel.start,
        "websockify": websockify.start,
    }


PEER_NAMES = ("ssh-aes128-gcm", "ssh-chacha20", "websocket-tunnel", "websockify")


def start_peers(
    work: WorkDir,
    targets: Mapping[str, int],
    wanted: Sequence[str],
    progress: Callable[[str], None],
) -> PeerSet:
    """Start each wanted peer; a missing program or a failed start is recorded as skipped."""
    peers = PeerSet()
    starters = all_starters()
    for name in wanted:
        try:
            peers.running[name] = starters[name](work, targets)
            progress(f"bench: peer {name}: forwards {peers.running[name].forwards}")
        except PeerSkipped as exc:
            peers.skipped[name] = str(exc)
            progress(f"bench: peer {name} skipped: {exc}")
        except BenchError as exc:
            peers.skipped[name] = f"failed to start: {exc}"
            progress(f"bench: peer {name} skipped, it failed to start: {exc}")
    return peers


def bulk_paths(peers: PeerSet, directions: Sequence[str], ca_file: Path) -> list[BulkPath]:
    """The bulk scenario's paths through each running peer (server and client side measured
    as process trees: sshd and websockify fork a child per connection)."""
    from ..scenarios import TRANSFERS
    from . import websockify
    from .tree import TreeProc

    paths = []
    for name, peer in peers.running.items():
        transfers: dict[str, Callable[[int, float], float]] = {}
        for direction in directions:
            server, transfer = TRANSFERS[direction]
            if server not in peer.forwards:
                continue
            port = peer.forwards[server]
            if peer.kind == "tcp":
                transfers[direction] = functools.partial(transfer, port)
            elif direction == "download":
                transfers[direction] = functools.partial(websockify.download, port, ca_file=ca_file)
        procs = [("server", TreeProc.of(peer.server))]
        if peer.client is not None:
            procs.append(("client", TreeProc.of(peer.client)))
        if transfers:
            paths.append(BulkPath(name, transfers, tuple(procs)))
    return paths
