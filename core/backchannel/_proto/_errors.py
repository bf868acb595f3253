"""Reset codes (the user-visible error vocabulary) and the protocol error."""

from __future__ import annotations

import enum


class ResetCode(enum.IntEnum):
    """Why a stream was reset or a tunnel went away; carried on the wire in RESET and GO_AWAY."""

    NO_ERROR = 0
    CANCELLED = 1
    ACCESS_DENIED = 2
    NOT_CONNECTED = 3
    BACKEND_UNREACHABLE = 4
    BACKEND_TIMEOUT = 5
    PROTOCOL_ERROR = 6
    REFUSED = 7
    UNAUTHENTICATED = 8
    INTERNAL = 9
    UNSUPPORTED_PROTOCOL = 10
    FLOW_CONTROL_ERROR = 11

    @classmethod
    def from_wire(cls, value: int) -> ResetCode:
        """Map a wire value to a code; unknown values (from a newer peer) become INTERNAL."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL


class ProtocolError(Exception):
    """The peer broke the wire protocol; the tunnel must be closed with ``code``."""

    def __init__(self, message: str, code: ResetCode = ResetCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code
