"""Everything that decides whether a stream frame is legal now lives here.

A stream is opened by one side (the *opener*) and accepted or reset by the other (the
*acceptor*). Each direction closes on its own with FIN; RESET ends both at once. The opener may
send DATA and FIN before the ACCEPT arrives (no round trip before the first request bytes); the
acceptor may send nothing but ACCEPT or RESET until it has accepted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._errors import ProtocolError


class Action(enum.Enum):
    """What happens to a stream: frames sent or received by this side."""

    # Members are singletons: hash them by identity, in C (Enum's own hash runs Python code,
    # and apply() hashes three members per frame).
    __hash__ = object.__hash__

    SEND_ACCEPT = enum.auto()
    RECV_ACCEPT = enum.auto()
    SEND_DATA = enum.auto()
    RECV_DATA = enum.auto()
    SEND_FIN = enum.auto()
    RECV_FIN = enum.auto()


class Role(enum.Enum):
    """This side's part in one stream."""

    # Members are singletons: hash them by identity, in C (Enum's own hash runs Python code,
    # and apply() hashes three members per frame).
    __hash__ = object.__hash__

    OPENER = enum.auto()
    ACCEPTOR = enum.auto()


class Phase(enum.Enum):
    """Whether the acceptor has said yes yet."""

    # Members are singletons: hash them by identity, in C (Enum's own hash runs Python code,
    # and apply() hashes three members per frame).
    __hash__ = object.__hash__

    PENDING = enum.auto()
    ACCEPTED = enum.auto()


# (role, phase, action) -> phase after the action. A missing key means the action is illegal.
_TRANSITIONS: dict[tuple[Role, Phase, Action], Phase] = {
    (Role.OPENER, Phase.PENDING, Action.RECV_ACCEPT): Phase.ACCEPTED,
    (Role.OPENER, Phase.PENDING, Action.SEND_DATA): Phase.PENDING,
    (Role.OPENER, Phase.PENDING, Action.SEND_FIN): Phase.PENDING,
    (Role.OPENER, Phase.ACCEPTED, Action.SEND_DATA): Phase.ACCEPTED,
    (Role.OPENER, Phase.ACCEPTED, Action.SEND_FIN): Phase.ACCEPTED,
    (Role.OPENER, Phase.ACCEPTED, Action.RECV_DATA): Phase.ACCEPTED,
    (Role.OPENER, Phase.ACCEPTED, Action.RECV_FIN): Phase.ACCEPTED,
    (Role.ACCEPTOR, Phase.PENDING, Action.SEND_ACCEPT): Phase.ACCEPTED,
    (Role.ACCEPTOR, Phase.PENDING, Action.RECV_DATA): Phase.PENDING,
    (Role.ACCEPTOR, Phase.PENDING, Action.RECV_FIN): Phase.PENDING,
    (Role.ACCEPTOR, Phase.ACCEPTED, Action.SEND_DATA): Phase.ACCEPTED,
    (Role.ACCEPTOR, Phase.ACCEPTED, Action.SEND_FIN): Phase.ACCEPTED,
    (Role.ACCEPTOR, Phase.ACCEPTED, Action.RECV_DATA): Phase.ACCEPTED,
    (Role.ACCEPTOR, Phase.ACCEPTED, Action.RECV_FIN): Phase.ACCEPTED,
}

_SENDING = frozenset({Action.SEND_DATA, Action.SEND_FIN})
_RECEIVING = frozenset({Action.RECV_DATA, Action.RECV_FIN})


class StreamStateError(ProtocolError):
    """An action that the stream's state forbids (raised for local misuse as well)."""


@dataclass(slots=True)
class StreamState:
    """The lifecycle and credit of one stream."""

    stream_id: int
    role: Role
    send_window: int
    receive_window: int
    phase: Phase = Phase.PENDING
    local_open: bool = True
    remote_open: bool = True
    unacknowledged: int = 0
    #: The credit this side grants the peer in all (receive_window + unread + unacknowledged):
    #: the initial window, grown while the application reads fast (Mux.acknowledge).
    window_size: int = 0
    #: When credit was last returned (or the stream was created), by the mux's clock.
    credited_at: float = 0.0

    def apply(self, action: Action) -> None:
        """Check that ``action`` is legal now and move to the next state."""
        next_phase = _TRANSITIONS.get((self.role, self.phase, action))
        if next_phase is None:
            raise StreamStateError(
                f"stream {self.stream_id}: {action.name} not allowed for the "
                f"{self.role.name.lower()} while {self.phase.name.lower()}"
            )
        if action in _SENDING and not self.local_open:
            raise StreamStateError(f"stream {self.stream_id}: {action.name} after FIN was sent")
        if action in _RECEIVING and not self.remote_open:
            raise StreamStateError(f"stream {self.stream_id}: {action.name} after FIN was received")
        self.phase = next_phase
        if action is Action.SEND_FIN:
            self.local_open = False
        elif action is Action.RECV_FIN:
            self.remote_open = False

    @property
    def finished(self) -> bool:
        """Both directions ended cleanly: the stream can be forgotten."""
        return self.phase is Phase.ACCEPTED and not self.local_open and not self.remote_open
