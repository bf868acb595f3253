"""The soak's short form: ``python -m bench.soak --seconds 20`` as a process, and its verdict.

Mixed TCP / HTTP / RFC traffic through a gateway and a connector (real processes) while the
tunnel is cut and the connector killed at random: no payload may come back wrong, no request may
hang, every kind of traffic must get through after the last fault, and the gateway must end
with the descriptors it started with (docs/reliability.md has the long form and its figures).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_short_soak_loses_nothing_and_recovers(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    command = [sys.executable, "-m", "bench.soak", "--seconds", "20", "--seed", "7"]
    result = subprocess.run(
        [*command, "--json", str(report_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["mismatches"] == 0
    assert report["hangs"] == 0
    assert report["faults"]["count"] >= 1
    assert all(
        report["requests"].get(kind, 0) > 0 for kind in ("tcp-echo", "tcp-sink", "http", "rfc")
    )
    assert all(report["traffic_after_last_fault"].values())
    assert report["bytes_verified"] > 0
    start, end = report["start"]["gateway"], report["end"]["gateway"]
    assert start["pid"] == end["pid"]  # the gateway never died
    assert end["open_fds"] <= start["open_fds"] + 2, (start, end)
    assert report["end"]["soak_process"]["tasks"] == report["start"]["soak_process"]["tasks"]
