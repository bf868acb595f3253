"""atheris target: the HTTP proxy's request parsing layer (HeadScanner, then h11), as
``ClientConnection._read_head`` uses it: the scanner must refuse or pass a head, and a head it
passes must parse in h11 to a request or a clean protocol error."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import h11

    from backchannel_http._relay import BadHead, HeadScanner, HttpLimits

LIMITS = HttpLimits(max_request_line=512, max_header_bytes=4096, max_headers=20)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    step = data[0] or 1
    rest = data[1:]
    scanner = HeadScanner(LIMITS)
    length = None
    try:
        for start in range(0, len(rest), step):
            length = scanner.feed(rest[start : start + step])
            if length is not None:
                break
    except BadHead:
        return
    if length is None:
        return
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=512 + 4096)
    conn.receive_data(rest)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return
    assert isinstance(event, h11.Request), f"scanner passed a head h11 reads as {event!r}"


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
