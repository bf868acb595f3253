"""The multiplexer: many flow-controlled streams over one ordered byte channel, sans-IO.

Feed received bytes to :meth:`Mux.receive_data` and act on the events it returns; call the
``send_*`` / ``open_stream`` / ``reset_stream`` methods and ship :meth:`Mux.data_to_send` to the
peer. The mux never blocks, sleeps, or reads a clock; all waiting is the caller's.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ProtocolError, ResetCode
from ._events import (
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PingReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from ._frames import (
    MAX_STREAM_ID,
    MAX_WINDOW,
    PING_PAYLOAD_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    decode_go_away,
    decode_reset,
    decode_window_increment,
    encode_frame,
    encode_go_away,
    encode_header,
    encode_reset,
    encode_window_update,
)
from ._streamstate import Action, Phase, Role, StreamState, StreamStateError

PROTOCOL_NAME = "backchannel/1"
_ID_AND_LENGTH = struct.Struct(">II")
#: A HELLO is read before the peer is authenticated, so it gets a small ceiling of its own.
MAX_HELLO_SIZE = 16 * 1024
MIN_FRAME_SIZE = 16 * 1024
#: OPEN and ACCEPT documents up to this size are remembered once decoded (see _Documents).
_REMEMBERED_DOCUMENT_SIZE = 2048
_REMEMBERED_DOCUMENTS = 64
#: See MuxSettings.max_window: half a window consumed within this many seconds is fast.
WINDOW_GROWTH_INTERVAL = 0.1


#: A queued frame: its bytes, or a DATA frame's header and a view of its (immutable) payload.
_Queued = bytes | tuple[bytes, memoryview]


def _queued_size(frame: _Queued) -> int:
    if isinstance(frame, bytes):
        return len(frame)
    return len(frame[0]) + len(frame[1])


@dataclass(frozen=True, slots=True)
class MuxSettings:
    """What this side promises the peer (sent in HELLO) and how it sends."""

    initial_window: int = 1024 * 1024
    #: A stream whose application consumes half its window within WINDOW_GROWTH_INTERVAL of
    #: the previous credit gets its window doubled, up to this (never below initial_window):
    #: one 1 MiB window held a single bulk stream to about 250 MB/s, since a window update
    #: waited for the whole 1 MiB message before it (docs/performance.md). Slow readers keep
    #: the initial window, so they hold no more memory.
    max_window: int = 4 * 1024 * 1024
    max_frame_size: int = 1024 * 1024
    max_concurrent_streams: int = 10_000
    #: DATA frames carry at most this much (and at most the peer's max_frame_size): 256 KiB,
    #: one splice read, one frame, one write on the far side. Against 64 KiB, 13-18% less CPU
    #: per MB relative to ssh in the same bulk runs (docs/performance.md).
    data_chunk_size: int = 256 * 1024
    #: Flood limits on what the peer sends (a token bucket each: this many per second on
    #: average, bursts of as many). Past them: PINGs and RESETs cut the tunnel
    #: (PROTOCOL_ERROR, "rapid reset" and ping floods); OPENs are refused (REFUSED), the
    #: tunnel stays.
    max_pings_per_second: int = 100
    max_resets_per_second: int = 10_000
    max_stream_opens_per_second: int = 10_000

    def __post_init__(self) -> None:
        if not 1 <= self.initial_window <= MAX_WINDOW:
            raise ValueError(f"initial_window must be in 1..{MAX_WINDOW}")
        if not 1 <= self.max_window <= MAX_WINDOW:
            raise ValueError(f"max_window must be in 1..{MAX_WINDOW}")
        if not MIN_FRAME_SIZE <= self.max_frame_size <= 16 * 1024 * 1024:
            raise ValueError(f"max_frame_size must be in {MIN_FRAME_SIZE}..16 MiB")
        if not 1 <= self.max_concurrent_streams <= 2**31:
            raise ValueError("max_concurrent_streams must be positive")
        if self.data_chunk_size < 1:
            raise ValueError("data_chunk_size must be positive")
        for name in ("max_pings_per_second", "max_resets_per_second"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_stream_opens_per_second < 1:
            raise ValueError("max_stream_opens_per_second must be positive")


class _Budget:
    """A token bucket: ``rate`` events per second on average, bursts of up to ``rate``."""

    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.stamp: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token; False when none is left."""
        if self.stamp is not None:
            self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """What the peer promised in its HELLO."""

    initial_window: int
    max_frame_size: int
    max_concurrent_streams: int


class Mux:
    """One side of a tunnel. ``initiator`` is the side that dialled (the connector).

    The initiator opens odd stream ids and sends HELLO first; the other side opens even ids.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        settings: MuxSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or MuxSettings()
        self._clock = clock
        self._pings = _Budget(self.settings.max_pings_per_second)
        self._resets = _Budget(self.settings.max_resets_per_second)
        self._opens = _Budget(self.settings.max_stream_opens_per_second)
        self.initiator = initiator
        self.peer: PeerSettings | None = None
        self._decoder = FrameDecoder(max_payload=MAX_HELLO_SIZE)
        #: Frames to send: bytes, or (header, payload view) for DATA from immutable bytes
        #: (joined once, in data_to_send: one copy of bulk bytes instead of two).
        self._ordered: list[_Queued] = []
        self._urgent: list[_Queued] = []
        self._pending_bytes = 0
        #: DATA payload bytes queued and not yet taken by data_to_send, per stream (lets the
        #: tunnel give each of many streams its turn instead of the first ones all the room).
        self._queued_data: dict[int, int] = {}
        self._streams: dict[int, StreamState] = {}
        self._next_local_id = 1 if initiator else 2
        self._highest_remote_id = 0
        self._hello_sent = False
        self._going_away = False
        self._peer_going_away = False
        self._terminated = False
        self._local_stream_count = 0
        self._remote_stream_count = 0
        self._documents = _Documents()

    # ----------------------------------------------------------------- properties

    @property
    def ready(self) -> bool:
        """Both HELLOs exchanged: streams may be opened."""
        return self._hello_sent and self.peer is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes queued for the peer and not yet taken by :meth:`data_to_send`."""
        return self._pending_bytes

    @property
    def open_stream_count(self) -> int:
        """Streams not yet finished or reset."""
        return len(self._streams)

    @property
    def at_frame_boundary(self) -> bool:
        """No partial frame is buffered (transports that frame messages check this)."""
        return self._decoder.at_frame_boundary

    @property
    def accepting_streams(self) -> bool:
        """False once either side sent GO_AWAY or the tunnel died."""
        return self.ready and not (self._going_away or self._peer_going_away or self._terminated)

    def send_window(self, stream_id: int) -> int:
        """Credit left for sending on ``stream_id`` (0 for unknown or closed streams)."""
        state = self._streams.get(stream_id)
        return state.send_window if state is not None and state.local_open else 0

    def is_open(self, stream_id: int) -> bool:
        """The stream is neither finished nor reset."""
        return stream_id in self._streams

    # ----------------------------------------------------------------- output

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Whole frames to ship, urgent ones (credit, pings) first; at least one frame if any."""
        frames: list[_Queued] = []
        size = 0
        for queue in (self._urgent, self._ordered):
            taken = 0
            for frame in queue:
                length = _queued_size(frame)
                if frames and max_bytes is not None and size + length > max_bytes:
                    break
                frames.append(frame)
                size += length
                taken += 1
            limit_reached = taken < len(queue)
            del queue[:taken]
            if limit_reached:
                break
        self._pending_bytes -= size
        parts: list[bytes | memoryview] = []
        for frame in frames:
            if isinstance(frame, bytes):
                parts.append(frame)
                header = frame
            else:
                header, payload = frame
                parts.append(header)
                parts.append(payload)
            if self._queued_data and header[1] == FrameType.DATA:
                stream_id, length = _ID_AND_LENGTH.unpack_from(header, 4)
                left = self._queued_data.get(stream_id, 0) - length
                if left > 0:
                    self._queued_data[stream_id] = left
                else:
                    self._queued_data.pop(stream_id, None)
        return b"".join(parts)

    def queued_data(self, stream_id: int) -> int:
        """DATA payload bytes of the stream queued and not yet taken by :meth:`data_to_send`."""
        return self._queued_data.get(stream_id, 0)

    def _queue(self, frame: _Queued, *, urgent: bool = False) -> None:
        (self._urgent if urgent else self._ordered).append(frame)
        self._pending_bytes += _queued_size(frame)

    # ----------------------------------------------------------------- local actions

    def send_hello(self, info: Mapping[str, Any]) -> None:
        """Queue our HELLO: ``info`` plus the protocol name and our settings."""
        if self._hello_sent:
            raise ProtocolError("HELLO already sent")
        if not self.initiator and self.peer is None:
            raise ProtocolError("the accepting side answers HELLO, it does not send it first")
        document = dict(info)
        document.update(
            protocol=PROTOCOL_NAME,
            initial_window=self.settings.initial_window,
            max_frame_size=self.settings.max_frame_size,
            max_concurrent_streams=self.settings.max_concurrent_streams,
        )
        payload = _encode_json(document)
        if len(payload) > MAX_HELLO_SIZE:
            raise ValueError(f"HELLO of {len(payload)} bytes exceeds {MAX_HELLO_SIZE}")
        self._queue(encode_frame(FrameType.HELLO, 0, payload))
        self._hello_sent = True

    def open_stream(self, metadata: Mapping[str, Any]) -> int:
        """Queue OPEN for a new stream and return its id."""
        self._require_ready()
        assert self.peer is not None
        if self._going_away or self._peer_going_away:
            raise ProtocolError("tunnel is going away: no new streams", ResetCode.REFUSED)
        if self._local_stream_count >= self.peer.max_concurrent_streams:
            raise ProtocolError(
                f"peer allows at most {self.peer.max_concurrent_streams} concurrent streams",
                ResetCode.REFUSED,
            )
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise ProtocolError("stream ids exhausted: reconnect", ResetCode.REFUSED)
        payload = self._checked_payload(_encode_json(dict(metadata)), "OPEN")
        self._next_local_id += 2
        self._streams[stream_id] = self._new_state(stream_id, Role.OPENER)
        self._local_stream_count += 1
        self._queue(encode_frame(FrameType.OPEN, stream_id, payload))
        return stream_id

    def accept_stream(self, stream_id: int, attributes: Mapping[str, Any] | None = None) -> None:
        """Queue ACCEPT for a stream the peer opened."""
        state = self._local_state(stream_id)
        state.apply(Action.SEND_ACCEPT)
        payload = self._checked_payload(_encode_json(dict(attributes or {})), "ACCEPT")
        self._queue(encode_frame(FrameType.ACCEPT, stream_id, payload))

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the credit allows; returns how many bytes were taken."""
        state = self._local_state(stream_id)
        state.apply(Action.SEND_DATA)
        assert self.peer is not None
        view = memoryview(data).cast("B")  # counted in bytes, whatever the item size
        count = min(len(view), state.send_window)
        if count == 0:
            return 0
        chunk_size = min(self.settings.data_chunk_size, self.peer.max_frame_size)
        # What views bytes (bytes, or a view of bytes: the tunnel stream passes slices)
        # cannot change: queued as (header, view), joined in data_to_send (the one copy). A
        # bytearray's may be reused by its owner as soon as this returns: copied here.
        immutable = type(view.obj) is bytes
        for start in range(0, count, chunk_size):
            chunk = view[start : min(start + chunk_size, count)]
            header = encode_header(FrameType.DATA, stream_id, len(chunk))
            self._queue((header, chunk) if immutable else header + chunk)
        state.send_window -= count
        self._queued_data[stream_id] = self._queued_data.get(stream_id, 0) + count
        return count

    def take_data_frame(self, stream_id: int, length: int) -> bytes | None:
        """The header of one DATA frame of ``length`` payload bytes, for a caller that sends
        header and payload itself at once instead of queueing them (a small read of a splice);
        the credit is spent as by :meth:`send_data`. None, with nothing changed, when anything
        is queued (the frame would overtake it), or when credit or frame size do not allow the
        whole of ``length`` in one frame: :meth:`send_data` then takes it."""
        state = self._local_state(stream_id)
        assert self.peer is not None
        if (
            self._pending_bytes
            or length > state.send_window
            or length > self.settings.data_chunk_size
            or length > self.peer.max_frame_size
        ):
            return None
        state.apply(Action.SEND_DATA)
        state.send_window -= length
        return encode_header(FrameType.DATA, stream_id, length)

    def send_fin(self, stream_id: int) -> None:
        """Half-close our direction of the stream."""
        state = self._local_state(stream_id)
        state.apply(Action.SEND_FIN)
        self._queue(encode_frame(FrameType.FIN, stream_id))
        self._forget_if_finished(state)

    def reset_stream(self, stream_id: int, code: ResetCode, reason: str = "") -> None:
        """Abort the stream in both directions (no-op if it is already gone)."""
        state = self._streams.get(stream_id)
        if state is None or self._terminated:
            return
        self._queue(encode_reset(stream_id, code, reason))
        self._forget(state)

    def acknowledge(self, stream_id: int, count: int) -> None:
        """The application consumed ``count`` received bytes: return credit when it adds up."""
        state = self._streams.get(stream_id)
        if state is None or not state.remote_open or count <= 0:
            return
        state.unacknowledged += count
        # Batch credit: one WINDOW_UPDATE per half window keeps control traffic small while
        # the sender never runs dry on a fast link.
        if state.unacknowledged >= state.window_size // 2:
            credit = state.unacknowledged
            now = self._clock()
            limit = max(self.settings.max_window, self.settings.initial_window)
            if state.window_size < limit and now - state.credited_at < WINDOW_GROWTH_INTERVAL:
                growth = min(state.window_size, limit - state.window_size)
                state.window_size += growth
                credit += growth
            self._queue(encode_window_update(stream_id, credit), urgent=True)
            state.receive_window += credit
            state.unacknowledged = 0
            state.credited_at = now

    def _new_state(self, stream_id: int, role: Role) -> StreamState:
        assert self.peer is not None
        window = self.settings.initial_window
        return StreamState(
            stream_id,
            role,
            send_window=self.peer.initial_window,
            receive_window=window,
            window_size=window,
            credited_at=self._clock(),
        )

    def ping(self, payload: bytes) -> None:
        """Queue a PING with an 8-byte opaque payload."""
        if len(payload) != PING_PAYLOAD_SIZE:
            raise ValueError("ping payload must be 8 bytes")
        self._queue(encode_frame(FrameType.PING, 0, payload), urgent=True)

    def send_control(self, payload: Mapping[str, Any]) -> None:
        """Queue a CONTROL document."""
        self._require_ready()
        encoded = self._checked_payload(_encode_json(dict(payload)), "CONTROL")
        self._queue(encode_frame(FrameType.CONTROL, 0, encoded))

    def go_away(self, code: ResetCode = ResetCode.NO_ERROR, reason: str = "") -> None:
        """Tell the peer no new streams will be accepted; existing ones go on."""
        if self._going_away:
            return
        self._going_away = True
        self._queue(encode_go_away(self._highest_remote_id, code, reason))

    def _require_ready(self) -> None:
        if self._terminated:
            raise ProtocolError("tunnel is closed", ResetCode.NOT_CONNECTED)
        if not self.ready:
            raise ProtocolError("handshake not complete")

    def _checked_payload(self, payload: bytes, what: str) -> bytes:
        assert self.peer is not None
        if len(payload) > self.peer.max_frame_size:
            raise ValueError(f"{what} payload of {len(payload)} bytes exceeds the peer's limit")
        return payload

    def _local_state(self, stream_id: int) -> StreamState:
        state = self._streams.get(stream_id)
        if state is None:
            raise StreamStateError(f"stream {stream_id} is not open")
        return state

    # ----------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Process received bytes; returns the events they caused. ``DataReceived.data`` is a
        view into ``data``, which must not change afterwards (FrameDecoder.feed).

        Raises :class:`ProtocolError` when the peer broke the protocol; a GO_AWAY carrying the
        error is then queued, and the caller should flush it and close the transport.
        """
        if self._terminated:
            return []
        events: list[Event] = []
        try:
            while True:
                # Until the peer's HELLO is in, decode one frame at a time: HELLO raises the
                # decoder's payload limit, and frames after it in the same bytes need the new one.
                before_hello = self.peer is None
                frames = self._decoder.feed(data, max_frames=1 if before_hello else None)
                data = b""
                for frame in frames:
                    self._handle_frame(frame, events)
                if not (before_hello and frames):
                    break
        except ProtocolError as exc:
            self._terminate(exc.code, str(exc))
            raise
        return events

    def _terminate(self, code: ResetCode, reason: str) -> None:
        if not self._going_away:
            self.go_away(code, reason)
        self._terminated = True
        self._streams.clear()

    def _handle_frame(self, frame: Frame, events: list[Event]) -> None:
        if self.peer is None and frame.type not in (FrameType.HELLO, FrameType.GO_AWAY):
            raise ProtocolError(f"{frame.type.name} before HELLO")
        if frame.type in _CONNECTION_HANDLERS:
            if frame.stream_id != 0:
                raise ProtocolError(f"{frame.type.name} on stream {frame.stream_id}")
            _CONNECTION_HANDLERS[frame.type](self, frame, events)
        else:
            if frame.stream_id == 0:
                raise ProtocolError(f"{frame.type.name} on stream 0")
            _STREAM_HANDLERS[frame.type](self, frame, events)

    def _on_hello(self, frame: Frame, events: list[Event]) -> None:
        if self.peer is not None:
            raise ProtocolError("second HELLO")
        if self.initiator and not self._hello_sent:
            raise ProtocolError("HELLO from the accepting side before ours")
        info = _decode_json(frame.body, "HELLO")
        if info.get("protocol") != PROTOCOL_NAME:
            raise ProtocolError(
                f"peer speaks {info.get('protocol')!r}, this side speaks {PROTOCOL_NAME!r}"
            )
        self.peer = PeerSettings(
            initial_window=_int_setting(info, "initial_window", 1, MAX_WINDOW),
            max_frame_size=_int_setting(info, "max_frame_size", MIN_FRAME_SIZE, 16 * 1024 * 1024),
            max_concurrent_streams=_int_setting(info, "max_concurrent_streams", 1, 2**31),
        )
        self._decoder.max_payload = self.settings.max_frame_size
        events.append(HelloReceived(info))

    def _on_open(self, frame: Frame, events: list[Event]) -> None:
        stream_id = frame.stream_id
        if (stream_id % 2 == 1) == self.initiator:
            raise ProtocolError(f"OPEN with stream id {stream_id} of the wrong parity")
        if stream_id <= self._highest_remote_id:
            raise ProtocolError(f"OPEN reuses stream id {stream_id}")
        metadata = self._documents.decode(frame.body, "OPEN")
        self._highest_remote_id = stream_id
        if self._going_away or self._terminated:
            self._queue(encode_reset(stream_id, ResetCode.REFUSED, "tunnel is going away"))
            return
        if self._remote_stream_count >= self.settings.max_concurrent_streams:
            reason = f"too many concurrent streams (limit {self.settings.max_concurrent_streams})"
            self._queue(encode_reset(stream_id, ResetCode.REFUSED, reason))
            return
        if not self._opens.take(self._clock()):
            rate = self.settings.max_stream_opens_per_second
            reason = f"streams opened faster than {rate} per second (max_stream_opens_per_second)"
            self._queue(encode_reset(stream_id, ResetCode.REFUSED, reason))
            return
        assert self.peer is not None
        self._streams[stream_id] = self._new_state(stream_id, Role.ACCEPTOR)
        self._remote_stream_count += 1
        events.append(StreamOpened(stream_id, metadata))

    def _on_accept(self, frame: Frame, events: list[Event]) -> None:
        state = self._remote_state(frame)
        if state is None:
            return
        state.apply(Action.RECV_ACCEPT)
        attributes = self._documents.decode(frame.body, "ACCEPT")
        events.append(StreamAccepted(frame.stream_id, attributes))
        self._forget_if_finished(state)

    def _on_data(self, frame: Frame, events: list[Event]) -> None:
        state = self._remote_state(frame)
        if state is None:
            return
        state.apply(Action.RECV_DATA)
        size = len(frame.payload)
        if size > state.receive_window:
            raise ProtocolError(
                f"stream {frame.stream_id}: {size} bytes of DATA exceed the window of "
                f"{state.receive_window}",
                ResetCode.FLOW_CONTROL_ERROR,
            )
        state.receive_window -= size
        if size:
            events.append(DataReceived(frame.stream_id, frame.data))

    def _on_window_update(self, frame: Frame, events: list[Event]) -> None:
        increment = decode_window_increment(frame.body)
        state = self._remote_state(frame)
        if state is None:
            return
        state.send_window += increment
        if state.send_window > MAX_WINDOW:
            raise ProtocolError(
                f"stream {frame.stream_id}: window grew past {MAX_WINDOW}",
                ResetCode.FLOW_CONTROL_ERROR,
            )
        events.append(WindowUpdated(frame.stream_id))

    def _on_fin(self, frame: Frame, events: list[Event]) -> None:
        state = self._remote_state(frame)
        if state is None:
            return
        if frame.payload:
            raise ProtocolError("FIN with a payload")
        state.apply(Action.RECV_FIN)
        events.append(StreamEnded(frame.stream_id))
        self._forget_if_finished(state)

    def _on_reset(self, frame: Frame, events: list[Event]) -> None:
        code, reason = decode_reset(frame.body)
        state = self._remote_state(frame)
        if state is None:
            return
        if (
            state.role is Role.ACCEPTOR
            and state.phase is Phase.PENDING
            and not self._resets.take(self._clock())
        ):
            # "Rapid reset": the peer opens streams and cancels them before we answered, each
            # one costing us work (a backend connection). Ordinary closes do not count.
            raise ProtocolError(
                f"RESET flood: more than {self.settings.max_resets_per_second} streams per "
                "second opened and cancelled before they were answered (max_resets_per_second)"
            )
        self._forget(state)
        events.append(StreamReset(frame.stream_id, ResetCode.from_wire(code), reason))

    def _on_ping(self, frame: Frame, events: list[Event]) -> None:
        if len(frame.payload) != PING_PAYLOAD_SIZE:
            raise ProtocolError("PING payload must be 8 bytes")
        if not self._pings.take(self._clock()):
            raise ProtocolError(
                f"PING flood: more than {self.settings.max_pings_per_second} per second "
                "(max_pings_per_second)"
            )
        self._queue(encode_frame(FrameType.PONG, 0, frame.body), urgent=True)
        events.append(PingReceived(frame.body))

    def _on_pong(self, frame: Frame, events: list[Event]) -> None:
        if len(frame.payload) != PING_PAYLOAD_SIZE:
            raise ProtocolError("PONG payload must be 8 bytes")
        events.append(PongReceived(frame.body))

    def _on_go_away(self, frame: Frame, events: list[Event]) -> None:
        last_stream_id, code, reason = decode_go_away(frame.body)
        self._peer_going_away = True
        events.append(GoAwayReceived(last_stream_id, ResetCode.from_wire(code), reason))
        # Streams we opened above the peer's last id were never seen by its application.
        for stream_id in [s for s, st in self._streams.items() if st.role is Role.OPENER]:
            if stream_id > last_stream_id:
                self._forget(self._streams[stream_id])
                events.append(
                    StreamReset(
                        stream_id, ResetCode.REFUSED, f"peer is going away: {reason}", False
                    )
                )

    def _on_control(self, frame: Frame, events: list[Event]) -> None:
        events.append(ControlReceived(_decode_json(frame.body, "CONTROL")))

    def _remote_state(self, frame: Frame) -> StreamState | None:
        """The stream a received frame is for; None for one already closed (frames in flight)."""
        stream_id = frame.stream_id
        state = self._streams.get(stream_id)
        if state is not None:
            return state
        opened_by_us = (stream_id % 2 == 1) == self.initiator
        highest = self._next_local_id - 2 if opened_by_us else self._highest_remote_id
        if stream_id > highest:
            raise ProtocolError(f"{frame.type.name} for stream {stream_id}, which was never opened")
        return None

    def _forget_if_finished(self, state: StreamState) -> None:
        if state.finished:
            self._forget(state)

    def _forget(self, state: StreamState) -> None:
        if self._streams.pop(state.stream_id, None) is None:
            return
        if state.role is Role.OPENER:
            self._local_stream_count -= 1
        else:
            self._remote_stream_count -= 1


_CONNECTION_HANDLERS = {
    FrameType.HELLO: Mux._on_hello,
    FrameType.PING: Mux._on_ping,
    FrameType.PONG: Mux._on_pong,
    FrameType.GO_AWAY: Mux._on_go_away,
    FrameType.CONTROL: Mux._on_control,
}
_STREAM_HANDLERS = {
    FrameType.OPEN: Mux._on_open,
    FrameType.ACCEPT: Mux._on_accept,
    FrameType.DATA: Mux._on_data,
    FrameType.WINDOW_UPDATE: Mux._on_window_update,
    FrameType.FIN: Mux._on_fin,
    FrameType.RESET: Mux._on_reset,
}


class _Documents:
    """Recently decoded small OPEN / ACCEPT payloads. The streams of one port forward or app
    all carry the same document: it is parsed and checked once, and each stream gets a copy of
    its own (fresh dicts and lists, shared strings), which saves the parse and about 0.7 KiB
    per idle stream (docs/performance.md)."""

    __slots__ = ("_decoded",)

    def __init__(self) -> None:
        self._decoded: dict[bytes, dict[str, Any]] = {}

    def decode(self, payload: bytes, what: str) -> dict[str, Any]:
        """:func:`_decode_json` of ``payload``, a copy the caller may change."""
        document = self._decoded.get(payload)
        if document is None:
            document = _decode_json(payload, what)
            if len(payload) > _REMEMBERED_DOCUMENT_SIZE:
                return document
            if len(self._decoded) >= _REMEMBERED_DOCUMENTS:
                self._decoded.clear()
            self._decoded[bytes(payload)] = document
        return {key: _copied(item) for key, item in document.items()}


def _copied(value: Any) -> Any:
    """``value`` with every dict and list copied (strings, numbers and the like are immutable)."""
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value


def _encode_json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _decode_json(payload: bytes, what: str) -> dict[str, Any]:
    if not payload:
        return {}
    try:
        document = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} payload is not valid UTF-8 JSON") from exc
    if not isinstance(document, dict):
        raise ProtocolError(f"{what} payload must be a JSON object")
    try:
        # JSON escapes can smuggle lone surrogates ("\ud800") past the UTF-8 check; strings
        # that cannot be encoded again would fail later, far from here (logs, comparisons).
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"{what} payload holds a string that is not valid Unicode") from exc
    return document


def _int_setting(info: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = info.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"HELLO setting {key}={value!r} is not an integer in {low}..{high}")
    return value
