"""bench.http_codec times each step of the proxy's per-request h11 work (and httptools when
installed): every step is measured and the cycle is their sum."""

from __future__ import annotations

import pytest
from bench import http_codec


def test_every_step_of_the_h11_cycle_is_timed() -> None:
    document = http_codec.run(50)
    steps = document["h11_us_per_step"]
    assert list(steps) == list(http_codec.STEPS)
    assert all(value > 0 for value in steps.values())
    assert abs(document["h11_us_per_cycle"] - sum(steps.values())) < 1e-9
    other = document["httptools_us_per_cycle"]
    assert other is None or other > 0


def test_the_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert http_codec.main(["--cycles", "20"]) == 0
    printed = capsys.readouterr().out
    assert "h11 whole cycle" in printed
    assert "httptools" in printed
