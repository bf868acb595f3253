"""TLS over a trio socket, driven directly: ``ssl.SSLObject`` and two memory BIOs.

trio's ``SSLStream`` does the same job for any transport stream, with a general retry loop,
conflict detection and one TLS record per ``receive_some``; the tunnel moves every byte through
it, and the bench's profile put that layer (with the WebSocket library above it) at about half
of each side's CPU per MB (docs/performance.md). :class:`TlsChannel` is the tunnel's own: the
TLS handshake, ``receive_some`` that returns every record the socket read made decryptable (up
to ``max_bytes``), ``send_all`` that encrypts in one call and writes the ciphertext with one
socket send, and a best-effort ``close_notify`` on close. It is a ``trio.abc.Stream``, so
trio-websocket runs the WebSocket upgrade over it unchanged.

Errors look like trio's: a failed handshake or a broken connection raises
``trio.BrokenResourceError`` whose ``__cause__`` is the ``ssl.SSLError`` or ``OSError``. An EOF
without ``close_notify`` ends the stream like one with it (trio's ``https_compatible=True``):
the WebSocket close handshake above says whether the end was orderly.

One task receives at a time and one sends at a time (the tunnel's reader and writer).
Ciphertext leaves in the order the ``SSLObject`` produced it: only the holder of the send lock
takes it from the outgoing BIO, and it sends everything there before letting go. A receive
that produced something to send (a TLS 1.3 key update answer) sends it only if nobody holds
the lock (the holder sends it otherwise): a reader must never wait for a writer that waits for
the peer, who may be waiting for us to read. A send cut short (cancelled, or the socket broke)
leaves half a record on the wire; the channel is then broken, as trio's is.

:meth:`TlsChannel.send_parts_now` sends without a scheduler pass when no send is in progress:
it encrypts and writes to the socket at once, and keeps what the socket did not take for the
next :meth:`~TlsChannel.flush` (or send), which sends it first. The tunnel uses it so that a
stream's data leaves while the task that wrote it still runs, instead of after every other
runnable task (docs/performance.md, "Eager sends").
"""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
from collections.abc import Callable
from functools import partial
from typing import cast

import trio

#: One socket read. The tunnel's messages are up to 1 MiB; 256 KiB reads keep the number of
#: scheduler passes per MB low without holding much memory per tunnel.
SOCKET_READ = 256 * 1024


class TlsChannel(trio.abc.Stream):
    """A TLS connection over ``transport`` (client or server side, after :meth:`do_handshake`)."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._send_lock = trio.StrictFIFOLock()
        #: Ciphertext :meth:`send_parts_now` took from the SSL object that the socket did not
        #: take yet; it leaves before anything else.
        self._unsent: memoryview | None = None
        #: The socket's descriptor for :meth:`send_parts_now` (a plain trio socket on POSIX).
        self._fd: int | None = None
        if isinstance(transport, trio.SocketStream) and sys.platform != "win32":
            self._fd = transport.socket.fileno()
        self._eof = False
        #: A TLS error met after plaintext that went out first: raised by the next decrypt.
        self._error: ssl.SSLError | None = None
        self._closed = False
        self._broken = False

    # ------------------------------------------------------------------ handshake / info

    async def do_handshake(self) -> None:
        """Run the TLS handshake; raises trio.BrokenResourceError (cause: the SSL error)."""
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._read_socket()
                continue
            except ssl.SSLError as exc:
                await self._flush_quietly()  # the alert tells the peer why
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            await self._flush()
            return

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER) if it presented one that the context verified."""
        return self._ssl.getpeercert(binary_form=True)

    # ------------------------------------------------------------------ receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """At least one byte of plaintext (or b"" at the end), and every byte that is already
        decryptable, up to ``max_bytes`` (default :data:`SOCKET_READ`)."""
        buffer = bytearray()
        await self.receive_into(buffer, max_bytes or SOCKET_READ)
        return buffer

    async def receive_into(self, buffer: bytearray, max_bytes: int = SOCKET_READ) -> int:
        """:meth:`receive_some`, appending to ``buffer``; returns how many bytes it appended,
        0 at the end."""
        return await self.receive_with(partial(self.decrypt, buffer, max_bytes))

    async def receive_with(self, step: Callable[[], int | None]) -> int:
        """Call ``step`` (which decrypts with :meth:`decrypt`, wherever it likes) until it
        returns a count, reading the socket whenever it returns None; returns that count (0:
        the end). A checkpoint, also when served from memory; a cancelled call takes nothing
        (the step runs only once the call can no longer be cancelled, or after a socket read).
        The WebSocket link decrypts a frame's header into its read buffer and a large payload
        into a buffer of its own."""
        await trio.lowlevel.checkpoint_if_cancelled()
        awaited = False
        while True:
            added = step()
            if added is not None:
                if not awaited:  # every call is a checkpoint, also when served from memory
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return added
            if self._outgoing.pending and self._unsent is None and not self._send_lock.locked():
                # E.g. a key update answer (see the module's docstring); behind the rest of an
                # eager send it waits for the writer's flush (which sends both, in order).
                await self._flush()
            await self._read_socket()
            awaited = True

    def decrypt(self, target: bytearray | memoryview, limit: int) -> int | None:
        """Decrypt what is decryptable now, up to ``limit`` bytes (at least 1), without I/O:
        appended to a bytearray, or written into a (non-empty) memoryview from its start, at
        most its length. The count; None if nothing is decryptable before more is read (0: the
        end). A TLS error raises trio.BrokenResourceError; after plaintext that came before it
        in the same call, at the next call."""
        if isinstance(target, memoryview):
            limit = min(limit, len(target))
        if limit < 1:
            raise ValueError("decrypt needs room for at least one byte")
        if self._error is not None:
            raise trio.BrokenResourceError(f"TLS error: {self._error}") from self._error
        size = 0
        while size < limit:
            try:
                if isinstance(target, memoryview):
                    # typeshed says bytes; with a buffer the SSL object returns the count.
                    count = cast("int", self._ssl.read(limit - size, target[size:]))
                else:
                    part = self._ssl.read(limit - size)
                    target += part
                    count = len(part)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or the socket ended without it: the end either way.
                self._eof = True
                break
            except ssl.SSLError as exc:
                self._error = exc
                if size:  # hand over what came before the error; the next call raises it
                    break
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            if not count:
                self._eof = True
                break
            size += count
        if size:
            return size
        return 0 if self._eof else None

    async def _read_socket(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS channel is closed")
        try:
            data = await self.transport.receive_some(SOCKET_READ)
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection broken: {exc}") from exc
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    # ------------------------------------------------------------------ sending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it; returns when the socket took all of it."""
        await self.send_parts(data)

    async def send_parts(self, *parts: bytes | bytearray | memoryview) -> None:
        """Encrypt ``parts`` one after the other, then send (no copy to join them first)."""
        if self._closed:
            raise trio.ClosedResourceError("TLS channel is closed")
        if self._broken:
            raise trio.BrokenResourceError("TLS channel broke during an earlier send")
        try:
            for part in parts:
                self._ssl.write(part)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        await self._flush()

    @property
    def can_send_now(self) -> bool:
        """Whether :meth:`send_parts_now` would take data: no send in progress, nothing
        unsent, a socket to write to, the channel usable."""
        return (
            self._fd is not None
            and self._unsent is None
            and not self._send_lock.locked()
            and not self._outgoing.pending
            and not self._closed
            and not self._broken
        )

    @property
    def send_pending(self) -> bool:
        """Ciphertext waits for :meth:`flush` (the socket did not take all of a
        :meth:`send_parts_now`)."""
        return self._unsent is not None or self._outgoing.pending > 0

    def send_parts_now(self, *parts: bytes | bytearray | memoryview) -> None:
        """Encrypt ``parts`` and write the ciphertext to the socket without waiting; what the
        socket does not take now stays for :meth:`flush`. Only when :attr:`can_send_now`.
        Raises trio.BrokenResourceError if the connection is broken (the channel is then)."""
        assert self.can_send_now, "send_parts_now while it cannot"
        assert self._fd is not None
        try:
            for part in parts:
                self._ssl.write(part)
        except ssl.SSLError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        ciphertext = self._outgoing.read()
        try:
            sent = os.write(self._fd, ciphertext)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"connection broken: {exc}") from exc
        if sent < len(ciphertext):
            self._unsent = memoryview(ciphertext)[sent:]

    async def flush(self) -> None:
        """Send what :meth:`send_parts_now` left (nothing: a checkpoint)."""
        if not self.send_pending:
            await trio.lowlevel.checkpoint()
            return
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        """Pass through to the socket."""
        await self.transport.wait_send_all_might_not_block()

    async def _flush(self) -> None:
        """Send every byte of ciphertext the SSL object produced, in order (first what
        :meth:`send_parts_now` left)."""
        if not self._outgoing.pending and self._unsent is None:
            return
        async with self._send_lock:
            while self._unsent is not None or self._outgoing.pending:
                if self._broken:
                    raise trio.BrokenResourceError("TLS channel broke during an earlier send")
                chunk: bytes | memoryview
                if self._unsent is not None:
                    chunk, self._unsent = self._unsent, None
                else:
                    chunk = self._outgoing.read()
                try:
                    await self.transport.send_all(chunk)
                except BaseException as exc:
                    self._broken = True  # part of a record may be on the wire
                    if isinstance(exc, OSError):
                        raise trio.BrokenResourceError(f"connection broken: {exc}") from exc
                    raise

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush()

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it at once (never wait for the peer), then
        close the socket."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            # SSLWantReadError: close_notify is queued; other errors: nothing left to say.
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()
            if self.send_pending and not self._send_lock.locked() and not self._broken:
                with trio.move_on_after(0.5):
                    await self._flush_quietly()
        finally:
            await self.transport.aclose()
