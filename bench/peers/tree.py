"""RSS and CPU of a process together with its descendants.

sshd and websockify fork a child per connection, and that child does the work: their memory and
CPU are only meaningful summed over the process tree. CPU includes the children that have
already exited and been reaped (``cutime``/``cstime``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..procs import Proc

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class TreeProc(Proc):
    """A :class:`Proc` whose RSS and CPU times include its descendants."""

    @classmethod
    def of(cls, proc: Proc) -> TreeProc:
        """The same process, measured as a tree."""
        return cls(proc.name, proc.popen, proc.log_path)

    def rss_kib(self) -> int:
        """VmRSS of the process and its live descendants, KiB."""
        return super().rss_kib() + sum(_rss_kib(pid) for pid in descendants(self.pid))

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) seconds of the tree, reaped children included."""
        user = system = 0.0
        for pid in (self.pid, *descendants(self.pid)):
            fields = _stat_fields(pid)
            if fields is None:
                continue
            user += (int(fields[11]) + int(fields[13])) / _CLOCK_TICKS
            system += (int(fields[12]) + int(fields[14])) / _CLOCK_TICKS
        return user, system
