"""Copy bytes both ways between a tunnel stream and a backend, with back-pressure and half-close."""

from __future__ import annotations

import logging

import trio

from backchannel import ResetCode, TunnelStream

log = logging.getLogger("backchannel.tcp")

#: Large reads keep the per-byte Python overhead low on bulk transfers; the mux cuts frames.
CHUNK = 256 * 1024


class _Failure(Exception):
    def __init__(self, side: str, exc: BaseException) -> None:
        super().__init__(f"{side}: {exc}")
        self.side = side


#: How the tunnel stream is reset when the other side's connection breaks, per side.
BACKEND_BROKE = (ResetCode.BACKEND_UNREACHABLE, "the backend connection broke")
CLIENT_BROKE = (ResetCode.CANCELLED, "the client connection broke")


async def splice(
    tunnel: TunnelStream,
    other: trio.abc.Stream,
    *,
    label: str,
    other_broke: tuple[ResetCode, str] = BACKEND_BROKE,
) -> None:
    """Pump until both directions ended; a failure on one side aborts the other side.

    Each direction forwards EOF as a half-close where the destination supports it (TLS
    streams cannot half-close: their direction then stays open until the other ends).
    """
    failures: list[_Failure] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _pump, tunnel, other, "tunnel", "backend", failures, nursery.cancel_scope
            )
            nursery.start_soon(
                _pump, other, tunnel, "backend", "tunnel", failures, nursery.cancel_scope
            )
    finally:
        # Also on cancellation (tunnel lost, shutdown): the other socket must not leak.
        if failures:
            log.debug("splice %s ended by %s", label, failures[0])
            if failures[0].side == "backend":
                tunnel.reset_nowait(*other_broke)
        await trio.aclose_forcefully(other)


async def _pump(
    source: trio.abc.ReceiveStream,
    destination: trio.abc.SendStream,
    source_name: str,
    destination_name: str,
    failures: list[_Failure],
    scope: trio.CancelScope,
) -> None:
    side = source_name
    try:
        while True:
            side = source_name
            data = await source.receive_some(CHUNK)
            if not data:
                break
            side = destination_name
            await destination.send_all(data)
        side = destination_name
        if isinstance(destination, trio.abc.HalfCloseableStream):
            await destination.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        failures.append(_Failure(side, exc))
        scope.cancel()
