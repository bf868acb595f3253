"""The RFC plugin end to end: pyrfc-compatible client -> gateway RFC front door -> tunnel ->
connector -> stub ABAP system, all real sockets on 127.0.0.1."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._errors import (
    ABAPApplicationError,
    CommunicationError,
    ExternalAuthorizationError,
    LogonError,
    RfcRc,
)
from tests.harness import APP_SECRET, audit_lines
from tests.rfc_harness import VIRTUAL_HOST, in_thread, rfc_setup

pytestmark = pytest.mark.integration


async def test_stfc_connection_through_the_tunnel(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:

        def run() -> tuple[dict[str, object], dict[str, object]]:
            with setup.connect() as connection:
                result = connection.call("STFC_CONNECTION", REQUTEXT="hello")
                return result, connection.get_connection_attributes()

        result, attributes = await in_thread(run)
    assert result["ECHOTEXT"] == "hello"
    assert "DEMO" in str(result["RESPTEXT"])
    assert attributes["user"] == "DEMO"
    assert attributes["client"] == "100"


async def test_denied_function_names_function_and_system(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:

        def run() -> ExternalAuthorizationError:
            with setup.connect() as connection:
                with pytest.raises(ExternalAuthorizationError) as info:
                    connection.call("BAPI_USER_GET_DETAIL", USERNAME="DEMO")
                assert connection.alive  # a denial does not end the connection
                assert connection.call("RFC_PING") == {}
            return info.value

        error = await in_thread(run)
    assert error.key == "RFC_AUTHORIZATION_FAILURE"
    assert "BAPI_USER_GET_DETAIL" in str(error.message)
    assert f"{VIRTUAL_HOST}:3300" in str(error.message)
    denied = [e for e in audit_lines(setup.connector_audit) if e.get("decision") == "deny"]
    assert any(e.get("function") == "BAPI_USER_GET_DETAIL" for e in denied)


async def test_unknown_function_is_fu_not_found(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path, functions=[{"name": "Z", "match": "prefix"}]) as setup:

        def run() -> ABAPApplicationError:
            with setup.connect() as connection, pytest.raises(ABAPApplicationError) as info:
                connection.call("Z_DOES_NOT_EXIST")
            return info.value

        error = await in_thread(run)
    assert error.key == "FU_NOT_FOUND"


async def test_wrong_password_is_logon_error(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:
        with pytest.raises(LogonError) as info:
            await in_thread(lambda: setup.connect(passwd="wrong"))
    assert info.value.key == "RFC_LOGON_FAILURE"
    assert "gateway" not in str(info.value.message)


async def test_wrong_app_secret_is_refused_by_the_gateway(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:
        with pytest.raises(LogonError) as info:
            await in_thread(lambda: setup.connect(app_secret="nope"))
    assert "gateway" in str(info.value.message)
    assert "nope" not in str(info.value)


async def test_backend_down_does_not_leak_the_internal_address(tmp_path: Path) -> None:
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    async with rfc_setup(tmp_path, stub_port=dead_port) as setup:
        with pytest.raises(CommunicationError) as info:
            await in_thread(setup.connect)
    assert info.value.key == "RFC_COMMUNICATION_FAILURE"
    assert str(dead_port) not in str(info.value)
    assert "127.0.0.1" not in str(info.value)
    assert VIRTUAL_HOST in str(info.value)


async def test_unmapped_system_is_refused(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:
        with pytest.raises(ExternalAuthorizationError) as info:
            await in_thread(lambda: setup.connect(ashost="other.virtual"))
    assert "other.virtual" in str(info.value)


async def test_client_timeout_cancels_the_call_and_the_connection_goes_on(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:

        def run() -> CommunicationError:
            params = setup.params()
            with Connection({"timeout": 0.3}, **params) as connection:
                first_handle = connection.handle
                with pytest.raises(CommunicationError) as info:
                    connection.call("RFC_PING_AND_WAIT", SECONDS=5)
                assert connection.handle != first_handle  # pyrfc reopens after a cancel
                assert connection.call("RFC_PING") == {}
            return info.value

        error = await in_thread(run)
    assert error.code == RfcRc.RFC_CANCELED
    assert error.key == "RFC_CANCELED"
    assert "Connection was canceled" in str(error.message)


async def test_mapping_call_timeout_applies_without_a_client_timeout(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path, mapping_extra={"call_timeout": 0.3}) as setup:

        def run() -> CommunicationError:
            with setup.connect() as connection, pytest.raises(CommunicationError) as info:
                connection.call("RFC_PING_AND_WAIT", SECONDS=5)
            return info.value

        error = await in_thread(run)
    assert error.key == "RFC_CANCELED"


async def test_hundred_concurrent_calls_from_ten_clients(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:
        results: dict[tuple[int, int], str] = {}
        limiter = trio.CapacityLimiter(100)

        def one_call(client: int, call: int) -> None:
            with setup.connect() as connection:
                text = f"client {client} call {call}"
                results[client, call] = connection.call("STFC_CONNECTION", REQUTEXT=text)[
                    "ECHOTEXT"
                ]

        async with trio.open_nursery() as nursery:
            for client in range(10):
                for call in range(10):
                    nursery.start_soon(
                        partial(trio.to_thread.run_sync, one_call, client, call, limiter=limiter)
                    )
    assert len(results) == 100
    assert all(text == f"client {c} call {n}" for (c, n), text in results.items())


async def test_destination_supplies_system_and_logon(tmp_path: Path) -> None:
    destination = {
        "name": "ERP",
        "subaccount": "acme",
        "ashost": VIRTUAL_HOST,
        "sysnr": "00",
        "client": "100",
        "authentication": "BasicAuthentication",
        "user": "DEMO",
        "password": "welcome",
    }
    async with rfc_setup(tmp_path, destinations=[destination]) as setup:
        route = {
            "gateway": str(setup.front_door),
            "app": "acme/crm",
            "app_secret": APP_SECRET,
        }

        def run() -> str:
            with Connection(None, dest="erp", **route) as connection:
                text: str = connection.call("STFC_CONNECTION", REQUTEXT="x")["RESPTEXT"]
                return text

        resptext = await in_thread(run)
        # Another tenant cannot use the name, and learns nothing beyond "no such destination".
        other = {**route, "app": "globex/erp"}
        with pytest.raises(ExternalAuthorizationError) as info:
            await in_thread(lambda: Connection(None, dest="ERP", **other))
    assert "Logon_Data: 100/DEMO/" in resptext
    assert "no RFC destination named 'ERP' for subaccount 'globex'" in str(info.value)
    assert "welcome" not in setup.gateway_audit.read_text()


async def test_other_tenant_cannot_reach_the_system(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:
        with pytest.raises(CommunicationError) as info:
            await in_thread(lambda: setup.connect(app="globex/erp"))
    assert "no connector of subaccount 'globex'" in str(info.value)


async def test_backend_connections_are_pooled(tmp_path: Path) -> None:
    system = demo_system()
    logons: list[str] = []
    original = system.logon

    def counting_logon(client: str, **kwargs: Any) -> Any:
        logons.append(str(kwargs.get("user")))
        return original(client, **kwargs)

    system.logon = counting_logon  # type: ignore[method-assign]
    async with rfc_setup(tmp_path, system=system) as setup:
        for _ in range(3):
            await in_thread(lambda: setup.connect().close())
        # Another user's logon does not reuse DEMO's connection.
        await in_thread(lambda: setup.connect(user="ALICE", passwd="secret1").close())
    assert logons == ["DEMO", "ALICE"]


async def test_garbage_on_the_front_door_gets_a_protocol_error(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:
        stream = await trio.open_tcp_stream(setup.front_door.host, setup.front_door.port)
        async with stream:
            await stream.send_all(b"\x00\x00\x00\x05hello")
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some():
                    data += chunk
        # The RFC front door still serves others.
        result = await in_thread(lambda: setup.connect().call("RFC_PING"))
    assert b"RFC_INVALID_PROTOCOL" in data
    assert result == {}


async def test_destination_password_is_never_tried_for_another_user(tmp_path: Path) -> None:
    destination = {
        "name": "ERP",
        "subaccount": "acme",
        "ashost": VIRTUAL_HOST,
        "client": "100",
        "authentication": "BasicAuthentication",
        "user": "DEMO",
        "password": "welcome",
    }
    async with rfc_setup(tmp_path, destinations=[destination]) as setup:
        route = {"gateway": str(setup.front_door), "app": "acme/crm", "app_secret": APP_SECRET}
        # ALICE without a password must not be logged on with DEMO's password ("welcome"
        # would fail for ALICE anyway; the point is that no password is sent for her).
        with pytest.raises(LogonError):
            await in_thread(lambda: Connection(None, dest="ERP", user="ALICE", **route))
        # With her own password she gets in as herself.
        user = await in_thread(
            lambda: Connection(
                None, dest="ERP", user="ALICE", passwd="secret1", **route
            ).get_connection_attributes()["user"]
        )
    assert user == "ALICE"


def test_destination_logon_uses_own_or_destination_credentials_never_mixed() -> None:
    from backchannel import HostPort, Secret
    from backchannel_rfc._destinations import RfcDestination

    destination = RfcDestination(
        "ERP",
        "acme",
        HostPort(VIRTUAL_HOST, 3300),
        "100",
        authentication="BasicAuthentication",
        user="DEMO",
        password=Secret("welcome", "test"),
        lang="E",
    )
    assert destination.logon({}) == {
        "client": "100",
        "lang": "E",
        "user": "DEMO",
        "passwd": "welcome",
    }
    assert destination.logon({"user": "ALICE"}) == {"client": "100", "lang": "E", "user": "ALICE"}
    assert destination.logon({"x509cert": "MII..", "client": "200"}) == {
        "client": "200",
        "lang": "E",
        "x509cert": "MII..",
    }
