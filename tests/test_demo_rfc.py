"""``backchannel demo`` with the RFC plugin's part: its steps fail when its function rules are
wrong, and the commands it prints while running do what they say."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys

import pytest
import trio

from backchannel._demo import run_demo
from backchannel_rfc import _demo_part
from tests.test_demo_http import STEPS, run_once, step_line

RFC_STEPS = [name for name in STEPS if name.startswith("rfc ")]


def test_the_rfc_steps_are_part_of_the_demo() -> None:
    assert RFC_STEPS == [
        "rfc via the pyrfc-compatible client",
        "rfc via the JSON endpoint",
        "rfc access control",
        "rfc with principal propagation",
    ]


async def test_wrong_function_rules_fail_every_rfc_step(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = 'name = "STFC_CONNECTION"', 'name = "BAPI_USER_GET_DETAIL"'
    assert old in _demo_part.CONNECTOR_TOML
    monkeypatch.setattr(_demo_part, "CONNECTOR_TOML", _demo_part.CONNECTOR_TOML.replace(old, new))
    code, lines = await run_once()
    assert code == 1, "\n".join(lines)
    for name in STEPS:
        mark = "FAIL" if name in RFC_STEPS else "ok  "
        assert step_line(lines, name).startswith(f"  [{mark}] {name}: "), "\n".join(lines)
    assert "Access denied to function module STFC_CONNECTION on system erp.virtual:3300" in (
        step_line(lines, "rfc via the pyrfc-compatible client")
    )
    assert "403" in step_line(lines, "rfc via the JSON endpoint")
    assert "a function without a rule was callable" in step_line(lines, "rfc access control")
    assert lines[-1].startswith("demo FAILED at step 'rfc via the pyrfc-compatible client': ")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_printed_rfc_commands_work() -> None:
    lines: list[str] = []
    ready = trio.Event()

    def print_line(line: str) -> None:
        lines.append(line)
        if line == "Press Ctrl-C to stop.":
            ready.set()

    async def run(command: str) -> bytes:
        argv = shlex.split(command.partition("   # ")[0])
        env = dict(os.environ)
        while "=" in argv[0] and not argv[0].startswith("-"):  # VAR=value prefixes
            name, _, value = argv.pop(0).partition("=")
            env[name] = value
        if argv[0] == "python":
            argv[0] = sys.executable
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, env=env)
        return bytes(result.stdout)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_demo(once=False, print_line=print_line))
            await ready.wait()
            commands = {
                line.rpartition("   # ")[2]: line.strip() for line in lines if "   # " in line
            }
            pyrfc = commands["RFC with the pyrfc API"]
            assert re.match(r"BACKCHANNEL_RFC_APP_SECRET=\S+ python -c ", pyrfc)
            printed = await run(pyrfc)
            assert b"'ECHOTEXT': 'hi'" in printed
            answer = json.loads(await run(commands["RFC via the JSON endpoint"]))
            assert answer["ECHOTEXT"] == "hi"
            assert "Logon_Data: 100/DEMO/" in answer["RESPTEXT"]
            nursery.cancel_scope.cancel()
