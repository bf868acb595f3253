"""The targets of the performance issue, checked against one run's figures (ratios in one run).

Each target gives its measured value (from the medians), the threshold, and met / not met; a
target whose figures are missing (scenario not run, peer skipped) says so instead of passing.
Where a scenario was repeated, the target also gives its value in each repeat (``runs``: our
run over the peer's run of the same round, which ran right after it), so that a verdict the
machine's noise could flip is visible as one: "met in 2 of 3 rounds".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Target = dict[str, Any]
Run = dict[str, Any]
Runs = list[float] | tuple[()]


def lookup(document: Mapping[str, Any], *keys: str) -> Any:
    """``document[k1][k2]...``, or None where a key (or a mapping on the way) is missing."""
    node: Any = document
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _ratio_target(
    name: str, value: float | None, threshold: float, unit: str = "x", runs: Runs = ()
) -> Target:
    if value is None:
        return {"target": name, "value": None, "threshold": threshold, "met": None}
    target = {
        "target": name,
        "value": round(value, 3),
        "threshold": threshold,
        "unit": unit,
        "met": value >= threshold,
    }
    if runs:
        target["runs"] = [round(run, 3) for run in runs]
        target["runs_met"] = sum(run >= threshold for run in runs)
    return target


def _below(name: str, value: float | None, threshold: float, unit: str, runs: Runs = ()) -> Target:
    if value is None:
        return {"target": name, "value": None, "threshold": threshold, "met": None}
    target = {
        "target": name,
        "value": round(value, 3),
        "threshold": threshold,
        "unit": unit,
        "met": value < threshold,
        "below": True,
    }
    if runs:
        target["runs"] = [round(run, 3) for run in runs]
        target["runs_met"] = sum(run < threshold for run in runs)
    return target


def _rounds(
    runs: Any, value: str, ours: Callable[[Run], bool], theirs: Callable[[Run], bool] | None
) -> list[float]:
    """Per repeat: our run's ``value`` over the peer's run of the same round (or ours alone
    without ``theirs``), in round order; rounds missing either side are left out."""
    if not isinstance(runs, list):
        return []
    mine = {run["repeat"]: run.get(value) for run in runs if ours(run)}
    if theirs is None:
        return [float(mine[k]) for k in sorted(mine) if mine[k] is not None]
    peer = {run["repeat"]: run.get(value) for run in runs if theirs(run)}
    return [
        float(mine[k]) / float(peer[k]) for k in sorted(mine) if mine[k] is not None and peer.get(k)
    ]


def _bulk_rounds(document: dict[str, Any], direction: str, peer: str) -> list[float]:
    return _rounds(
        lookup(document, "bulk", "runs"),
        "mb_per_s",
        lambda run: run.get("direction") == direction and run.get("path") == "tunnel",
        lambda run: run.get("direction") == direction and run.get("path") == peer,
    )


def _http_rounds(document: dict[str, Any], path: str, peer: str | None) -> list[float]:
    def at_32(name: str) -> Callable[[Run], bool]:
        return lambda run: run.get("concurrency") == 32 and run.get("path") == name

    return _rounds(
        lookup(document, "http-peers", "runs"),
        "req_per_s",
        at_32(path),
        at_32(peer) if peer is not None else None,
    )


def _http_p99_rounds(document: dict[str, Any], path: str) -> list[float]:
    runs = lookup(document, "http-peers", "runs")
    if not isinstance(runs, list):
        return []
    return [
        float(run["latency_ms"]["p99"])
        for run in sorted(runs, key=lambda run: run.get("repeat", 0))
        if run.get("concurrency") == 32 and run.get("path") == path and "latency_ms" in run
    ]


def _bulk_ratio(document: dict[str, Any], direction: str, peer: str) -> float | None:
    value = lookup(document, "bulk", "summary", direction, "peers", peer, "ratio_tunnel_to_peer")
    return float(value) if value is not None else None


def _http(document: dict[str, Any], path: str, key: str) -> float | None:
    value = lookup(document, "http-peers", "summary", "32", path, key)
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
                runs=_bulk_rounds(document, direction, "websocket-tunnel"),
            )
        )
        found.append(
            _ratio_target(
                f"bulk {direction}: backchannel / ssh -R aes128-gcm >= 0.5",
                _bulk_ratio(document, direction, "ssh-aes128-gcm"),
                0.5,
                runs=_bulk_rounds(document, direction, "ssh-aes128-gcm"),
            )
        )
        growth = None
        rss = lookup(document, "bulk", "summary", direction, "rss")
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
            runs=_http_rounds(document, "proxy", "ssh-aes128-gcm"),
        )
    )
    found.append(
        _below(
            "HTTP c=32: proxy p99 < 5 ms",
            _http(document, "proxy", "p99"),
            5.0,
            "ms",
            runs=_http_p99_rounds(document, "proxy"),
        )
    )
    found.append(
        _ratio_target(
            "HTTP c=32: forward / websocket-tunnel req/s >= 1.0",
            _divide(forward, _http(document, "websocket-tunnel", "req_per_s")),
            1.0,
            runs=_http_rounds(document, "forward", "websocket-tunnel"),
        )
    )
    first = lookup(document, "setup", "first_byte", "backchannel", "p50_ms")
    found.append(_below("new stream + first byte p50 < 0.5 ms", first, 0.5, "ms"))
    counts = lookup(document, "idle", "counts") or []
    big = next((c for c in counts if c.get("streams") == 10000), None)
    for side in ("gateway", "connector"):
        value = big["sides"][side]["per_stream_kib"] if big else None
        found.append(_below(f"10,000 idle streams: {side} KiB per stream < 10", value, 10, "KiB"))
    fairness = lookup(document, "streams", "summary", "1000", "backchannel", "fairness")
    fairness_rounds = _rounds(
        lookup(document, "streams", "runs"),
        "fairness",
        lambda run: run.get("streams") == 1000 and run.get("path") == "backchannel",
        None,
    )
    found.append(
        _ratio_target(
            "1,000 active streams: slowest / fastest >= 0.5",
            fairness,
            0.5,
            runs=fairness_rounds,
        )
    )
    reconnect = lookup(document, "setup", "reconnect", "reconnect_seconds")
    found.append(_below("reconnect within 2 s of the gateway listening", reconnect, 2.0, "s"))
    return found


def render(targets: list[Target], line: Callable[[str], None]) -> None:
    """One line per target."""
    line("Targets (issue 6), measured in this run (from the medians; per round where repeated)")
    for target in targets:
        rounds = ""
        if target["met"] is None:
            verdict, value = "not measured", "-"
        else:
            verdict = "met" if target["met"] else "NOT met"
            value = f"{target['value']:g} {target.get('unit', '')}".strip()
            runs = target.get("runs")
            if runs:
                rounds = (
                    f"  [rounds {min(runs):g}-{max(runs):g}: "
                    f"met in {target['runs_met']} of {len(runs)}]"
                )
        line(f"  {verdict:>12}  {value:>12}  {target['target']}{rounds}")
    line("")
