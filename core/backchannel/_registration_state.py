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
from ._pki import replace_file

_FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    """One certificate the gateway signed."""

    serial: str
    identity: ConnectorIdentity
    not_after: datetime.datetime
    issued_at: datetime.datetime
    reason: str
    #: For a renewal: the serial it replaced (revoking that one revokes this one too).
    previous: str | None = None


@dataclass(frozen=True, slots=True)
class Revocation:
    """Why and when a serial was revoked."""

    revoked_at: datetime.datetime
    reason: str


class RevocationListError(Exception):
    """``revoked.json`` cannot be read and no earlier version of it was: fail closed."""


#: Expired entries ``used-tokens.jsonl`` may keep before it is rewritten without them.
_EXPIRED_TOKENS_KEPT = 256


class RegistrationState:
    """Read and write the records in ``directory`` (created 0700 when missing)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._revoked: dict[str, Revocation] | None = None
        self._revoked_stamp: tuple[int, int] | None = None
        self._revoked_error = ""
        self._previous: dict[str, str] = {}
        self._issued_stamp: tuple[int, int] | None = None

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
        self,
        certificate: x509.Certificate,
        *,
        reason: str,
        now: datetime.datetime,
        previous: str | None = None,
    ) -> None:
        """Remember a signed certificate (for ``registration list`` and revocation by name);
        ``previous`` is the serial a renewal replaces."""
        identity = identity_of(certificate)
        assert identity is not None, "only connector certificates are recorded"
        record: dict[str, Any] = {
            "serial": serial_text(certificate),
            "subaccount": identity.subaccount,
            "location": identity.location,
            "not_after": certificate.not_valid_after_utc.isoformat(),
            "issued_at": now.isoformat(),
            "reason": reason,
        }
        if previous is not None:
            record["previous"] = previous
        with self._locked():
            self._append("issued.jsonl", record)

    def issued(self) -> list[IssuedRecord]:
        """Every certificate signed, oldest first."""
        return [
            IssuedRecord(
                str(r["serial"]),
                ConnectorIdentity(str(r["subaccount"]), str(r["location"])),
                datetime.datetime.fromisoformat(str(r["not_after"])),
                datetime.datetime.fromisoformat(str(r["issued_at"])),
                str(r.get("reason", "")),
                str(r["previous"]) if "previous" in r else None,
            )
            for r in self._lines("issued.jsonl")
        ]

    def lineage(self, serial: str) -> list[str]:
        """``serial`` and the serials it renewed, newest first (re-read when the file changed)."""
        path = self.directory / "issued.jsonl"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return [serial]
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._issued_stamp:
            self._previous = {
                str(r["serial"]): str(r["previous"])
                for r in self._lines("issued.jsonl")
                if "previous" in r
            }
            self._issued_stamp = stamp
        chain = [serial]
        while chain[-1] in self._previous and len(chain) < 100_000:
            chain.append(self._previous[chain[-1]])
        return chain

    # ------------------------------------------------------------------ revoked

    def revoked(self) -> Mapping[str, Revocation]:
        """Serial -> revocation; re-read only when the file changed.

        A file that cannot be read (bad JSON, wrong shape, no permission) keeps the last good
        list in force and says why in :attr:`revocation_error`; with no good list yet it raises
        :class:`RevocationListError` (the caller fails closed).
        """
        path = self.directory / "revoked.json"
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._revoked, self._revoked_stamp, self._revoked_error = {}, None, ""
            return self._revoked
        except OSError as exc:
            return self._keep_last_good(f"cannot read {path}: {exc.strerror}")
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp != self._revoked_stamp or self._revoked is None:
            self._revoked_stamp = stamp
            try:
                self._revoked = self._read_revoked(path)
                self._revoked_error = ""
            except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
                return self._keep_last_good(f"{path} is not a valid revocation list: {exc}")
        return self._keep_last_good(self._revoked_error)

    @property
    def revocation_error(self) -> str:
        """Why the revocation list on disk is not the one in force ("" when it is)."""
        return self._revoked_error

    def _keep_last_good(self, error: str) -> Mapping[str, Revocation]:
        self._revoked_error = error
        if self._revoked is None:
            raise RevocationListError(error)
        return self._revoked

    @staticmethod
    def _read_revoked(path: Path) -> dict[str, Revocation]:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("expected a JSON object of serial -> {revoked_at, reason}")
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
            text = json.dumps(current, indent=1, sort_keys=True)
            replace_file(path, text.encode("utf-8"), _FILE_MODE)
        return added

    # ------------------------------------------------------------------ tokens

    def spend_token(
        self, token_id: str, expires: datetime.datetime, *, now: datetime.datetime
    ) -> bool:
        """Mark a registration token used; False if it was used before. Ids of tokens that
        have expired anyway are dropped now and then (they cannot be used again)."""
        with self._locked():
            records = list(self._lines("used-tokens.jsonl"))
            if any(record.get("jti") == token_id for record in records):
                return False
            entry = {"jti": token_id, "exp": int(expires.timestamp())}
            alive = [r for r in records if int(r.get("exp", 0)) > now.timestamp()]
            if len(records) - len(alive) > _EXPIRED_TOKENS_KEPT:
                self._replace("used-tokens.jsonl", [*alive, entry])
            else:
                self._append("used-tokens.jsonl", entry)
        return True

    def _replace(self, name: str, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        replace_file(self.directory / name, lines.encode("utf-8"), _FILE_MODE)
