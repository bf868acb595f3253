"""The exception tree: every error backchannel raises on purpose derives from BackchannelError."""

from __future__ import annotations

from ._proto._errors import ResetCode


class BackchannelError(Exception):
    """Root of backchannel's own exceptions."""


class ConfigError(BackchannelError):
    """A configuration file is invalid; the message names file, key and problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


class StreamError(BackchannelError):
    """A stream was refused or reset: ``code`` is the wire reset code, ``reason`` the text."""

    def __init__(self, code: ResetCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}" if reason else code.name)
        self.code = code
        self.reason = reason


class NotConnectedError(StreamError):
    """No live connector tunnel for the subaccount and location."""

    def __init__(self, subaccount: str, location: str) -> None:
        where = f"location id {location!r}" if location else "the default location"
        super().__init__(
            ResetCode.NOT_CONNECTED,
            f"no connector of subaccount {subaccount!r} is connected for {where}",
        )
        self.subaccount = subaccount
        self.location = location


class AuthenticationError(BackchannelError):
    """Credentials were missing or wrong (the message never repeats the secret)."""


class TunnelError(BackchannelError):
    """The tunnel could not be set up or was lost; the message says why and what to check."""

    def __init__(self, message: str, code: ResetCode = ResetCode.INTERNAL) -> None:
        super().__init__(message)
        self.code = code
