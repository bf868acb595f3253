"""``backchannel demo`` with the HTTP plugin: every self-check step passes in-process, a failing
step is named with exit code 1, and the commands printed while it runs do what they say."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest
import trio

from backchannel import _demo
from backchannel._demo import HELLO_BODY, run_demo

STEPS = (
    "tunnel",
    "tcp via SOCKS5",
    "tcp via port forward",
    "http over tcp via SOCKS5",
    "access control",
    "http via the HTTP proxy",
    "http access control",
    "http via a destination",
    "rfc via the pyrfc-compatible client",
    "rfc via the JSON endpoint",
    "rfc access control",
    "rfc with principal propagation",
)


async def run_once() -> tuple[int, list[str]]:
    lines: list[str] = []
    with trio.fail_after(60):
        code = await run_demo(once=True, print_line=lines.append)
    return code, lines


def step_line(lines: list[str], name: str) -> str:
    [line] = [line for line in lines if re.match(rf"  \[(ok  |FAIL)\] {re.escape(name)}: ", line)]
    return line


async def test_every_step_including_http_is_ok() -> None:
    code, lines = await run_once()
    assert code == 0, "\n".join(lines)
    for name in STEPS:
        assert step_line(lines, name).startswith(f"  [ok  ] {name}: "), name
    assert not any("FAIL" in line for line in lines)
    assert lines[-1] == f"demo OK: {len(STEPS)} steps passed"
    assert "via the HTTP proxy 127.0.0.1:" in step_line(lines, "http via the HTTP proxy")
    assert "/admin refused 403" in step_line(lines, "http access control")


def _patch(monkeypatch: pytest.MonkeyPatch, template: str, old: str, new: str) -> None:
    text = getattr(_demo, template)
    assert old in text, f"{template} no longer contains {old!r}: update this test"
    monkeypatch.setattr(_demo, template, text.replace(old, new))


@pytest.mark.parametrize(
    ("template", "old", "new", "failing", "detail"),
    [
        pytest.param(
            "GATEWAY_TOML",
            'url = "http://hello.virtual:80"',
            'url = "http://hello.virtual:80/nowhere"',
            ["http via a destination"],
            "expected 200 and the greeting, got 403",
            id="destination-to-a-denied-path",
        ),
        pytest.param(
            "CONNECTOR_TOML",
            'path = "/"\nmatch = "exact"',
            'path = "/"\nmatch = "prefix"',
            ["http access control"],
            "/admin: expected 403, got 200",
            id="resource-rule-too-wide",
        ),
        pytest.param(
            "CONNECTOR_TOML",
            'path = "/"\nmatch = "exact"',
            'path = "/index.html"\nmatch = "exact"',
            ["http via the HTTP proxy", "http via a destination"],
            "expected 200 and the greeting, got 403",
            id="root-not-allowed",
        ),
    ],
)
async def test_a_failing_step_is_named_and_exits_1(
    monkeypatch: pytest.MonkeyPatch,
    template: str,
    old: str,
    new: str,
    failing: list[str],
    detail: str,
) -> None:
    _patch(monkeypatch, template, old, new)
    code, lines = await run_once()
    assert code == 1, "\n".join(lines)
    for name in STEPS:
        mark = "FAIL" if name in failing else "ok  "
        assert step_line(lines, name).startswith(f"  [{mark}] {name}: "), "\n".join(lines)
    summary = lines[-1]
    assert summary.startswith(f"demo FAILED at step {failing[0]!r}: "), summary
    assert detail in summary
    if len(failing) > 1:
        assert summary.endswith(f" (and {len(failing) - 1} more)")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_printed_http_commands_work() -> None:
    lines: list[str] = []
    ready = trio.Event()

    def print_line(line: str) -> None:
        lines.append(line)
        if line == "Press Ctrl-C to stop.":
            ready.set()

    async def curl(command: str, *extra: str) -> bytes:
        argv = [*shlex.split(command.partition("   # ")[0]), "-sS", "-m", "10", *extra]
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
        return bytes(result.stdout)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_demo(once=False, print_line=print_line))
            await ready.wait()
            commands = {
                line.rpartition("   # ")[2]: line.strip() for line in lines if "   # " in line
            }
            assert re.fullmatch(
                r"curl -x http://127\.0\.0\.1:\d+ --proxy-user 'demo/app:\S+' "
                r"http://hello\.virtual/   # HTTP proxy",
                commands["HTTP proxy"],
            )
            assert await curl(commands["HTTP proxy"]) == HELLO_BODY
            assert await curl(commands["destination"]) == HELLO_BODY
            assert await curl(commands["raw TCP via SOCKS5"]) == HELLO_BODY
            denied = await curl(commands["403: no resource rule"], "-w", "%{http_code}")
            assert denied.startswith(
                b"Access denied to resource http://hello.virtual:80/admin "
                b"on system hello.virtual:80\n"
            )
            assert denied.endswith(b"403")
            nursery.cancel_scope.cancel()
