"""Hand trio-websocket every TLS record that is already decryptable, not one per read.

``ssl.SSLObject.read`` returns at most one TLS record (16 KiB) per call, so trio's
``SSLStream.receive_some(256 KiB)`` returns 16 KiB even when the socket read brought 64 KiB:
trio-websocket's reader loop, wsproto's parser and a trio scheduler pass then run 32 times
for each 512 KiB tunnel message (docs/performance.md, "One TLS record per read").
:class:`DrainingReceive` wraps the tunnel's ``trio.SSLStream`` for trio-websocket: after the
first record it keeps reading, without blocking, what the SSL object can already decrypt, up
to ``max_bytes``. It reads the ``SSLObject`` that trio's stream keeps in ``_ssl_object``
(a private attribute; without it the wrapper only passes calls through). Only the one task that
receives calls this, and nothing awaits between the reads, so trio's stream never sees a
read it did not make; anything other than "no more data" (close_notify, a TLS error) ends the
draining, and trio's next ``receive_some`` meets it and reports it as it always does.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio


class DrainingReceive(trio.abc.Stream):
    """A pass-through of ``inner`` whose ``receive_some`` drains decryptable TLS records."""

    def __init__(self, inner: trio.SSLStream[Any]) -> None:
        self.inner = inner
        self._ssl_object: ssl.SSLObject | None = getattr(inner, "_ssl_object", None)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """At least one record (or b"" at EOF), then whatever else is decryptable now."""
        first = await self.inner.receive_some(max_bytes)
        if not first or max_bytes is None or self._ssl_object is None:
            return first
        parts = [first]
        size = len(first)
        while size < max_bytes:
            try:
                more = self._ssl_object.read(max_bytes - size)
            except ssl.SSLError:  # SSLWantReadError: nothing whole left; others: see above
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return first if len(parts) == 1 else b"".join(parts)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Pass through."""
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Pass through."""
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Pass through."""
        await self.inner.aclose()
