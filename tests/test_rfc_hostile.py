"""Hostile and faulty RFC peers end to end: cloud clients that speak the stub protocol by hand
(so that the client library's own checks hide nothing), clients that hang up, backends that die
or never answer, and another tenant's application. Everything runs on 127.0.0.1 with real
sockets: stub ABAP systems, the gateway's RFC front door, the tunnel, the connector.

Each refusal is checked precisely (class, key, text), and next to it that another session on
the same tunnel carries on. On leaving ``running``, every error text a client received is
checked for the internal addresses of the backends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import trio

from backchannel import (
    Connector,
    ConnectorConfig,
    Gateway,
    GatewayConfig,
    HostPort,
    open_connector,
    open_gateway,
)
from backchannel_rfc import _handler
from backchannel_rfc._backend import BackendPool
from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._errors import CommunicationError, LogonError, RFCLibError
from backchannel_rfc._handler import RfcHandler
from backchannel_rfc._stub_protocol import MessageDecoder, description_to_wire, encode_message
from backchannel_rfc._stub_server import serve_stub
from backchannel_rfc._system import AbapSystem, Session
from tests.harness import (
    APP_SECRET,
    CONNECTOR_TOKEN,
    audit_lines,
    connector_document,
    gateway_document,
    tls_material,
)
from tests.procs import tcp_sockets, wait_until
from tests.rfc_harness import DEFAULT_FUNCTIONS, LOGON, VIRTUAL_HOST

pytestmark = pytest.mark.integration

T = TypeVar("T")

#: Another tenant's app secret (the shared harness gives both tenants the same one).
GLOBEX_SECRET = "globex-secret-for-hostile-tests-987"
OTHER_HOST = "other.virtual"
#: The standard rules plus a namespace prefix and one exact namespaced name.
FUNCTIONS: tuple[dict[str, Any], ...] = (
    *DEFAULT_FUNCTIONS,
    {"name": "/BCNS/", "match": "prefix"},
    {"name": "/BCX/Z_ONE"},
)
_ESTABLISHED = 0x01
#: How long any one step may take before the test fails (a hang fails, it does not block).
STEP = 10.0


# ------------------------------------------------------------------------------ set-up


@dataclass
class Stub:
    """A stub ABAP system served in the test's nursery, which the test can kill."""

    port: int
    system: AbapSystem
    scope: trio.CancelScope
    stopped: trio.Event

    async def kill(self) -> None:
        """Stop listening and drop every connection, as a crashed system does."""
        self.scope.cancel()
        await self.stopped.wait()


async def start_stub(nursery: trio.Nursery, system: AbapSystem, port: int = 0) -> Stub:
    scope, stopped = trio.CancelScope(), trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        try:
            with scope:
                await serve_stub(system, "127.0.0.1", port, task_status=task_status)
        finally:
            stopped.set()

    bound: int = await nursery.start(run)
    return Stub(bound, system, scope, stopped)


@dataclass
class Env:
    """A gateway and an acme connector (one mapping per entry of ``backends``)."""

    gateway: Gateway
    connector: Connector
    gateway_audit: Path
    connector_audit: Path
    backends: dict[str, str]
    location: str = ""
    #: Every error text a client received in this test.
    errors: list[str] = field(default_factory=list)
    #: Connections made by hand, closed when the test ends.
    raws: list[Raw] = field(default_factory=list)

    @property
    def front_door(self) -> HostPort:
        return self.gateway.front_door_addresses["rfc.pyrfc"][0]

    @property
    def pool(self) -> BackendPool:
        return cast(RfcHandler, self.connector.handlers["rfc"]).pool

    def params(self, host: str = VIRTUAL_HOST, **overrides: str) -> dict[str, str]:
        params = {
            "gateway": str(self.front_door),
            "app": "acme/crm",
            "app_secret": APP_SECRET,
            "ashost": host,
            "sysnr": "00",
            "location_id": self.location,
            **LOGON,
            **overrides,
        }
        return {k: v for k, v in params.items() if v != ""}

    def connect(self, host: str = VIRTUAL_HOST, **overrides: str) -> Connection:
        return Connection(None, **self.params(host, **overrides))

    def call_once(self, function: str, host: str = VIRTUAL_HOST, **params: Any) -> Any:
        with self.connect(host) as connection:
            return connection.call(function, **params)

    def internal_addresses(self) -> list[str]:
        return list(self.backends.values())


@asynccontextmanager
async def running(
    tmp_path: Path,
    backends: dict[str, str],
    *,
    functions: Sequence[dict[str, Any]] = FUNCTIONS,
    mapping_extra: dict[str, Any] | None = None,
    connector_plugin: dict[str, Any] | None = None,
    gateway_plugin: dict[str, Any] | None = None,
    destinations: Sequence[dict[str, Any]] = (),
    location: str = "",
    globex_backends: dict[str, str] | None = None,
) -> AsyncIterator[Env]:
    """Gateway with the RFC front door, acme's connector with an ``rfc`` mapping per virtual
    host in ``backends`` (virtual host -> internal host:port) and, with ``globex_backends``,
    a connector of the other tenant. Both audit files include allowed decisions."""
    tls = tls_material(tmp_path / "tls")
    gateway_audit = tmp_path / "gateway-audit.jsonl"
    connector_audit = tmp_path / "connector-audit.jsonl"
    document = gateway_document(tls, gateway_audit, socks=False)
    document["audit"]["include_allowed"] = True
    document["subaccounts"]["globex"]["apps"]["erp"]["secret"] = GLOBEX_SECRET
    document["plugins"]["rfc"] = {
        "listen": "127.0.0.1:0",
        "destinations": list(destinations),
        **(gateway_plugin or {}),
    }

    def connector_config(
        subaccount: str, token: str, where: str, mapped: dict[str, str], audit: Path
    ) -> ConnectorConfig:
        mappings = [
            {
                "protocol": "rfc",
                "virtual": f"{virtual}:3300",
                "internal": internal,
                "functions": list(functions),
                **(mapping_extra or {}),
            }
            for virtual, internal in mapped.items()
        ]
        assert gateway.tunnel_address is not None
        doc = connector_document(
            tls,
            gateway.tunnel_address.port,
            audit,
            mappings,
            location=where,
            token=token,
            subaccount=subaccount,
        )
        doc["audit"]["include_allowed"] = True
        doc["plugins"] = {"rfc": {"backend": "stub", **(connector_plugin or {})}}
        return ConnectorConfig.from_mapping(doc, source=f"{subaccount}.toml")

    async with open_gateway(GatewayConfig.from_mapping(document, source="gateway.toml")) as gateway:
        acme = connector_config("acme", CONNECTOR_TOKEN, location, backends, connector_audit)
        async with open_connector(acme) as connector:
            with trio.fail_after(STEP):
                await connector.wait_connected()
            env = Env(gateway, connector, gateway_audit, connector_audit, dict(backends), location)
            if globex_backends is None:
                yield env
            else:
                globex = connector_config(
                    "globex",
                    CONNECTOR_TOKEN + "-globex",
                    "",
                    globex_backends,
                    tmp_path / "globex-audit.jsonl",
                )
                async with open_connector(globex) as other:
                    with trio.fail_after(STEP):
                        await other.wait_connected()
                    env.backends.update({f"globex {k}": v for k, v in globex_backends.items()})
                    yield env
    for raw in env.raws:
        await trio.aclose_forcefully(raw.stream)
    assert_no_internal_address(env.errors, env.internal_addresses())


def assert_no_internal_address(texts: Iterable[str], internal: Iterable[str]) -> None:
    """No internal host:port, port or loopback address in ``texts``."""
    needles: list[str] = []
    for address in internal:
        host, _, port = address.rpartition(":")
        needles += [re.escape(address), re.escape(host.strip("[]")), rf"(?<!\d){port}(?!\d)"]
    pattern = re.compile("|".join(needles))
    leaks = [text for text in texts if pattern.search(text)]
    assert not leaks, f"internal addresses in error texts: {leaks}"


async def blocking(function: Callable[[], T]) -> T:
    """A blocking client call in a worker thread; abandoned (not waited for) if the test gives
    up, so that a hang fails the test instead of stopping it."""
    with trio.fail_after(STEP):
        return await trio.to_thread.run_sync(function, abandon_on_cancel=True)


async def expect_error(env: Env, cls: type[RFCLibError], function: Callable[[], Any]) -> Any:
    """The error a blocking client call raises (recorded for the address check)."""
    with pytest.raises(cls) as info:
        await blocking(function)
    env.errors += [str(info.value), str(info.value.message)]
    return info.value


def blocking_wait(system: AbapSystem) -> tuple[threading.Event, threading.Event]:
    """Make RFC_PING_AND_WAIT wait for ``release`` (at most SECONDS): (started, release)."""
    started, release = threading.Event(), threading.Event()

    def wait(session: Session, params: dict[str, Any]) -> dict[str, Any]:
        started.set()
        release.wait(params["SECONDS"])
        return {}

    system.register(system.describe("RFC_PING_AND_WAIT"), wait)
    return started, release


async def until_backend_connections(port: int, count: int) -> None:
    """Wait until this process holds exactly ``count`` connections to the backend on ``port``
    (the connector's side of them: everything runs in this process)."""

    def connections() -> int:
        sockets = tcp_sockets(os.getpid())
        return sum(1 for s in sockets if s.remote_port == port and s.state == _ESTABLISHED)

    await trio.to_thread.run_sync(
        wait_until, lambda: connections() == count, f"{count} connection(s) to port {port}"
    )


# ------------------------------------------------------------------ the client by hand


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Raw:
    """The stub protocol by hand through the RFC front door."""

    def __init__(self, env: Env, stream: trio.SocketStream) -> None:
        self.env = env
        self.stream = stream
        self.decoder = MessageDecoder()

    @classmethod
    async def open(cls, env: Env) -> Raw:
        address = env.front_door
        raw = cls(env, await trio.open_tcp_stream(address.host, address.port))
        env.raws.append(raw)
        return raw

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(encode_message(message))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> dict[str, Any] | None:
        """The next answer, or None when the connection ends."""
        with trio.fail_after(STEP):
            while (message := self.decoder.next_message()) is None:
                if self.decoder.at_eof:
                    return None
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""  # reset: ended all the same
                self.decoder.receive_data(data)
        error = message.get("error")
        if isinstance(error, dict):
            self.env.errors += [str(v) for v in error.values() if isinstance(v, str)]
            self.env.errors += [str(a) for a in error.get("args", [])]
        return message

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(message)
        answer = await self.receive()
        assert answer is not None, f"no answer to {message!r}: the connection ended"
        return answer

    async def ended(self) -> bool:
        """True if the connection ends without another answer."""
        return await self.receive() is None

    async def aclose(self) -> None:
        await self.stream.aclose()


def route(host: str = VIRTUAL_HOST, **overrides: str) -> dict[str, str]:
    return {"app": "acme/crm", "app_secret": APP_SECRET, "ashost": host, "sysnr": "00", **overrides}


async def raw_logon(env: Env, host: str = VIRTUAL_HOST, **route_overrides: str) -> Raw:
    raw = await Raw.open(env)
    if env.location:
        route_overrides.setdefault("location_id", env.location)
    answer = await raw.request({"op": "logon", **LOGON, "route": route(host, **route_overrides)})
    assert answer["ok"], answer
    return raw


def refused(answer: dict[str, Any] | None, cls: str, key: str) -> str:
    """The message of an error answer of class ``cls`` and key ``key``."""
    assert answer is not None
    assert answer["ok"] is False, answer
    error = answer["error"]
    assert (error["class"], error["key"]) == (cls, key), error
    return str(error["message"])


# ------------------------------------------------------------------ function rules


ALLOWED = ["STFC_CONNECTION", "stfc_connection", "Stfc_Connection"]
#: Allowed by a rule, but the system has no such function module: FU_NOT_FOUND.
ALLOWED_UNKNOWN = ["/BCNS/Z_ANY", "/bcns/z_any", "/BCX/Z_ONE", "/bcx/z_one", "STFC_" + "X" * 25]
NOT_COVERED: list[Any] = [
    "BAPI_USER_GET_DETAIL",
    "bapi_user_get_detail",
    "Bapi_User_Get_Detail",
    "/BCNSX/Z_ANY",  # a prefix rule "/BCNS/" ends at the namespace's closing slash
    "/BCX/Z_ONE_MORE",  # exact means exact
    "/BCX/Z_ON",
    "RFC_PINGX",
    "BCNS_Z_ANY",
    123,  # not a string: compared as its text
    None,
    True,
]
NOT_A_NAME: list[Any] = [
    " STFC_CONNECTION",
    "STFC_CONNECTION ",
    "STFC_CONNECTION\x00",
    "STFC_CONNECTION\x00\x00",
    "STFC_CONNECTION\n",
    "\tRFC_PING",
    "RFC_PING\u200b",  # zero-width space
    "\u017ftfc_connection",  # long s: upper() is "S"
    "rfc_p\u0131ng",  # dotless i: upper() is "I"
    "\ufb05fc_connection",  # the st ligature: upper() is "ST"
    "\uff33\uff34\uff26\uff23_CONNECTION",  # full-width STFC
    "S\u0422FC_CONNECTION",  # Cyrillic TE
    "STFC_CONNECT\u0130ON",  # dotted capital I
    "STFC_" + "X" * 26,  # 31 characters
    "A" * 100_000,
    "/BCNS//Z",
    "//BCNS/Z",
    "/BCNS/",
    "BCNS/Z_X",
    "/BCNS/Z/X",
    "STFC-CONNECTION",
    "STFC_CONNECTION;RFC_PING",
    "STFC_CONNECTION%00",
    "../STFC_CONNECTION",
    "*",
    "STFC_*",
    "",
    ["STFC_CONNECTION"],
    {"name": "STFC_CONNECTION"},
]


@pytest.mark.parametrize("op", ["describe", "call"])
async def test_function_rules_cannot_be_sidestepped_by_spelling(tmp_path: Path, op: str) -> None:
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        backends = {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"}
        async with running(tmp_path, backends) as env:
            other = await blocking(env.connect)
            raw = await raw_logon(env)

            async def ask(name: Any) -> dict[str, Any]:
                message: dict[str, Any] = {"op": op, "name": name}
                if op == "call":
                    message["params"] = {"REQUTEXT": "hostile"} if name in ALLOWED else {}
                return await raw.request(message)

            for name in ALLOWED:
                answer = await ask(name)
                assert answer["ok"], (name, answer)
                if op == "call":
                    assert answer["result"]["ECHOTEXT"] == "hostile"
                else:
                    assert answer["description"]["name"] == "STFC_CONNECTION"
            for name in ALLOWED_UNKNOWN:
                message = refused(await ask(name), "ABAPApplicationError", "FU_NOT_FOUND")
                assert name.upper() in message
            for name in NOT_COVERED:
                message = refused(
                    await ask(name), "ExternalAuthorizationError", "RFC_AUTHORIZATION_FAILURE"
                )
                canonical = str(name).upper()
                assert message == (
                    f"Access denied to function module {canonical} on system "
                    f"{VIRTUAL_HOST}:3300 by the connector: no active function rule covers "
                    f"{canonical}"
                )
            for name in NOT_A_NAME:
                message = refused(
                    await ask(name), "ExternalAuthorizationError", "RFC_AUTHORIZATION_FAILURE"
                )
                assert message.startswith("Access denied to function module "), (name, message)
                assert message.endswith("is not a valid function module name"), (name, message)
                assert len(message) < 300, (name[:40], len(message))
            # Denials do not end the session, and the other session never noticed.
            assert (await raw.request({"op": "ping"}))["ok"]
            answer = await raw.request(
                {"op": "call", "name": "RFC_PING", "params": {}, "not_requested": ["NOPE"]}
            )
            assert refused(answer, "ExternalRuntimeError", "RFC_INVALID_PARAMETER")
            assert await blocking(lambda: other.call("STFC_CONNECTION", REQUTEXT="x"))
            await raw.aclose()
            await blocking(other.close)
        nursery.cancel_scope.cancel()
    denied = [
        line
        for line in audit_lines(env.connector_audit)
        if line["event"] == "rfc_call" and line["decision"] == "deny"
    ]
    assert len(denied) == len(NOT_COVERED) + len(NOT_A_NAME)
    assert {line["action"] for line in denied} == {op}
    # A caller's name of any length makes a bounded audit line.
    assert max(len(json.dumps(line)) for line in denied) < 1000


# ------------------------------------------------------------------ protocol states


async def test_requests_out_of_turn_are_protocol_errors(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        async with running(tmp_path, {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"}) as env:
            other = await blocking(env.connect)
            # Before the logon the front door takes nothing else, and no tunnel stream opens.
            for first in (
                {"op": "call", "name": "STFC_CONNECTION", "route": route()},
                {"op": "describe", "name": "RFC_PING", "route": route()},
                {"op": "ping"},
                {"op": "close"},
                {"op": "register", "program_id": "X"},
                {"name": "STFC_CONNECTION"},
            ):
                raw = await Raw.open(env)
                message = refused(await raw.request(first), "RFCLibError", "RFC_INVALID_PROTOCOL")
                assert message == "the first request on an RFC connection must be a logon"
                assert await raw.ended()
            # A logon without a route is a client that does not know the gateway.
            raw = await Raw.open(env)
            message = refused(
                await raw.request({"op": "logon", **LOGON, "route": "acme"}),
                "RFCLibError",
                "RFC_INVALID_PROTOCOL",
            )
            assert "this is a backchannel gateway" in message
            assert await raw.ended()
            # A failed logon ends the connection.
            raw = await Raw.open(env)
            answer = await raw.request({"op": "logon", **LOGON, "passwd": "x", "route": route()})
            assert refused(answer, "LogonError", "RFC_LOGON_FAILURE")
            assert await raw.ended()
            # After the logon: a second logon, unknown ops and ops that are not strings.
            for op in ("logon", "register", "CALL", "call ", "", 5, None, ["call"], {"op": "ping"}):
                raw = await raw_logon(env)
                message = refused(
                    await raw.request({"op": op, **LOGON, "name": "RFC_PING"}),
                    "RFCLibError",
                    "RFC_INVALID_PROTOCOL",
                )
                assert message == f"operation {op!r} not allowed in state logged_on"
                assert await raw.ended()
            raw = await raw_logon(env)
            message = refused(
                await raw.request({"name": "RFC_PING"}), "RFCLibError", "RFC_INVALID_PROTOCOL"
            )
            assert message == "operation None not allowed in state logged_on"
            # After close nothing more is answered.
            raw = await raw_logon(env)
            assert await raw.request({"op": "close"}) == {"ok": True}
            await raw.send({"op": "ping"})
            assert await raw.ended()
            assert await blocking(lambda: other.call("RFC_PING")) == {}
            await blocking(other.close)
        nursery.cancel_scope.cancel()


#: Bytes after a valid logon that are not a request the connector can answer.
MALFORMED = {
    "over the size limit": (struct.pack(">I", 65537), "message of 65537 bytes exceeds the maximum"),
    "not JSON": (frame(b"hello"), "message is not UTF-8 JSON"),
    "not UTF-8": (frame(b'{"op":"\xff"}'), "message is not UTF-8 JSON"),
    "an array": (frame(b'["ping"]'), "message is not a JSON object"),
    "a string": (frame(b'"ping"'), "message is not a JSON object"),
    "a number too long": (
        frame(b'{"op":"call","name":"STFC_CONNECTION","timeout":' + b"9" * 5000 + b"}"),
        "message holds a number too long to convert",
    ),
    "nesting too deep": (
        frame(b'{"op":"call","name":"RFC_PING","params":' + b"[" * 20000 + b"]" * 20000 + b"}"),
        "message is nested too deeply",
    ),
    "a lone surrogate": (
        frame(b'{"op":"call","name":"\\ud800STFC_CONNECTION"}'),
        "message holds a lone surrogate",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_request_after_logon_is_a_protocol_error(tmp_path: Path, case: str) -> None:
    data, expected = MALFORMED[case]
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        async with running(
            tmp_path,
            {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"},
            connector_plugin={"max_message_size": 65536},
        ) as env:
            other = await blocking(env.connect)
            raw = await raw_logon(env)
            await raw.send_raw(data)
            message = refused(await raw.receive(), "RFCLibError", "RFC_INVALID_PROTOCOL")
            assert message.startswith(expected)
            assert await raw.ended()
            assert await blocking(lambda: other.call("RFC_PING")) == {}
            await blocking(other.close)
        nursery.cancel_scope.cancel()


#: First messages at the front door that must be refused without harming the gateway.
HOSTILE_LOGONS: dict[str, tuple[bytes, str, str] | None] = {
    "over the size limit": (
        struct.pack(">I", 16 * 1024 * 1024 + 1),
        "RFC_INVALID_PROTOCOL",
        "exceeds the maximum",
    ),
    "not JSON": (frame(b"\x00\x01"), "RFC_INVALID_PROTOCOL", "message is not UTF-8 JSON"),
    "a number too long": (
        frame(b'{"op":"logon","client":' + b"1" * 5000 + b"}"),
        "RFC_INVALID_PROTOCOL",
        "message holds a number too long",
    ),
    "nesting too deep": (
        frame(b'{"op":"logon","route":' + b"[" * 20000 + b"]" * 20000 + b"}"),
        "RFC_INVALID_PROTOCOL",
        "message is nested too deeply",
    ),
    "a lone surrogate in the app secret": (
        frame(
            b'{"op":"logon","client":"100","user":"DEMO","passwd":"welcome","route":'
            b'{"app":"acme/crm","app_secret":"\\udc80","ashost":"erp.virtual"}}'
        ),
        "RFC_INVALID_PROTOCOL",
        "message holds a lone surrogate",
    ),
    "a lone surrogate in the ABAP user": (
        frame(
            b'{"op":"logon","client":"100","user":"\\ud800","passwd":"welcome","route":'
            + json.dumps(route()).encode()
            + b"}"
        ),
        "RFC_INVALID_PROTOCOL",
        "message holds a lone surrogate",
    ),
    "credentials of the wrong type": (
        frame(
            b'{"op":"logon","route":{"app":["acme/crm"],"app_secret":{"s":1},'
            b'"ashost":"erp.virtual"}}'
        ),
        "RFC_LOGON_FAILURE",
        "gateway: application credentials refused: no application credentials",
    ),
    "half a length prefix": (b"\x00\x00", "", ""),
    "half a message": (struct.pack(">I", 100) + b'{"op":"lo', "", ""),
    "nothing": (b"", "", ""),
}


async def test_hostile_first_messages_do_not_harm_the_front_door(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        async with running(
            tmp_path,
            {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"},
            gateway_plugin={"handshake_timeout": 0.5},
        ) as env:
            other = await blocking(env.connect)
            for case, expected in HOSTILE_LOGONS.items():
                assert expected is not None
                data, key, text = expected
                raw = await Raw.open(env)
                await raw.send_raw(data)
                if key:
                    answer = await raw.receive()
                    assert answer is not None, case
                    error = answer["error"]
                    assert error["key"] == key, (case, error)
                    assert text in str(error["message"]), (case, error)
                # Refused, or closed after handshake_timeout: either way the connection ends.
                assert await raw.ended(), case
                await raw.aclose()
                assert await blocking(lambda: other.call("RFC_PING")) == {}, case
            assert await blocking(lambda: env.call_once("RFC_PING")) == {}
            await blocking(other.close)
        nursery.cancel_scope.cancel()


HUGE = "x" * 1_000_000
#: Route fields no valid route has, and the refusal each gets: (route, class, key, start of text).
ODD_ROUTES: list[tuple[dict[str, str], str, str, str]] = [
    (
        {"app": "acme/" + HUGE, "app_secret": APP_SECRET, "ashost": VIRTUAL_HOST},
        "LogonError",
        "RFC_LOGON_FAILURE",
        "gateway: application credentials refused: invalid app credentials for 'acme/xxx",
    ),
    (route(dest=HUGE), "ExternalAuthorizationError", "RFC_NOT_FOUND", "gateway: no RFC dest"),
    (route(HUGE), "CommunicationError", "RFC_INVALID_PARAMETER", "gateway: pass ashost"),
    (route(location_id=HUGE), "CommunicationError", "RFC_INVALID_PARAMETER", "gateway: location"),
    (route(sysnr=HUGE), "CommunicationError", "RFC_INVALID_PARAMETER", "gateway: sysnr 'xxx"),
    (route(gwserv="9" * 5000), "CommunicationError", "RFC_INVALID_PARAMETER", "gateway: gwserv"),
    # Digits of other scripts and superscripts are digits to str.isdigit(), not to a port.
    (
        route(gwserv="\u0663\u0663\u0660\u0660"),
        "CommunicationError",
        "RFC_INVALID_PARAMETER",
        "gateway: gwserv",
    ),
    (route(gwserv="\u00b3"), "CommunicationError", "RFC_INVALID_PARAMETER", "gateway: gwserv"),
]


async def test_odd_route_fields_get_short_refusals(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        async with running(tmp_path, {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"}) as env:
            other = await blocking(env.connect)
            for fields, cls, key, start in ODD_ROUTES:
                raw = await Raw.open(env)
                answer = await raw.request({"op": "logon", **LOGON, "route": fields})
                message = refused(answer, cls, key)
                assert message.startswith(start), message[:200]
                assert len(message) < 500, message[:200]
                assert await raw.ended()
                assert await blocking(lambda: other.call("RFC_PING")) == {}
            await blocking(other.close)
        nursery.cancel_scope.cancel()
    # Audit lines stay short too: the caller's names are cut, not copied.
    lines = env.gateway_audit.read_text().splitlines()
    assert max(len(line) for line in lines) < 1000


async def test_an_unexpected_failure_with_one_client_spares_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        async with running(tmp_path, {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"}) as env:
            other = await blocking(env.connect)
            authenticate = env.gateway.authenticate_basic

            def broken(username: str, password: str) -> Any:
                if username == "acme/boom":
                    raise RuntimeError("a bug somewhere below the front door")
                return authenticate(username, password)

            monkeypatch.setattr(env.gateway, "authenticate_basic", broken)
            raw = await Raw.open(env)
            await raw.send({"op": "logon", **LOGON, "route": route(app="acme/boom")})
            assert await raw.ended()
            assert await blocking(lambda: other.call("RFC_PING")) == {}
            assert await blocking(lambda: env.call_once("RFC_PING")) == {}
            await blocking(other.close)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ clients that go away


async def test_client_hanging_up_mid_call_gives_the_backend_connection_back(
    tmp_path: Path,
) -> None:
    system = demo_system()
    started, release = blocking_wait(system)
    try:
        async with trio.open_nursery() as nursery:
            stub = await start_stub(nursery, system)
            other_stub = await start_stub(nursery, demo_system())
            backends = {
                VIRTUAL_HOST: f"127.0.0.1:{stub.port}",
                OTHER_HOST: f"127.0.0.1:{other_stub.port}",
            }
            async with running(
                tmp_path,
                backends,
                connector_plugin={"max_connections": 1, "pool_wait_timeout": 5},
            ) as env:
                other = await blocking(lambda: env.connect(OTHER_HOST))
                raw = await raw_logon(env)
                await raw.send(
                    {"op": "call", "name": "RFC_PING_AND_WAIT", "params": {"SECONDS": 60}}
                )
                assert await blocking(lambda: started.wait(STEP))
                await raw.aclose()
                # The only backend connection comes back at once, not after the 60 s call.
                result = await blocking(
                    lambda: env.call_once("STFC_CONNECTION", REQUTEXT="after the hang-up")
                )
                assert result["ECHOTEXT"] == "after the hang-up"
                # The cancelled connection is closed, even once the client has recovered from
                # the cancel by opening a new one: only the pooled connection stays.
                await until_backend_connections(stub.port, 1)
                assert await blocking(lambda: other.call("RFC_PING")) == {}
                await blocking(other.close)
            nursery.cancel_scope.cancel()
    finally:
        release.set()


async def test_tunnel_lost_mid_call_never_pools_the_busy_connection(tmp_path: Path) -> None:
    system = demo_system()
    started, release = blocking_wait(system)
    try:
        async with trio.open_nursery() as nursery:
            stub = await start_stub(nursery, system)
            async with running(tmp_path, {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"}) as env:
                raw = await raw_logon(env)
                await raw.send(
                    {"op": "call", "name": "RFC_PING_AND_WAIT", "params": {"SECONDS": 60}}
                )
                assert await blocking(lambda: started.wait(STEP))
                tunnel = await env.connector.wait_connected()
                tunnel.abort("test: the tunnel is lost")
                assert await raw.ended()
                with trio.fail_after(STEP):
                    await env.connector.wait_status(
                        lambda s: s.connected and s.tunnel is not tunnel
                    )
                # The same logon again: the connection still waiting for RFC_PING_AND_WAIT
                # must not be handed out.
                result = await blocking(lambda: env.call_once("STFC_CONNECTION", REQUTEXT="x"))
                assert result["ECHOTEXT"] == "x"
                await until_backend_connections(stub.port, 1)
            nursery.cancel_scope.cancel()
    finally:
        release.set()


async def test_half_a_request_holds_the_backend_only_until_idle_timeout(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        async with running(
            tmp_path,
            {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"},
            connector_plugin={"max_connections": 1, "pool_wait_timeout": 5, "idle_timeout": 1},
        ) as env:
            raw = await raw_logon(env)
            await raw.send_raw(struct.pack(">I", 100) + b'{"op":"ca')
            # The next session waits for the only backend connection, which comes back once
            # the half-sent request has been idle for a second.
            assert await blocking(lambda: env.call_once("RFC_PING")) == {}
            assert await raw.ended()
        nursery.cancel_scope.cancel()


async def test_idle_connections_of_other_logons_do_not_starve_a_logon(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        async with running(
            tmp_path,
            {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"},
            connector_plugin={"max_connections": 1, "pool_wait_timeout": 3},
        ) as env:
            alice = {"user": "ALICE", "passwd": "secret1"}
            # DEMO's connection goes idle, holding the only slot; ALICE's logon gets it.
            await blocking(lambda: env.connect().close())
            await blocking(lambda: env.connect(**alice).close())
            # ALICE's idle connection, then DEMO busy and ALICE waiting for the slot: when
            # DEMO is done, the slot goes to ALICE rather than to an idle DEMO connection.
            demo = await blocking(env.connect)
            backend = env.pool._backends[HostPort("127.0.0.1", stub.port)]
            async with trio.open_nursery() as waiting:
                waiting.start_soon(blocking, lambda: env.connect(**alice).close())
                await trio.to_thread.run_sync(
                    wait_until,
                    lambda: backend.slots.statistics().tasks_waiting == 1,
                    "ALICE's logon to wait for the only connection",
                )
                await blocking(demo.close)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ backends that fail


async def test_backend_killed_mid_session_and_back(tmp_path: Path) -> None:
    system = demo_system()
    started, release = blocking_wait(system)
    try:
        async with trio.open_nursery() as nursery:
            stub = await start_stub(nursery, system)
            other_stub = await start_stub(nursery, demo_system())
            backends = {
                VIRTUAL_HOST: f"127.0.0.1:{stub.port}",
                OTHER_HOST: f"127.0.0.1:{other_stub.port}",
            }
            async with running(tmp_path, backends) as env:
                other = await blocking(lambda: env.connect(OTHER_HOST))
                raw = await raw_logon(env)
                await raw.send(
                    {"op": "call", "name": "RFC_PING_AND_WAIT", "params": {"SECONDS": 60}}
                )
                assert await blocking(lambda: started.wait(STEP))
                await stub.kill()
                # The broken connection, or the failed attempt to open it again.
                refused(await raw.receive(), "CommunicationError", "RFC_COMMUNICATION_FAILURE")
                assert await blocking(lambda: other.call("RFC_PING")) == {}
                # While it is down, new sessions get the same clean error.
                error = await expect_error(env, CommunicationError, env.connect)
                assert error.message == f"partner '{VIRTUAL_HOST}:3300' not reached"
                # Back on the same port: the next connection works.
                await start_stub(nursery, system, stub.port)
                result = await blocking(lambda: env.call_once("STFC_CONNECTION", REQUTEXT="y"))
                assert result["ECHOTEXT"] == "y"
                assert await blocking(lambda: other.call("RFC_PING")) == {}
                await blocking(other.close)
            nursery.cancel_scope.cancel()
    finally:
        release.set()


LOGON_OK = json.dumps(
    {"ok": True, "sysid": "FAK", "release": "758", "client": "100", "user": "DEMO", "language": "E"}
).encode()


@asynccontextmanager
async def fake_backend(answer: Callable[[dict[str, Any]], bytes | None]) -> AsyncIterator[int]:
    """A backend whose answer to each request is ``answer(request)``: the body of the answer
    message as raw JSON bytes, or None for no answer ever."""

    async def serve(stream: trio.SocketStream) -> None:
        decoder = MessageDecoder()
        async with stream:
            # A client sends "close" and closes its socket at once, as pyrfc's does: when the
            # answer arrives first, its kernel resets the connection, as a real backend sees.
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await stream.receive_some(65536):
                    decoder.receive_data(data)
                    while (message := decoder.next_message()) is not None:
                        body = answer(message)
                        if body is not None:
                            await stream.send_all(frame(body))

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, serve, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()  # closes the connections: the waiting threads end


def silent_backend(*, answer_logon: bool) -> AbstractAsyncContextManager[int]:
    """A backend that reads, but never answers (except, with ``answer_logon``, the logon)."""
    return fake_backend(lambda m: LOGON_OK if answer_logon and m.get("op") == "logon" else None)


@pytest.mark.parametrize("answer_logon", [False, True], ids=["silent", "silent-after-logon"])
async def test_backend_that_never_answers_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer_logon: bool
) -> None:
    monkeypatch.setattr(_handler, "CANCEL_GRACE", 0.2)
    silent_host = "silent.virtual"
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        async with silent_backend(answer_logon=answer_logon) as silent_port:
            backends = {
                VIRTUAL_HOST: f"127.0.0.1:{stub.port}",
                silent_host: f"127.0.0.1:{silent_port}",
            }
            async with running(tmp_path, backends, mapping_extra={"call_timeout": 0.5}) as env:
                other = await blocking(env.connect)
                if not answer_logon:
                    error = await expect_error(
                        env, CommunicationError, lambda: env.connect(silent_host)
                    )
                    assert (error.key, error.message) == (
                        "RFC_CANCELED",
                        f"logon to {silent_host}:3300 canceled after 0.5 s",
                    )
                else:
                    for request in ({"op": "ping"}, {"op": "describe", "name": "RFC_PING"}):
                        raw = await raw_logon(env, silent_host)
                        message = refused(
                            await raw.request(request), "CommunicationError", "RFC_CANCELED"
                        )
                        assert message == (
                            f"{request['op']} to {silent_host}:3300 canceled after 0.5 s"
                        )
                        # The backend connection is given up, and the session with it.
                        assert await raw.ended()
                assert await blocking(lambda: other.call("RFC_PING")) == {}
                await blocking(other.close)
        nursery.cancel_scope.cancel()


async def test_answers_the_tunnel_cannot_carry_are_refused(tmp_path: Path) -> None:
    system = demo_system()

    def answer(request: dict[str, Any]) -> bytes | None:
        op, name = request.get("op"), str(request.get("name"))
        if op in ("logon", "ping", "close"):
            return LOGON_OK if op == "logon" else b'{"ok":true}'
        if op == "describe":
            wire = description_to_wire(system.describe(name))
            return json.dumps({"ok": True, "description": wire}).encode()
        if name == "STFC_CONNECTION":  # a string that is not Unicode, as broken data may hold
            return b'{"ok":true,"result":{"ECHOTEXT":"\\ud800","RESPTEXT":"x"}}'
        rows = [{"WA": "x" * 512}] * 200  # RFC_READ_TABLE: 100 KB, over max_message_size
        return json.dumps({"ok": True, "result": {"DATA": rows}}).encode()

    async with (
        fake_backend(answer) as port,
        running(
            tmp_path,
            {VIRTUAL_HOST: f"127.0.0.1:{port}"},
            connector_plugin={"max_message_size": 65536},
        ) as env,
    ):
        raw = await raw_logon(env)
        for name, text in (
            ("STFC_CONNECTION", "message holds a lone surrogate"),
            ("RFC_READ_TABLE", "message of "),
        ):
            call = {"op": "call", "name": name, "params": {}}
            message = refused(await raw.request(call), "RFCLibError", "RFC_INVALID_PROTOCOL")
            assert message.startswith(text), message
            assert (await raw.request({"op": "ping"}))["ok"]


def _unused_port(family: socket.AddressFamily, host: str) -> int:
    with socket.socket(family) as unused:
        unused.bind((host, 0))
        port: int = unused.getsockname()[1]
    return port


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "name"])
async def test_unreachable_backend_error_names_the_virtual_system_only(
    tmp_path: Path, family: str
) -> None:
    internal = {
        "ipv4": f"127.0.0.1:{_unused_port(socket.AF_INET, '127.0.0.1')}",
        "ipv6": f"[::1]:{_unused_port(socket.AF_INET6, '::1')}",
        "name": f"localhost:{_unused_port(socket.AF_INET, '127.0.0.1')}",
    }[family]
    async with running(tmp_path, {VIRTUAL_HOST: internal}) as env:
        error = await expect_error(env, CommunicationError, env.connect)
        assert error.key == "RFC_COMMUNICATION_FAILURE"
        assert error.message == f"partner '{VIRTUAL_HOST}:3300' not reached"


# ------------------------------------------------------------------ tenants and secrets


async def test_another_tenant_cannot_route_to_acme(tmp_path: Path) -> None:
    destination = {
        "name": "ERP",
        "subaccount": "acme",
        "ashost": VIRTUAL_HOST,
        "sysnr": "00",
        "client": "100",
        "location": "loc-a",
        "authentication": "BasicAuthentication",
        "user": "DEMO",
        "password": "welcome",
    }
    async with trio.open_nursery() as nursery:
        acme_stub = await start_stub(nursery, demo_system())
        globex_system = AbapSystem("GLX")
        for name in ("RFC_PING", "STFC_CONNECTION"):
            globex_system.register(demo_system().describe(name), lambda s, p: {})
        globex_system.add_user("100", demo_system().users["100"]["DEMO"])
        globex_stub = await start_stub(nursery, globex_system)
        async with running(
            tmp_path,
            {VIRTUAL_HOST: f"127.0.0.1:{acme_stub.port}"},
            location="loc-a",
            destinations=[destination],
            globex_backends={VIRTUAL_HOST: f"127.0.0.1:{globex_stub.port}"},
        ) as env:
            acme = await blocking(env.connect)
            globex = {"app": "globex/erp", "app_secret": GLOBEX_SECRET}

            async def globex_logon(
                route_fields: dict[str, str], **top: str
            ) -> tuple[Raw, dict[str, Any]]:
                raw = await Raw.open(env)
                return raw, await raw.request(
                    {"op": "logon", **LOGON, **top, "route": {**globex, **route_fields}}
                )

            # Naming acme's virtual host reaches globex's own system, whatever else is said.
            for fields, top in (
                ({"ashost": VIRTUAL_HOST, "sysnr": "00"}, {}),
                ({"ashost": VIRTUAL_HOST, "subaccount": "acme"}, {}),
                ({"ashost": VIRTUAL_HOST}, {"subaccount": "acme", "location": "loc-a"}),
                ({"ashost": VIRTUAL_HOST}, {"tpname": "ACME_PROGRAM"}),
            ):
                raw, answer = await globex_logon(fields, **top)
                assert answer["ok"], (fields, top, answer)
                assert answer["sysid"] == "GLX", (fields, top, answer)
                await raw.aclose()
            # acme's location is not globex's.
            raw, answer = await globex_logon({"ashost": VIRTUAL_HOST, "location_id": "loc-a"})
            message = refused(answer, "CommunicationError", "RFC_COMMUNICATION_FAILURE")
            assert "no connector of subaccount 'globex'" in message
            # acme's destination does not exist for globex, however it is spelled.
            for dest in ("ERP", "erp", "acme/ERP", "ERP ", "../ERP"):
                raw, answer = await globex_logon({"dest": dest})
                message = refused(answer, "ExternalAuthorizationError", "RFC_NOT_FOUND")
                assert (
                    message == f"gateway: no RFC destination named {dest!r} for subaccount 'globex'"
                )
                assert await raw.ended()
            # Claiming acme's app with globex's secret is a wrong secret.
            for app in ("acme/crm", "ACME/crm", "acme/crm/../erp"):
                raw, answer = await globex_logon({"app": app, "ashost": VIRTUAL_HOST})
                message = refused(answer, "LogonError", "RFC_LOGON_FAILURE")
                assert message.startswith("gateway: application credentials refused")
            # acme carries on, by host and by destination.
            assert (await blocking(acme.get_connection_attributes))["sysId"] == "BCH"
            params = {"gateway": str(env.front_door), "app": "acme/crm", "app_secret": APP_SECRET}
            with_dest = await blocking(lambda: Connection(None, dest="erp", **params))
            assert with_dest.get_connection_attributes()["sysId"] == "BCH"
            await blocking(with_dest.close)
            await blocking(acme.close)
        nursery.cancel_scope.cancel()
    denied = [e for e in audit_lines(env.gateway_audit) if e["decision"] == "deny"]
    assert {e["event"] for e in denied} >= {"rfc_destination", "rfc_app_auth", "open_stream"}


async def test_audit_and_logs_never_hold_passwords_or_app_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_password, wrong_secret = "wrong-password-4711", "wrong-app-secret-0815"
    destination_password = "welcome"  # DEMO's: the destination logs on with it
    destination = {
        "name": "ERP",
        "subaccount": "acme",
        "ashost": VIRTUAL_HOST,
        "client": "100",
        "authentication": "BasicAuthentication",
        "user": "DEMO",
        "password": destination_password,
    }
    async with trio.open_nursery() as nursery:
        stub = await start_stub(nursery, demo_system())
        async with running(
            tmp_path, {VIRTUAL_HOST: f"127.0.0.1:{stub.port}"}, destinations=[destination]
        ) as env:
            params = {"gateway": str(env.front_door), "app": "acme/crm", "app_secret": APP_SECRET}
            assert await blocking(lambda: env.call_once("RFC_PING")) == {}
            await expect_error(env, LogonError, lambda: env.connect(passwd=wrong_password))
            await expect_error(env, LogonError, lambda: env.connect(app_secret=wrong_secret))
            await expect_error(
                env, LogonError, lambda: env.connect(app="globex/erp", app_secret=APP_SECRET)
            )
            with_dest = await blocking(lambda: Connection(None, dest="ERP", **params))
            await blocking(lambda: with_dest.call("RFC_PING"))
            await blocking(with_dest.close)
            raw = await raw_logon(env)
            denied = await raw.request({"op": "call", "name": "BAPI_USER_GET_DETAIL"})
            refused(denied, "ExternalAuthorizationError", "RFC_AUTHORIZATION_FAILURE")
            await raw.aclose()
        nursery.cancel_scope.cancel()
    gateway, connector = audit_lines(env.gateway_audit), audit_lines(env.connector_audit)
    # The trail is there (allowed logons and calls, refused credentials), without secrets.
    assert {e["event"] for e in connector} >= {"rfc_logon", "rfc_call", "stream"}
    assert {e["event"] for e in gateway} >= {"rfc_app_auth", "open_stream"}
    texts = {
        "gateway audit": env.gateway_audit.read_text(),
        "connector audit": env.connector_audit.read_text(),
        "log": caplog.text,
    }
    for secret in (APP_SECRET, GLOBEX_SECRET, wrong_secret, wrong_password, destination_password):
        for where, text in texts.items():
            assert secret not in text, f"{secret!r} in the {where}"
