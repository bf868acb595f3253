"""Helpers for tests that run real processes on 127.0.0.1: the CLI, redis-server, curl.

Synchronisation is always on a condition (a log line, a port that accepts), polled with a
deadline; never a bare sleep. Every process started here is killed by its context manager.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

#: Upper bound for anything a test waits for (start-up, a log line, a port).
TIMEOUT = 15.0

BACKCHANNEL = (sys.executable, "-m", "backchannel")


def require_tool(name: str) -> str:
    """The path of ``name``, or skip the test saying which tool (and Debian package) is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name!r} is not installed (see .ci/apt-packages.txt)")
    return path


def free_port() -> int:
    """A port that was free a moment ago, for servers that cannot be told to bind port 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connect to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def child_environment(**extra: str) -> dict[str, str]:
    """The environment for child processes: no proxy variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("https_proxy", "http_proxy", "all_proxy", "no_proxy")
    }
    env.update(extra)
    return env


def run_cli(
    *args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``backchannel ARGS`` to completion and capture its output."""
    return subprocess.run(
        [*BACKCHANNEL, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else child_environment(),
        check=False,
    )


class Process:
    """A child process whose stdout and stderr lines are collected by reader threads."""

    def __init__(self, argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else child_environment(),
        )
        self._readers = [
            threading.Thread(target=self._read, args=(pipe,), daemon=True)
            for pipe in (self.popen.stdout, self.popen.stderr)
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr interleaved by line)."""
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first output line matching the regular expression ``pattern`` (waits for it)."""
        return self._wait(pattern, lambda line: line, timeout)

    def wait_for_message(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first ``--log-json`` message matching ``pattern`` (waits for it)."""
        return self._wait(pattern, _json_message, timeout)

    def _wait(
        self, pattern: str, text_of: Callable[[str], str | None], timeout: float
    ) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            checked = 0
            while True:
                for line in self.lines[checked:]:
                    text = text_of(line)
                    match = regex.search(text) if text is not None else None
                    if match:
                        return match
                checked = len(self.lines)
                if self.popen.poll() is not None and not any(r.is_alive() for r in self._readers):
                    raise AssertionError(
                        f"{self.argv[:4]} exited ({self.popen.returncode}) before logging "
                        f"{pattern!r}; output:\n{self.output_unlocked()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout:g} s; output:\n"
                        f"{self.output_unlocked()}"
                    )
                self._changed.wait(min(left, 0.2))

    def output_unlocked(self) -> str:
        """``output`` for callers that already hold the lock."""
        return "\n".join(self.lines)

    def log_messages(self) -> list[str]:
        """The ``message`` of every JSON log line (for ``--log-json``)."""
        with self._changed:
            lines = list(self.lines)
        return [m for m in map(_json_message, lines) if m is not None]

    def terminate_and_wait(self, timeout: float = 10) -> int:
        """Send SIGTERM and return the exit code (fails the test if it does not exit in time)."""
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.argv[:4]} did not exit within {timeout:g} s of SIGTERM"
            ) from None
        for reader in self._readers:
            reader.join(timeout)
        return code

    def kill(self) -> None:
        """Kill the process if it still runs, and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(TIMEOUT)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


def _json_message(line: str) -> str | None:
    try:
        document = json.loads(line)
    except ValueError:
        return None
    message = document.get("message") if isinstance(document, dict) else None
    return message if isinstance(message, str) else None


@contextmanager
def running(
    argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None
) -> Iterator[Process]:
    """Start ``argv``; the process is killed when the block exits, however it exits."""
    process = Process(argv, env=env)
    try:
        yield process
    finally:
        process.kill()


def _exited_or_accepts(process: Process, port: int) -> bool:
    return process.popen.poll() is not None or port_accepts(port)


@contextmanager
def redis_server(directory: Path | None = None) -> Iterator[int]:
    """A throwaway redis-server on 127.0.0.1 (no persistence); yields its port.

    redis-server cannot bind port 0, so a free port is picked first; if another process takes
    it in the meantime, redis exits and the next attempt uses another port.
    """
    executable = require_tool("redis-server")
    for _attempt in range(3):
        port = free_port()
        argv = [
            executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(directory or tempfile.gettempdir()),
        ]  # fmt: skip
        with running(argv) as process:
            wait_until(partial(_exited_or_accepts, process, port), f"redis-server on port {port}")
            if process.popen.poll() is None:
                yield port
                return
    raise AssertionError(f"redis-server did not start; last output:\n{process.output}")


# ------------------------------------------------------------------------------- TOML


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def to_toml(document: Mapping[str, Any], _prefix: str = "") -> str:
    """Write the nested dicts the tests build (tables, arrays of tables, scalars) as TOML."""
    lines: list[str] = []
    for key, value in document.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in document.items():
        name = f"{_prefix}.{_key(key)}" if _prefix else _key(key)
        if isinstance(value, dict):
            lines.append(f"\n[{name}]")
            lines.append(to_toml(value, name))
        elif _is_table_array(value):
            for item in value:
                lines.append(f"\n[[{name}]]")
                lines.append(to_toml(item, name))
    return "\n".join(line for line in lines if line) + "\n"


def write_toml(path: Path, document: Mapping[str, Any]) -> Path:
    """Write ``document`` as TOML to ``path`` and return the path."""
    path.write_text(to_toml(document))
    return path


def write_secret(path: Path, value: str) -> Path:
    """A secret file (mode 0600) holding ``value``."""
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


# ----------------------------------------------------------------------- /proc sockets


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One TCP socket of a process, from /proc/<pid>/net/tcp{,6}."""

    local_port: int
    remote_port: int
    state: int  # 0x01 established, 0x02 SYN sent, 0x0A listening, ...

    @property
    def listening(self) -> bool:
        """Whether this is a listening socket."""
        return self.state == 0x0A


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """The TCP sockets that process ``pid`` holds open (Linux only)."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while we looked
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
    sockets = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode in inodes:
                sockets.append(
                    TcpSocket(
                        int(local.rsplit(":", 1)[1], 16),
                        int(remote.rsplit(":", 1)[1], 16),
                        int(state, 16),
                    )
                )
    return sockets
