"""``python -m backchannel_rfc serve`` as a real process on 127.0.0.1."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from backchannel_rfc._connection import Connection
from tests.procs import TIMEOUT, child_environment, running

pytestmark = pytest.mark.integration

STUB = (sys.executable, "-m", "backchannel_rfc")
LISTENING = r"^stub ABAP system BCH listening on 127\.0\.0\.1:(\d+) \(client 100, user DEMO\)$"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_and_stops_cleanly(stop_signal: signal.Signals) -> None:
    with running([*STUB, "serve", "--port", "0"]) as stub:
        port = int(stub.wait_for_line(LISTENING).group(1))
        with Connection(
            ashost="127.0.0.1", port=str(port), client="100", user="DEMO", passwd="welcome"
        ) as connection:
            result = connection.call("STFC_CONNECTION", REQUTEXT="from the CLI test")
        assert result["ECHOTEXT"] == "from the CLI test"
        assert "Sysid: BCH" in result["RESPTEXT"]
        if stop_signal == signal.SIGTERM:
            assert stub.terminate_and_wait() == 0
        else:
            stub.popen.send_signal(stop_signal)
            assert stub.popen.wait(TIMEOUT) == 0  # an uncaught KeyboardInterrupt is not 0
        assert "Traceback" not in stub.output


def test_port_in_use_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*STUB, "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_environment(),
            check=False,
        )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"python -m backchannel_rfc: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in lines[0]


def test_sysnr_and_port_exclude_each_other() -> None:
    done = subprocess.run(
        [*STUB, "serve", "--sysnr", "01", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_environment(),
        check=False,
    )
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr
