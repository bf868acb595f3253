"""bench.compare: two checkouts run in alternating order, backchannel's figures side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench import compare

ROOT = Path(__file__).resolve().parents[1]


def result(rate: float, cpu: float, first_byte: float) -> dict[str, Any]:
    """A ``python -m bench`` result with the parts bench.compare reads (peers included)."""
    return {
        "bulk": {
            "summary": {
                "upload": {
                    "tunnel_mb_per_s": {"median": rate, "min": rate, "max": rate},
                    "tunnel_cpu_ms_per_mb_median": {"gateway": cpu, "connector": cpu},
                }
            }
        },
        "streams": {
            "summary": {
                "1000": {
                    "direct": {"aggregate_mb_per_s": 9999.0, "fairness": 0.1},
                    "backchannel": {"aggregate_mb_per_s": rate / 2, "fairness": 0.9},
                }
            }
        },
        "http-peers": {
            "summary": {
                "32": {
                    "direct": {"req_per_s": 90000.0, "p99": 1.0},
                    "forward": {
                        "req_per_s": rate * 20,
                        "p99": 6.0,
                        "cpu_us_per_request": [cpu, cpu],
                    },
                    "websocket-tunnel": {"req_per_s": 1.0, "p99": 1.0},
                }
            }
        },
        "setup": {
            "first_byte": {"backchannel": {"p50_ms": first_byte}},
            "first_answer": {"backchannel": {"p50_ms": first_byte + 0.5}},
        },
        "idle": {"counts": [{"streams": 1000, "sides": {"gateway": {"per_stream_kib": 9.2}}}]},
    }


def test_backchannels_figures_are_taken_and_the_peers_left_out() -> None:
    figures = compare.figures_of(result(400.0, 2.0, 1.9))
    assert {name: (f.value, f.higher_is_better) for name, f in figures.items()} == {
        "bulk upload MB/s": (400.0, True),
        "bulk upload gateway CPU ms/MB": (2.0, False),
        "bulk upload connector CPU ms/MB": (2.0, False),
        "streams x1000 MB/s": (200.0, True),
        "streams x1000 slowest/fastest": (0.9, True),
        "http c=32 forward req/s": (8000.0, True),
        "http c=32 forward p99 ms": (6.0, False),
        "http c=32 forward gateway CPU us/req": (2.0, False),
        "http c=32 forward connector CPU us/req": (2.0, False),
        "new stream first byte p50 ms": (1.9, False),
        "new conn first answer p50 ms": (2.4, False),
        "idle x1000 gateway KiB": (9.2, False),
    }


def test_rounds_give_ratios_and_who_was_better_by_the_figures_direction() -> None:
    rounds = [
        (result(400.0, 2.0, 2.0), result(440.0, 1.8, 2.2)),  # B faster, cheaper, slower to open
        (result(500.0, 2.0, 2.0), result(450.0, 2.1, 1.5)),  # B slower, dearer, quicker to open
    ]
    by_name = {item.name: item for item in compare.compare(rounds)}
    rate = by_name["bulk upload MB/s"]
    assert rate.a == [400.0, 500.0]
    assert rate.b == [440.0, 450.0]
    assert rate.ratios == pytest.approx([1.1, 0.9])
    assert rate.b_better == 1
    assert by_name["bulk upload gateway CPU ms/MB"].b_better == 1
    assert by_name["new stream first byte p50 ms"].b_better == 1
    table = compare.render(list(by_name.values()), ("before", "after"))
    assert "A = before" in table
    assert "B = after" in table
    assert "bulk upload MB/s" in table
    assert "1.100 0.900" in table
    assert "(lower is better)" in table


def test_a_figure_missing_from_any_run_is_left_out() -> None:
    partial = result(400.0, 2.0, 2.0)
    del partial["setup"]
    names = {item.name for item in compare.compare([(result(1, 1, 1), partial)])}
    assert "new stream first byte p50 ms" not in names
    assert "bulk upload MB/s" in names


def test_each_tree_runs_with_its_own_code_first_on_the_path(tmp_path: Path) -> None:
    env = compare.tree_environment(tmp_path, {"HOME": "/home/x"})
    parts = env["PYTHONPATH"].split(":")
    assert parts == [
        str(tmp_path / "core"),
        str(tmp_path / "plugins" / "tcp"),
        str(tmp_path / "plugins" / "http"),
        str(tmp_path / "plugins" / "rfc"),
        str(tmp_path),
    ]
    assert env["HOME"] == "/home/x"


def test_the_order_of_the_trees_alternates_round_by_round(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ran: list[tuple[str, tuple[str, ...]]] = []

    def fake_run(tree: Path, bench_args: list[str]) -> dict[str, Any]:
        ran.append((tree.name, tuple(bench_args)))
        return result(400.0 if tree.name == "a" else 420.0, 2.0, 2.0)

    monkeypatch.setattr(compare, "run_bench", fake_run)
    out = tmp_path / "compare.json"
    argv = ["--tree", str(a), "--tree", str(b), "--rounds", "3", "--json", str(out)]
    assert compare.main([*argv, "--", "--only", "bulk"]) == 0
    assert [tree for tree, _ in ran] == ["a", "b", "b", "a", "a", "b"]
    assert {args for _, args in ran} == {("--only", "bulk")}
    written = json.loads(out.read_text())
    rate = next(item for item in written["comparisons"] if item["figure"] == "bulk upload MB/s")
    assert rate == {"figure": "bulk upload MB/s", "a": [400.0] * 3, "b": [420.0] * 3, "b_better": 3}
    assert "3 of 3" in capsys.readouterr().out


def test_one_tree_is_needed_twice() -> None:
    with pytest.raises(SystemExit):
        compare.main(["--tree", "x", "--", "--only", "bulk"])


def test_a_real_round_on_this_checkout_compares_idle_memory(tmp_path: Path) -> None:
    """End to end: this checkout as both trees, the quick idle scenario (gateway, connector
    and backend as processes, 20 idle streams)."""
    out = tmp_path / "compare.json"
    argv = ["--tree", str(ROOT), "--tree", str(ROOT), "--rounds", "1", "--json", str(out)]
    assert (
        compare.main([*argv, "--", "--only", "idle", "--idle-streams", "20", "--peers", "none"])
        == 0
    )
    figures = {item["figure"]: item for item in json.loads(out.read_text())["comparisons"]}
    for side in ("gateway", "connector"):
        item = figures[f"idle x20 {side} KiB"]
        assert len(item["a"]) == len(item["b"]) == 1
        assert item["a"][0] > 0
