"""The embedding example (examples/embed_gateway_and_connector.py) runs and says what it did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from examples import embed_gateway_and_connector as example

EXAMPLE = Path(__file__).parents[1] / "examples" / "embed_gateway_and_connector.py"


def check_output(output: str) -> None:
    lines = output.splitlines()
    assert lines[0].startswith("gateway: tunnels on 127.0.0.1:")
    assert ", SOCKS5 on 127.0.0.1:" in lines[0]
    assert lines[1:] == [
        "connector: tunnel up",
        f"echo through the tunnel: {example.MESSAGE.decode()}",
        "stopped",
    ]


async def test_example_main_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(30):
        await example.main()
    check_output(capsys.readouterr().out)


def test_example_runs_as_a_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=tmp_path,  # the example must not depend on the working directory
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    check_output(result.stdout)
    assert result.stderr == ""
