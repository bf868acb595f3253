"""A cap on the connections a listener serves at once (every front door has one).

Past the cap a new connection is closed at once, before anything is read from it, and the
refusal is counted and logged (at most once per second per listener, so that a flood does not
flood the log as well).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("backchannel.limits")

#: The default of every front door's ``max_connections``.
DEFAULT_MAX_CONNECTIONS = 10_000

Handler = Callable[[trio.SocketStream], Awaitable[None]]


class ConnectionLimit:
    """Count a listener's connections; refuse those above ``limit``.

    Use ``trio.serve_listeners(limit.wrap(handler), listeners)``, or call :meth:`try_admit`
    and :meth:`release` in the handler.
    """

    #: The default of every front door's ``max_connections``.
    DEFAULT = DEFAULT_MAX_CONNECTIONS

    def __init__(self, limit: int, label: str) -> None:
        if limit < 1:
            raise ValueError("a connection limit must be at least 1")
        self.limit = limit
        self.label = label
        #: Connections being served now, and refused since start.
        self.active = 0
        self.refused = 0
        self._last_report = -1.0

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` behind the cap."""

        async def limited(stream: trio.SocketStream) -> None:
            if not self.try_admit():
                await trio.aclose_forcefully(stream)
                return
            try:
                await handler(stream)
            finally:
                self.release()

        return limited

    def try_admit(self) -> bool:
        """Count a new connection in; above the cap, count and report it as refused and return
        False (the caller closes it). Call :meth:`release` once an admitted connection has
        been served. For a handler that checks the cap itself instead of being wrapped:
        :meth:`wrap`'s coroutine frame lives as long as the connection (about 0.3 KiB)."""
        if self.active >= self.limit:
            self.refused += 1
            self._report()
            return False
        self.active += 1
        return True

    def release(self) -> None:
        """An admitted connection has been served."""
        self.active -= 1

    def _report(self) -> None:
        now = trio.current_time()
        if now - self._last_report >= 1.0:
            self._last_report = now
            log.warning(
                "%s: %d connections open (max_connections); refused new ones (%d so far)",
                self.label,
                self.active,
                self.refused,
            )
