"""The TCP plugin's backend connect (backchannel_tcp._handler._open_tcp): a connection made at
once (a backend on the same host) costs no wait for writability, one still in progress is
waited for, and failures and cancellation close the socket with the same errors as before."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from backchannel import is_connection_refused
from backchannel_tcp import _handler

GUARD = 10


@pytest.fixture
def writable_waits(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every ``trio.lowlevel.wait_writable`` call (each is a scheduler pass)."""
    calls: list[object] = []
    wait = trio.lowlevel.wait_writable

    async def spy(sock: Any) -> None:
        calls.append(sock)
        await wait(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_writable", spy)
    return calls


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


@pytest.fixture
def created_sockets(monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    """The sockets ``_open_tcp`` creates (``socket.socket(family, SOCK_STREAM)``; trio's own
    and the tests' are made otherwise)."""
    created: list[socket.socket] = []
    original = socket.socket

    class Recorded(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if len(args) == 2 and not kwargs:
                created.append(self)

    monkeypatch.setattr("backchannel_tcp._handler.socket.socket", Recorded)
    return created


async def echo_one_line(stream: trio.SocketStream, server: socket.socket) -> bytes:
    peer, _ = server.accept()
    with peer:
        await stream.send_all(b"ping\n")
        peer.sendall(peer.recv(16))
    return await stream.receive_some(16)


class _StepsOf(trio.abc.Instrument):
    """Counts the scheduler's steps of one task (a step follows every time it yielded)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_a_backend_on_this_host_is_connected_without_a_scheduler_pass(
    listener: socket.socket,
) -> None:
    """To a backend on the same host the handshake is done when ``connect`` returns: no wait
    for writability, no yield to the scheduler (trio's ``sock.connect`` took one)."""
    host, port = listener.getsockname()
    counter = _StepsOf(trio.lowlevel.current_task())
    with trio.fail_after(GUARD):
        trio.lowlevel.add_instrument(counter)
        try:
            stream = await _handler._open_tcp(host, port)
        finally:
            trio.lowlevel.remove_instrument(counter)
        async with stream:
            assert counter.steps == 0
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert await echo_one_line(stream, listener) == b"ping\n"


class NotReadyYet:
    """A ``select.poll`` whose first look says the connect is still in progress (as to a
    backend across a network)."""

    def register(self, *args: Any) -> None:
        pass

    def poll(self, timeout: int) -> list[tuple[int, int]]:
        return []


async def test_a_connect_still_in_progress_is_waited_for(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket, writable_waits: list[object]
) -> None:
    monkeypatch.setattr("backchannel_tcp._handler.select.poll", NotReadyYet)
    host, port = listener.getsockname()
    with trio.fail_after(GUARD):
        stream = await _handler._open_tcp(host, port)
        async with stream:
            assert len(writable_waits) == 1
            assert await echo_one_line(stream, listener) == b"ping\n"


@pytest.mark.parametrize("in_progress", [False, True])
async def test_a_refused_connect_raises_the_refusal_and_closes_the_socket(
    monkeypatch: pytest.MonkeyPatch, created_sockets: list[socket.socket], in_progress: bool
) -> None:
    if in_progress:
        monkeypatch.setattr("backchannel_tcp._handler.select.poll", NotReadyYet)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nobody listens there now
    with trio.fail_after(GUARD), pytest.raises(OSError, match="all attempts") as caught:
        await _handler._open_tcp("127.0.0.1", port)
    assert str(caught.value) == f"all attempts to connect to 127.0.0.1:{port} failed"
    assert is_connection_refused(caught.value)
    group = caught.value.__cause__
    assert isinstance(group, ExceptionGroup)
    refusal = group.exceptions[0]
    assert isinstance(refusal, OSError)
    assert refusal.errno == errno.ECONNREFUSED
    assert [sock.fileno() for sock in created_sockets] == [-1]


async def test_a_cancelled_connect_closes_its_socket(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket, created_sockets: list[socket.socket]
) -> None:
    monkeypatch.setattr("backchannel_tcp._handler.select.poll", NotReadyYet)
    host, port = listener.getsockname()
    parked: list[object] = []

    async def never_writable(sock: Any) -> None:
        parked.append(sock)
        await trio.sleep_forever()

    monkeypatch.setattr(trio.lowlevel, "wait_writable", never_writable)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:

            async def connect() -> None:
                await _handler._open_tcp(host, port)

            nursery.start_soon(connect)
            await trio.testing.wait_all_tasks_blocked()
            assert len(parked) == 1
            nursery.cancel_scope.cancel()
    assert [sock.fileno() for sock in created_sockets] == [-1]
