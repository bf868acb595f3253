"""Frame layout and the incremental frame decoder (docs/protocol.md, "Frames")."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ._errors import ProtocolError

FRAME_VERSION = 1
HEADER_SIZE = 12
#: Absolute ceiling on a payload length the decoder will buffer, whatever was negotiated: a
#: hostile length field must not make us allocate gigabytes before the mux can object.
HARD_MAX_PAYLOAD = 16 * 1024 * 1024

_HEADER = struct.Struct(">BBHII")
_U32 = struct.Struct(">I")
_RESET = struct.Struct(">H")
_GO_AWAY = struct.Struct(">IH")
MAX_STREAM_ID = 2**32 - 1
MAX_WINDOW = 2**31 - 1
MAX_REASON_BYTES = 1024
PING_PAYLOAD_SIZE = 8


class FrameType(enum.IntEnum):
    """Frame types of protocol version 1."""

    HELLO = 0x0
    OPEN = 0x1
    ACCEPT = 0x2
    DATA = 0x3
    WINDOW_UPDATE = 0x4
    FIN = 0x5
    RESET = 0x6
    PING = 0x7
    PONG = 0x8
    GO_AWAY = 0x9
    CONTROL = 0xA


#: Frame types that belong to the tunnel as a whole and must carry stream id 0.
CONNECTION_FRAME_TYPES = frozenset(
    {FrameType.HELLO, FrameType.PING, FrameType.PONG, FrameType.GO_AWAY, FrameType.CONTROL}
)


#: Frame types by their number: a dict lookup (an IntEnum call costs several times more, per
#: frame).
_FRAME_TYPES: dict[int, FrameType] = {int(member): member for member in FrameType}


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; ``payload`` is its raw bytes (interpreted by the mux): a DATA frame's
    a view into the bytes the decoder was fed (see :meth:`FrameDecoder.feed`)."""

    type: FrameType
    stream_id: int
    payload: bytes | memoryview
    flags: int = 0

    @property
    def body(self) -> bytes:
        """The payload of a frame other than DATA (always bytes)."""
        assert isinstance(self.payload, bytes), "a DATA frame's payload is a view"
        return self.payload

    @property
    def data(self) -> memoryview:
        """The payload of a DATA frame (a view)."""
        assert isinstance(self.payload, memoryview), "only a DATA frame's payload is a view"
        return self.payload


def encode_header(frame_type: FrameType, stream_id: int, length: int, flags: int = 0) -> bytes:
    """The 12-byte header of a frame."""
    return _HEADER.pack(FRAME_VERSION, frame_type, flags, stream_id, length)


def encode_frame(
    frame_type: FrameType, stream_id: int, payload: bytes = b"", flags: int = 0
) -> bytes:
    """A whole frame: header followed by payload."""
    return encode_header(frame_type, stream_id, len(payload), flags) + payload


def encode_window_update(stream_id: int, increment: int) -> bytes:
    """WINDOW_UPDATE granting ``increment`` more bytes of credit."""
    return encode_frame(FrameType.WINDOW_UPDATE, stream_id, _U32.pack(increment))


def encode_reset(stream_id: int, code: int, reason: str) -> bytes:
    """RESET with a 16-bit code and a UTF-8 reason cut to MAX_REASON_BYTES."""
    return encode_frame(FrameType.RESET, stream_id, _RESET.pack(code) + _reason_bytes(reason))


def encode_go_away(last_stream_id: int, code: int, reason: str) -> bytes:
    """GO_AWAY naming the last peer-opened stream that will still be served."""
    payload = _GO_AWAY.pack(last_stream_id, code) + _reason_bytes(reason)
    return encode_frame(FrameType.GO_AWAY, 0, payload)


def decode_window_increment(payload: bytes) -> int:
    """The credit carried by a WINDOW_UPDATE payload."""
    if len(payload) != _U32.size:
        raise ProtocolError(f"WINDOW_UPDATE payload must be 4 bytes, got {len(payload)}")
    (increment,) = _U32.unpack(payload)
    if increment == 0 or increment > MAX_WINDOW:
        raise ProtocolError(f"WINDOW_UPDATE increment {increment} out of range 1..{MAX_WINDOW}")
    return int(increment)


def decode_reset(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a RESET payload."""
    if len(payload) < _RESET.size:
        raise ProtocolError("RESET payload shorter than its 2-byte code")
    (code,) = _RESET.unpack_from(payload)
    return int(code), _decode_reason(payload[_RESET.size :], "RESET")


def decode_go_away(payload: bytes) -> tuple[int, int, str]:
    """(last_stream_id, code, reason) of a GO_AWAY payload."""
    if len(payload) < _GO_AWAY.size:
        raise ProtocolError("GO_AWAY payload shorter than its 6-byte fixed part")
    last_stream_id, code = _GO_AWAY.unpack_from(payload)
    return int(last_stream_id), int(code), _decode_reason(payload[_GO_AWAY.size :], "GO_AWAY")


def _reason_bytes(reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")
    if len(raw) <= MAX_REASON_BYTES:
        return raw
    # Cut on a character boundary so the receiver's strict UTF-8 check still passes.
    return raw[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _decode_reason(raw: bytes, what: str) -> str:
    if len(raw) > MAX_REASON_BYTES:
        raise ProtocolError(f"{what} reason longer than {MAX_REASON_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} reason is not valid UTF-8") from exc


class FrameDecoder:
    """Turns a byte stream into frames; feed any split of the bytes, get the same frames.

    Only the 12-byte header is validated here (version, type, length ceiling); what a frame
    means, and whether it is allowed now, is the mux's business.
    """

    def __init__(self, max_payload: int = HARD_MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._max_payload = min(max_payload, HARD_MAX_PAYLOAD)

    @property
    def max_payload(self) -> int:
        """Largest payload length accepted before the frame is even buffered."""
        return self._max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self._max_payload = min(value, HARD_MAX_PAYLOAD)

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered."""
        return not self._buffer

    def feed(
        self, data: bytes | bytearray | memoryview, max_frames: int | None = None
    ) -> list[Frame]:
        """Decode every whole frame now available (at most ``max_frames``); keep the rest.

        A DATA frame's payload is a view into ``data`` (or into the decoder's own buffer): no
        copy of bulk bytes here. ``data`` must not change afterwards (a bytearray with views
        cannot be resized: BufferError); other frames' payloads are bytes."""
        if self._buffer:
            self._buffer += data
            view = memoryview(self._buffer)
        else:
            view = memoryview(data)
        frames: list[Frame] = []
        offset = 0
        total = len(view)
        try:
            while total - offset >= HEADER_SIZE and (
                max_frames is None or len(frames) < max_frames
            ):
                version, raw_type, flags, stream_id, length = _HEADER.unpack_from(view, offset)
                if version != FRAME_VERSION:
                    raise ProtocolError(f"unsupported frame version {version}")
                frame_type = _FRAME_TYPES.get(raw_type)
                if frame_type is None:
                    raise ProtocolError(f"unknown frame type {raw_type:#x}")
                if length > self._max_payload:
                    raise ProtocolError(
                        f"{frame_type.name} frame of {length} bytes exceeds the limit of "
                        f"{self._max_payload}"
                    )
                end = offset + HEADER_SIZE + length
                if end > total:
                    break
                payload: bytes | memoryview = (
                    view[offset + HEADER_SIZE : end]  # DATA: a view, copied only if buffered
                    if frame_type is FrameType.DATA
                    else bytes(view[offset + HEADER_SIZE : end])
                )
                frames.append(Frame(frame_type, stream_id, payload, flags))
                offset = end
            rest = bytes(view[offset:])
        finally:
            view.release()
        self._buffer = bytearray(rest)
        return frames
