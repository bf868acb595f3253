"""Terminal tables of the comparison with the peers (bulk, streams, HTTP, set-up, targets)."""

from __future__ import annotations

from typing import Any

from . import targets


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def peer_lines(peers: dict[str, Any]) -> list[str]:
    """Which peers ran and which were skipped (with the reason)."""
    lines = ["Peers"]
    for name, peer in peers.get("running", {}).items():
        lines.append(f"  {name:18} ran: {peer['label']}")
    for name, reason in peers.get("skipped", {}).items():
        lines.append(f"  {name:18} SKIPPED: {reason}")
    return [*lines, ""]


def bulk_peer_lines(bulk: dict[str, Any]) -> list[str]:
    """Each peer's bulk MB/s beside backchannel's, and its memory during the transfers."""
    lines = [
        "Bulk through the peers (median MB/s; backchannel/peer; CPU ms per MB server / client;"
        " RSS MiB start / peak per side)"
    ]
    for direction, row in bulk["summary"].items():
        tunnel = row["tunnel_mb_per_s"]["median"]
        lines.append(f"  {direction:9} {'backchannel':18} {tunnel:9.1f}")
        for name, peer in row.get("peers", {}).items():
            cost = peer["cpu_ms_per_mb_median"]
            sides = [k for k in cost if not k.endswith("_sys")]
            rss = " | ".join(
                f"{_mib(v['start_kib'])} / {_mib(v['peak_kib'])}" for v in peer["rss"].values()
            )
            lines.append(
                f"  {direction:9} {name:18} {peer['mb_per_s']['median']:9.1f}"
                f" {peer['ratio_tunnel_to_peer']:7.3f}x  "
                + " / ".join(f"{cost[k]:.2f}" for k in sides)
                + f"  RSS {rss}"
            )
    return [*lines, ""]


def idle_lines(idle: dict[str, Any]) -> list[str]:
    """One block per idle stream count."""
    lines: list[str] = []
    for run in idle.get("counts", []):
        lines.append(
            f"Idle streams: {run['streams']} via {run['via']}, established in "
            f"{run['open_seconds']:.2f} s ({run['streams_per_second']:.0f}/s)"
        )
        lines.append(
            f"  {'side':10} {'before MiB':>11} {'with streams':>13} {'per stream KiB':>15}"
            f" {'after close':>12} {'2nd round with/after':>21}"
        )
        for side, row in run["sides"].items():
            lines.append(
                f"  {side:10} {_mib(row['before_kib']):>11} {_mib(row['with_streams_kib']):>13}"
                f" {row['per_stream_kib']:15.1f} {_mib(row['after_close_kib']):>12}"
                f" {_mib(row['second_round_with_streams_kib']) + ' / ':>14}"
                f"{_mib(row['second_round_after_close_kib'])}"
            )
        lines.append("")
    return lines


def streams_lines(section: dict[str, Any]) -> list[str]:
    """Aggregate MB/s and fairness per count and path."""
    lines = [
        f"Many streams, download, {section['total_mib']} MiB per case shared out (median of "
        f"{section['repeat']}; aggregate MB/s, slowest/fastest stream)"
    ]
    names = list(next(iter(section["summary"].values())).keys())
    lines.append(f"  {'streams':>7} " + " ".join(f"{n:>22}" for n in names))
    for count, row in section["summary"].items():
        cells = [f"{row[n]['aggregate_mb_per_s']:12.1f} / {row[n]['fairness']:5.2f}" for n in names]
        lines.append(f"  {count:>7} " + " ".join(f"{c:>22}" for c in cells))
    return [*lines, ""]


def http_lines(section: dict[str, Any]) -> list[str]:
    """req/s and latency per concurrency and path."""
    lines = [
        f"HTTP through every path, {section['request']}, client {section['client']}, "
        f"{section['seconds']:g} s per case, median of {section['repeat']} (latency ms)",
        f"  {'conc':>4} {'path':18} {'req/s':>9} {'p50':>8} {'p99':>8} {'p99.9':>8} {'/direct':>8}"
        "  CPU µs/request server / client side",
    ]
    for concurrency, row in section["summary"].items():
        direct = row.get("direct", {}).get("req_per_s")
        for name, cell in row.items():
            ratio = f"{cell['req_per_s'] / direct:8.3f}" if direct else f"{'-':>8}"
            lines.append(
                f"  {concurrency:>4} {name:18} {cell['req_per_s']:9.0f} {cell['p50']:8.3f}"
                f" {cell['p99']:8.3f} {cell['p99_9']:8.3f} {ratio}  "
                + " / ".join(f"{v:.0f}" for v in cell.get("cpu_us_per_request", []))
            )
    return [*lines, ""]


def _setup_rows(rows: dict[str, Any]) -> list[str]:
    return [
        f"  {name:18} p50 {row['p50_ms']:8.3f}  p99 {row['p99_ms']:8.3f}  max"
        f" {row['max_ms']:8.3f}  ({row['samples']} streams)"
        for name, row in rows.items()
    ]


def setup_lines(section: dict[str, Any]) -> list[str]:
    """First byte per path, start-up and reconnect."""
    lines = ["Set-up: new stream + first byte (connect to the hold server's greeting), ms"]
    lines += _setup_rows(section["first_byte"])
    if "first_answer" in section:
        lines.append(
            "  new connection + first answer (connect, send the source server's probe, its"
            " answer), ms"
        )
        lines += _setup_rows(section["first_answer"])
    reconnect = section["reconnect"]
    lines.append(
        "  connector start to first request served: "
        f"{section['connector_start_to_first_request_seconds']:.3f} s"
    )
    lines.append(
        f"  reconnect: gateway down {reconnect['gateway_down_seconds']:g} s, listening again after"
        f" {reconnect['gateway_start_seconds']:.3f} s, first stream served"
        f" {reconnect['reconnect_seconds']:.3f} s later"
    )
    return [*lines, ""]


def render(document: dict[str, Any]) -> list[str]:
    """Every comparison section the document has, then the targets."""
    lines: list[str] = []
    if document.get("peers"):
        lines += peer_lines(document["peers"])
    bulk = document.get("bulk")
    if bulk and "summary" in bulk and any(r.get("peers") for r in bulk["summary"].values()):
        lines += bulk_peer_lines(bulk)
    if document.get("idle") and "counts" in document["idle"]:
        lines += idle_lines(document["idle"])
    if document.get("streams") and "summary" in document["streams"]:
        lines += streams_lines(document["streams"])
    if document.get("http-peers") and "summary" in document["http-peers"]:
        lines += http_lines(document["http-peers"])
    if document.get("setup") and "first_byte" in document["setup"]:
        lines += setup_lines(document["setup"])
    evaluated = targets.evaluate(document)
    document["targets"] = evaluated
    targets.render(evaluated, lines.append)
    if document.get("chart"):
        lines.append(f"chart: {document['chart']}")
    return lines
