"""WebSocket masking in C for wsproto, when the ``websockets`` package's speedups are present.

RFC 6455 makes the client (the connector) mask every frame it sends and the server (the
gateway) unmask it. wsproto does this in Python (``XorMaskerSimple``: four ``bytes.translate``
passes over strided slices), about 0.6 GB/s on the bench machine, and it was the largest single
item in the bulk download profile (docs/performance.md). ``websockets.speedups.apply_mask`` is
the same XOR in C (about 25 GB/s there). :func:`install` swaps wsproto's masker class for one
that calls it; wsproto looks the class up by name each time it masks a frame or starts
unmasking one, so the swap takes effect for every connection created afterwards as well as
before. Without the speedups (no ``websockets``, or a build without its C extension) nothing
changes. The masking keys are still wsproto's (``os.urandom(4)`` per frame).
"""

from __future__ import annotations

from collections.abc import Callable

import wsproto.frame_protocol

_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - depends on the installed build
    _apply_mask = None


#: wsproto's own masker, as it was before :func:`install` (the reference the tests compare with).
PYTHON_MASKER = wsproto.frame_protocol.XorMaskerSimple


class CMasker:
    """wsproto's masker interface (``process`` keeps the key's phase across calls, since a
    received frame's payload arrives in pieces) over the C ``apply_mask``."""

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        """XOR ``data`` with the key, continuing where the previous call stopped."""
        if not data:
            return bytearray()
        assert _apply_mask is not None
        masked = bytearray(_apply_mask(data, self._key))
        rotation = len(data) % 4
        if rotation:
            self._key = self._key[rotation:] + self._key[:rotation]
        return masked


def available() -> bool:
    """True when the C masking routine can be used."""
    return _apply_mask is not None


def install() -> bool:
    """Make wsproto mask and unmask with :class:`CMasker`; True if it did (idempotent)."""
    if _apply_mask is None:
        return False
    wsproto.frame_protocol.XorMaskerSimple = CMasker  # type: ignore[misc,assignment]
    return True
