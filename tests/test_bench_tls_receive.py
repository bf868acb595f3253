"""bench.tls_receive moves every byte over real TLS on 127.0.0.1 both ways (memory BIOs and a
socket-owning SSLSocket) and reports the receiver's CPU per MiB for each."""

from __future__ import annotations

import pytest
from bench import tls_receive


def test_both_ways_receive_every_byte_and_are_timed() -> None:
    results = tls_receive.run(mib=2, rounds=1)
    assert set(results) == set(tls_receive.WAYS)
    assert all(len(values) == 1 and values[0] > 0 for values in results.values())


def test_the_command_prints_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    assert tls_receive.main(["--mib", "1", "--rounds", "1"]) == 0
    printed = capsys.readouterr().out
    assert all(way in printed for way in tls_receive.WAYS)
