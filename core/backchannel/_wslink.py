"""The tunnel's WebSocket after the upgrade: RFC 6455 framing of our own over a TlsChannel.

trio-websocket performs the opening handshake (both sides) over a :class:`HandshakeStream`,
which passes it the HTTP head of the upgrade and nothing after it. Once the upgrade is
accepted, :class:`WebSocketLink` takes the connection over: it parses and builds frames itself
(RFC 6455 section 5) straight from and into the :class:`~backchannel._tlschannel.TlsChannel`,
in the tunnel's reader and writer tasks. trio-websocket's way (a reader task that parses with
wsproto and hands messages through a channel to ours, wsproto building every frame, trio's
``SSLStream`` under both) cost about half of each side's CPU per MB in the bench; on the wire
nothing changes (docs/performance.md).

What the link implements: binary and text messages, fragmented messages (reassembled, bounded
by ``max_message_size``), ping (answered with pong), pong (ignored), the close handshake, the
masking rules (a client masks every frame, a server never does, and each side refuses the
other's violations), reserved bits and opcodes, minimal length encoding, UTF-8 in text
messages and close reasons. A violation closes the connection with the RFC's code (1002
protocol error, 1007 invalid UTF-8, 1009 too big) and raises :class:`WebSocketClosed`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ._tlschannel import TlsChannel

_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - depends on the installed build
    _apply_mask = None

#: Read size while the link waits for more of a frame.
RECEIVE_SIZE = 256 * 1024
#: From this payload size on a frame's header goes to TLS apart from its body (one record
#: more, one copy less).
SEPARATE_HEADER = 64 * 1024
#: From this payload size on, once :meth:`WebSocketLink.allow_direct_payloads` was called, the
#: rest of a frame that has not all arrived is decrypted straight into a buffer of its own (no
#: copy into the read buffer and out again). The buffer is allocated at the size the header
#: announces, so not for a peer that has not authenticated yet: an announced size alone would
#: cost up to ``max_message_size`` of memory.
DIRECT_PAYLOAD = 64 * 1024
#: How long :meth:`WebSocketLink.aclose` waits for the peer's close frame.
CLOSE_TIMEOUT = 1.0
#: Control replies (pongs, the close echo) that wait for a send in progress; beyond this the
#: reader waits too (a peer that pings without reading gets no more of our attention).
CONTROL_BACKLOG = 64 * 1024

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
#: Close codes a peer may send (RFC 6455 7.4.1, 7.4.2; 1012-1014 registered since).
_VALID_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)

_CLOSE_NAMES = {
    1000: "NORMAL_CLOSURE",
    1001: "GOING_AWAY",
    1002: "PROTOCOL_ERROR",
    1003: "UNSUPPORTED_DATA",
    1005: "NO_STATUS_RCVD",
    1006: "ABNORMAL_CLOSURE",
    1007: "INVALID_FRAME_PAYLOAD_DATA",
    1008: "POLICY_VIOLATION",
    1009: "MESSAGE_TOO_BIG",
    1010: "MANDATORY_EXTENSION",
    1011: "INTERNAL_ERROR",
    1012: "SERVICE_RESTART",
    1013: "TRY_AGAIN_LATER",
    1014: "BAD_GATEWAY",
}

_SHORT = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
#: The longest frame header: 2 bytes, a 64-bit length, a masking key.
_MAX_HEADER = 14


def close_name(code: int) -> str:
    """The RFC's name of a close code (``UNKNOWN`` for others)."""
    return _CLOSE_NAMES.get(code, "PRIVATE" if 3000 <= code <= 4999 else "UNKNOWN")


class WebSocketClosed(Exception):
    """The WebSocket is closed: by the peer's close frame, by a protocol violation (ours to
    report: the peer got a close frame saying it), or because the connection ended."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} ({close_name(code)}){': ' + reason if reason else ''}")
        self.code = code
        self.reason = reason


class _Violation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def mask(payload: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated (masking and unmasking alike)."""
    if _apply_mask is not None:
        return _apply_mask(payload, key)
    length = len(payload)  # pragma: no cover - without websockets' C routine
    stream = (key * (length // 4 + 1))[:length]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
    return value.to_bytes(length, "little")


def frame_parts(
    opcode: int, payload: bytes | bytearray | memoryview, *, client: bool
) -> tuple[bytes, bytes | bytearray | memoryview]:
    """One final frame carrying ``payload`` as (header, body): the body is ``payload`` itself,
    or masked with a fresh random key (then in the header's last four bytes) when ``client``."""
    length = len(payload)
    first = 0x80 | opcode
    mask_bit = 0x80 if client else 0
    if length <= 125:
        header = bytes((first, mask_bit | length))
    elif length <= 0xFFFF:
        header = _SHORT.pack(first, mask_bit | 126, length)
    else:
        header = _LONG.pack(first, mask_bit | 127, length)
    if client:
        key = os.urandom(4)
        return header + key, mask(payload, key)
    return header, payload


def build_frame(opcode: int, payload: bytes | bytearray | memoryview, *, client: bool) -> bytes:
    """One final frame carrying ``payload``, masked with a fresh random key when ``client``."""
    header, body = frame_parts(opcode, payload, client=client)
    return header + body


class HandshakeStream(trio.abc.Stream):
    """The stream trio-websocket performs the upgrade on: the HTTP head of the upgrade passes,
    what follows it stays here.

    After the head, trio-websocket's reader (which goes on reading) waits for a decision:
    :meth:`take_over` (the tunnel: the bytes after the head go to :class:`WebSocketLink`, and
    the reader waits until :meth:`release`, then sees the end of the stream, or until its
    nursery is cancelled) or :meth:`pass_through` (the library keeps the connection: a refused
    upgrade's body, or a WebSocket served by trio-websocket, such as registration). A client
    passes through by itself when the answer is not ``101``.

    ``ended`` is set when the connection ended (EOF or error, kept in ``error``) during the
    upgrade: trio-websocket would wait for an answer forever.
    """

    def __init__(self, channel: trio.abc.Stream, *, client: bool) -> None:
        self.channel = channel
        self._client = client
        self._buffer = bytearray()
        self._tail = b""  # the last bytes handed out, to find a head end split across reads
        self._head_start = b""  # the first bytes of the head (a client checks for 101)
        self._head_done = False
        self._ours = False
        self._decided = trio.Event()
        self._released = trio.Event()
        self.ended = trio.Event()
        self.error: BaseException | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The head (in pieces), then per the decision: the rest, or nothing until released."""
        if not self._head_done:
            return await self._receive_head()
        await self._decided.wait()
        if self._ours:
            await self._released.wait()
            return b""
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        return await self._read()

    async def _receive_head(self) -> bytes:
        while True:
            if self._buffer:
                window = self._tail + self._buffer
                end = window.find(b"\r\n\r\n")
                cut = end + 4 - len(self._tail) if end >= 0 else len(self._buffer)
                piece = bytes(self._buffer[:cut])
                del self._buffer[:cut]
                if len(self._head_start) < 16:
                    self._head_start += piece[: 16 - len(self._head_start)]
                self._tail = (self._tail + piece)[-3:]
                if end >= 0:
                    self._head_done = True
                    if self._client and not self._head_start.startswith(b"HTTP/1.1 101 "):
                        self.pass_through()  # refused: trio-websocket reads the body
                return piece
            received = await self._read()
            if not received:
                return b""
            self._buffer += received

    async def _read(self) -> bytes | bytearray:
        try:
            data = await self.channel.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.error = exc
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    def take_over(self) -> bytes:
        """The tunnel takes the connection: returns the bytes received after the head."""
        self._ours = True
        self._decided.set()
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def pass_through(self) -> None:
        """trio-websocket keeps the connection."""
        self._decided.set()

    def release(self) -> None:
        """Let trio-websocket's waiting reader see the end of the stream (and finish)."""
        self._released.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Pass through (the upgrade request or answer, and pass-through frames)."""
        await self.channel.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Pass through."""
        await self.channel.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the channel, unless the tunnel took it over (then it closes it itself)."""
        if self._ours:
            await trio.lowlevel.checkpoint()
            return
        self.ended.set()  # e.g. trio-websocket refused the request: no upgrade will come
        await self.channel.aclose()


def _length_field(buffer: bytearray) -> tuple[int, int] | None:
    """(payload length, where the masking key or payload starts) of the frame at the start of
    ``buffer``, as its header says (unchecked); None until that much has arrived."""
    available = len(buffer)
    if available < 2:
        return None
    length = buffer[1] & 0x7F
    if length == 126:
        return (_U16.unpack_from(buffer, 2)[0], 4) if available >= 4 else None
    if length == 127:
        return (_U64.unpack_from(buffer, 2)[0], 10) if available >= 10 else None
    return length, 2


@dataclass(slots=True)
class _PartialFrame:
    """A large frame whose payload the link decrypts straight into ``payload``."""

    opcode: int
    fin: bool
    key: bytes
    payload: bytearray
    filled: int


class WebSocketLink:
    """An open WebSocket over ``channel`` (the tunnel's: a
    :class:`~backchannel._tlschannel.TlsChannel`); ``client`` is the side that masks.

    One task calls :meth:`get_message` at a time and one :meth:`send_message` (they may run
    concurrently); :meth:`aclose` may be called from anywhere, once or more.
    """

    def __init__(
        self,
        channel: trio.abc.Stream,
        *,
        client: bool,
        max_message_size: int,
        buffered: bytes = b"",
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.channel = channel
        self._client = client
        self._max_message_size = max_message_size
        self._buffer = bytearray(buffered)
        self._on_close = on_close
        #: Fragments of a message that is not complete yet (one buffer: a list would cost
        #: ~40 bytes per fragment, however small), and its opcode.
        self._fragments = bytearray()
        self._fragment_opcode = 0
        #: The large frame being received straight into its payload (see DIRECT_PAYLOAD).
        self._partial: _PartialFrame | None = None
        self._direct_payloads = False
        self._close_sent = False
        self._closed: WebSocketClosed | None = None
        self._closed_event = trio.Event()
        self._pending_controls: list[bytes] = []
        self._channel_closed = False
        self._sending = False
        self._receiving = False

    def allow_direct_payloads(self) -> None:
        """From now on, large frames go straight into buffers of their own (DIRECT_PAYLOAD):
        for a peer that authenticated (before, its frames are buffered as they arrive). Only
        over a :class:`~backchannel._tlschannel.TlsChannel` (elsewhere nothing changes)."""
        self._direct_payloads = isinstance(self.channel, TlsChannel)

    @property
    def closed(self) -> WebSocketClosed | None:
        """Why the WebSocket closed, or None while it is open."""
        return self._closed

    # ------------------------------------------------------------------ receiving

    async def get_message(self) -> bytes | bytearray | str:
        """The next data message; raises :class:`WebSocketClosed` once the WebSocket closed."""
        self._receiving = True
        try:
            return await self._get_message()
        finally:
            self._receiving = False

    async def _get_message(self) -> bytes | bytearray | str:
        while True:
            if self._closed is not None:
                raise self._closed
            try:
                message = self._next_message()
            except _Violation as violation:
                await self._fail(violation.code, violation.reason)
                continue
            if self._pending_controls and (
                (not self._sending and not self.send_pending)
                or sum(map(len, self._pending_controls)) > CONTROL_BACKLOG
            ):
                # A send in progress (or the rest of an eager send, which the woken writer
                # flushes) sends them when it is done: a reader must not wait for a writer
                # that waits for the peer (unless the backlog is full).
                await self._send_controls()
            if message is not None:
                return message
            if self.closed is not None:  # a close frame came (the property: mypy narrows)
                continue
            try:
                received = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._set_closed(CLOSE_ABNORMAL, f"connection lost: {exc}")
                raise self._closed_or_abnormal() from exc
            if not received:
                self._set_closed(CLOSE_ABNORMAL, "the connection ended without a close frame")

    async def _receive(self) -> int:
        """Read more into the buffer (or the large frame's own); the count (0: the end)."""
        if isinstance(self.channel, TlsChannel):  # decrypts straight into the buffers
            return await self.channel.receive_with(self._decrypt_step)
        data = await self.channel.receive_some(RECEIVE_SIZE)
        self._buffer += data
        return len(data)

    def _decrypt_step(self) -> int | None:
        """Decrypt what the TLS channel can now (see TlsChannel.decrypt): into the large
        frame's own buffer while one is open (at most its rest); at a frame's start its header
        first, and the rest of what is decryptable now unless the header announces a frame
        whose payload _next_frame gives a buffer of its own."""
        channel = self.channel
        assert isinstance(channel, TlsChannel)
        partial = self._partial
        if partial is not None:
            rest = memoryview(partial.payload)[partial.filled :]
            assert rest, "a complete partial frame is _next_frame's to hand over"
            count = channel.decrypt(rest, len(rest))
            if count:
                partial.filled += count
            return count
        buffer = self._buffer
        if len(buffer) >= _MAX_HEADER or not self._direct_payloads:
            return channel.decrypt(buffer, RECEIVE_SIZE)
        header = channel.decrypt(buffer, _MAX_HEADER - len(buffer))
        if not header or self._large_frame_ahead():
            return header
        try:
            more = channel.decrypt(buffer, RECEIVE_SIZE)
        except trio.BrokenResourceError:
            more = None  # the header's bytes go first; the channel raises it again next time
        return header + (more or 0)

    def _large_frame_ahead(self) -> bool:
        """Whether the buffer starts with the length of a frame of DIRECT_PAYLOAD bytes or
        more (its validity is _next_frame's to check)."""
        length_field = _length_field(self._buffer)
        return length_field is not None and length_field[0] >= DIRECT_PAYLOAD

    def _closed_or_abnormal(self) -> WebSocketClosed:
        return self._closed or WebSocketClosed(CLOSE_ABNORMAL, "connection lost")

    def _next_message(self) -> bytes | bytearray | str | None:
        """Parse frames from the buffer until a message is complete (None: need more)."""
        while self._closed is None:
            frame = self._next_frame()
            if frame is None:
                return None
            opcode, fin, payload = frame
            if opcode in _CONTROL_OPCODES:
                self._on_control(opcode, payload)
                continue
            continuing = opcode == OP_CONTINUATION
            if continuing:
                if not self._fragment_opcode:
                    raise _Violation(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
                opcode = self._fragment_opcode
            elif self._fragment_opcode:
                raise _Violation(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            if not fin:
                self._fragment_opcode = opcode
                self._fragments += payload
                continue
            if continuing:
                self._fragments += payload
                payload = bytes(self._fragments)
                self._fragments = bytearray()
                self._fragment_opcode = 0
            if opcode == OP_TEXT:
                try:
                    return payload.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _Violation(CLOSE_INVALID_DATA, "text message is not UTF-8") from exc
            return payload
        return None

    def _next_frame(self) -> tuple[int, bool, bytes | bytearray] | None:
        """One whole frame off the buffer (unmasked), or None if it has not all arrived."""
        partial = self._partial
        if partial is not None:
            if partial.filled < len(partial.payload):
                return None
            self._partial = None
            filled = partial.payload
            return partial.opcode, partial.fin, mask(filled, partial.key) if partial.key else filled
        buffer = self._buffer
        available = len(buffer)
        if available < 2:
            return None
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            raise _Violation(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        opcode = first & 0x0F
        fin = bool(first & 0x80)
        if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES:
            raise _Violation(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        masked = bool(second & 0x80)
        if masked == self._client:
            raise _Violation(
                CLOSE_PROTOCOL_ERROR,
                "masked frame from the server" if masked else "unmasked frame from the client",
            )
        length_field = _length_field(buffer)
        if length_field is None:
            return None
        length, position = length_field
        if (position == 4 and length < 126) or (
            position == 10 and (length <= 0xFFFF or length >> 63)
        ):
            raise _Violation(CLOSE_PROTOCOL_ERROR, "frame length not minimally encoded")
        if opcode in _CONTROL_OPCODES:
            if length > 125:
                raise _Violation(CLOSE_PROTOCOL_ERROR, "control frame longer than 125 bytes")
            if not fin:
                raise _Violation(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
        elif len(self._fragments) + length > self._max_message_size:
            raise _Violation(CLOSE_TOO_BIG, f"message larger than {self._max_message_size} bytes")
        key = b""
        if masked:
            if available < position + 4:
                return None
            key = bytes(buffer[position : position + 4])
            position += 4
        end = position + length
        if available < end:
            if self._direct_payloads and length >= DIRECT_PAYLOAD:
                # The rest goes straight into the payload's own buffer (see _receive).
                direct = bytearray(length)
                with memoryview(buffer) as view:
                    direct[: available - position] = view[position:]
                buffer.clear()
                self._partial = _PartialFrame(opcode, fin, key, direct, available - position)
            return None
        with memoryview(buffer) as view:
            payload = mask(view[position:end], key) if masked else bytes(view[position:end])
        del buffer[:end]
        return opcode, fin, payload

    def _on_control(self, opcode: int, payload: bytes | bytearray) -> None:
        if opcode == OP_PING:
            self._pending_controls.append(build_frame(OP_PONG, payload, client=self._client))
        elif opcode == OP_CLOSE:
            code, reason = _parse_close(payload)
            if not self._close_sent:
                self._close_sent = True
                echo = b"" if code == CLOSE_NO_STATUS else _U16.pack(code)
                self._pending_controls.append(build_frame(OP_CLOSE, echo, client=self._client))
            self._set_closed(code, reason)

    async def _send_controls(self) -> None:
        frames, self._pending_controls = self._pending_controls, []
        try:
            await self.channel.send_all(b"".join(frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._set_closed(CLOSE_ABNORMAL, f"connection lost: {exc}")

    async def _fail(self, code: int, reason: str) -> None:
        """Close with ``code`` after a violation by the peer."""
        self._set_closed(code, reason)
        await self._send_close(code, reason)

    def _set_closed(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = WebSocketClosed(code, reason)
            self._closed_event.set()

    # ------------------------------------------------------------------ sending

    async def send_message(self, message: bytes | bytearray | memoryview | str) -> None:
        """Send one message (text if ``message`` is a str); raises :class:`WebSocketClosed`
        once the WebSocket is closing or closed."""
        if self._close_sent or self._closed is not None:
            raise self._closed or WebSocketClosed(CLOSE_NORMAL, "closing")
        payload: bytes | bytearray | memoryview
        if isinstance(message, str):
            opcode, payload = OP_TEXT, message.encode("utf-8")
        else:
            opcode, payload = OP_BINARY, message
        header, body = frame_parts(opcode, payload, client=self._client)
        self._sending = True
        try:
            if len(body) >= SEPARATE_HEADER and isinstance(self.channel, TlsChannel):
                # TLS takes header and body apart: no copy of a large body to join them.
                await self.channel.send_parts(header, body)
            else:
                await self.channel.send_all(header + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._set_closed(CLOSE_ABNORMAL, f"connection lost: {exc}")
            raise self._closed_or_abnormal() from exc
        finally:
            self._sending = False
        if self._pending_controls:  # replies the reader left for us
            await self._send_controls()

    @property
    def can_send_now(self) -> bool:
        """Whether :meth:`send_message_now` would take a message: open, no send in progress,
        no control replies waiting, and a :class:`TlsChannel` that can write at once."""
        return (
            not self._sending
            and not self._pending_controls
            and not self._close_sent
            and self._closed is None
            and isinstance(self.channel, TlsChannel)
            and self.channel.can_send_now
        )

    @property
    def send_pending(self) -> bool:
        """Part of a :meth:`send_message_now` waits for :meth:`flush`."""
        return isinstance(self.channel, TlsChannel) and self.channel.send_pending

    def send_message_now(self, message: bytes | bytearray | memoryview) -> None:
        """Send one binary message without a scheduler pass (only when :attr:`can_send_now`);
        what the socket does not take at once waits for :meth:`flush`. Raises
        :class:`WebSocketClosed` if the connection broke."""
        assert isinstance(self.channel, TlsChannel)
        assert self.can_send_now
        header, body = frame_parts(OP_BINARY, message, client=self._client)
        try:
            if len(body) >= SEPARATE_HEADER:
                self.channel.send_parts_now(header, body)
            else:  # one TLS record for a small message
                self.channel.send_parts_now(header + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._set_closed(CLOSE_ABNORMAL, f"connection lost: {exc}")
            raise self._closed_or_abnormal() from exc

    async def flush(self) -> None:
        """Send what :meth:`send_message_now` left, then control replies the reader left."""
        if isinstance(self.channel, TlsChannel) and self.channel.send_pending:
            self._sending = True
            try:
                await self.channel.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._set_closed(CLOSE_ABNORMAL, f"connection lost: {exc}")
                raise self._closed_or_abnormal() from exc
            finally:
                self._sending = False
        else:
            await trio.lowlevel.checkpoint()
        if self._pending_controls:
            await self._send_controls()

    async def _send_close(self, code: int, reason: str) -> None:
        if self._close_sent:
            return
        self._close_sent = True
        payload = _U16.pack(code) + reason.encode("utf-8")[:123]
        try:
            await self.channel.send_all(build_frame(OP_CLOSE, payload, client=self._client))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._set_closed(CLOSE_ABNORMAL, "connection lost while closing")

    # ------------------------------------------------------------------ closing

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str | None = None) -> None:
        """Close handshake (send close, wait up to :data:`CLOSE_TIMEOUT` for the peer's,
        discarding data that arrives first), then the connection, always."""
        try:
            if self._pending_controls and not self._sending:  # e.g. a close echo left over
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._send_controls()
            if not self._close_sent:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._send_close(code, reason or "")
            if self._closed is None and self._receiving:
                # Another task reads (the tunnel's reader): it sees the peer's close.
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._closed_event.wait()
            if self._closed is None:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    while self._closed is None:
                        try:
                            await self.get_message()
                        except WebSocketClosed:
                            break
            self._set_closed(code, reason or "")
        finally:
            if not self._channel_closed:
                self._channel_closed = True
                if self._on_close is not None:
                    self._on_close()
                await trio.aclose_forcefully(self.channel)


def _parse_close(payload: bytes | bytearray) -> tuple[int, str]:
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise _Violation(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
    (code,) = _U16.unpack_from(payload)
    if code not in _VALID_CLOSE_CODES and not 3000 <= code <= 4999:
        raise _Violation(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Violation(CLOSE_INVALID_DATA, "close reason is not UTF-8") from exc
    return code, reason
