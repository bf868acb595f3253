"""The audit trail: one JSON line per access decision (who, what target, allowed or why not)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, TextIO

from ._config import AuditConfig
from ._plugin_api import Role

log = logging.getLogger("backchannel.audit")


class AuditLog:
    """Writes audit lines to a JSON-lines file (if configured) and to the log."""

    def __init__(self, role: Role, config: AuditConfig | None = None) -> None:
        self.role = role
        self._config = config or AuditConfig()
        # Opened on the first line, so that building a gateway or connector (config check)
        # touches no file and a failed start leaves nothing open.
        self._file: TextIO | None = None
        self.denials = 0

    @property
    def path(self) -> Path | None:
        """The audit file, if any."""
        return self._config.file

    def open(self) -> None:
        """Open the audit file now (raises OSError if it cannot be): call before listening."""
        if self._config.file is not None and self._file is None:
            self._file = _open_append(self._config.file)

    def allowed(self, event: str, **fields: Any) -> None:
        """Record an allowed access (written only with ``include_allowed = true``)."""
        if self._config.include_allowed:
            self._write(event, "allow", fields)

    def denied(self, event: str, reason: str, **fields: Any) -> None:
        """Record a refusal; always written."""
        self.denials += 1
        self._write(event, "deny", {**fields, "reason": reason})

    def _write(self, event: str, decision: str, fields: dict[str, Any]) -> None:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "role": self.role.value,
            "event": event,
            "decision": decision,
            **fields,
        }
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)
        log.info("audit %s", line)
        if self._config.file is not None:
            self.open()
            assert self._file is not None
            # Small appends to a line-buffered file: the cost is a write(2) per denial, which is
            # what makes the trail survive a crash.
            self._file.write(line + "\n")

    def close(self) -> None:
        """Close the audit file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _open_append(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
