"""A PNG chart of one run's comparison figures (matplotlib, an optional dependency).

Four panels: bulk MB/s per path and direction, HTTP req/s per path at each concurrency, many
streams' aggregate MB/s per count, and a new stream's first-byte p50 per path. Without
matplotlib the chart is skipped and the run says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _bulk(document: dict[str, Any]) -> dict[str, dict[str, float]]:
    series: dict[str, dict[str, float]] = {}
    for direction, row in (document.get("bulk") or {}).get("summary", {}).items():
        series.setdefault("direct", {})[direction] = row["direct_mb_per_s"]["median"]
        series.setdefault("backchannel", {})[direction] = row["tunnel_mb_per_s"]["median"]
        for name, peer in row.get("peers", {}).items():
            series.setdefault(name, {})[direction] = peer["mb_per_s"]["median"]
    return series


def _grouped(axis: Any, groups: list[str], series: dict[str, dict[str, float]], title: str) -> None:
    names = list(series)
    width = 0.8 / max(1, len(names))
    for index, name in enumerate(names):
        xs = [g + index * width for g in range(len(groups))]
        axis.bar(xs, [series[name].get(group, 0.0) for group in groups], width, label=name)
    axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=6)


def write_chart(document: dict[str, Any], path: Path) -> str:
    """Write the chart; returns its path relative to the repository, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install matplotlib)"
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    bulk = _bulk(document)
    if bulk:
        _grouped(axes[0][0], ["upload", "download"], bulk, "Bulk TCP, one stream (MB/s)")
        axes[0][0].set_yscale("log")
    http = (document.get("http-peers") or {}).get("summary", {})
    if http:
        series: dict[str, dict[str, float]] = {}
        for concurrency, row in http.items():
            for name, cell in row.items():
                series.setdefault(name, {})[f"c={concurrency}"] = cell["req_per_s"]
        _grouped(axes[0][1], [f"c={c}" for c in http], series, "HTTP 1 KiB GETs (req/s)")
        axes[0][1].set_yscale("log")
    streams = (document.get("streams") or {}).get("summary", {})
    if streams:
        series = {}
        for count, row in streams.items():
            for name, cell in row.items():
                series.setdefault(name, {})[count] = cell["aggregate_mb_per_s"]
        _grouped(axes[1][0], list(streams), series, "Many streams, aggregate MB/s")
        axes[1][0].set_yscale("log")
    setup = (document.get("setup") or {}).get("first_byte", {})
    if setup:
        axes[1][1].bar(list(setup), [row["p50_ms"] for row in setup.values()])
        axes[1][1].set_title("New stream + first byte, p50 (ms)", fontsize=9)
        axes[1][1].tick_params(axis="x", labelsize=6)
    figure.suptitle(f"backchannel bench {document['timestamp']}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return str(path.relative_to(path.parent.parent.parent))
