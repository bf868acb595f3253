"""atheris target: the SOCKS5 handshake parser, driven as the front door drives it."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from backchannel_tcp._socks5 import (
        AuthMethod,
        ConnectRequest,
        Greeting,
        SapToken,
        Socks5ServerConnection,
        SocksError,
        State,
        UsernamePassword,
    )

METHODS = (AuthMethod.USERNAME_PASSWORD, AuthMethod.SAP_TOKEN, AuthMethod.NO_AUTH)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    control, rest = data[0], data[1:]
    conn = Socks5ServerConnection(METHODS[: 1 + control % 3], max_token_length=1 + control * 64)
    step = (control >> 2) or 1
    try:
        for start in range(0, len(rest), step):
            if conn.state in (State.REPLY_PENDING, State.DONE, State.CLOSED):
                return
            events = conn.receive_data(rest[start : start + step])
            while events:
                (event,) = events
                if isinstance(event, Greeting):
                    conn.choose_method(conn.preferred_method())
                elif isinstance(event, UsernamePassword | SapToken):
                    conn.auth_reply(True)
                else:
                    assert isinstance(event, ConnectRequest)
                    return
                events = conn.pending_events()
    except SocksError:
        return


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
