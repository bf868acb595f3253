"""The targets of the performance issue, checked against one run's figures (ratios in one run).

Each target gives its measured value, the threshold, and met / not met; a target whose figures
are missing (scenario not run, peer skipped) says so instead of passing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Target = dict[str, Any]


def _get(document: dict[str, Any], *keys: str) -> Any:
    node: Any = document
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _ratio_target(name: str, value: float | None, threshold: float, unit: str = "x") -> Target:
    if value is None:
        return {"target": name, "value": None, "threshold": threshold, "met": None}
    return {
        "target": name,
        "value": round(value, 3),
        "threshold": threshold,
        "unit": unit,
        "met": value >= threshold,
    }


def _below(name: str, value: float | None, threshold: float, unit: str) -> Target:
    if value is None:
        return {"target": name, "value": None, "threshold": threshold, "met": None}
    return {
        "target": name,
        "value": round(value, 3),
        "threshold": threshold,
        "unit": unit,
        "met": value < threshold,
        "below": True,
    }


def _bulk_ratio(document: dict[str, Any], direction: str, peer: str) -> float | None:
    value = _get(document, "bulk", "summary", direction, "peers", peer, "ratio_tunnel_to_peer")
    return float(value) if value is not None else None


def _http(document: dict[str, Any], path: str, key: str) -> float | None:
    value = _get(document, "http-peers", "summary", "32", path, key)
    return float(value) if value is not None else None


def _divide(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluate(document: dict[str, Any]) -> list[Target]:
    """Every target with its measured value."""
    found: list[Target] = []
    for direction in ("upload", "download"):
        found.append(
            _ratio_target(
                f"bulk {direction}: backchannel / websocket-tunnel >= 1.0",
                _bulk_ratio(document, direction, "websocket-tunnel"),
                1.0,
            )
        )
        found.append(
            _ratio_target(
                f"bulk {direction}: backchannel / ssh -R aes128-gcm >= 0.5",
                _bulk_ratio(document, direction, "ssh-aes128-gcm"),
                0.5,
            )
        )
        growth = None
        rss = _get(document, "bulk", "summary", direction, "rss")
        if rss:
            growth = max((side["peak_kib"] - side["start_kib"]) / 1024 for side in rss.values())
        found.append(
            _below(
                f"bulk {direction}: memory flat (peak - start per side, MiB) < 16",
                growth,
                16,
                "MiB",
            )
        )
    proxy, forward = _http(document, "proxy", "req_per_s"), _http(document, "forward", "req_per_s")
    found.append(
        _ratio_target(
            "HTTP c=32: proxy / ssh -R aes128-gcm req/s >= 2",
            _divide(proxy, _http(document, "ssh-aes128-gcm", "req_per_s")),
            2.0,
        )
    )
    found.append(_below("HTTP c=32: proxy p99 < 5 ms", _http(document, "proxy", "p99"), 5.0, "ms"))
    found.append(
        _ratio_target(
            "HTTP c=32: forward / websocket-tunnel req/s >= 1.0",
            _divide(forward, _http(document, "websocket-tunnel", "req_per_s")),
            1.0,
        )
    )
    first = _get(document, "setup", "first_byte", "backchannel", "p50_ms")
    found.append(_below("new stream + first byte p50 < 0.5 ms", first, 0.5, "ms"))
    counts = _get(document, "idle", "counts") or []
    big = next((c for c in counts if c.get("streams") == 10000), None)
    for side in ("gateway", "connector"):
        value = big["sides"][side]["per_stream_kib"] if big else None
        found.append(_below(f"10,000 idle streams: {side} KiB per stream < 10", value, 10, "KiB"))
    fairness = _get(document, "streams", "summary", "1000", "backchannel", "fairness")
    found.append(_ratio_target("1,000 active streams: slowest / fastest >= 0.5", fairness, 0.5))
    reconnect = _get(document, "setup", "reconnect", "reconnect_seconds")
    found.append(_below("reconnect within 2 s of the gateway listening", reconnect, 2.0, "s"))
    return found


def render(targets: list[Target], line: Callable[[str], None]) -> None:
    """One line per target."""
    line("Targets (issue 6), ratios measured in this run")
    for target in targets:
        if target["met"] is None:
            verdict, value = "not measured", "-"
        else:
            verdict = "met" if target["met"] else "NOT met"
            value = f"{target['value']:g} {target.get('unit', '')}".strip()
        line(f"  {verdict:>12}  {value:>12}  {target['target']}")
    line("")
