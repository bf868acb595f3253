"""Which live tunnel serves (subaccount, location), behind an interface a shared store can fill."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509

from ._exceptions import TunnelError
from ._proto._errors import ResetCode
from ._tunnel import Tunnel


@dataclass(slots=True)
class TunnelEntry:
    """One connector's registration; ``tunnel`` is None while its handshake completes."""

    subaccount: str
    location: str
    peer: str
    software: str
    since: float = field(default_factory=time.time)
    tunnel: Tunnel | None = None
    #: The connector's client certificate, when it authenticated with one.
    certificate: x509.Certificate | None = None


class TunnelRegistry(Protocol):
    """Reserve, activate, look up and release connector registrations."""

    def reserve(self, entry: TunnelEntry) -> None:
        """Claim (subaccount, location); raise TunnelError(REFUSED) if someone holds it."""
        ...

    def release(self, entry: TunnelEntry) -> None:
        """Give the claim up (no-op if ``entry`` no longer holds it)."""
        ...

    def lookup(self, subaccount: str, location: str) -> TunnelEntry | None:
        """The live entry that may take new streams, if any."""
        ...

    def entries(self) -> list[TunnelEntry]:
        """All registrations (for status output)."""
        ...


class InMemoryTunnelRegistry:
    """The registry of a single gateway process."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], TunnelEntry] = {}

    def reserve(self, entry: TunnelEntry) -> None:
        """See :meth:`TunnelRegistry.reserve`."""
        key = (entry.subaccount, entry.location)
        current = self._entries.get(key)
        if current is not None:
            where = f"location id {entry.location!r}" if entry.location else "the default location"
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(current.since))
            raise TunnelError(
                f"a connector for subaccount {entry.subaccount!r} at {where} is already connected "
                f"(from {current.peer} since {since}); stop it or give this connector another "
                "location id. If that connector is gone, the gateway notices within its heartbeat "
                "timeout and the next retry succeeds",
                ResetCode.REFUSED,
            )
        self._entries[key] = entry

    def release(self, entry: TunnelEntry) -> None:
        """See :meth:`TunnelRegistry.release`."""
        key = (entry.subaccount, entry.location)
        if self._entries.get(key) is entry:
            del self._entries[key]

    def lookup(self, subaccount: str, location: str) -> TunnelEntry | None:
        """See :meth:`TunnelRegistry.lookup`."""
        entry = self._entries.get((subaccount, location))
        if entry is None or entry.tunnel is None or not entry.tunnel.accepting_streams:
            return None
        return entry

    def entries(self) -> list[TunnelEntry]:
        """See :meth:`TunnelRegistry.entries`."""
        return list(self._entries.values())
