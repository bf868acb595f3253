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
    label: object,
    other_broke: tuple[ResetCode, str] = BACKEND_BROKE,
    idle_timeout: float = 0.0,
) -> None:
    """Pump until both directions ended; a failure on one side aborts the other side.
    ``label`` names the connection in log lines (formatted with ``str`` only then).

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

            def moved() -> None:
                """Something moved: not idle for another ``idle_timeout`` seconds."""
                idle.deadline = trio.current_time() + idle_timeout

            moved()
            broken = await splice_streams(
                tunnel, other, a_name="tunnel", b_name="other", moved=moved
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
