"""The gateway's registration records, in a folder (``[registration] state_dir``).

- ``issued.jsonl``: one line per certificate signed (registration or renewal), append-only.
- ``revoked.json``: serial -> when and why, rewritten whole (atomically) by
  ``backchannel registration revoke``; a running gateway re-reads it when it changes.
- ``used-tokens.jsonl``: registration token ids already spent (one-time use), append-only.

Writers hold an exclusive ``flock`` on ``.lock`` so a revocation from the command line and a
registration in the gateway never lose each other's update. Files are private (0600).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ._connector_identity import ConnectorIdentity, identity_of, serial_text

_FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    """One certificate the gateway signed."""

    serial: str
    identity: ConnectorIdentity
    not_after: datetime.datetime
    issued_at: datetime.datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Revocation:
    """Why and when a serial was revoked."""

    revoked_at: datetime.datetime
    reason: str


class RegistrationState:
    """Read and write the records in ``directory`` (created 0700 when missing)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._revoked: dict[str, Revocation] = {}
        self._revoked_stamp: tuple[int, int] | None = None

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_directory()
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _FILE_MODE)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def _lines(self, name: str) -> Iterator[dict[str, Any]]:
        try:
            text = (self.directory / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            if line.strip():
                record = json.loads(line)
                if isinstance(record, dict):
                    yield record

    # ------------------------------------------------------------------ issued

    def record_issued(
        self, certificate: x509.Certificate, *, reason: str, now: datetime.datetime
    ) -> None:
        """Remember a signed certificate (for ``registration list`` and revocation by name)."""
        identity = identity_of(certificate)
        assert identity is not None, "only connector certificates are recorded"
        with self._locked():
            self._append(
                "issued.jsonl",
                {
                    "serial": serial_text(certificate),
                    "subaccount": identity.subaccount,
                    "location": identity.location,
                    "not_after": certificate.not_valid_after_utc.isoformat(),
                    "issued_at": now.isoformat(),
                    "reason": reason,
                },
            )

    def issued(self) -> list[IssuedRecord]:
        """Every certificate signed, oldest first."""
        return [
            IssuedRecord(
                str(r["serial"]),
                ConnectorIdentity(str(r["subaccount"]), str(r["location"])),
                datetime.datetime.fromisoformat(str(r["not_after"])),
                datetime.datetime.fromisoformat(str(r["issued_at"])),
                str(r.get("reason", "")),
            )
            for r in self._lines("issued.jsonl")
        ]

    # ------------------------------------------------------------------ revoked

    def revoked(self) -> Mapping[str, Revocation]:
        """Serial -> revocation; re-read only when the file changed."""
        path = self.directory / "revoked.json"
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._revoked, self._revoked_stamp = {}, None
            return self._revoked
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp != self._revoked_stamp:
            self._revoked = self._read_revoked(path)
            self._revoked_stamp = stamp
        return self._revoked

    @staticmethod
    def _read_revoked(path: Path) -> dict[str, Revocation]:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            str(serial): Revocation(
                datetime.datetime.fromisoformat(str(entry["revoked_at"])), str(entry["reason"])
            )
            for serial, entry in data.items()
        }

    def revoke(self, serials: list[str], *, reason: str, now: datetime.datetime) -> list[str]:
        """Add ``serials`` to the revocation list; returns those that were not revoked yet."""
        path = self.directory / "revoked.json"
        with self._locked():
            try:
                current = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                current = {}
            added = [serial for serial in serials if serial not in current]
            for serial in added:
                current[serial] = {"revoked_at": now.isoformat(), "reason": reason}
            temporary = path.with_name(".revoked.json.new")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(current, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        return added

    # ------------------------------------------------------------------ tokens

    def spend_token(self, token_id: str, expires: datetime.datetime) -> bool:
        """Mark a registration token used; False if it was used before."""
        with self._locked():
            for record in self._lines("used-tokens.jsonl"):
                if record.get("jti") == token_id:
                    return False
            self._append("used-tokens.jsonl", {"jti": token_id, "exp": int(expires.timestamp())})
        return True
