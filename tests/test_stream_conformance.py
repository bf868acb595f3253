"""TunnelStream passes trio's own conformance suite for half-closeable streams."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from backchannel import ResetCode, StreamError
from backchannel._proto._mux import MuxSettings
from backchannel._stream import TunnelStream
from backchannel._tunnel import TunnelSettings
from tests.tunnel_pair import TunnelPair, tunnel_pair

#: Every stream gets one byte of credit, so a single byte clogs it until the peer reads.
TINY = TunnelSettings(mux=MuxSettings(initial_window=1))


async def test_tunnel_stream_is_a_conforming_half_closeable_stream() -> None:
    with trio.fail_after(60):
        async with tunnel_pair() as pair, tunnel_pair(TINY, TINY) as tiny:

            async def stream_maker() -> tuple[TunnelStream, TunnelStream]:
                return await pair.open_pair()

            async def clogged_stream_maker() -> tuple[TunnelStream, TunnelStream]:
                return await _clogged(tiny)

            await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)


async def _clogged(pair: TunnelPair) -> tuple[TunnelStream, TunnelStream]:
    opener, acceptor = await pair.open_pair()
    # Spend the one byte of credit in each direction: the next send waits for the peer to read.
    await opener.send_all(b"x")
    await acceptor.send_all(b"x")
    await _assert_send_blocks(opener)
    await _assert_send_blocks(acceptor)
    return opener, acceptor


async def _assert_send_blocks(stream: TunnelStream) -> None:
    """``stream`` has no credit: a send stays parked once everything else is idle."""
    done = False

    async def send_one() -> None:
        nonlocal done
        await stream.wait_send_all_might_not_block()
        done = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_one)
        await trio.testing.wait_all_tasks_blocked()
        assert not done, "a clogged stream has credit left"
        nursery.cancel_scope.cancel()


async def test_clogged_stream_unclogs_when_the_peer_reads() -> None:
    with trio.fail_after(10):
        async with tunnel_pair(TINY, TINY) as tiny:
            opener, acceptor = await tiny.open_pair()
            async with opener, acceptor:
                await opener.send_all(b"a")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(opener.send_all, b"bc")
                    await trio.testing.wait_all_tasks_blocked()
                    received = b""
                    while len(received) < 3:
                        received += await acceptor.receive_some()
                assert received == b"abc"


async def test_opener_may_send_and_finish_before_the_accept() -> None:
    """No round trip before the first request bytes; a refusal still reaches the opener."""
    with trio.fail_after(10):
        async with tunnel_pair(accept=False) as pair:
            opener, acceptor = await pair.open_pair({"protocol": "test"}, wait_accepted=False)
            await opener.send_all(b"GET /")
            await opener.send_eof()
            assert await receive_all(acceptor) == b"GET /"
            await acceptor.reset(ResetCode.ACCESS_DENIED, "not for you")
            with pytest.raises(StreamError) as info:
                await opener.wait_accepted()
            assert info.value.code is ResetCode.ACCESS_DENIED
            assert info.value.reason == "not for you"
            await opener.aclose()
            await acceptor.aclose()


async def test_reset_reaches_the_peer_with_its_code_and_drops_unfinished_data() -> None:
    with trio.fail_after(10):
        async with tunnel_pair() as pair:
            opener, acceptor = await pair.open_pair()
            async with opener, acceptor:
                await acceptor.send_all(b"partial answer")
                await trio.testing.wait_all_tasks_blocked()
                assert opener.buffered == len(b"partial answer")
                await acceptor.reset(ResetCode.BACKEND_UNREACHABLE, "backend broke")
                await trio.testing.wait_all_tasks_blocked()
                # Without a FIN the buffered bytes are a fragment: they are not handed out.
                assert opener.buffered == 0
                with pytest.raises(trio.BrokenResourceError) as info:
                    await opener.receive_some()
                cause = info.value.__cause__
                assert isinstance(cause, StreamError)
                assert cause.code is ResetCode.BACKEND_UNREACHABLE
                with pytest.raises(trio.BrokenResourceError):
                    await opener.send_all(b"more")
                assert pair.gateway.stream_count == 1  # until the application closes it
            assert pair.gateway.stream_count == pair.connector.stream_count == 0


async def receive_all(stream: TunnelStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


async def test_protocol_error_fails_streams_at_once_with_trio_errors() -> None:
    """While the tunnel flushes its GO_AWAY after a protocol error (here: held up by a peer that
    does not read), its streams already fail with trio's stream errors, not mux internals."""
    with trio.fail_after(10):
        async with tunnel_pair() as pair:
            opener, acceptor = await pair.open_pair()
            pair.connector_transport.hold_sends()
            await pair.gateway_transport.inject(b"\xff" * 12)  # a frame of no known version
            await trio.testing.wait_all_tasks_blocked()
            assert not pair.connector.closed  # still trying to tell the peer why
            assert "protocol error" in pair.connector.close_reason
            with pytest.raises(trio.BrokenResourceError):
                await acceptor.send_eof()
            with pytest.raises(trio.BrokenResourceError):
                await acceptor.receive_some()
            with pytest.raises(trio.BrokenResourceError):
                await acceptor.send_all(b"x")
            await acceptor.aclose()
            await opener.aclose()
