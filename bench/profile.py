"""Optional sampling profile of the gateway and/or connector during the bulk runs (py-spy).

``py-spy record --pid PID --format raw`` writes collapsed stacks ("frame;frame;... count"); we sum
them into self time (leaf frame) and inclusive time per function, so the report can name hot spots.
Idle samples (threads waiting in epoll) are not recorded by py-spy without ``--idle``, so the sample
count over (duration x rate) is roughly the busy fraction of the process.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .procs import BenchError, Proc

RATE = 100
_LINE = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def py_spy_path() -> str:
    """The py-spy executable (next to this interpreter, or on PATH)."""
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy: pip install py-spy (into this venv)")
    return found


class Profiler:
    """py-spy attached to one process for the duration of a ``with`` block."""

    def __init__(self, proc: Proc, output: Path, rate: int = RATE) -> None:
        self.proc = proc
        self.output = output
        self.rate = rate
        self._popen: subprocess.Popen[bytes] | None = None
        self._log = output.with_suffix(".log")
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Profiler:
        with self._log.open("wb") as log:
            self._popen = subprocess.Popen(
                [
                    py_spy_path(),
                    "record",
                    "--pid",
                    str(self.proc.pid),
                    "--rate",
                    str(self.rate),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(self.output),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        time.sleep(0.5)  # let it attach
        if self._popen.poll() is not None:
            raise BenchError(
                f"py-spy could not attach to the {self.proc.name}: {self._log.read_text()}"
            )
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.monotonic() - self.started
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._popen.send_signal(signal.SIGINT)
        try:
            self._popen.wait(30)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait(5)

    def summary(self, top: int = 15) -> dict[str, Any]:
        """Top functions by self and inclusive samples."""
        if not self.output.exists():
            raise BenchError(
                f"py-spy wrote no output for the {self.proc.name}: {self._log.read_text()}"
            )
        return summarize(self.output.read_text(), top=top, seconds=self.seconds, rate=self.rate)


def _function(frame: str) -> str:
    match = _LINE.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "/core/", "/plugins/tcp/", "/plugins/http/", "/lib/python3."):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{match['func']} ({file})"


#: Leaf frames that are (mostly) a thread waiting in a system call: trio's epoll wait and its
#: non-blocking socket helper. py-spy's idle detection misses many of these samples on some
#: machines (perf showed 7% kernel time where py-spy put 70% of the samples here).
WAIT_FRAMES = ("EpollIOManager.get_events", "_SocketType._nonblocking_helper")

#: (substring of the file path, package label), first match wins.
_PACKAGES = (
    ("backchannel_http", "backchannel_http (HTTP plugin)"),
    ("backchannel_tcp", "backchannel_tcp (TCP plugin)"),
    ("backchannel/_proto", "backchannel mux and frames"),
    ("backchannel/", "backchannel core"),
    ("trio/_core", "trio scheduler and I/O (trio/_core)"),
    ("trio/_ssl", "trio SSLStream"),
    ("trio/", "trio other (sockets, channels, sync)"),
    ("trio_websocket", "trio_websocket"),
    ("wsproto", "wsproto"),
    ("h11", "h11"),
    ("ssl.py", "ssl (SSLObject)"),
    ("outcome", "outcome"),
    ("<frozen abc>", "abc isinstance checks"),
    ("contextlib", "contextlib"),
    ("<string>", "generated __init__/__eq__ (dataclasses)"),
)


def _package(frame: str) -> str:
    match = _LINE.match(frame.strip())
    file = match["file"] if match else frame
    for marker, label in _PACKAGES:
        if marker in file:
            return label
    return "other"


def summarize(raw: str, *, top: int = 15, seconds: float = 0.0, rate: int = RATE) -> dict[str, Any]:
    """Self/inclusive sample counts per function from py-spy's raw (collapsed) output, and the
    self time per package without the wait frames (:data:`WAIT_FRAMES`)."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    waits = 0
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        functions = [_function(frame) for frame in frames]
        self_counts[functions[-1]] += count
        if functions[-1].split(" ", 1)[0] in WAIT_FRAMES:
            waits += count
        else:
            packages[_package(frames[-1])] += count
        for function in set(functions):
            inclusive[function] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "percent": round(100 * n / total, 1) if total else 0.0}
            for name, n in counter.most_common(top)
        ]

    working = total - waits
    return {
        "samples": total,
        "seconds": round(seconds, 2),
        "rate_hz": rate,
        "busy_fraction_estimate": round(total / (seconds * rate), 2) if seconds else None,
        "top_self": rows(self_counts),
        "top_inclusive": rows(inclusive),
        "wait_frame_percent": round(100 * waits / total, 1) if total else 0.0,
        "self_by_package_without_waits": [
            {"package": name, "samples": n, "percent": round(100 * n / working, 1)}
            for name, n in packages.most_common()
        ]
        if working
        else [],
    }
