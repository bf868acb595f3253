"""The stub server runs module calls in worker threads: a slow module holds up only its own
connection, at most ``call_threads`` calls run at once, and a client that hangs up during a
call is not waited for.

Ordering is asserted with events; the only clock involved is RFC_PING_AND_WAIT's own sleep.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._modules import rfc_ping_and_wait
from backchannel_rfc._stub_protocol import MessageDecoder, encode_message
from backchannel_rfc._stub_server import _Gateway, _serve_connection, _Stub, serve_stub
from backchannel_rfc._system import AbapSystem, Session

HOST = "127.0.0.1"
LOGON = {"client": "100", "user": "demo", "passwd": "welcome", "lang": "E"}


def with_wait_module(
    before: Callable[[], None],
) -> AbapSystem:
    """The demo system whose RFC_PING_AND_WAIT calls ``before()`` first (in the worker)."""
    system = demo_system()

    def wait(session: Session, params: dict[str, Any]) -> dict[str, Any]:
        before()
        return rfc_ping_and_wait(session, params)

    system.register(system.describe("RFC_PING_AND_WAIT"), wait)
    return system


def test_rfc_ping_and_wait_interface() -> None:
    system = demo_system()
    (seconds,) = system.describe("RFC_PING_AND_WAIT").parameters
    assert (seconds["name"], seconds["parameter_type"], seconds["direction"]) == (
        "SECONDS",
        "RFCTYPE_INT",
        "RFC_IMPORT",
    )
    assert (seconds["optional"], seconds["default_value"]) == (True, "0")
    session = system.logon("100", user="demo", passwd="welcome")
    assert system.call(session, "RFC_PING_AND_WAIT", {}) == {}
    assert system.call(session, "RFC_PING_AND_WAIT", {"SECONDS": -5}) == {}


async def test_slow_module_does_not_stall_other_connections() -> None:
    entered = threading.Event()
    system = with_wait_module(entered.set)
    finished: list[str] = []

    def call(port: int, name: str, **params: Any) -> None:
        with Connection(None, ashost=HOST, port=str(port), **LOGON) as connection:
            connection.call(name, **params)
        finished.append(name)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_stub, system, HOST, 0)
        with trio.fail_after(20):
            async with trio.open_nursery() as clients:
                clients.start_soon(
                    trio.to_thread.run_sync, partial(call, port, "RFC_PING_AND_WAIT", SECONDS=1)
                )
                assert await trio.to_thread.run_sync(entered.wait, 10)
                # The slow call is in its worker thread now; a new connection logs on and pings.
                await trio.to_thread.run_sync(partial(call, port, "RFC_PING"))
        nursery.cancel_scope.cancel()
    assert finished == ["RFC_PING", "RFC_PING_AND_WAIT"]


async def exchange(stream: trio.abc.Stream, message: dict[str, Any]) -> dict[str, Any]:
    """Send one request on ``stream`` and read its response."""
    await stream.send_all(encode_message(message))
    return await receive(stream)


async def receive(stream: trio.abc.Stream) -> dict[str, Any]:
    decoder = MessageDecoder()
    while (response := decoder.next_message()) is None:
        data = await stream.receive_some(65536)
        assert data, "the stub closed the connection"
        decoder.receive_data(data)
    return response


def call_message(name: str, **params: Any) -> bytes:
    return encode_message({"op": "call", "name": name, "params": params})


async def test_client_hanging_up_during_a_call_is_not_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="backchannel_rfc._stub_server")
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(10)

    stub = _Stub(with_wait_module(hold), _Gateway("test / sapgw00"), trio.CapacityLimiter(4))
    client, server = trio.testing.memory_stream_pair()
    ended = trio.Event()

    async def serve() -> None:
        await _serve_connection(stub, server)
        ended.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with trio.fail_after(10):
                assert (await exchange(client, {"op": "logon", **LOGON}))["ok"]
                await client.send_all(call_message("RFC_PING_AND_WAIT"))
                assert await trio.to_thread.run_sync(entered.wait, 10)
                await client.aclose()
                # The connection ends while the module still runs (it waits for ``release``).
                await ended.wait()
            assert not release.is_set()
    finally:
        release.set()
    assert "client hung up during a request" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_call_threads_bounds_parallel_calls() -> None:
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        assert release.wait(10)

    stub = _Stub(with_wait_module(hold), _Gateway("test / sapgw00"), trio.CapacityLimiter(1))
    slow_client, slow_server = trio.testing.memory_stream_pair()
    ping_client, ping_server = trio.testing.memory_stream_pair()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_connection, stub, slow_server)
            nursery.start_soon(_serve_connection, stub, ping_server)
            with trio.fail_after(10):
                for client in (slow_client, ping_client):
                    assert (await exchange(client, {"op": "logon", **LOGON}))["ok"]
                await slow_client.send_all(call_message("RFC_PING_AND_WAIT"))
                assert await trio.to_thread.run_sync(entered.wait, 10)
                await ping_client.send_all(call_message("RFC_PING"))
                await trio.testing.wait_all_tasks_blocked()
                # One worker thread is allowed and taken: the ping waits for it.
                assert stub.limiter.statistics().tasks_waiting == 1
                release.set()
                assert (await receive(slow_client)) == {"ok": True, "result": {}}
                assert (await receive(ping_client)) == {"ok": True, "result": {}}
                for client in (slow_client, ping_client):
                    await client.aclose()
    finally:
        release.set()
