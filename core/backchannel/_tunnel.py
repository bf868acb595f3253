"""Tunnel: drives one Mux over a message transport (a WebSocket) with trio tasks.

One reader task always drains the transport into the mux (so the WebSocket library's own queue
never becomes the back-pressure), one writer task batches queued frames into messages, and a
heartbeat task pings the peer and declares it dead when nothing arrives for too long.

While the writer is idle, a task that queues frames sends them itself, at once, when the
transport can take them without waiting (:class:`EagerTransport`). Waking the writer instead
would send them only after every other runnable task ran: with many streams busy, each side
then did a whole round of work before the other could start on it, and the two sides took
turns instead of working at the same time (docs/performance.md, "Eager sends").
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import trio

from ._exceptions import StreamError
from ._proto._errors import ProtocolError, ResetCode
from ._proto._events import (
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from ._proto._frames import HEADER_SIZE
from ._proto._mux import Mux, MuxSettings
from ._room_waiters import SERVED_LIMIT, RoomWaiters
from ._stream import TunnelStream

log = logging.getLogger("backchannel.tunnel")


class MessageTransport(Protocol):
    """What a tunnel needs from its transport; trio-websocket's WebSocketConnection fits."""

    async def send_message(self, message: bytes) -> None: ...

    async def get_message(self) -> bytes | bytearray | str: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


@runtime_checkable
class EagerTransport(Protocol):
    """A transport that can also send a message at once, from whichever task queued it
    (:class:`~backchannel._wslink.WebSocketLink`)."""

    @property
    def can_send_now(self) -> bool: ...

    @property
    def send_pending(self) -> bool: ...

    def send_message_now(self, message: bytes) -> None: ...

    async def flush(self) -> None: ...


class TransportClosed(Exception):
    """Raised by transport adapters when the peer went away; message says why."""


#: The most one send_all step hands the mux at once (bounds overshoot of the high-water mark):
#: one splice read, so that a bulk read becomes one DATA frame (MuxSettings.data_chunk_size).
#: Only streams that have sent SERVED_LIMIT take steps this large: before that, steps of
#: FIRST_SEND_CHUNK keep many new streams taking turns (1,000 streams of 256 KiB each finish
#: together instead of one after the other, docs/performance.md).
MAX_SEND_CHUNK = 256 * 1024
FIRST_SEND_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    """Timing and buffering of a tunnel; the mux settings are what is promised to the peer."""

    mux: MuxSettings = field(default_factory=MuxSettings)
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 30.0
    handshake_timeout: float = 10.0
    #: 1 MiB messages and a 2 MiB queue: against 512 KiB / 1 MiB, 22% (upload) and 33%
    #: (download) less CPU per MB over both sides in the bench (docs/performance.md).
    max_message_size: int = 1024 * 1024
    output_high_water: int = 2 * 1024 * 1024
    #: How long an opener waits for ACCEPT or RESET before giving up with BACKEND_TIMEOUT.
    stream_open_timeout: float = 30.0

    @property
    def output_limit(self) -> int:
        """Queued output beyond which the peer counts as not reading (our own streams stop at
        the high-water mark; only replies to the peer's frames could grow past this)."""
        return 4 * self.output_high_water + 4 * MAX_SEND_CHUNK


StreamHandler = Callable[[TunnelStream], Awaitable[None]]


class Tunnel:
    """A live, handshaken tunnel. Run it with :meth:`run`; open streams with :meth:`open_stream`."""

    def __init__(
        self,
        transport: MessageTransport,
        mux: Mux,
        *,
        settings: TunnelSettings,
        peer_info: dict[str, Any],
        label: str,
        stream_handler: StreamHandler | None = None,
        closed_translator: Callable[[BaseException], str | None] | None = None,
        control_handler: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._transport = transport
        self._mux = mux
        self._settings = settings
        self.peer_info = peer_info
        self.label = label
        self._stream_handler = stream_handler
        self._translate_closed = closed_translator or (lambda exc: None)
        self._ping_unanswered = False
        self._control_handler = control_handler
        self._streams: dict[int, TunnelStream] = {}
        self._writer_waiters = trio.lowlevel.ParkingLot()
        self._eager = transport if isinstance(transport, EagerTransport) else None
        #: Streams waiting for the output queue to drain: woken least served first (then in
        #: the order they blocked), as many as the room allows.
        self._output_blocked: RoomWaiters[TunnelStream] = RoomWaiters()
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()
        self._close_reason = ""
        self._aborted_here = False
        self._draining_close = False
        #: Set by _flush_then_abort: the writer reports through _drained when all is sent.
        self._abort_when_drained = False
        self._drained = trio.Event()
        self._peer_silent = False
        self._last_received = trio.current_time()
        self.peer_going_away = False
        self.going_away = False
        self.handler_tasks = 0

    # ---------------------------------------------------------------- public

    @property
    def closed(self) -> bool:
        """The transport is gone; no stream can make progress."""
        return self._closed.is_set()

    @property
    def close_reason(self) -> str:
        """Why the tunnel closed ("" while open)."""
        return self._close_reason

    @property
    def accepting_streams(self) -> bool:
        """New streams may be opened (open, and no GO_AWAY either way)."""
        return not self.closed and self._mux.accepting_streams

    @property
    def stream_count(self) -> int:
        """Streams the application still holds."""
        return len(self._streams)

    async def wait_closed(self) -> None:
        """Wait until the tunnel is closed."""
        await self._closed.wait()

    async def open_stream(
        self, metadata: dict[str, Any], *, wait_accepted: bool = True, first_data: bytes = b""
    ) -> TunnelStream:
        """Open a stream; by default wait for the peer to accept (StreamError if it refuses).

        ``first_data`` (what a client sent before its stream was open) leaves in the same
        message as the OPEN, as far as the peer's initial window and the output queue take it
        now, and the rest once the peer accepted: all of it is handed to the tunnel before this
        returns (with ``wait_accepted=False`` too, which then waits for the answer if a rest is
        left). The peer holds it for the stream until it accepts, and drops it if it refuses. A
        stream that breaks after the peer accepted it is returned as it is: its user meets the
        error on it, as on any accepted stream (it was not refused)."""
        if self.closed:
            raise StreamError(ResetCode.NOT_CONNECTED, f"tunnel closed: {self._close_reason}")
        try:
            stream_id = self._mux.open_stream(metadata)
        except ProtocolError as exc:
            raise StreamError(exc.code, str(exc)) from exc
        stream = TunnelStream(self, stream_id, metadata, opened_locally=True)
        self._streams[stream_id] = stream
        # Queued behind the OPEN, so that one message carries both (_send_now wakes the
        # writer only when it queued something).
        taken = stream._send_now(first_data) if first_data else 0
        self._wake_writer()
        rest = memoryview(first_data)[taken:]
        try:
            if wait_accepted or rest:  # the rest needs credit, which comes after the answer
                with trio.move_on_after(self._settings.stream_open_timeout) as scope:
                    await stream.wait_accepted()
                if scope.cancelled_caught:
                    raise StreamError(
                        ResetCode.BACKEND_TIMEOUT,
                        f"the peer did not answer the stream open within "
                        f"{self._settings.stream_open_timeout:g} s",
                    )
            if rest:
                # Accepted: a reset from now on is the stream's, not a refusal of the open.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(rest)
        except BaseException:
            stream.reset_nowait(ResetCode.CANCELLED, "opener gave up waiting")
            await stream.aclose()
            raise
        return stream

    def send_control(self, payload: dict[str, Any]) -> None:
        """Queue a CONTROL document for the peer."""
        self._mux.send_control(payload)
        self._wake_writer()

    def go_away(self, code: ResetCode = ResetCode.NO_ERROR, reason: str = "") -> None:
        """Accept no new streams; the tunnel closes when the open ones are done."""
        if self.closed:
            return
        self.going_away = True
        self._mux.go_away(code, reason)
        self._wake_writer()
        self._close_if_drained()

    def abort(self, reason: str) -> None:
        """Close now; every open stream fails with NOT_CONNECTED."""
        if not self._close_reason:
            self._close_reason = reason
        self._aborted_here = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self) -> None:
        """Run reader, writer and heartbeat until the tunnel closes, then fail leftover streams."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._reader)
        finally:
            if not self._close_reason:
                self._close_reason = "tunnel stopped"
            self._closed.set()
            error = StreamError(ResetCode.NOT_CONNECTED, f"tunnel closed: {self._close_reason}")
            for stream in list(self._streams.values()):
                stream._fail(error)
            self._streams.clear()
            # When we closed the tunnel ourselves the transport's reader still runs and sees
            # the peer's close reply; when the whole program is being cancelled it does not,
            # so waiting for that reply would only stall shutdown.
            # A peer that failed its heartbeat will not answer the close either.
            grace = 2.0 if self._aborted_here and not self._peer_silent else 0.1
            with trio.CancelScope(shield=True), trio.move_on_after(grace):
                await self._transport.aclose()

    # ---------------------------------------------------------------- tasks

    async def _reader(self) -> None:
        while True:
            try:
                message = await self._transport.get_message()
            except Exception as exc:
                reason = self._translate_closed(exc)
                if reason is None:
                    raise
                self.abort(reason)
                return
            self._last_received = trio.current_time()
            self._ping_unanswered = False  # anything from the peer shows it is alive
            if isinstance(message, str):
                self._protocol_failure(ProtocolError("text message on the tunnel"))
                return
            try:
                events = self._mux.receive_data(message)
                if not self._mux.at_frame_boundary:
                    raise ProtocolError("message ended inside a frame")
            except ProtocolError as exc:
                self._protocol_failure(exc)
                return
            for event in events:
                self._dispatch(event)
            if self._mux.pending_bytes > self._settings.output_limit:
                # Pings, refused opens and the like make us queue replies; a peer that sends
                # them without reading ours would grow our memory without end.
                self.abort(
                    f"peer does not read: {self._mux.pending_bytes} bytes queued for it "
                    f"(limit {self._settings.output_limit})"
                )
                return
            if self._mux.pending_bytes:
                self._wake_writer()

    def _protocol_failure(self, exc: ProtocolError) -> None:
        log.warning("tunnel %s: protocol error from peer: %s", self.label, exc)
        # The mux queued a GO_AWAY naming the error: let the writer flush it before we go.
        self._close_reason = f"protocol error: {exc}"
        # The mux has forgotten every stream: fail them now, or their next call would surface
        # the mux's own "stream is not open" instead of a trio stream error.
        error = StreamError(ResetCode.NOT_CONNECTED, f"tunnel closed: {self._close_reason}")
        for stream in list(self._streams.values()):
            stream._fail(error)
        assert self._nursery is not None
        self._nursery.start_soon(self._flush_then_abort)

    async def _flush_then_abort(self) -> None:
        # The writer sends what is queued, finishing a send in flight and the rest of an eager
        # send first, then reports the drain. Bounded by the heartbeat timeout: a live peer
        # takes queued data within it.
        self._abort_when_drained = True
        self._writer_waiters.unpark_all()
        with trio.move_on_after(self._settings.heartbeat_timeout):
            await self._drained.wait()
        self.abort(self._close_reason)

    async def _writer(self) -> None:
        while True:
            while not self._mux.pending_bytes:
                if self._eager is not None and self._eager.send_pending:
                    break  # the rest of a message a stream sent at once
                if self._abort_when_drained:
                    self._drained.set()
                # Nothing queued: whoever still waits for room gets it (a stream woken below
                # may have been closed instead of queueing, and nobody else would wake them).
                self._wake_blocked(everyone=True)
                await self._writer_waiters.park()
            try:
                if self._mux.pending_bytes:
                    data = self._mux.data_to_send(self._settings.max_message_size)
                    await self._transport.send_message(data)
                else:
                    assert self._eager is not None
                    await self._eager.flush()
            except Exception as exc:
                reason = self._translate_closed(exc)
                if reason is None:
                    raise
                self.abort(reason)
                return
            self._wake_blocked()

    def _wake_blocked(self, *, everyone: bool = False) -> None:
        """Wake streams waiting for room, least served first, about as many as the room below
        the high-water mark takes (one send step each). Waking all of them would let whichever
        runs first take the room each time (1,000 streams: the same few, and 1,000 wake-ups
        per message); a woken stream that finds no room queues itself again."""
        waiters = self._output_blocked
        room = self._settings.output_high_water - self._mux.pending_bytes
        while everyone or room > 0:
            stream = waiters.pop()
            if stream is None:
                return
            if stream._on_window() and stream._sent < SERVED_LIMIT:
                # Until its task runs it still counts as served what it had: a stream woken
                # with it that runs first and has been served more gives way to it. (Streams
                # past the limit are equals: whichever runs first may fill the queue, so two
                # bulk streams keep the writer's messages full.)
                waiters.woken(stream, stream._sent)
            room -= MAX_SEND_CHUNK

    async def _heartbeat(self) -> None:
        interval = self._settings.heartbeat_interval
        while True:
            await trio.sleep(interval)
            idle = trio.current_time() - self._last_received
            if idle >= self._settings.heartbeat_timeout:
                self._peer_silent = True
                self.abort(f"peer sent nothing for {idle:.1f} s (heartbeat timeout)")
                return
            if idle >= interval and not self._ping_unanswered:
                # One heartbeat PING at a time: after a stall, a backlog of them would reach
                # the peer as a burst (and trip its max_pings_per_second).
                self._ping_unanswered = True
                self._mux.ping(os.urandom(8))
                self._wake_writer()

    async def _run_handler(self, stream: TunnelStream) -> None:
        assert self._stream_handler is not None
        self.handler_tasks += 1
        try:
            await self._stream_handler(stream)
        except Exception:
            log.exception("tunnel %s: handler for stream %d failed", self.label, stream.stream_id)
            stream.reset_nowait(ResetCode.INTERNAL, "the connector's handler failed")
        finally:
            self.handler_tasks -= 1
            if not stream._accepted_locally and stream.error is None:
                stream.reset_nowait(ResetCode.INTERNAL, "handler ended without answering")
            with trio.CancelScope(shield=True):
                await stream.aclose()

    # ---------------------------------------------------------------- events

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                self._mux.acknowledge(event.stream_id, len(event.data))
            else:
                stream._on_data(event.data)
        elif isinstance(event, WindowUpdated):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream._on_window()
        elif isinstance(event, StreamOpened):
            self._on_stream_opened(event)
        elif isinstance(event, StreamAccepted):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream._on_accepted(event.attributes)
        elif isinstance(event, StreamEnded):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream._on_eof()
        elif isinstance(event, StreamReset):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream._fail(StreamError(event.code, event.reason))
        elif isinstance(event, GoAwayReceived):
            self.peer_going_away = True
            log.info(
                "tunnel %s: peer is going away (%s: %s)",
                self.label,
                event.code.name,
                event.reason,
            )
            if event.code != ResetCode.NO_ERROR and not self._close_reason:
                # Why the peer sent us away (a revoked certificate, say) is what the operator
                # must read in the connector's status, not "went away gracefully".
                self._close_reason = f"the peer went away ({event.code.name}): {event.reason}"
            self._close_if_drained()
        elif isinstance(event, ControlReceived):
            log.debug("tunnel %s: control document with keys %s", self.label, sorted(event.payload))
            if self._control_handler is not None:
                self._control_handler(event.payload)
        elif isinstance(event, PingReceived | PongReceived):
            pass  # _last_received already moved; the mux answered pings itself

    def _on_stream_opened(self, event: StreamOpened) -> None:
        if self._stream_handler is None or self._nursery is None:
            self._mux.reset_stream(event.stream_id, ResetCode.REFUSED, "this side opens no streams")
            return
        stream = TunnelStream(self, event.stream_id, event.metadata, opened_locally=False)
        self._streams[event.stream_id] = stream
        # A fixed name: trio would otherwise format one per stream.
        self._nursery.start_soon(self._run_handler, stream, name="backchannel stream handler")

    def _close_if_drained(self) -> None:
        if self.closed or self._draining_close:
            return
        if (self.going_away or self.peer_going_away) and not self._streams:
            self._draining_close = True
            self._close_reason = self._close_reason or "tunnel went away gracefully"
            if self._nursery is not None:
                self._nursery.start_soon(self._flush_then_abort)

    # ---------------------------------------------------------------- used by TunnelStream

    def _wake_writer(self) -> None:
        eager = self._eager
        if eager is not None and len(self._writer_waiters):
            # The writer is idle: send now if the transport takes it without waiting. (Nothing
            # queued, e.g. a second GO_AWAY: nothing to send, and nobody waits for room while
            # the writer is idle.)
            if not self._mux.pending_bytes:
                return
            if not eager.can_send_now:
                self._writer_waiters.unpark_all()
                return
            try:
                eager.send_message_now(self._mux.data_to_send(self._settings.max_message_size))
            except Exception as exc:
                self.abort(self._translate_closed(exc) or f"sending failed: {exc!r}")
                return
            if not self._mux.pending_bytes and not eager.send_pending:
                if self._output_blocked:  # (every small send passes here: skip the call)
                    self._wake_blocked(everyone=True)  # as the writer would before parking
                return
        self._writer_waiters.unpark_all()

    def _send_blocked(self, stream: TunnelStream) -> bool:
        waiters = self._output_blocked
        if self._mux.pending_bytes >= self._settings.output_high_water or (
            # Others wait for room, or were woken and have not run yet: one send step queued
            # per stream at a time, so the streams take turns instead of the first ones (or
            # the first one trio runs) filling the queue, and none queues ahead of one that
            # has been served less (_room_waiters.py).
            waiters.others_waiting()
            and (
                self._mux.queued_data(stream.stream_id) >= self._send_step(stream._sent)
                or waiters.any_served_less_than(stream._sent)
            )
        ):
            waiters.add(stream, stream._sent)
            return True
        waiters.discard(stream)  # it may send: it waits no longer (if it did)
        return self._mux.send_window(stream.stream_id) == 0

    def _sender_resumed(self, stream: TunnelStream) -> None:
        """``stream``'s parked sender runs again (woken, or cancelled). Streams may have given
        way to it while it was woken; if the writer is idle, nobody else would wake them."""
        waiters = self._output_blocked
        waiters.ran(stream)
        if len(waiters) and len(self._writer_waiters):
            self._wake_blocked(everyone=True)

    def _send_step(self, sent: int) -> int:
        """The most one send step of a stream that has sent ``sent`` bytes takes:
        FIRST_SEND_CHUNK below SERVED_LIMIT, then MAX_SEND_CHUNK; never a frame larger than a
        message (``max_message_size`` can be set below a step; a frame is never split)."""
        step = MAX_SEND_CHUNK if sent >= SERVED_LIMIT else min(FIRST_SEND_CHUNK, MAX_SEND_CHUNK)
        return min(step, self._settings.max_message_size - HEADER_SIZE)

    def _mux_send(self, stream_id: int, data: memoryview, sent: int) -> int:
        taken = self._mux.send_data(stream_id, data[: self._send_step(sent)])
        self._wake_writer()
        return taken

    def _send_at_once(self, stream: TunnelStream, data: bytes | bytearray) -> bool:
        """Send all of ``data`` as one DATA frame in one message from the calling task, without
        the mux's queue (a small splice read, such as one HTTP request: the work of queueing
        and joining it would be done only to take it back out at once). Only when the result
        is what queueing and :meth:`_wake_writer` would send: nothing queued ahead of it, the
        writer idle, no stream waiting for room (or woken for it and not run yet: it may have
        been served less, see :meth:`_send_blocked`), one send step, and a transport that
        takes it without waiting. False, with nothing sent, when any of that does not hold."""
        eager = self._eager
        if (
            eager is None
            or not len(self._writer_waiters)
            or self._output_blocked.others_waiting()  # waiting, or woken and not run yet
            or len(data) > self._send_step(stream._sent)
            or not eager.can_send_now
        ):
            return False
        header = self._mux.take_data_frame(stream.stream_id, len(data))
        if header is None:
            return False
        try:
            eager.send_message_now(header + data)
        except Exception as exc:
            # As _wake_writer: the data counts as taken; the tunnel's end fails the stream.
            self.abort(self._translate_closed(exc) or f"sending failed: {exc!r}")
            return True
        if eager.send_pending:
            self._writer_waiters.unpark_all()  # the writer sends what the socket did not take
        return True

    def _mux_queue(self, stream_id: int, data: memoryview, sent: int) -> int:
        """:meth:`_mux_send` without waking the writer (the caller does, once, after queueing
        several steps: one message for all of them)."""
        return self._mux.send_data(stream_id, data[: self._send_step(sent)])

    def _mux_accept(self, stream_id: int, attributes: dict[str, Any] | None) -> None:
        self._mux.accept_stream(stream_id, attributes)
        self._wake_writer()

    def _mux_fin(self, stream_id: int) -> None:
        self._mux.send_fin(stream_id)
        self._wake_writer()

    def _mux_reset(self, stream_id: int, code: ResetCode, reason: str) -> None:
        self._mux.reset_stream(stream_id, code, reason)
        self._wake_writer()

    def _mux_acknowledge(self, stream_id: int, count: int) -> None:
        self._mux.acknowledge(stream_id, count)
        if self._mux.pending_bytes:
            self._wake_writer()

    def _forget_stream(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._output_blocked.discard(stream)
        self._close_if_drained()
