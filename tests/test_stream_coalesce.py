"""receive_some hands over every buffered frame that fits, in order, and never more than asked."""

from __future__ import annotations

import trio
import trio.testing

from backchannel._proto._mux import MuxSettings
from backchannel._tunnel import TunnelSettings
from tests.tunnel_pair import tunnel_pair

FRAME = 16 * 1024
SETTINGS = TunnelSettings(mux=MuxSettings(data_chunk_size=FRAME))


async def test_buffered_frames_come_out_together_and_in_order() -> None:
    payload = bytes(range(256)) * (10 * FRAME // 256)  # ten DATA frames
    with trio.fail_after(10):
        async with tunnel_pair(SETTINGS, SETTINGS) as pair:
            opener, acceptor = await pair.open_pair()
            await opener.send_all(payload)
            while acceptor.buffered < len(payload):
                await trio.testing.wait_all_tasks_blocked()
            first = await acceptor.receive_some(4 * FRAME + 100)
            assert first == payload[: 4 * FRAME]  # four whole frames, not a cut fifth
            second = await acceptor.receive_some(FRAME // 2)
            assert second == payload[4 * FRAME : 4 * FRAME + FRAME // 2]
            rest = await acceptor.receive_some(len(payload))
            assert rest == payload[4 * FRAME + FRAME // 2 :]
            assert acceptor.buffered == 0
            await opener.aclose()
            await acceptor.aclose()
