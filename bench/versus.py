"""The scenarios that compare backchannel with its peers in one run: many streams, HTTP through
every path, and set-up times (the bulk scenario takes the peers as extra paths itself)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import http_versus, setup_times, streams
from .peers import PeerSet
from .peers.tree import TreeProc
from .procs import APP, HTTP_VIRTUAL, SUBACCOUNT, Pair, Proc, WorkDir


@dataclass
class VersusOptions:
    """Options of the comparison scenarios."""

    stream_counts: Sequence[int]
    streams_mib: int
    http_concurrencies: Sequence[int]
    http_seconds: float
    http_warm_up: float
    first_byte_samples: int
    reconnect_down: float
    repeat: int
    log_level: str


def _peer_procs(peers: PeerSet, name: str) -> list[Proc]:
    peer = peers.running[name]
    return [TreeProc.of(p) for p in (peer.server, peer.client) if p is not None]


def run_streams(
    pair: Pair,
    ports: Mapping[str, int],
    peers: PeerSet,
    options: VersusOptions,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Many concurrent downloads: direct, backchannel and every plain-TCP peer."""
    paths: dict[str, tuple[int, Sequence[Proc]]] = {
        "direct": (ports["source"], []),
        "backchannel": (pair.addresses.forwards["source"], list(pair.procs())),
    }
    for name, peer in peers.tcp("source").items():
        paths[name] = (peer.forwards["source"], _peer_procs(peers, name))
    return streams.run_streams(
        paths,
        counts=options.stream_counts,
        total_mib=options.streams_mib,
        repeat=options.repeat,
        progress=progress,
        check_alive=pair.check_alive,
    )


def run_http(
    work: WorkDir,
    pair: Pair,
    ports: Mapping[str, int],
    peers: PeerSet,
    options: VersusOptions,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """1 KiB GETs: direct, proxy, forward, peers."""
    paths = http_versus.http_paths(
        ports["http"],
        pair.addresses.http_proxy,
        pair.addresses.forwards.get("web"),
        f"{HTTP_VIRTUAL[0]}:{HTTP_VIRTUAL[1]}",
        f"{SUBACCOUNT}/{APP}:{work.app_secret}",
        {
            name: (peer.forwards["web"], tuple(_peer_procs(peers, name)))
            for name, peer in peers.tcp("web").items()
        },
        pair.procs(),
    )
    return http_versus.run_http_versus(
        work,
        paths,
        concurrencies=options.http_concurrencies,
        seconds=options.http_seconds,
        warm_up=options.http_warm_up,
        repeat=options.repeat,
        progress=progress,
        check_alive=pair.check_alive,
    )


def run_setup(
    work: WorkDir,
    pair: Pair,
    ports: Mapping[str, int],
    peers: PeerSet,
    options: VersusOptions,
    label: str,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """First byte and first answer over every path; start-up and reconnect of backchannel."""
    hold_ports = {"direct": ports["hold"], "backchannel": pair.addresses.forwards["hold"]}
    hold_ports |= {name: peer.forwards["hold"] for name, peer in peers.tcp("hold").items()}
    source_ports = {"direct": ports["source"], "backchannel": pair.addresses.forwards["source"]}
    source_ports |= {name: peer.forwards["source"] for name, peer in peers.tcp("source").items()}
    return setup_times.run_setup(
        work,
        pair,
        hold_ports,
        source_ports=source_ports,
        samples=options.first_byte_samples,
        down=options.reconnect_down,
        log_level=options.log_level,
        label=label,
        progress=progress,
    )
