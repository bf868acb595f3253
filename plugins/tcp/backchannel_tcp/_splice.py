"""Copy bytes both ways between a tunnel stream and a backend, with back-pressure and half-close."""

from __future__ import annotations

import logging

import trio

from backchannel import ResetCode, TunnelStream, splice_streams

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
) -> None:
    """Pump until both directions ended; a failure on one side aborts the other side.

    Each direction forwards EOF as a half-close where the destination supports it (TLS
    streams cannot half-close: their direction then stays open until the other ends).
    """
    broken: str | None = None
    try:
        broken = await splice_streams(tunnel, other, a_name="tunnel", b_name="other")
    finally:
        # Also on cancellation (tunnel lost, shutdown): the other socket must not leak.
        if broken is not None:
            log.debug("splice %s ended: the %s side broke", label, broken)
            if broken == "other":
                tunnel.reset_nowait(*other_broke)
        await trio.aclose_forcefully(other)
