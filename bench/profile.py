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

    def __init__(self, proc: Proc, output: Path) -> None:
        self.proc = proc
        self.output = output
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
                    str(RATE),
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
        return summarize(self.output.read_text(), top=top, seconds=self.seconds)


def _function(frame: str) -> str:
    match = _LINE.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "/core/", "/plugins/tcp/", "/lib/python3."):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{match['func']} ({file})"


def summarize(raw: str, *, top: int = 15, seconds: float = 0.0) -> dict[str, Any]:
    """Self/inclusive sample counts per function from py-spy's raw (collapsed) output."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        functions = [_function(frame) for frame in stack.split(";")]
        self_counts[functions[-1]] += count
        for function in set(functions):
            inclusive[function] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "percent": round(100 * n / total, 1) if total else 0.0}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "seconds": round(seconds, 2),
        "rate_hz": RATE,
        "busy_fraction_estimate": round(total / (seconds * RATE), 2) if seconds else None,
        "top_self": rows(self_counts),
        "top_inclusive": rows(inclusive),
    }
