"""BackendPool.aclose logs off every idle backend connection, even when the connector stopping
is cancelled (an embedding program's nursery torn down): each close starts in its own thread
before the first wait, so no socket is left to the garbage collector."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import trio
import trio.testing

from backchannel import HostPort
from backchannel_rfc._backend import BackendPool, PoolSettings

ADDRESS = HostPort("erp.internal", 3300)


class FakeConnection:
    """Records its close; ``release_close`` holds the close until the test lets it finish."""

    def __init__(self, release_close: threading.Event) -> None:
        self.closed = threading.Event()
        self.alive = True
        self._release_close = release_close

    def call(self, func_name: str, options: dict[str, Any] | None = None, **params: Any) -> Any:
        return {}

    def get_function_description(self, func_name: str) -> Any:
        raise NotImplementedError

    def get_connection_attributes(self) -> dict[str, Any]:
        return {}

    def ping(self) -> None:
        pass

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        self._release_close.wait(timeout=10)
        self.alive = False
        self.closed.set()


async def pool_with_idle(
    count: int, release_close: threading.Event
) -> tuple[BackendPool, list[FakeConnection]]:
    made: list[FakeConnection] = []

    def connect(address: HostPort, logon: Mapping[str, str]) -> FakeConnection:
        made.append(FakeConnection(release_close))
        return made[-1]

    pool = BackendPool(connect, PoolSettings(max_idle=count))
    leases = [
        await pool.lease(ADDRESS, {"user": f"user{i}", "passwd": "secret"}) for i in range(count)
    ]
    for lease in leases:
        await pool.release(lease)
    assert [pool.idle_count(ADDRESS)] == [count]
    return pool, made


async def test_aclose_waits_for_every_idle_connection_to_close() -> None:
    release_close = threading.Event()
    pool, made = await pool_with_idle(3, release_close)
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def close_pool() -> None:
            await pool.aclose()
            done.set()

        nursery.start_soon(close_pool)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # the closes are held: aclose waits for them
        release_close.set()
    assert all(connection.closed.is_set() for connection in made)
    assert pool.idle_count(ADDRESS) == 0


async def test_aclose_cancelled_still_closes_every_idle_connection() -> None:
    release_close = threading.Event()
    pool, made = await pool_with_idle(3, release_close)
    with trio.CancelScope() as scope:
        scope.cancel()
        await pool.aclose()
    assert scope.cancelled_caught
    release_close.set()
    for connection in made:
        assert await trio.to_thread.run_sync(connection.closed.wait, 10)
    assert pool.idle_count(ADDRESS) == 0


async def test_aclose_of_an_empty_pool_returns_at_once() -> None:
    pool = BackendPool(lambda address, logon: FakeConnection(threading.Event()))
    with trio.fail_after(1):
        await pool.aclose()
