"""atheris target: the mux receive path (frame decoder included), after the handshake.

The first input byte picks the side (connector or gateway) and how the rest is split into
``receive_data`` calls; see fuzz/README.md.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from backchannel._proto._errors import ProtocolError
    from backchannel._proto._events import DataReceived, StreamOpened
    from backchannel._proto._mux import Mux, MuxSettings

SETTINGS = MuxSettings(initial_window=4096, max_frame_size=16 * 1024, max_concurrent_streams=4)


def handshaken(initiator: bool) -> Mux:
    mux = Mux(initiator=initiator, settings=SETTINGS)
    peer = Mux(initiator=not initiator, settings=SETTINGS)
    first, second = (mux, peer) if initiator else (peer, mux)
    first.send_hello({"role": "connector"})
    second.receive_data(first.data_to_send())
    second.send_hello({"role": "gateway"})
    first.receive_data(second.data_to_send())
    mux.data_to_send()
    return mux


def test_one_input(data: bytes) -> None:
    if not data:
        return
    control, rest = data[0], data[1:]
    mux = handshaken(initiator=bool(control & 1))
    step = (control >> 1) or len(rest) or 1
    try:
        for start in range(0, len(rest), step):
            for event in mux.receive_data(rest[start : start + step]):
                if isinstance(event, StreamOpened) and mux.is_open(event.stream_id):
                    mux.accept_stream(event.stream_id)
                elif isinstance(event, DataReceived) and mux.is_open(event.stream_id):
                    mux.acknowledge(event.stream_id, len(event.data))
            mux.data_to_send()
    except ProtocolError:
        return


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
