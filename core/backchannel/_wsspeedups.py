"""Faster paths for wsproto (under trio-websocket): masking in C, and frames built with one copy.

RFC 6455 makes the client (the connector) mask every frame it sends and the server (the
gateway) unmask it. wsproto does this in Python (``XorMaskerSimple``: four ``bytes.translate``
passes over strided slices), about 0.6 GB/s on the bench machine; it was the largest single
item in the bulk download profile (docs/performance.md). ``websockets.speedups.apply_mask`` is
the same XOR in C (about 25 GB/s there).

wsproto's ``FrameProtocol._serialize_frame`` copies a message's payload four to six times on
its way out (into a bytearray, again for extensions, the masked copy, header + payload, a
bytearray of that, and ``b"" + frame`` in ``Connection.send`` and ``WSConnection.send``). For
the tunnel's 512 KiB messages those copies were 12-16% of the sending side's CPU.
:func:`lean_serialize_frame` builds the same bytes with one copy (two when masking) and returns
``bytes``, which CPython then passes through ``b"" + frame`` without copying.

:func:`install` swaps both into wsproto's module (wsproto looks them up on every frame, so
connections made before the swap use them too). Without the C routine (no ``websockets``, or a
build without its extension) it changes nothing. The masking keys are drawn as wsproto draws
them (``os.urandom(4)`` per frame); frames with extensions (none are negotiated by the tunnel)
go through wsproto's own code.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import wsproto.frame_protocol
from wsproto.frame_protocol import FrameProtocol, Opcode

_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - depends on the installed build
    _apply_mask = None

#: wsproto's own masker and serializer, as they were before :func:`install` (the reference).
PYTHON_MASKER = wsproto.frame_protocol.XorMaskerSimple
PYTHON_SERIALIZE_FRAME = FrameProtocol._serialize_frame

_SHORT = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


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


def lean_serialize_frame(
    self: FrameProtocol, opcode: Opcode, payload: bytes | bytearray = b"", fin: bool = True
) -> Any:
    """wsproto's ``FrameProtocol._serialize_frame`` with one copy of the payload."""
    if self.extensions:
        return PYTHON_SERIALIZE_FRAME(self, opcode, payload, fin)
    length = len(payload)
    first = (0x80 if fin else 0) | int(opcode)
    mask_bit = 0x80 if self.client else 0
    if length <= 125:
        header = bytes((first, mask_bit | length))
    elif opcode.iscontrol():
        raise ValueError("payload too long for control frame")
    elif length <= 0xFFFF:
        header = _SHORT.pack(first, mask_bit | 126, length)
    else:
        header = _LONG.pack(first, mask_bit | 127, length)
    if self.client:
        assert _apply_mask is not None
        key = os.urandom(4)
        return header + key + _apply_mask(payload, key)
    return header + payload


def available() -> bool:
    """True when the C masking routine can be used."""
    return _apply_mask is not None


def install() -> bool:
    """Make wsproto use :class:`CMasker` and :func:`lean_serialize_frame`; True if it did."""
    if _apply_mask is None:
        return False
    wsproto.frame_protocol.XorMaskerSimple = CMasker  # type: ignore[misc,assignment]
    FrameProtocol._serialize_frame = lean_serialize_frame  # type: ignore[method-assign]
    return True
