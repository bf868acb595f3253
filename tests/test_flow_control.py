"""Credit flow control: a stalled reader holds back only its own stream, with bounded memory."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from backchannel._proto._mux import MuxSettings
from backchannel._stream import TunnelStream
from backchannel._tunnel import TunnelSettings
from tests.harness import echo_server, receive_exactly, running_pair, socks_connect
from tests.tunnel_pair import tunnel_pair

WINDOW = 64 * 1024
CHUNK = 16 * 1024
#: A fixed window (no growth): the bound the tests check is WINDOW itself.
SETTINGS = TunnelSettings(mux=MuxSettings(initial_window=WINDOW, max_window=WINDOW))


def seeded_chunks(seed: int, total: int, size: int = CHUNK) -> Iterator[bytes]:
    """``total`` reproducible pseudo-random bytes in pieces of ``size``."""
    generator = random.Random(seed)
    for start in range(0, total, size):
        yield generator.randbytes(min(size, total - start))


class Sender:
    """Sends seeded data chunk by chunk, then EOF; counts what ``send_all`` has taken."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, seed: int, total: int) -> None:
        self.stream = stream
        self.seed = seed
        self.total = total
        self.progress = 0
        self.finished = trio.Event()
        self.digest = hashlib.sha256()

    async def run(self) -> None:
        for chunk in seeded_chunks(self.seed, self.total):
            await self.stream.send_all(chunk)
            self.progress += len(chunk)
            self.digest.update(chunk)
        await self.stream.send_eof()
        self.finished.set()


async def drain(stream: trio.abc.ReceiveStream) -> tuple[int, str]:
    """Read to EOF; return the byte count and sha256."""
    digest = hashlib.sha256()
    count = 0
    while data := await stream.receive_some(256 * 1024):
        digest.update(data)
        count += len(data)
    return count, digest.hexdigest()


async def check_transfer(sender: TunnelStream, receiver: TunnelStream, seed: int) -> None:
    """Move 512 KiB from ``sender`` to ``receiver`` and check it arrived intact."""
    total = 512 * 1024
    source = Sender(sender, seed, total)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        count, digest = await drain(receiver)
    assert (count, digest) == (total, source.digest.hexdigest())


@pytest.mark.parametrize("direction", ["gateway-to-connector", "connector-to-gateway"])
async def test_stalled_reader_holds_back_only_its_own_stream(direction: str) -> None:
    stalled_total = 16 * WINDOW
    with trio.fail_after(30):
        async with tunnel_pair(SETTINGS, SETTINGS) as pair:
            opener, acceptor = await pair.open_pair()
            sender_end, reader_end = (
                (opener, acceptor) if direction == "gateway-to-connector" else (acceptor, opener)
            )
            stalled = Sender(sender_end, seed=1, total=stalled_total)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stalled.run)

                # Once everything is idle the sender is parked on credit: it spent exactly the
                # window, and the receiving side buffers no more than that.
                await trio.testing.wait_all_tasks_blocked()
                assert not stalled.finished.is_set()
                assert stalled.progress <= WINDOW + CHUNK
                assert reader_end.buffered == WINDOW
                assert pair.gateway.stream_count == pair.connector.stream_count == 1

                # Twenty other streams, both ways, complete while that reader still sleeps.
                others = [await pair.open_pair() for _ in range(20)]
                async with trio.open_nursery() as traffic:
                    for index, (a, b) in enumerate(others):
                        pair_ends = (a, b) if index % 2 else (b, a)
                        traffic.start_soon(check_transfer, *pair_ends, 100 + index)
                for a, b in others:
                    await a.aclose()
                    await b.aclose()

                await trio.testing.wait_all_tasks_blocked()
                assert not stalled.finished.is_set()
                assert stalled.progress <= WINDOW + CHUNK
                assert reader_end.buffered == WINDOW

                # The reader resumes: everything arrives, in order, intact.
                count, digest = await drain(reader_end)
            assert stalled.finished.is_set()
            assert (count, digest) == (stalled_total, stalled.digest.hexdigest())
            await opener.aclose()
            await acceptor.aclose()


async def test_buffered_never_exceeds_window_while_reading_slowly() -> None:
    """A reader taking one small piece at a time never lets the buffer grow past the window."""
    total = 8 * WINDOW
    with trio.fail_after(30):
        async with tunnel_pair(SETTINGS, SETTINGS) as pair:
            opener, acceptor = await pair.open_pair()
            source = Sender(opener, seed=7, total=total)
            digest = hashlib.sha256()
            received = 0
            high_water = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(source.run)
                while data := await acceptor.receive_some(1000):
                    digest.update(data)
                    received += len(data)
                    await trio.testing.wait_all_tasks_blocked()
                    high_water = max(high_water, acceptor.buffered)
                    assert acceptor.buffered <= WINDOW
            assert received == total
            assert digest.hexdigest() == source.digest.hexdigest()
            # The window was actually used (the assertion above is not vacuous).
            assert high_water > WINDOW // 2
            await opener.aclose()
            await acceptor.aclose()


async def test_stalled_socks_client_does_not_stall_other_socks_streams(tmp_path: Path) -> None:
    """End to end: a SOCKS client that stops reading a firehose backend; others go on."""

    async def firehose(stream: trio.SocketStream) -> None:
        chunk = b"z" * 65536
        async with stream:
            try:
                while True:
                    await stream.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async with trio.open_nursery() as servers, echo_server() as echo_port:
        listeners = await servers.start(partial(trio.serve_tcp, firehose, 0, host="127.0.0.1"))
        firehose_port = listeners[0].socket.getsockname()[1]
        mappings = [
            {"virtual": "echo.virtual:7", "internal": f"127.0.0.1:{echo_port}", "protocol": "tcp"},
            {
                "virtual": "hose.virtual:9",
                "internal": f"127.0.0.1:{firehose_port}",
                "protocol": "tcp",
            },
        ]
        tunnel = {"initial_window": 64 * 1024}
        async with running_pair(
            tmp_path,
            mappings,
            gateway_tunnel=tunnel,
            connector_tunnel={**tunnel, "reconnect_min_delay": 0.05},
        ) as pair:
            with trio.fail_after(30):
                stalled = await socks_connect(pair.socks, "hose.virtual", 9)
                async with stalled:
                    # Make sure the firehose is flowing before the reader stalls.
                    assert await receive_exactly(stalled, 1000) == b"z" * 1000

                    async def one(index: int) -> None:
                        payload = random.Random(index).randbytes(200_000)
                        stream = await socks_connect(pair.socks, "echo.virtual", 7)
                        async with stream, trio.open_nursery() as nursery:
                            nursery.start_soon(stream.send_all, payload)
                            assert await receive_exactly(stream, len(payload)) == payload

                    async with trio.open_nursery() as nursery:
                        for index in range(20):
                            nursery.start_soon(one, index)
            servers.cancel_scope.cancel()
