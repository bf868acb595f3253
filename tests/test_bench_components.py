"""bench.components measures the tunnel's own layers (TLS channel, WebSocket link, mux) and runs
end to end over loopback TCP; its numbers reach the bench's table."""

from __future__ import annotations

from bench import components
from bench.report import machine_info, render_table


def test_components_measure_every_layer_and_both_end_to_end_variants() -> None:
    printed: list[str] = []
    document = components.run(2, 1, print_line=printed.append)
    for label in ("download (connector sends, masked)", "upload (gateway sends)"):
        section = document[label]
        layers = section["layers"]
        assert any(name.startswith("recv: TLS decrypt + websocket parse") for name in layers)
        assert all(value > 0 for value in layers.values())
        assert set(section["end_to_end"]) == set(components.VARIANTS)
        for numbers in section["end_to_end"].values():
            assert numbers["cpu_ms_per_mb_both_ends"] > 0
            assert numbers["mb_per_s_one_core"] > 0
    assert any("tunnel link" in line for line in printed)
    table = render_table(
        {
            "machine": machine_info(),
            "timestamp": "now",
            "command": "python -m bench --components",
            "components": document,
        }
    )
    assert "over TLS over loopback TCP, both ends, tunnel link" in table
