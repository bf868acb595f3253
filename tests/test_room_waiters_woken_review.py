"""Review of 3a5abfd (least served first: streams woken for room count as waiting until they
run; a sender cancelled while it waits leaves the waiters): ``RoomWaiters.woken`` / ``ran`` /
``others_waiting``, ``Tunnel._wake_blocked`` / ``_send_blocked`` / ``_wake_writer`` and
``TunnelStream._park_sender`` / ``_abort_sender``.

Checked and found correct (passing tests): no stranding in the sequences tried. A woken
stream always runs its ``_park_sender`` finally (it was rescheduled), so nobody counts as
woken for good; a stream reset by the peer, closed, or whose tunnel closes while woken stops
counting at once; a window-blocked sender is never popped nor marked woken; a splice
(``_send_now`` then ``send_all``), a ``wait_send_all_might_not_block`` user that then does not
send, a cancelled sender and bulk senders all finish on an eager transport with a 64 KiB mark,
and once every task is blocked nobody waits or counts as woken (``_wake_writer``'s invariant).
Without an eager transport, a bulk stream run before the new stream woken with it queues one
step ahead of it, as the commit says.

Four were written failing (strict xfail), each for a defect; all four are fixed:

* With an eager transport (production's ``WebSocketLink``) the case the commit names was not
  fixed: the bulk stream run first sent each step at once, so its queued data was 0 again and
  the one-step rule never stopped it; it sent all it had before the new stream woken with it
  ran. Fixed: a woken stream counts with what it has been served
  (``RoomWaiters.any_served_less_than``), so the bulk stream gives way to it.
* A stream whose sender a WINDOW_UPDATE had rescheduled while it waited for room, popped by
  the writer before it ran, was not marked woken. Fixed: ``_wake_sender`` also reports a
  sender rescheduled and not run yet.
* The commit cited tests/test_chunk_size_review.py for "both run orders", but its
  ``fixed_run_order`` did not give them (under pytest trio sorts each batch by task creation
  and shuffles it). Fixed: ``control_run_order`` (``PreferredFirst``) there, used here too.
* Two bulk streams (past SERVED_LIMIT, windows not limiting) each counted the other as
  waiting, so each queued one step per writer round: the writer's messages carried two
  256 KiB frames instead of three, and the queue never got back to the mark. Fixed: only
  streams woken below SERVED_LIMIT count as woken (past it streams are equals; whichever
  runs first may fill the queue, as before 3a5abfd).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from backchannel import _tunnel
from backchannel._proto._errors import ResetCode
from backchannel._proto._events import StreamReset, WindowUpdated
from backchannel._proto._mux import MuxSettings
from backchannel._stream import TunnelStream
from backchannel._tunnel import MAX_SEND_CHUNK, TunnelSettings

from .test_chunk_size_review import PreferredFirst, control_run_order, record_sends
from .test_eager_send import EagerGatedTransport, eager_pair
from .test_room_waiters_review import SMALL_HIGH_WATER, read_exactly, with_high_water
from .test_wslink_review import GUARD
from .tunnel_pair import GatedTransport, TunnelPair, tunnel_pair

KIB = 1024
MIB = 1024 * KIB
#: The send step of the scenarios with a small mark (as in the other room-waiter tests).
STEP = 64 * KIB
#: What the bulk stream of the wake-up scenarios still has to send.
BULK_REST = 8 * STEP
#: What each bulk stream of the throughput test may send (shared, never all of it).
BULK = bytes(32 * MIB)


@pytest.fixture
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tunnel, "MAX_SEND_CHUNK", STEP)


async def fill_to_the_mark(
    pair: TunnelPair, transport: GatedTransport, bulk: TunnelStream, mark: int = SMALL_HIGH_WATER
) -> None:
    """Hold the gateway's sends; ``bulk`` sends a step, which the writer takes and holds, then
    ``mark`` bytes, which stay queued: the queue is at the mark."""
    with_high_water(pair.gateway, mark)
    transport.hold_sends()
    await bulk.send_all(b"b" * STEP)
    await trio.testing.wait_all_tasks_blocked()  # the writer took it and holds it
    await bulk.send_all(b"b" * mark)
    assert pair.gateway._mux.pending_bytes >= mark


def bytes_ahead(sends: list[tuple[int, int, int]], stream: TunnelStream) -> int:
    """Data bytes other streams handed the mux before ``stream``'s first (all they handed it
    if ``stream`` has sent nothing yet)."""
    ahead = 0
    for stream_id, taken, _ in sends:
        if stream_id == stream.stream_id:
            break
        ahead += taken
    return ahead


async def bulk_run_ahead_of_new(
    pair: TunnelPair, eager: EagerGatedTransport | None, order: PreferredFirst, bulk_first: bool
) -> int:
    """Bulk stream B (192 KiB sent) and new stream N (nothing sent) wait for room behind a held
    writer, the queue at a 128 KiB mark (two steps). Sends are released: the writer sends the
    held message and then the queued one, wakes N and B (the room of two steps), finds the
    queue empty and parks; trio runs B first (or N first). The bytes of B queued (or sent)
    before N's answer."""
    gateway = pair.gateway
    n, n_peer = await pair.open_pair()
    b, b_peer = await pair.open_pair()
    await trio.testing.wait_all_tasks_blocked()
    transport: GatedTransport = pair.gateway_transport
    if eager is not None:
        eager.accepting_now = False  # the writer sends until the release
        transport = eager
    await fill_to_the_mark(pair, transport, b, 2 * STEP)
    sends: list[tuple[int, int, int]] = []
    record_sends(gateway, sends)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.send_all, b"b" * BULK_REST)
        nursery.start_soon(n.send_all, b"answer")
        await trio.testing.wait_all_tasks_blocked()
        assert n in gateway._output_blocked
        assert b in gateway._output_blocked
        assert b._send_waiter is not None
        assert n._send_waiter is not None
        tasks = [b._send_waiter, n._send_waiter]
        order.first = tasks if bulk_first else tasks[::-1]
        if eager is not None:
            eager.accepting_now = True
        transport.release_sends()
        assert await read_exactly(n_peer, len(b"answer")) == b"answer"
        assert len(await read_exactly(b_peer, 3 * STEP + BULK_REST)) == 3 * STEP + BULK_REST
    assert not gateway._output_blocked.others_waiting()
    return bytes_ahead(sends, n)


# =========================================================================== findings


@pytest.mark.usefixtures("small_steps")
@pytest.mark.parametrize(
    "bulk_first",
    [
        False,
        True,
    ],
)
async def test_a_bulk_stream_woken_with_a_new_one_sends_one_step_ahead_on_an_eager_transport(
    monkeypatch: pytest.MonkeyPatch, bulk_first: bool
) -> None:
    """The commit's case "the writer going idle" on an eager transport (production's): at
    most one step of B goes before N's answer, whatever order trio runs them in. When trio
    runs B first, B finds the writer idle, ``_wake_writer`` sends its step at once,
    ``queued_data(B)`` is 0 again and ``others_waiting()`` (N woken) does not stop it: B
    sends all 512 KiB, step after step, before N runs (as before the commit)."""
    order = control_run_order(monkeypatch)
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            ahead = await bulk_run_ahead_of_new(pair, eager, order, bulk_first)
    assert ahead <= STEP, f"{ahead} bytes ahead"


@pytest.mark.usefixtures("small_steps")
@pytest.mark.parametrize(
    "window_update",
    [
        False,
        True,
    ],
)
async def test_a_new_stream_woken_by_a_window_update_still_counts_as_waiting(
    monkeypatch: pytest.MonkeyPatch, window_update: bool
) -> None:
    """N (nothing sent) and B (128 KiB sent) wait for room. A WINDOW_UPDATE for N arrives
    (as for a stream whose earlier bytes the peer just read; the reader dispatches it: N's
    sender is rescheduled, N stays in the heap), then, before N runs, the writer makes room
    for seven steps and pops N and B. N is not marked woken; trio runs B first; B finds
    nobody waiting and queues seven steps (448 KiB, up to the mark) ahead of N, where the
    rule is one. Without the WINDOW_UPDATE, B queues nothing ahead of N (it has a step
    queued already); before 3a5abfd it queued the seven steps in both cases."""
    order = control_run_order(monkeypatch)
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair:
            gateway = pair.gateway
            with_high_water(gateway, SMALL_HIGH_WATER)
            n, _ = await pair.open_pair()
            b, _ = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            await fill_to_the_mark(pair, pair.gateway_transport, b)
            sends: list[tuple[int, int, int]] = []
            record_sends(gateway, sends)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(b.send_all, b"b" * BULK_REST)
                nursery.start_soon(n.send_all, b"answer")
                await trio.testing.wait_all_tasks_blocked()
                assert n in gateway._output_blocked
                assert b in gateway._output_blocked
                assert b._send_waiter is not None
                assert n._send_waiter is not None
                order.first = [b._send_waiter, n._send_waiter]
                if window_update:
                    gateway._dispatch(WindowUpdated(n.stream_id))  # as the reader does
                with_high_water(gateway, 8 * STEP)  # the writer sent: room for 7 steps
                gateway._wake_blocked()
                await trio.testing.wait_all_tasks_blocked()
                ahead = bytes_ahead(sends, n)
                nursery.cancel_scope.cancel()
    assert ahead <= STEP, f"{ahead} bytes ahead"


async def writer_messages(bulk_count: int, messages: int) -> list[int]:
    """``bulk_count`` streams send without end to a peer that reads at once, with windows
    that never limit (64 MiB); the gateway's writer sends one message each time every other
    task is blocked (a transport slower than the streams). The sizes of the messages after the
    first few."""
    window = TunnelSettings(mux=MuxSettings(initial_window=64 * MIB, max_window=64 * MIB))
    with trio.fail_after(GUARD):
        async with tunnel_pair(None, window) as pair:
            streams = [await pair.open_pair() for _ in range(bulk_count)]
            await trio.testing.wait_all_tasks_blocked()
            sizes: list[int] = []
            gate = trio.Semaphore(0)
            send_message = pair.gateway_transport.send_message

            async def gated(message: bytes) -> None:
                await gate.acquire()
                sizes.append(len(message))
                await send_message(message)

            pair.gateway_transport.send_message = gated  # type: ignore[method-assign]

            async def drain(stream: TunnelStream) -> None:
                while await stream.receive_some(MIB):
                    pass

            async with trio.open_nursery() as nursery:
                for opener, acceptor in streams:
                    nursery.start_soon(opener.send_all, BULK)
                    nursery.start_soon(drain, acceptor)
                for _ in range(messages):
                    await trio.testing.wait_all_tasks_blocked()
                    gate.release()
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
    return sizes[8:]


@pytest.mark.parametrize(
    "bulk_count",
    [
        1,
        2,
        3,
    ],
)
async def test_bulk_streams_keep_the_writers_messages_full(bulk_count: int) -> None:
    """With a transport slower than the streams, every message the writer sends carries as
    much as one bulk stream alone gives it: three 256 KiB frames (a 1 MiB message holds no
    fourth with its headers). Before 3a5abfd, two streams did so too (the first one woken
    found nobody waiting and queued up to the mark)."""
    sizes = await writer_messages(bulk_count, 24)
    assert len(sizes) >= 12
    assert min(sizes) >= 3 * MAX_SEND_CHUNK, sizes


# =========================================================================== checked: correct


@pytest.mark.usefixtures("small_steps")
async def test_without_an_eager_transport_the_bulk_stream_run_first_queues_one_step_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scenario of the first finding on the plain (writer-only) transport: the commit's
    fix holds, B queues one step before N's answer (before it: seven, up to the mark)."""
    order = control_run_order(monkeypatch)
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair:
            ahead = await bulk_run_ahead_of_new(pair, None, order, bulk_first=True)
    assert ahead <= STEP, f"{ahead} bytes ahead"


@pytest.mark.usefixtures("small_steps")
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
async def test_nobody_strands_with_splices_cancellations_and_idle_waiters(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Eager transport, 64 KiB mark. At once: a splice-like sender (``_send_now`` of 256 KiB
    + 1, then ``send_all`` of the rest), two bulk senders, a stream that waits with
    ``wait_send_all_might_not_block`` and then sends nothing, and a sender cancelled once it
    waits. Everyone finishes; once every task is blocked nobody waits or counts as woken, and
    the writer is idle."""
    control_run_order(monkeypatch, seed)  # four different schedules
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, _):
            gateway = pair.gateway
            with_high_water(gateway, SMALL_HIGH_WATER)
            ends = [await pair.open_pair() for _ in range(5)]
            (splice, splice_peer), (bulk1, peer1), (bulk2, peer2) = ends[:3]
            (idle, _), (cancelled, _) = ends[3:]
            await trio.testing.wait_all_tasks_blocked()
            done: list[str] = []
            waited = trio.Event()
            splice_data = b"s" * (4 * STEP + 1)

            async def splice_like() -> None:
                taken = splice._send_now(splice_data)
                await splice.send_all(memoryview(splice_data)[taken:])
                done.append("splice")

            async def bulk(stream: TunnelStream, name: str) -> None:
                await stream.send_all(b"x" * (6 * STEP))
                done.append(name)

            async def idle_waiter() -> None:
                await idle.wait_send_all_might_not_block()
                waited.set()

            async def cancelled_sender(scope: trio.CancelScope) -> None:
                with scope:
                    await cancelled.send_all(b"c" * (6 * STEP))
                done.append("cancelled")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_exactly, splice_peer, len(splice_data))
                nursery.start_soon(read_exactly, peer1, 6 * STEP)
                nursery.start_soon(read_exactly, peer2, 6 * STEP)
                scope = trio.CancelScope()
                nursery.start_soon(bulk, bulk1, "bulk1")
                nursery.start_soon(splice_like)
                nursery.start_soon(cancelled_sender, scope)
                nursery.start_soon(idle_waiter)
                nursery.start_soon(bulk, bulk2, "bulk2")
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert not gateway._output_blocked
                assert not gateway._output_blocked.others_waiting()
                assert len(gateway._writer_waiters) == 1  # idle
            assert sorted(done) == ["bulk1", "bulk2", "cancelled", "splice"]
            assert waited.is_set()


@pytest.mark.usefixtures("small_steps")
async def test_a_stream_reset_by_the_peer_while_woken_counts_no_more() -> None:
    """C is woken for room, then the peer resets it before its task runs: it stops counting
    at once (``_fail`` discards it), its send fails with BrokenResourceError, and D, which has
    sent more, is not held to one step by it."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(TunnelSettings(output_high_water=SMALL_HIGH_WATER)) as pair:
            gateway = pair.gateway
            c, _ = await pair.open_pair()
            d, d_peer = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            await fill_to_the_mark(pair, pair.gateway_transport, d)
            outcome: list[str] = []

            async def send_c() -> None:
                try:
                    await c.send_all(b"c" * STEP)
                except trio.BrokenResourceError:
                    outcome.append("reset")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_c)
                await trio.testing.wait_all_tasks_blocked()
                assert c in gateway._output_blocked
                gateway._wake_blocked(everyone=True)
                assert gateway._output_blocked.others_waiting()
                # The peer's RESET, dispatched as the reader does, before C's task runs.
                gateway._dispatch(StreamReset(c.stream_id, ResetCode.CANCELLED, "gone"))
                assert c.error is not None
                assert not gateway._output_blocked.others_waiting()
                await trio.testing.wait_all_tasks_blocked()
                assert outcome == ["reset"]
                pair.gateway_transport.release_sends()
                assert len(await read_exactly(d_peer, 2 * STEP)) == 2 * STEP


@pytest.mark.usefixtures("small_steps")
async def test_a_window_blocked_sender_is_never_counted_as_waiting_for_room() -> None:
    """A sender parked for credit (window 0, not for room) is not in the waiters: waking
    everyone neither pops nor marks it, and others are not held to one step by it."""
    small_window = TunnelSettings(mux=MuxSettings(initial_window=STEP))
    with trio.fail_after(GUARD):
        async with tunnel_pair(None, small_window) as pair:
            gateway = pair.gateway
            w, w_peer = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.send_all, b"w" * (2 * STEP))
                await trio.testing.wait_all_tasks_blocked()
                assert gateway._mux.send_window(w.stream_id) == 0
                assert w._send_waiter is not None  # parked for credit
                assert w not in gateway._output_blocked
                gateway._wake_blocked(everyone=True)
                assert w._send_waiter is not None
                assert not gateway._output_blocked.others_waiting()
                assert len(await read_exactly(w_peer, 2 * STEP)) == 2 * STEP
            assert not gateway._output_blocked.others_waiting()


@pytest.mark.usefixtures("small_steps")
async def test_streams_woken_when_the_tunnel_closes_count_no_more() -> None:
    """C and D wait for room and are woken; the tunnel aborts before they run: both sends
    fail, and nobody counts as waiting or woken afterwards."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(TunnelSettings(output_high_water=SMALL_HIGH_WATER)) as pair:
            gateway = pair.gateway
            c, _ = await pair.open_pair()
            d, _ = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            await fill_to_the_mark(pair, pair.gateway_transport, d)
            failures: list[str] = []

            async def send(stream: TunnelStream) -> None:
                try:
                    await stream.send_all(b"x" * STEP)
                except trio.BrokenResourceError:
                    failures.append("broken")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, c)
                nursery.start_soon(send, d)
                await trio.testing.wait_all_tasks_blocked()
                gateway._wake_blocked(everyone=True)
                gateway.abort("test: tunnel lost")
                await gateway.wait_closed()
            assert failures == ["broken", "broken"]
            assert not gateway._output_blocked.others_waiting()
            assert not gateway._output_blocked


# =========================================================================== the tests' claims


@pytest.mark.parametrize("first", ["a", "b"])
async def test_control_run_order_decides_which_of_two_tasks_woken_together_runs_first(
    monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """The run-order helper the tests above and tests/test_chunk_size_review.py rely on: of a
    and b woken together (a first; b created first), the one preferred runs first. (The
    earlier helper fixed ``random()``: a fixed permutation of creation order, not of
    wake-up order, so its "woken" and "reverse" did not mean what they said.)"""
    order = control_run_order(monkeypatch)
    ran: list[str] = []
    tasks: dict[str, trio.lowlevel.Task] = {}

    async def wait(name: str) -> None:
        tasks[name] = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
        ran.append(name)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "b")  # created first, woken second
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait, "a")
            await trio.testing.wait_all_tasks_blocked()
            order.first = [tasks[first]]
            trio.lowlevel.reschedule(tasks["a"])
            trio.lowlevel.reschedule(tasks["b"])
    assert ran[0] == first
