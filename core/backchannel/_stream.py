"""TunnelStream: one multiplexed stream as a trio HalfCloseableStream (the plugin contract)."""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ._exceptions import StreamError
from ._proto._errors import ProtocolError, ResetCode
from ._sockio import write_now

if TYPE_CHECKING:
    from ._tunnel import Tunnel


class Standby(Protocol):
    """A splice's direction out of this stream while no task runs it (``_splice``)."""

    def start(self) -> None:
        """Start the task that receives what the sink could not take (data, an error)."""

    def end(self) -> None:
        """The peer's FIN with nothing buffered: half-close the socket, end the direction."""


#: Where the tunnel's reader writes a spliced stream's data: the splice's plain socket, or
#: (socket, moved) when the splice has a ``moved`` callback for the reader to call after writes.
Sink = trio.socket.SocketType | tuple[trio.socket.SocketType, Callable[[], None]]

#: Never appended to: every stream starts with it and gets a deque of its own on first data.
_NO_CHUNKS: deque[bytes | memoryview] = deque()

#: Shared by every stream the peer has not (yet) answered with attributes; replaced, never
#: mutated here.
_NO_ATTRIBUTES: dict[str, Any] = {}


class TunnelStream(trio.abc.HalfCloseableStream):
    """A stream inside a tunnel. Send and receive respect the peer's and our credit windows.

    ``metadata`` is the OPEN document (protocol, virtual target, app, attributes). A stream the
    peer opened must be accepted (:meth:`accept`) or refused (:meth:`reset`); sending data
    accepts it implicitly.
    """

    # Slots, and one waiting task per direction instead of a ParkingLot each (only one task
    # may receive and one send at a time anyway): memory per idle stream, docs/performance.md.
    __slots__ = (
        "__weakref__",
        "_accepted",
        "_accepted_locally",
        "_buffered",
        "_chunks",
        "_closed",
        "_eof_received",
        "_error",
        "_fin_sent",
        "_peer_accepted",
        "_receive_waiter",
        "_receiving",
        "_send_waiter",
        "_sender_resuming",
        "_sending",
        "_sent",
        "_sink",
        "_standby",
        "_tunnel",
        "accept_attributes",
        "metadata",
        "opened_locally",
        "stream_id",
    )

    def __init__(
        self, tunnel: Tunnel, stream_id: int, metadata: dict[str, Any], *, opened_locally: bool
    ) -> None:
        self._tunnel = tunnel
        self.stream_id = stream_id
        self.metadata = metadata
        self.opened_locally = opened_locally
        self.accept_attributes: dict[str, Any] = _NO_ATTRIBUTES
        # Only an opener waits for ACCEPT; the peer's streams skip the Event (memory per idle
        # stream, see docs/performance.md).
        self._accepted: trio.Event | None = trio.Event() if opened_locally else None
        self._peer_accepted = False
        self._accepted_locally = False
        # The shared empty deque until data arrives: an idle stream keeps no deque block.
        self._chunks: deque[bytes | memoryview] = _NO_CHUNKS
        self._buffered = 0
        self._eof_received = False
        self._fin_sent = False
        #: Payload bytes handed to the mux so far: the tunnel wakes the least served first.
        self._sent = 0
        self._closed = False
        self._error: StreamError | None = None
        self._receive_waiter: trio.lowlevel.Task | None = None
        self._send_waiter: trio.lowlevel.Task | None = None
        #: The sender was rescheduled and has not run yet.
        self._sender_resuming = False
        self._sending = False
        self._receiving = False
        #: Set by a splice (into a plain socket) around its receive_some: data that arrives
        #: while it waits with nothing buffered is written to this socket by the tunnel's
        #: reader at once, without waking it; only what the socket does not take is buffered.
        #: With the splice's ``moved`` callback: (socket, moved), called after each write.
        self._sink: Sink | None = None
        #: Set by a splice that runs this stream's direction without a task of its own (see
        #: :class:`Standby`): the sink is written as for a waiting receiver, and whatever the
        #: sink cannot take (data left over, the end, an error, a close) goes to the standby.
        self._standby: Standby | None = None

    # ---------------------------------------------------------------- state queries

    @property
    def error(self) -> StreamError | None:
        """Why the stream was reset, if it was."""
        return self._error

    @property
    def buffered(self) -> int:
        """Received bytes not yet read by the application."""
        return self._buffered

    # ---------------------------------------------------------------- acceptance

    async def accept(self, attributes: dict[str, Any] | None = None) -> None:
        """Accept a stream the peer opened (no-op if it already is)."""
        await trio.lowlevel.checkpoint()
        self._accept_now(attributes)

    def _accept_now(self, attributes: dict[str, Any] | None = None) -> None:
        if self.opened_locally or self._accepted_locally:
            return
        self._raise_if_unusable()
        self._accepted_locally = True
        self._tunnel._mux_accept(self.stream_id, attributes)

    async def wait_accepted(self) -> None:
        """Wait until the peer accepts a stream we opened; raises StreamError if it refused."""
        assert self._accepted is not None, "only a stream opened here is accepted by the peer"
        await self._accepted.wait()
        if not self._peer_accepted:
            assert self._error is not None
            raise self._error

    async def reset(self, code: ResetCode, reason: str = "") -> None:
        """Abort both directions and tell the peer why."""
        await trio.lowlevel.checkpoint()
        self.reset_nowait(code, reason)

    def reset_nowait(self, code: ResetCode, reason: str = "") -> None:
        """Synchronous :meth:`reset`, for cleanup paths that cannot await."""
        if self._error is None:
            self._tunnel._mux_reset(self.stream_id, code, reason)
            self._fail(StreamError(code, reason))

    # ---------------------------------------------------------------- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Read up to ``max_bytes``; b"" after the peer's FIN."""
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for 1.5, as trio's streams do
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            parked = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._chunks:
                    data = self._take(max_bytes)
                    break
                if self._eof_received:
                    data = b""
                    break
                if self._error is not None:
                    raise trio.BrokenResourceError(str(self._error)) from self._error
                parked = True
                # Parked here, not in a helper coroutine: an idle stream's waiting receiver
                # would hold that coroutine's frame too (about 0.2 KiB per idle stream).
                self._receive_waiter = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_receiver)
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes:
        chunk = self._chunks.popleft()
        taken: bytes
        if max_bytes is not None and len(chunk) > max_bytes:
            # The rest stays a view of the frame's bytes: reading a 256 KiB frame in 64 KiB
            # pieces copies each byte once, not the rest again after every piece.
            view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
            self._chunks.appendleft(view[max_bytes:])
            taken = bytes(view[:max_bytes])
        elif max_bytes is not None and self._chunks:
            # Hand over every whole frame that fits (several small frames, or the rest of
            # one): one receive and one send to the backend instead of one per frame.
            parts = [chunk]
            size = len(chunk)
            while self._chunks and size + len(self._chunks[0]) <= max_bytes:
                parts.append(self._chunks.popleft())
                size += len(parts[-1])
            taken = b"".join(parts) if len(parts) > 1 else bytes(chunk)
        else:
            taken = bytes(chunk)  # a copy only for the rest of a frame read in pieces
        self._buffered -= len(taken)
        if not self._chunks:
            self._chunks = _NO_CHUNKS  # an idle stream keeps no deque block
        self._tunnel._mux_acknowledge(self.stream_id, len(taken))
        return taken

    # ---------------------------------------------------------------- sending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting for credit as needed."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._raise_if_cannot_send()
            self._accept_now()
            view = memoryview(data).cast("B")  # offsets in bytes, whatever the item size
            offset = 0
            parked = False
            while offset < len(view):
                if self._tunnel._send_blocked(self):
                    parked = True
                    await self._park_sender()
                    self._raise_if_cannot_send()
                    continue
                taken = self._tunnel._mux_send(self.stream_id, view[offset:], self._sent)
                offset += taken
                self._sent += taken
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def _send_now(self, data: bytes | bytearray) -> int:
        """Queue as much of ``data`` as credit and the output queue take now, without waiting
        or a checkpoint; how much that was (0 also when sending is not possible: ``send_all``
        with the rest then waits, or raises what there is to raise). For the splice, whose
        loop checkpoints when it reads."""
        if self._sending or self._closed or self._fin_sent or self._error is not None:
            return 0
        self._accept_now()
        tunnel = self._tunnel
        if data and tunnel._send_at_once(self, data):
            self._sent += len(data)
            return len(data)
        view = memoryview(data).cast("B")
        offset = 0
        while offset < len(view) and not tunnel._send_blocked(self):
            taken = tunnel._mux_queue(self.stream_id, view[offset:], self._sent)
            offset += taken
            self._sent += taken
        if offset:
            tunnel._wake_writer()  # one message for the whole read
        return offset

    async def wait_send_all_might_not_block(self) -> None:
        """Return once there is credit to send (or the stream is unusable)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            parked = False
            while not self._closed and self._error is None and self._tunnel._send_blocked(self):
                parked = True
                await self._park_sender()
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Half-close: the peer reads b"" after what we sent; we can still receive."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._fin_sent:
            return
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error
        self._accept_now()
        self._fin_sent = True
        self._tunnel._mux_fin(self.stream_id)

    def _raise_if_cannot_send(self) -> None:
        if self._closed or self._fin_sent:
            raise trio.ClosedResourceError("stream was closed for sending")
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error

    # ---------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Close both directions: FIN what we sent; reset what the peer may still send."""
        if not self._closed:
            self._closed = True
            if self._error is None:
                try:
                    if not self.opened_locally and not self._accepted_locally:
                        self._tunnel._mux_reset(
                            self.stream_id, ResetCode.CANCELLED, "closed before accepting"
                        )
                    else:
                        if not self._fin_sent:
                            self._fin_sent = True
                            self._tunnel._mux_fin(self.stream_id)
                        if not self._eof_received:
                            self._tunnel._mux_reset(
                                self.stream_id, ResetCode.CANCELLED, "receiver closed the stream"
                            )
                except ProtocolError:
                    pass  # the tunnel is already gone; nothing to tell the peer
            self._chunks.clear()
            self._buffered = 0
            self._tunnel._forget_stream(self.stream_id)
            self._wake_receiver()
            self._wake_sender()
        await trio.lowlevel.checkpoint()

    # ---------------------------------------------------------------- waiting

    def _abort_receiver(self, _: Any) -> trio.lowlevel.Abort:
        self._receive_waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_receiver(self) -> None:
        task = self._receive_waiter
        if task is not None:
            self._receive_waiter = None
            trio.lowlevel.reschedule(task)
        elif self._standby is not None:
            standby = self._standby
            self._release_standby()
            standby.start()  # a task of the splice's receives what the sink could not take

    def _stand_by(
        self,
        standby: Standby,
        sink: Sink,
    ) -> bool:
        """Let ``standby`` run the receiving side without a task, the reader writing to
        ``sink``, after what is buffered went to it. False: the splice receives with a task
        as before (some buffered bytes may have gone to the socket, in order) because someone
        receives, the stream has ended or failed, or the socket did not take the buffer."""
        if self._receiving or self._eof_received or self._error is not None or self._closed:
            return False
        while self._chunks:  # data that came before the splice began (after ACCEPT, say)
            chunk = self._chunks[0]
            sent = self._write_to_sink(sink, chunk)
            self._buffered -= sent
            if sent < len(chunk):
                if sent:
                    self._chunks[0] = memoryview(chunk)[sent:]
                return False
            self._chunks.popleft()
        self._chunks = _NO_CHUNKS
        self._receiving = True  # reserved: another receive_some is refused, as with a task
        self._sink = sink
        self._standby = standby
        return True

    def _release_standby(self) -> None:
        """End the standby: no sink, nobody receiving (a task of the splice may now)."""
        self._standby = None
        self._sink = None
        self._receiving = False

    async def _park_sender(self) -> None:
        self._send_waiter = trio.lowlevel.current_task()
        try:
            await trio.lowlevel.wait_task_rescheduled(self._abort_sender)
        finally:
            self._sender_resuming = False
            self._tunnel._sender_resumed(self)

    def _abort_sender(self, _: Any) -> trio.lowlevel.Abort:
        self._send_waiter = None
        # A cancelled sender no longer waits for room: nobody gives way to it.
        self._tunnel._output_blocked.discard(self)
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_sender(self) -> bool:
        """Reschedule the parked sender; True if there was one, or one was rescheduled and
        has not run yet."""
        task = self._send_waiter
        if task is None:
            return self._sender_resuming
        self._send_waiter = None
        self._sender_resuming = True
        trio.lowlevel.reschedule(task)
        return True

    # ---------------------------------------------------------------- called by the tunnel

    def _on_data(self, data: bytes | memoryview) -> None:
        """Bytes from the peer, a view into the received message: written straight to a
        waiting splice's socket, else copied into the stream's buffer."""
        if self._closed:
            self._tunnel._mux_acknowledge(self.stream_id, len(data))
            return
        sink = self._sink
        if (
            sink is not None
            and (self._receive_waiter is not None or self._standby is not None)
            and not self._chunks
        ):
            # A splice waits in receive_some (or stands by) with nothing buffered: straight to
            # its socket, in order, without waking it (a write error is its to meet).
            sent = self._write_to_sink(sink, data)
            if sent == len(data):
                return
            data = data[sent:]
        if self._chunks is _NO_CHUNKS:
            self._chunks = deque()
        self._chunks.append(bytes(data))
        self._buffered += len(data)
        self._wake_receiver()

    def _write_to_sink(
        self,
        sink: Sink,
        data: bytes | memoryview,
    ) -> int:
        """Write ``data`` to the sink's socket without waiting; how much it took (then
        acknowledged to the peer, and the splice's ``moved`` called). A write error counts as
        nothing taken: the splice meets it when it writes the rest itself."""
        if isinstance(sink, tuple):
            sock, moved = sink
        else:
            sock, moved = sink, None
        try:
            sent = write_now(sock, data)
        except (OSError, trio.ClosedResourceError):
            return 0
        if sent:
            self._tunnel._mux_acknowledge(self.stream_id, sent)
            if moved is not None:
                moved()
        return sent

    def _on_eof(self) -> None:
        self._eof_received = True
        standby = self._standby
        if standby is not None and not self._chunks:
            self._release_standby()
            standby.end()  # the splice's socket half-closes now, no task woken
            return
        self._wake_receiver()

    def _on_accepted(self, attributes: dict[str, Any]) -> None:
        self.accept_attributes = attributes
        self._peer_accepted = True
        if self._accepted is not None:
            self._accepted.set()

    def _on_window(self) -> bool:
        """Credit or room to send: wake the parked sender; True if there was one."""
        return self._wake_sender()

    def _fail(self, error: StreamError) -> None:
        """Reset by the peer, by the mux, or the tunnel died."""
        if self._error is not None:
            return
        self._error = error
        self._tunnel._output_blocked.discard(self)  # it sends nothing more: others need not wait
        if not self._eof_received:
            # Without the FIN the data received so far is a fragment: do not hand it out.
            self._chunks.clear()
            self._buffered = 0
        if self._accepted is not None:
            self._accepted.set()
        self._wake_receiver()
        self._wake_sender()
