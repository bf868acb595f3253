"""Events the mux hands to its caller after receiving bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._errors import ResetCode


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of all mux events."""


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """The peer's handshake; ``info`` is its HELLO document, settings already applied."""

    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream; accept it with ``Mux.accept_stream`` or reset it."""

    stream_id: int
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamAccepted(Event):
    """The peer accepted a stream we opened."""

    stream_id: int
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Bytes for a stream; hand ``Mux.acknowledge`` the count once the application consumed them.

    ``data`` is a view into the message given to ``Mux.receive_data`` (no copy): copy it
    (``bytes(data)``) to keep it beyond handling the event."""

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed its direction of the stream (FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The stream is gone: reset by the peer (``remote``) or by the mux itself."""

    stream_id: int
    code: ResetCode
    reason: str
    remote: bool = True


@dataclass(frozen=True, slots=True)
class WindowUpdated(Event):
    """The peer granted more credit: blocked senders on this stream may go on."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    """The peer pinged us (the mux already queued the PONG)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """An answer to one of our pings."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer opens no new streams and accepts none above ``last_stream_id``."""

    last_stream_id: int
    code: ResetCode
    reason: str


@dataclass(frozen=True, slots=True)
class ControlReceived(Event):
    """A CONTROL document (configuration or trust synchronisation)."""

    payload: dict[str, Any]
