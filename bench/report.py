"""Machine description, the terminal table and the JSON file."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import backchannel

from . import versus_report

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_mib": _mem_total_mib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "backchannel": backchannel.__version__,
        "trio": _version("trio"),
        "trio_websocket": _version("trio-websocket"),
        "wsproto": _version("wsproto"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        # which uncommitted changes of tracked files the run measured (none: hash of "")
        "git_diff_sha256": hashlib.sha256((_git("diff", "HEAD") or "").encode()).hexdigest()[:16],
    }


def write_json(document: dict[str, Any], stamp: str) -> Path:
    """Write ``bench/results/<stamp>.json``; returns the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{stamp}.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def _rss_cell(rss: dict[str, int]) -> str:
    """One process's RSS over the runs: start / peak / end, in MiB."""
    return f"{_mib(rss['start_kib'])} / {_mib(rss['peak_kib'])} / {_mib(rss['end_kib'])}"


def _ms(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:8.3f}"


def _rate_table(
    summary: dict[str, Any], *, rate: str, heading: str, latency: str, server: str, width: int
) -> list[str]:
    """The table of a closed-loop scenario (HTTP, RFC): a header, then per concurrency a row per
    path with the median ``rate`` (under ``heading``), the ``latency`` percentiles, the
    tunnel/direct ratio and CPU of gateway, connector, ``server`` (a column ``width`` wide),
    client and other."""
    lines = [
        f"  {'conc':>4} {'path':6} {heading:>9} {'p50':>8} {'p99':>8} {'p99.9':>8}"
        f" {'tunnel/direct':>14} {'gw CPU':>7} {'conn CPU':>9} {server:>{width}} {'client':>7}"
        f" {'other':>6}",
    ]
    for concurrency, row in summary.items():
        for path in ("direct", "tunnel"):
            side = row[path]
            ms = side[latency]
            cpu = side["cpu_percent_median"]
            ratio = f"{row['ratio_tunnel_to_direct']:14.3f}" if path == "tunnel" else " " * 14
            lines.append(
                f"  {concurrency:>4} {path:6} {side[rate]['median']:9.0f}"
                f" {_ms(ms['p50'])} {_ms(ms['p99'])} {_ms(ms['p99_9'])} {ratio}"
                f" {cpu['gateway']:6.0f}% {cpu['connector']:8.0f}% {cpu[server]:{width - 1}.0f}%"
                f" {cpu['client']:6.0f}% {cpu['other']:5.0f}%"
            )
    return lines


def render_table(document: dict[str, Any]) -> str:
    """The human-readable summary."""
    machine = document["machine"]
    lines = [
        f"backchannel {machine['backchannel']} bench, {document['timestamp']}",
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
        f"kernel {machine['kernel']}",
        f"command: {document['command']}",
        f"background load before start: {document.get('background_load_percent_before', '?')}%"
        " of one CPU",
        "",
    ]
    bulk = document.get("bulk")
    if bulk and "summary" in bulk:
        lines.append(
            f"Bulk TCP, one stream, {bulk['mib']} MiB per run, {bulk['repeat']} run(s) per path "
            "(median MB/s, MB = 10^6 bytes)"
        )
        lines.append(
            f"  {'direction':9} {'direct':>9} {'tunnel':>9} {'tunnel/direct':>14}"
            f" {'gw CPU':>7} {'conn CPU':>9} {'other CPU':>10}"
        )
        for direction, row in bulk["summary"].items():
            cpu = row["tunnel_cpu_percent_median"]
            lines.append(
                f"  {direction:9} {row['direct_mb_per_s']['median']:9.1f} "
                f"{row['tunnel_mb_per_s']['median']:9.1f} {row['ratio_tunnel_to_direct']:14.3f}"
                f" {cpu['gateway']:6.0f}% {cpu['connector']:8.0f}% {cpu['other']:9.0f}%"
            )
        lines.append(
            "  (CPU: percent of one core during the tunnel runs;"
            " 'other' = processes outside the bench)"
        )
        lines.append(
            "  CPU cost per MB through the tunnel (median) and the single-core ceiling it implies"
        )
        lines.append(
            f"  {'direction':9} {'gateway ms/MB':>14} {'connector ms/MB':>16} {'ceiling MB/s':>13}"
            "   kernel part (gw / conn)"
        )
        for direction, row in bulk["summary"].items():
            cost = row["tunnel_cpu_ms_per_mb_median"]
            worst = max(cost["gateway"], cost["connector"])
            ceiling = f"{1000 / worst:13.0f}" if worst > 0 else f"{'-':>13}"
            lines.append(
                f"  {direction:9} {cost['gateway']:14.2f} {cost['connector']:16.2f} {ceiling}"
                f"   {cost['gateway_sys']:.2f} / {cost['connector_sys']:.2f}"
            )
        lines.append("  RSS during the tunnel runs, MiB (start / peak / end, sampled every 100 ms)")
        lines.append(f"  {'direction':9} {'gateway':>22} {'connector':>22}")
        for direction, row in bulk["summary"].items():
            rss = row["rss"]
            lines.append(
                f"  {direction:9} {_rss_cell(rss['gateway']):>22} {_rss_cell(rss['connector']):>22}"
            )
        lines.append("")
    idle = document.get("idle")
    if idle and "sides" in idle:
        lines.append(
            f"Idle streams: {idle['streams']} via {idle['via']}, established in "
            f"{idle['open_seconds']:.2f} s ({idle['streams_per_second']:.0f}/s)"
        )
        lines.append(
            f"  {'side':10} {'before MiB':>11} {'with streams':>13} {'per stream KiB':>15}"
            f" {'after close':>12} {'2nd round with/after':>21}"
        )
        for side, row in idle["sides"].items():
            lines.append(
                f"  {side:10} {_mib(row['before_kib']):>11} {_mib(row['with_streams_kib']):>13}"
                f" {row['per_stream_kib']:15.1f} {_mib(row['after_close_kib']):>12}"
                f" {_mib(row['second_round_with_streams_kib']) + ' / ':>14}"
                f"{_mib(row['second_round_after_close_kib'])}"
            )
        lines.append("")
    http = document.get("http")
    if http and "summary" in http:
        lines += _http_lines(http)
    rfc = document.get("rfc")
    if rfc and "summary" in rfc:
        lines += _rfc_lines(rfc)
    identity = document.get("identity")
    if identity and "summary" in identity:
        lines += identity_micro_lines(identity["micro"]) + _identity_lines(identity)
    for label, section in (document.get("components") or {}).items():
        if not isinstance(section, dict) or "layers" not in section:
            continue
        lines.append(f"Layers, {label}: ms CPU per MB, in one process (lowest of the rounds)")
        for name, value in section["layers"].items():
            lines.append(f"  {value:7.3f}  {name}")
        lines.append(f"  {section['layers_sum']:7.3f}  sum of the layers (both ends)")
        for variant, numbers in section["end_to_end"].items():
            lines.append(
                f"  over TLS over loopback TCP, both ends, {variant}: "
                f"{numbers['cpu_ms_per_mb_both_ends']:.3f} ms/MB"
            )
        lines.append("")
    windows = [
        ("HTTP", role, profile, f"{profile.get('req_per_s_while_profiled', 0):.0f} req/s")
        for role, profile in (document.get("http_profile") or {}).items()
    ] + [
        ("RFC", role, profile, f"{profile.get('calls_per_s_while_profiled', 0):.0f} calls/s")
        for role, profile in (document.get("rfc_profile") or {}).items()
    ]
    for scenario, role, profile, rate in windows:
        if "top_self" not in profile:
            continue
        lines.append(
            f"Profile of the {role.replace('-c', ' at concurrency ')} during an extra {scenario}"
            f" tunnel window (py-spy, {profile['samples']} samples, busy"
            f" ~{profile['busy_fraction_estimate']}, {rate}): top self time"
        )
        for row in profile["top_self"][:10]:
            lines.append(f"  {row['percent']:5.1f}%  {row['function']}")
        lines.append(
            f"  self time by package, without the {profile['wait_frame_percent']:.0f}% of samples"
            " in epoll wait / socket calls:"
        )
        for row in profile["self_by_package_without_waits"][:10]:
            lines.append(f"  {row['percent']:5.1f}%  {row['package']}")
        lines.append("")
    for role, profile in (document.get("profile") or {}).items():
        if "top_self" not in profile:
            continue
        lines.append(
            f"Profile of the {role} during the bulk tunnel runs"
            f" (py-spy, {profile['samples']} samples,"
            f" busy ~{profile['busy_fraction_estimate']}): top self time"
        )
        for row in profile["top_self"][:10]:
            lines.append(f"  {row['percent']:5.1f}%  {row['function']}")
        lines.append("")
    lines += versus_report.render(document)
    for error in document.get("errors", []):
        lines.append(f"ERROR in {error['scenario']}: {error['message']}")
    return "\n".join(lines)


def _http_lines(http: dict[str, Any]) -> list[str]:
    lines = [
        f"HTTP, {http['request']}, kept-alive connections with one request in flight each, "
        f"{http['seconds']:g} s per case after {http['warm_up_seconds']:g} s warm-up, "
        f"{http['repeat']} run(s) per path (medians; latency in ms)",
        *_rate_table(
            http["summary"],
            rate="req_per_s",
            heading="req/s",
            latency="latency_ms_median",
            server="backend",
            width=8,
        ),
    ]
    lines.append(
        "  (CPU: percent of one core during the window; client = the load processes; other ="
        " CPU not charged to the bench's processes: other programs, kernel softirq work)"
    )
    lines.append("  CPU per request through the tunnel (median, microseconds) and RSS (MiB)")
    lines.append(
        f"  {'conc':>4} {'gateway':>8} {'connector':>10} {'backend':>8} {'client':>7}"
        f"   {'gateway start/peak/end':>24} {'connector start/peak/end':>26}"
    )
    for concurrency, row in http["summary"].items():
        cost = row["tunnel"]["cpu_us_per_request_median"]
        rss = row["tunnel"]["rss"]
        lines.append(
            f"  {concurrency:>4} {cost['gateway']:8.0f} {cost['connector']:10.0f}"
            f" {cost['backend']:8.0f} {cost['client']:7.0f}"
            f"   {_rss_cell(rss['gateway']):>24} {_rss_cell(rss['connector']):>26}"
        )
    big = http["big_download"]
    cpu = big["tunnel_cpu_percent_median"]
    cost = big["tunnel_cpu_ms_per_mb_median"]
    rss = big["rss"]
    lines.append(
        f"  GET /big, {big['mib']} MiB on one connection (median MB/s): direct"
        f" {big['direct_mb_per_s']['median']:.1f}, tunnel {big['tunnel_mb_per_s']['median']:.1f}"
        f" ({big['ratio_tunnel_to_direct']:.3f})"
    )
    lines.append(
        f"    tunnel CPU {cpu['gateway']:.0f}% gw / {cpu['connector']:.0f}% conn"
        f" ({cost['gateway']:.2f} / {cost['connector']:.2f} ms per MB); RSS peak"
        f" {_mib(rss['gateway']['peak_kib'])} / {_mib(rss['connector']['peak_kib'])} MiB"
    )
    lines.append("")
    return lines


def _rfc_lines(rfc: dict[str, Any]) -> list[str]:
    clients = (
        "a client process each"
        if rfc["client_processes"] is None
        else f"{rfc['client_processes']} client process(es)"
    )
    lines = [
        f"RFC, {rfc['call']}, one call in flight per connection ({clients}), "
        f"{rfc['seconds']:g} s per case after {rfc['warm_up_seconds']:g} s warm-up, "
        f"{rfc['repeat']} run(s) per path (calls/s: median of the runs; latency in ms over the"
        f" calls of all runs, p99.9 from {rfc['p99_9_min_calls']} calls up)",
        *_rate_table(
            rfc["summary"],
            rate="calls_per_s",
            heading="calls/s",
            latency="latency_ms_pooled",
            server="stub",
            width=6,
        ),
    ]
    lines.append(
        "  (CPU: percent of one core during the window; client = the load processes; other ="
        " CPU not charged to the bench's processes)"
    )
    lines.append(
        "  CPU per call (median, microseconds): gateway and connector through the tunnel, stub"
        " and client direct / tunnel; logon (median ms) direct / tunnel; tunnel RSS (MiB)"
    )
    lines.append(
        f"  {'conc':>4} {'gateway':>8} {'connector':>10} {'stub d/t':>10} {'client d/t':>11}"
        f" {'logon d/t':>12}   {'gateway start/peak/end':>24} {'connector start/peak/end':>26}"
    )
    for concurrency, row in rfc["summary"].items():
        direct = row["direct"]["cpu_us_per_call_median"]
        cost = row["tunnel"]["cpu_us_per_call_median"]
        rss = row["tunnel"]["rss"]
        logon = f"{row['direct']['logon_ms_median']:.1f} / {row['tunnel']['logon_ms_median']:.1f}"
        lines.append(
            f"  {concurrency:>4} {cost['gateway']:8.0f} {cost['connector']:10.0f}"
            f" {direct['stub']:4.0f} / {cost['stub']:3.0f} {direct['client']:5.0f} / "
            f"{cost['client']:3.0f} {logon:>12}"
            f"   {_rss_cell(rss['gateway']):>24} {_rss_cell(rss['connector']):>26}"
        )
    lines.append("")
    return lines


def identity_micro_lines(micro: dict[str, Any]) -> list[str]:
    """The in-process costs of principal propagation (``bench.identity``)."""
    lines = [
        "Principal propagation, in-process cost of each step (µs per call)",
        f"  {'median':>9} {'p99':>9} {'CPU med':>9} {'N':>5}  step",
    ]
    for row in micro["steps"].values():
        lines.append(
            f"  {row['median_us']:9.1f} {row['p99_us']:9.1f} {row['cpu_median_us']:9.1f}"
            f" {row['runs']:5d}  {row['label']}"
        )
    lines.append(
        "  (median and p99: wall time, p99 the nearest rank, with fewer than 100 calls the"
        " slowest; CPU med: this thread's CPU time)"
    )
    lines.append("")
    return lines


def _identity_lines(identity: dict[str, Any]) -> list[str]:
    lines = [
        f"Principal propagation end to end, {identity['request']} through the HTTP proxy to"
        f" nginx (mTLS), {identity['seconds']:g} s per case after"
        f" {identity['warm_up_seconds']:g} s warm-up, {identity['repeat']} run(s) per case"
        " (medians; latency in ms; CPU µs per request)",
        f"  {'connections':16} {'mode':11} {'req/s':>7} {'/basic':>7} {'p50':>8} {'p99':>8}"
        f" {'gw µs':>7} {'conn µs':>8} {'nginx µs':>9} {'client µs':>10} {'other':>6}",
    ]
    for label, row in identity["summary"].items():
        for mode in identity["modes"]:
            side = row[mode]
            ms = side["latency_ms_median"]
            cost = side["cpu_us_per_request_median"]
            ratio = row["ratio_to_basic"].get(mode)
            ratio_text = f"{ratio:7.3f}" if ratio is not None else " " * 7
            lines.append(
                f"  {label:16} {mode:11} {side['req_per_s']['median']:7.0f} {ratio_text}"
                f" {_ms(ms['p50'])} {_ms(ms['p99'])} {cost['gateway']:7.0f}"
                f" {cost['connector']:8.0f} {cost['backend']:9.0f} {cost['client']:10.0f}"
                f" {side['other_cpu_percent_median']:5.0f}%"
            )
    lines.append(
        "  (keep-alive: one tunnel stream per client connection, the user resolved once per"
        " stream; new: Connection: close, a new stream and backend TLS handshake per request;"
        " other: percent of one core used outside the bench's processes)"
    )
    lines.append("")
    return lines


def command_line() -> str:
    """The exact command that ran this bench."""
    return " ".join([sys.executable, "-m", "bench", *sys.argv[1:]])
