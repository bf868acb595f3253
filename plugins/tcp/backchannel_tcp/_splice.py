"""Copy bytes both ways between a tunnel stream and a backend, with back-pressure and half-close."""

from __future__ import annotations

import logging

import trio

from backchannel import ResetCode, TunnelStream, close_forcefully, splice_streams

log = logging.getLogger("backchannel.tcp")

#: How the tunnel stream is reset when the other side's connection breaks, per side.
BACKEND_BROKE = (ResetCode.BACKEND_UNREACHABLE, "the backend connection broke")
CLIENT_BROKE = (ResetCode.CANCELLED, "the client connection broke")


async def splice(
    tunnel: TunnelStream,
    other: trio.abc.Stream,
    *,
    label: str,
    other_broke: tuple[ResetCode, str] = BACKEND_BROKE,
    idle_timeout: float = 0.0,
) -> None:
    """Pump until both directions ended; a failure on one side aborts the other side.

    Each direction forwards EOF as a half-close where the destination supports it (TLS
    streams cannot half-close: their direction then stays open until the other ends). With
    ``idle_timeout`` (seconds, 0 = none), a connection on which no byte moved either way for
    that long is closed, and the tunnel stream reset with CANCELLED saying so.
    """
    broken: str | None = None
    try:
        if idle_timeout <= 0:
            broken = await splice_streams(tunnel, other, a_name="tunnel", b_name="other")
            return
        with trio.CancelScope() as idle:
            watched_tunnel = _Watched(tunnel, idle, idle_timeout)
            watched_other = _Watched(other, idle, idle_timeout)
            watched_tunnel.moved()
            broken = await splice_streams(
                watched_tunnel, watched_other, a_name="tunnel", b_name="other"
            )
        if idle.cancelled_caught:
            log.info("%s: nothing moved for %g s (idle_timeout): closed", label, idle_timeout)
            tunnel.reset_nowait(
                ResetCode.CANCELLED, f"idle for {idle_timeout:g} s ([plugins.tcp] idle_timeout)"
            )
    finally:
        # Also on cancellation (tunnel lost, shutdown): the other socket must not leak.
        if broken is not None:
            log.debug("splice %s ended: the %s side broke", label, broken)
            if broken == "other":
                tunnel.reset_nowait(*other_broke)
        await close_forcefully(other)


#: How much of a chunk goes out between two "something moved" marks.
_SLICE = 16 * 1024


class _Watched(trio.abc.HalfCloseableStream):
    """A stream that pushes an idle deadline back whenever a byte moves through it."""

    def __init__(self, stream: trio.abc.Stream, idle: trio.CancelScope, timeout: float) -> None:
        self._stream = stream
        self._idle = idle
        self._timeout = timeout

    def moved(self) -> None:
        """Something moved: the connection is not idle for another ``timeout`` seconds."""
        self._idle.deadline = trio.current_time() + self._timeout

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        self.moved()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # In slices, so that a slow but steady reader keeps the connection alive (one splice
        # chunk of 256 KiB could take longer than the idle timeout to go out).
        view = memoryview(data)
        for start in range(0, len(view), _SLICE):
            await self._stream.send_all(view[start : start + _SLICE])
            self.moved()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        # Only half-closeable streams get an EOF (TLS cannot send one: nothing to do).
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()
