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
"""

from __future__ import annotations

import contextlib
import ssl

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
        self._eof = False
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
        """:meth:`receive_some`, appending to ``buffer`` (the WebSocket link's: one copy of
        every byte less); returns how many bytes it appended, 0 at the end."""
        awaited = False
        while True:
            added = self._decrypt_into(buffer, max_bytes)
            if added is not None:
                if not awaited:  # every call is a checkpoint, also when served from memory
                    await trio.lowlevel.checkpoint()
                return added
            if self._outgoing.pending and not self._send_lock.locked():
                await self._flush()  # e.g. a key update answer (see the module's docstring)
            await self._read_socket()
            awaited = True

    def _decrypt_into(self, buffer: bytearray, limit: int) -> int | None:
        """Append what the SSL object can decrypt now; None if it needs more (0: the end)."""
        size = 0
        while size < limit:
            try:
                part = self._ssl.read(limit - size)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or the socket ended without it: the end either way.
                self._eof = True
                break
            except ssl.SSLError as exc:
                if size:  # hand over what came before the error; the next call raises it
                    break
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            if not part:
                self._eof = True
                break
            buffer += part
            size += len(part)
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

    async def wait_send_all_might_not_block(self) -> None:
        """Pass through to the socket."""
        await self.transport.wait_send_all_might_not_block()

    async def _flush(self) -> None:
        """Send every byte of ciphertext the SSL object produced, in order."""
        if not self._outgoing.pending:
            return
        async with self._send_lock:
            while self._outgoing.pending:
                if self._broken:
                    raise trio.BrokenResourceError("TLS channel broke during an earlier send")
                try:
                    await self.transport.send_all(self._outgoing.read())
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
            if self._outgoing.pending and not self._send_lock.locked() and not self._broken:
                with trio.move_on_after(0.5):
                    await self._flush_quietly()
        finally:
            await self.transport.aclose()
