"""The RFC plugin end to end: pyrfc-compatible client -> gateway RFC front door -> tunnel ->
connector -> stub ABAP system, all real sockets on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from backchannel_rfc._errors import (
    ABAPApplicationError,
    CommunicationError,
    ExternalAuthorizationError,
    LogonError,
)
from tests.harness import audit_lines
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
