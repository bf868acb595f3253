"""backchannel.serve_connections: the TCP front doors' accept loop, whose handler owns each
connection (no wrapper task that closes it again: docs/performance.md, "Per-stream cost")."""

from __future__ import annotations

import errno
import logging
from functools import partial
from typing import Any, cast

import pytest
import trio
import trio.testing

from backchannel import close_forcefully, serve_connections
from backchannel._serve import RETRY_AFTER


async def test_each_connection_runs_the_handler_as_its_own_named_task() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[tuple[str, bytes]] = []

    async def handler(stream: trio.SocketStream) -> None:
        try:
            seen.append((trio.lowlevel.current_task().name, await stream.receive_some(10)))
            await stream.send_all(b"bye")
        finally:
            await close_forcefully(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            started = await nursery.start(
                partial(serve_connections, handler, listeners, task_name="test door")
            )
            assert list(started) == listeners
            for greeting in (b"one", b"two"):
                client = await trio.open_tcp_stream("127.0.0.1", port)
                async with client:
                    await client.send_all(greeting)
                    assert await client.receive_some(10) == b"bye"
                    assert await client.receive_some(10) == b""  # the handler closed it
            nursery.cancel_scope.cancel()
    assert seen == [("test door", b"one"), ("test door", b"two")]
    assert listeners[0].socket.fileno() == -1  # closed when serving ended


async def test_the_stream_is_the_handlers_to_close() -> None:
    """Nothing closes the stream after the handler returns: a handler may hand it on."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    kept: list[trio.SocketStream] = []

    async def handler(stream: trio.SocketStream) -> None:
        kept.append(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_connections, handler, listeners, task_name="door"))
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                while not kept:
                    await trio.testing.wait_all_tasks_blocked()
                await kept[0].send_all(b"still open")
                assert await client.receive_some(20) == b"still open"
                await close_forcefully(kept[0])
            nursery.cancel_scope.cancel()


class FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """Fails accept with the given errors, then waits forever."""

    def __init__(self, *errors: OSError) -> None:
        self.errors = list(errors)
        self.closed = False

    async def accept(self) -> trio.SocketStream:
        if self.errors:
            raise self.errors.pop(0)
        await trio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True


async def test_running_out_of_descriptors_is_logged_and_accept_retried(
    caplog: pytest.LogCaptureFixture, autojump_clock: Any
) -> None:
    listener = FlakyListener(OSError(errno.EMFILE, "Too many open files"))

    async def handler(stream: trio.SocketStream) -> None:
        raise AssertionError("no connection was accepted")

    async with trio.open_nursery() as nursery:
        listeners = [cast(trio.SocketListener, listener)]
        nursery.start_soon(partial(serve_connections, handler, listeners, task_name="busy door"))
        await trio.sleep(RETRY_AFTER * 3)
        assert not listener.errors  # retried after the failure: now waiting in accept
        nursery.cancel_scope.cancel()
    assert listener.closed
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert "busy door: accept failed with EMFILE" in message
    assert "open-files limit" in message


async def test_other_accept_errors_end_the_serving() -> None:
    listener = FlakyListener(OSError(errno.EBADF, "Bad file descriptor"))

    async def handler(stream: trio.SocketStream) -> None:
        raise AssertionError("no connection was accepted")

    with pytest.raises(ExceptionGroup) as raised:
        await serve_connections(handler, [cast(trio.SocketListener, listener)], task_name="door")
    assert raised.group_contains(OSError, match="Bad file descriptor")
    assert listener.closed
