"""Streams woken for room count as waiting until they run, and a sender that stops waiting
(cancelled) leaves the waiters at once (backchannel._room_waiters, Tunnel._wake_blocked,
TunnelStream._park_sender).

Without the first, a bulk stream woken together with a new one and run before it found nobody
waiting and queued up to the high-water mark ahead of it
(tests/test_chunk_size_review.py::test_bulk_streams_woken_with_a_new_stream_give_way_to_it;
tests/test_room_waiters_woken_review.py for the eager transport and WINDOW_UPDATE cases);
without the second, a cancelled sender's entry held back every stream that had sent more than
it until the next wake-up popped it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from backchannel import _tunnel
from backchannel._exceptions import StreamError
from backchannel._proto._errors import ResetCode
from backchannel._room_waiters import RoomWaiters
from backchannel._stream import TunnelStream
from backchannel._tunnel import TunnelSettings

from .test_chunk_size_review import control_run_order
from .test_eager_send import eager_pair
from .test_room_waiters_review import SMALL_HIGH_WATER, read_exactly
from .test_room_waiters_woken_review import fill_to_the_mark
from .test_wslink_review import GUARD
from .tunnel_pair import tunnel_pair

STEP = 64 * 1024


@pytest.fixture(autouse=True)
def _small_send_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tunnel, "MAX_SEND_CHUNK", STEP)


def test_a_woken_waiter_counts_as_served_less_until_it_runs() -> None:
    waiters: RoomWaiters[str] = RoomWaiters()
    waiters.add("new", 0)
    waiters.add("bulk", 500_000)
    assert waiters.pop() == "new"
    waiters.woken("new", 0)
    assert len(waiters) == 1  # "bulk" waits to be woken; "new" was woken
    assert "new" not in waiters
    assert waiters.pop() == "bulk"
    waiters.woken("bulk", 500_000)
    assert len(waiters) == 0
    assert waiters.others_waiting()  # both woken, neither has run
    assert waiters.any_served_less_than(500_000)  # "new": bulk gives way to it
    waiters.ran("bulk")
    assert waiters.any_served_less_than(1)  # "new" still has not run
    waiters.ran("new")
    assert not waiters.others_waiting()
    assert not waiters.any_served_less_than(1)


def test_a_discarded_waiter_no_longer_counts_even_when_woken() -> None:
    waiters: RoomWaiters[str] = RoomWaiters()
    waiters.add("gone", 0)
    assert waiters.pop() == "gone"
    waiters.woken("gone", 0)
    waiters.discard("gone")
    assert not waiters.others_waiting()
    assert not waiters.any_served_less_than(1)


async def test_a_cancelled_sender_leaves_the_waiters_and_holds_nobody_back() -> None:
    """C (nothing sent) and D (128 KiB sent) wait for room. C's send is cancelled (a timeout
    around it, say): C leaves the waiters at once, so D, which has sent more, no longer gives
    way to it, and D finishes when the writer sends again."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(TunnelSettings(output_high_water=SMALL_HIGH_WATER)) as pair:
            gateway = pair.gateway
            c, _ = await pair.open_pair()
            d, d_peer = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            await fill_to_the_mark(pair, pair.gateway_transport, d)
            cancelled: list[bool] = []

            async def send_c(scope: trio.CancelScope) -> None:
                with scope:
                    await c.send_all(b"c" * STEP)
                cancelled.append(scope.cancelled_caught)

            async with trio.open_nursery() as nursery:
                c_scope = trio.CancelScope()
                nursery.start_soon(send_c, c_scope)
                nursery.start_soon(d.send_all, b"d" * STEP)
                await trio.testing.wait_all_tasks_blocked()
                assert gateway._output_blocked.least_served() == 0  # C's
                c_scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert cancelled == [True]
                assert c not in gateway._output_blocked
                assert gateway._output_blocked.least_served() == 2 * STEP  # D's
                assert not gateway._output_blocked.any_served_less_than(2 * STEP)
                pair.gateway_transport.release_sends()
                assert len(await read_exactly(d_peer, 3 * STEP)) == 3 * STEP
            assert not gateway._output_blocked.others_waiting()


async def test_a_stream_woken_then_cancelled_before_it_runs_counts_no_more_once_it_has() -> None:
    """Every waiter is woken and C's task is cancelled before it runs: the wake-up came first,
    so C runs (to raise Cancelled at its next checkpoint) and stops counting as woken; nobody
    is left counting as waiting once every task is blocked."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(TunnelSettings(output_high_water=SMALL_HIGH_WATER)) as pair:
            gateway = pair.gateway
            c, _ = await pair.open_pair()
            d, d_peer = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            await fill_to_the_mark(pair, pair.gateway_transport, d)

            async def send_c(scope: trio.CancelScope) -> None:
                with scope:
                    await c.send_all(b"c" * STEP)

            async with trio.open_nursery() as nursery:
                c_scope = trio.CancelScope()
                nursery.start_soon(send_c, c_scope)
                nursery.start_soon(d.send_all, b"d" * STEP)
                await trio.testing.wait_all_tasks_blocked()
                assert c in gateway._output_blocked
                assert d in gateway._output_blocked
                gateway._wake_blocked(everyone=True)
                assert gateway._output_blocked.others_waiting()  # woken, not run yet
                c_scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert c not in gateway._output_blocked
                pair.gateway_transport.release_sends()
                assert len(await read_exactly(d_peer, 3 * STEP)) == 3 * STEP
            assert not gateway._output_blocked.others_waiting()


async def test_a_stream_woken_then_closed_before_it_runs_counts_no_more() -> None:
    """C is woken for room and closed (by another task) before it runs: its send ends with
    ClosedResourceError without queueing itself again, and it no longer counts as waiting."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(TunnelSettings(output_high_water=SMALL_HIGH_WATER)) as pair:
            gateway = pair.gateway
            c, _ = await pair.open_pair()
            d, _ = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            await fill_to_the_mark(pair, pair.gateway_transport, d)
            outcome: list[str] = []

            async def send_c() -> None:
                try:
                    await c.send_all(b"c" * STEP)
                except trio.ClosedResourceError:
                    outcome.append("closed")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_c)
                await trio.testing.wait_all_tasks_blocked()
                assert c in gateway._output_blocked
                gateway._wake_blocked(everyone=True)
                await c.aclose()
                await trio.testing.wait_all_tasks_blocked()
                assert outcome == ["closed"]
                assert not gateway._output_blocked.others_waiting()
                pair.gateway_transport.release_sends()


async def test_a_stream_that_gave_way_to_a_woken_one_reset_before_it_ran_is_woken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On an eager transport N (nothing sent) and B (192 KiB sent) wait for room; the writer
    wakes both, finds the queue empty and parks. B runs first and gives way to N (woken, served
    less): it waits again, the writer idle. Then N is reset (as the reader does on the peer's
    RESET) before its task runs: N sends nothing, so no eager send and no writer round would
    wake B. N's sender, resuming to raise, wakes it (``Tunnel._sender_resumed``)."""
    order = control_run_order(monkeypatch)
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            gateway = pair.gateway
            n, _ = await pair.open_pair()
            b, b_peer = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            eager.accepting_now = False  # the writer sends until the release
            await fill_to_the_mark(pair, eager, b, 2 * STEP)
            outcome: dict[str, str] = {}
            resetter: list[trio.lowlevel.Task] = []

            async def reset_n() -> None:
                resetter.append(trio.lowlevel.current_task())
                await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
                n._fail(StreamError(ResetCode.CANCELLED, "reset by the peer"))

            async def send(stream: TunnelStream, name: str, data: bytes) -> None:
                try:
                    await stream.send_all(data)
                except trio.BrokenResourceError:
                    outcome[name] = "reset"
                else:
                    outcome[name] = "sent"

            wake_blocked = gateway._wake_blocked

            def wake_then_run_the_resetter(*, everyone: bool = False) -> None:
                wake_blocked(everyone=everyone)
                if resetter and n not in gateway._output_blocked:
                    trio.lowlevel.reschedule(resetter.pop())

            monkeypatch.setattr(gateway, "_wake_blocked", wake_then_run_the_resetter)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reset_n)
                nursery.start_soon(send, b, "b", b"b" * 4 * STEP)
                nursery.start_soon(send, n, "n", b"answer")
                await trio.testing.wait_all_tasks_blocked()
                assert n in gateway._output_blocked
                assert b in gateway._output_blocked
                assert b._send_waiter is not None
                assert n._send_waiter is not None
                order.first = [b._send_waiter, resetter[0], n._send_waiter]
                eager.accepting_now = True
                eager.release_sends()
                await trio.testing.wait_all_tasks_blocked()
                assert outcome["n"] == "reset"
                # Not waiting until something else (a heartbeat) makes the writer run:
                assert b not in gateway._output_blocked
                assert len(await read_exactly(b_peer, 7 * STEP)) == 7 * STEP
            assert outcome == {"n": "reset", "b": "sent"}
            assert not gateway._output_blocked.others_waiting()
