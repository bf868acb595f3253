"""The many-streams bench (bench.streams) against the bench's own backend, directly on 127.0.0.1:
it waits until every connection is open end to end before it starts the clock, and reports a
path that never opens instead of timing it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.procs import BenchError, Proc, WorkDir, start_backend
from bench.streams import _open, _wait_open, download_many

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def backend_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    monkeypatch.chdir(ROOT)  # python -m bench.backend
    proc: Proc
    proc, ports = start_backend(WorkDir(tmp_path))
    try:
        yield ports
    finally:
        proc.stop()


@pytest.mark.integration
def test_every_stream_is_asked_for_and_gets_its_bytes(backend_ports: dict[str, int]) -> None:
    result = download_many(backend_ports["source"], 20, 64 * 1024, time.monotonic() + 60)
    assert result["streams"] == 20
    assert result["bytes_per_stream"] == 64 * 1024
    assert result["aggregate_mb_per_s"] > 0
    assert 0 < result["fairness"] <= 1
    assert result["slowest_mb_per_s"] <= result["fastest_mb_per_s"]


@pytest.mark.integration
def test_the_readiness_probe_is_answered_by_the_source(backend_ports: dict[str, int]) -> None:
    socks = _open(backend_ports["source"], 5)
    try:
        _wait_open(socks, time.monotonic() + 30)  # returns: every probe answered
        for sock in socks:  # still usable for the download itself
            sock.setblocking(True)
            sock.sendall((3).to_bytes(8, "big"))
            assert len(sock.recv(3, 0x100)) == 3  # MSG_WAITALL
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.integration
def test_a_path_that_never_answers_the_probe_is_reported(backend_ports: dict[str, int]) -> None:
    socks = _open(backend_ports["sink"], 3)  # the sink answers nothing until EOF
    try:
        with pytest.raises(BenchError, match="3 of 3 streams not open end to end"):
            _wait_open(socks, time.monotonic() + 0.5)
    finally:
        for sock in socks:
            sock.close()
