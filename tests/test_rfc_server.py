"""The pyrfc-compatible ``Server``: it registers a program id at the stub system's gateway, and
a ``Connection`` naming that program id (``tpname``) calls its functions through the stub.

The stub runs in the test's trio loop; Server and Connection are blocking, as in pyrfc code, so
they run in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

import pytest
import trio

from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._errors import (
    ABAPApplicationError,
    ABAPRuntimeError,
    CommunicationError,
    ExternalRuntimeError,
    RFCError,
)
from backchannel_rfc._server import Server
from backchannel_rfc._stub_protocol import description_to_wire
from backchannel_rfc._stub_server import StubSession, serve_stub
from tests.procs import wait_until

HOST = "127.0.0.1"
PROGRAM = "BCH_PY_SERVER"
LOGON = {"client": "100", "user": "demo", "passwd": "welcome", "lang": "E"}

T = TypeVar("T")


async def blocking(function: Callable[[], T]) -> T:
    """Run blocking pyrfc-style code without blocking the stub's trio loop."""
    with trio.fail_after(10):
        return await trio.to_thread.run_sync(function)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        bound: int = await nursery.start(serve_stub, demo_system(), HOST, 0)
        yield bound
        nursery.cancel_scope.cancel()


def server_params(port: int, program_id: str = PROGRAM) -> dict[str, str]:
    return {"gwhost": HOST, "gwserv": str(port), "program_id": program_id}


def backend_params(port: int) -> dict[str, str]:
    return {"ashost": HOST, "port": str(port), **LOGON}


def program_client(port: int, program_id: str = PROGRAM) -> Connection:
    """A client of the registered program, as pyrfc addresses one: gateway and tpname."""
    return Connection(None, gwhost=HOST, gwserv=str(port), tpname=program_id, **LOGON)


def stfc_connection(request_context: dict[str, Any], REQUTEXT: str = "") -> dict[str, Any]:
    attributes = request_context["connection_attributes"]
    if REQUTEXT == "fail":
        raise ABAPApplicationError("no way", key="NOT_TODAY", msg_class="ZZ", msg_number="042")
    if REQUTEXT == "message":
        raise ABAPRuntimeError("a message", msg_type="E", msg_class="ZZ", msg_number="043")
    if REQUTEXT == "crash":
        raise KeyError("not a pyrfc error")
    return {
        "ECHOTEXT": REQUTEXT,
        "RESPTEXT": f"Python server here, user {attributes['user']} client {attributes['client']}",
    }


def echo_structure(
    request_context: dict[str, Any], IMPORTSTRUCT: dict[str, Any], RFCTABLE: list[Any]
) -> dict[str, Any]:
    return {"ECHOSTRUCT": IMPORTSTRUCT, "RFCTABLE": [*RFCTABLE, IMPORTSTRUCT]}


async def test_client_calls_the_registered_server(port: int) -> None:
    def run() -> None:
        with Server(server_params(port), backend_params(port)) as server:
            server.add_function("STFC_CONNECTION", stfc_connection)
            server.add_function("STFC_STRUCTURE", echo_structure)
            server.start()
            assert server.get_server_attributes()["state"] == "RFC_SERVER_RUNNING"
            with program_client(port) as client:
                result = client.call("STFC_CONNECTION", REQUTEXT="Hällo")
                assert result == {
                    "ECHOTEXT": "Hällo",
                    "RESPTEXT": "Python server here, user DEMO client 100",
                }
                fd = client.get_function_description("STFC_STRUCTURE")
                expected = demo_system().describe("STFC_STRUCTURE")
                assert description_to_wire(fd) == description_to_wire(expected)
                line = {"RFCINT4": 7, "RFCCHAR4": "ab"}
                echoed = client.call("STFC_STRUCTURE", IMPORTSTRUCT=line, RFCTABLE=[line])
                assert echoed["ECHOSTRUCT"]["RFCINT4"] == 7
                assert [row["RFCCHAR4"] for row in echoed["RFCTABLE"]] == ["ab", "ab"]
                assert echoed["RESPTEXT"] == ""  # an export the callback left out is initial
                with pytest.raises(ABAPApplicationError) as ex:
                    client.call("BAPI_USER_GET_DETAIL", USERNAME="DEMO")  # not served
                assert ex.value.key == "FU_NOT_FOUND"
            attributes = server.get_server_attributes()
            assert (attributes["serverName"], attributes["peakBusyCount"]) == (PROGRAM, 1)

    await blocking(run)


async def test_callback_errors_reach_the_client(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    def run() -> None:
        with Server(server_params(port), backend_params(port)) as server:
            server.add_function("STFC_CONNECTION", stfc_connection)
            server.start()
            with program_client(port) as client:
                with pytest.raises(ABAPApplicationError) as ex:
                    client.call("STFC_CONNECTION", REQUTEXT="fail")
                error = ex.value
                assert type(error) is ABAPApplicationError
                assert (error.code, error.key, error.message) == (5, "NOT_TODAY", "no way")
                assert (error.msg_class, error.msg_number) == ("ZZ", "042")
                with pytest.raises(ABAPRuntimeError) as ex2:
                    client.call("STFC_CONNECTION", REQUTEXT="message")
                assert (ex2.value.code, ex2.value.msg_number) == (4, "043")
                with pytest.raises(ExternalRuntimeError) as ex3:
                    client.call("STFC_CONNECTION", REQUTEXT="crash")
                assert ex3.value.code == 15
                assert ex3.value.message == "Invalid exception raised by callback function."
                # The client reopened after those errors, as pyrfc does; the server still serves.
                assert client.call("STFC_CONNECTION", REQUTEXT="ok")["ECHOTEXT"] == "ok"

    await blocking(run)
    assert "KeyError" in caplog.text


async def test_auth_check_refuses_calls(port: int) -> None:
    def run() -> None:
        config = {"auth_check": lambda name, context: 0 if name == "RFC_PING" else 1}
        with Server(server_params(port), backend_params(port), config) as server:
            server.add_function("STFC_CONNECTION", stfc_connection)
            server.start()
            with program_client(port) as client, pytest.raises(ExternalRuntimeError) as ex:
                client.call("STFC_CONNECTION", REQUTEXT="x")
            assert ex.value.message == (
                "Authentication exception raised by callback function: 'STFC_CONNECTION'"
            )

    await blocking(run)


async def test_unknown_program_id_is_not_registered(port: int) -> None:
    def run() -> CommunicationError:
        with pytest.raises(CommunicationError) as ex:
            program_client(port, "NOBODY")
        return ex.value

    error = await blocking(run)
    assert (error.code, error.key) == (1, "RFC_COMMUNICATION_FAILURE")
    assert error.message is not None
    assert "ERROR       program NOBODY not registered" in error.message
    assert "DETAIL      TP NOBODY not registered" in error.message
    assert "RC          679" in error.message


async def test_add_function_checks(port: int) -> None:
    def run() -> None:
        with Server(server_params(port), backend_params(port)) as server:
            server.add_function("STFC_CONNECTION", stfc_connection)
            with pytest.raises(TypeError, match="Server function 'STFC_CONNECTION' already"):
                server.add_function("STFC_CONNECTION", stfc_connection)
            with pytest.raises(ABAPApplicationError) as ex:
                server.add_function("Z_NO_SUCH_FM", stfc_connection)
            assert ex.value.key == "FU_NOT_FOUND"
        with pytest.raises(ExternalRuntimeError, match="PROGRAM_ID"):
            Server({"gwhost": HOST}, backend_params(port))
        with pytest.raises(TypeError, match="'int' object has no attribute 'encode'"):
            Server({"gwhost": HOST, "gwserv": port, "program_id": "X"}, backend_params(port))

    await blocking(run)


async def state_becomes(server: Server, state: str) -> None:
    """Wait (polling, bounded) until ``server`` reports ``state``."""

    def reached() -> bool:
        return bool(server.get_server_attributes()["state"] == state)

    await trio.to_thread.run_sync(wait_until, reached, f"server state {state}")


def echo(request_context: dict[str, Any], REQUTEXT: str = "") -> dict[str, Any]:
    return {"ECHOTEXT": REQUTEXT}


async def test_stop_ends_serve(port: int) -> None:
    server = await blocking(partial(Server, server_params(port), backend_params(port)))
    await blocking(partial(server.add_function, "STFC_CONNECTION", echo))
    served = trio.Event()

    async def serve() -> None:
        await trio.to_thread.run_sync(server.serve)
        served.set()

    def call() -> str:
        with program_client(port) as client:
            return str(client.call("STFC_CONNECTION", REQUTEXT="up")["ECHOTEXT"])

    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            nursery.start_soon(serve)
            await state_becomes(server, "RFC_SERVER_RUNNING")
            assert await blocking(call) == "up"
            assert not served.is_set()
            await blocking(server.stop)
            await served.wait()
    attributes = server.get_server_attributes()
    assert (attributes["state"], attributes["registrationCount"]) == ("RFC_SERVER_STOPPED", 0)

    def call_after_stop() -> None:
        # Either the logon finds the program gone, or (if the stub has not yet seen the
        # registration end) the call breaks and pyrfc's reopen finds it gone.
        with pytest.raises(CommunicationError), program_client(port) as client:
            client.call("STFC_CONNECTION", REQUTEXT="x")

    await blocking(call_after_stop)
    await blocking(server.close)
    with pytest.raises(RFCError, match="closed"):
        server.serve()


async def test_stop_lets_the_call_in_progress_finish(port: int) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(request_context: dict[str, Any], REQUTEXT: str = "") -> dict[str, Any]:
        entered.set()
        assert release.wait(10)
        return {"ECHOTEXT": REQUTEXT}

    server = await blocking(partial(Server, server_params(port), backend_params(port)))
    await blocking(partial(server.add_function, "STFC_CONNECTION", slow))
    await blocking(server.start)

    def call() -> str:
        with program_client(port) as client:
            return str(client.call("STFC_CONNECTION", REQUTEXT="done")["ECHOTEXT"])

    events: list[str] = []

    async def call_in_thread() -> None:
        events.append(await blocking(call))

    async def stop() -> None:
        await blocking(server.stop)
        events.append("stopped")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call_in_thread)
        assert await blocking(partial(entered.wait, 10))
        assert server.get_server_attributes()["currentBusyCount"] == 1
        nursery.start_soon(stop)
        await state_becomes(server, "RFC_SERVER_STOPPING")
        release.set()
    assert sorted(events) == ["done", "stopped"]
    assert server.get_server_attributes()["state"] == "RFC_SERVER_STOPPED"
    await blocking(server.close)


def test_session_routes_program_clients() -> None:
    """The sans-IO side: logons naming a program, registrations, relayed requests."""
    system = demo_system()
    unknown = StubSession(system, {"P1"}, gateway="host / sapgw00")
    response = unknown.handle({"op": "logon", "tpname": "P2", "client": "100"})
    assert response["error"]["class"] == "CommunicationError"
    assert "SAP-Gateway on host host / sapgw00" in response["error"]["message"]
    assert unknown.state == "closed"

    client = StubSession(system, {"P1"}, peer="10.0.0.1")
    logon = client.handle({"op": "logon", "tpname": "P1", "client": "100", "user": "demo"})
    assert (logon["ok"], logon["user"], logon["sysid"]) == (True, "DEMO", "")
    assert client.relayed({"op": "close"}) is None
    message = client.relayed({"op": "call", "name": "STFC_CONNECTION", "params": {"A": 1}})
    assert message == {
        "op": "call",
        "name": "STFC_CONNECTION",
        "params": {"A": 1},
        "return_import_params": False,
        "connection": {
            "client": "100",
            "user": "DEMO",
            "language": "E",
            "partner_host": "10.0.0.1",
        },
    }
    assert client.relay_response({"id": 3, "ok": True, "result": {}}) == {"ok": True, "result": {}}
    broken = client.relay_response(None)
    assert broken["error"]["class"] == "CommunicationError"
    assert client.state == "closed"

    program = StubSession(system)
    assert program.handle({"op": "register", "program_id": "P1", "functions": ["F"]})["ok"]
    assert (program.state, program.program_id, program.functions) == ("registered", "P1", ["F"])
    refused = StubSession(system).handle({"op": "register", "program_id": "x" * 65})
    assert refused["error"]["key"] == "RFC_INVALID_PROTOCOL"
