"""The RFC plugin's HTTP JSON endpoint, on 127.0.0.1 with real sockets, against a fake
GatewayServices whose streams cross a real tunnel pair (tests/tunnel_pair.py) to a fake connector
that serves each stream with the stub ABAP system's ``StubSession`` (and refuses what a real
connector would). Clients are curl and a small h11 client; raw sockets for hostile input; the
timeout cases run over memory streams with the autojump clock.

Every response any test receives is checked for the destinations' passwords.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import h11
import pytest
import trio
import trio.testing

from backchannel import (
    AppIdentity,
    AuditLog,
    AuthenticationError,
    HostPort,
    NotConnectedError,
    ResetCode,
    Role,
    Secret,
    TunnelStream,
)
from backchannel_rfc import _abap_types as t
from backchannel_rfc._call_codec import (
    call_request,
    params_from_json,
    parse_json,
    prepare_call,
    read_result,
    result_to_json,
)
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._descriptions import FunctionDescription, structure
from backchannel_rfc._destinations import RfcDestination, RfcDestinations
from backchannel_rfc._errors import (
    ABAPApplicationError,
    ABAPRuntimeError,
    CommunicationError,
    ExternalAuthorizationError,
    ExternalRuntimeError,
    LogonError,
    RFCError,
    RfcRc,
    RFCTypeError,
    buffer_too_small,
    function_not_found,
    invalid_parameter,
    library_error,
    to_wire,
)
from backchannel_rfc._json_endpoint import RfcJsonEndpoint
from backchannel_rfc._json_http import (
    CallOptions,
    HttpRefusal,
    parse_options,
    parse_target,
    status_for,
)
from backchannel_rfc._message_stream import MessageStream
from backchannel_rfc._stub_protocol import CLOSED, description_to_wire
from backchannel_rfc._stub_server import StubSession
from backchannel_rfc._system import AbapSystem, Session
from tests.tunnel_pair import TunnelPair, tunnel_pair

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
HOST = "127.0.0.1"
APP_SECRET = "s3cret"
BASIC = "Basic " + base64.b64encode(f"acme/app:{APP_SECRET}".encode()).decode()
TOKEN = "token-acme-app"
DEMO_PASSWORD = "welcome"
WRONG_PASSWORD = "Wr0ng-Pa55-7"
PASSWORDS = (DEMO_PASSWORD.encode(), WRONG_PASSWORD.encode())
#: A function module the fake connector's function rules deny.
DENIED_FUNCTION = "BAPI_USER_GET_DETAIL"
JSON = ("Content-Type", "application/json")


def _destination(name: str, subaccount: str, host: str, **kwargs: Any) -> RfcDestination:
    password = kwargs.pop("password", DEMO_PASSWORD)
    return RfcDestination(
        name,
        subaccount,
        HostPort(host, 3300),
        "100",
        authentication="BasicAuthentication",
        user="DEMO",
        password=Secret(password, "test"),
        **kwargs,
    )


DESTINATIONS = RfcDestinations(
    [
        _destination("ERP", "acme", "erp.virtual"),
        _destination("BADPW", "acme", "erp.virtual", password=WRONG_PASSWORD),
        _destination("OFFLINE", "acme", "erp.virtual", location="offline"),
        _destination("LOCKED", "acme", "denied.virtual"),
        _destination("GLOBEX", "globex", "erp.virtual"),
    ]
)


# ------------------------------------------------------------------------------- a test module

_ALL_TYPES_LINE = structure(
    "ZLINE",
    [("ID", t.INT8, 8), ("AMOUNT", t.BCD, 8, 2), ("NOTE", t.STRING, 0)],
)
_ALL_TYPES = structure(
    "ZALLTYPES",
    [
        ("CHAR", t.CHAR, 10),
        ("NUMC", t.NUM, 6),
        ("DATE", t.DATE, 8),
        ("TIME", t.TIME, 6),
        ("BCD", t.BCD, 8, 3),
        ("FLOAT", t.FLOAT, 8),
        ("DECF16", t.DECF16, 8),
        ("DECF34", t.DECF34, 16),
        ("INT1", t.INT1, 1),
        ("INT2", t.INT2, 2),
        ("INT4", t.INT, 4),
        ("INT8", t.INT8, 8),
        ("BYTE", t.BYTE, 4),
        ("XSTRING", t.XSTRING, 0),
        ("STRING", t.STRING, 0),
        ("LINES", t.TABLE, _ALL_TYPES_LINE),
    ],
)


def _echo_all_types(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    added = {"ID": -1, "AMOUNT": Decimal(0), "NOTE": "added"}
    return {"OUT": params["IN"], "ROWS": [*params["ROWS"], added]}


def _failing(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    raise library_error(ABAPRuntimeError, "COMPUTE_INT_ZERODIVIDE", 3, "RFC_ABAP_RUNTIME_FAILURE")


def make_system() -> AbapSystem:
    """The demo system plus Z_ECHO_ALL_TYPES (every elementary type, a table inside a
    structure) and Z_DUMP (a short dump)."""
    system = demo_system()
    fd = FunctionDescription("Z_ECHO_ALL_TYPES")
    size = _ALL_TYPES.nuc_length
    fd.add_parameter("IN", t.STRUCTURE, "RFC_IMPORT", size, size, type_description=_ALL_TYPES)
    fd.add_parameter("OUT", t.STRUCTURE, "RFC_EXPORT", size, size, type_description=_ALL_TYPES)
    line = _ALL_TYPES_LINE.nuc_length
    fd.add_parameter("ROWS", t.TABLE, "RFC_TABLES", line, line, type_description=_ALL_TYPES_LINE)
    system.register(fd, _echo_all_types)
    system.register(FunctionDescription("Z_DUMP"), _failing)
    return system


# ------------------------------------------------------------------------------- fakes


class RecordingAudit(AuditLog):
    """The audit log, keeping the denials for the test to look at."""

    def __init__(self) -> None:
        super().__init__(Role.GATEWAY)
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def denied(self, event: str, reason: str, **fields: Any) -> None:
        self.records.append((event, reason, fields))
        super().denied(event, reason, **fields)


class FakeServices:
    """GatewayServices whose streams cross a real tunnel pair; location "offline" has no
    connector."""

    def __init__(self, pair: TunnelPair) -> None:
        self.recording = RecordingAudit()
        self.audit: AuditLog = self.recording
        self.denied = self.recording.records
        self.opened: list[dict[str, Any]] = []
        self._pair = pair

    def authenticate_basic(self, username: str, password: str) -> AppIdentity:
        if username != "acme/app" or password != APP_SECRET:
            raise AuthenticationError(f"invalid app credentials for {username!r}")
        return AppIdentity("acme", "app")

    def authenticate_bearer(self, token: str) -> AppIdentity:
        if token != TOKEN:
            raise AuthenticationError("invalid app token")
        return AppIdentity("acme", "app")

    def app_for_forward(self, subaccount: str, name: str) -> AppIdentity:
        return AppIdentity(subaccount, f"forward:{name}")

    def has_subaccount(self, subaccount: str) -> bool:
        return subaccount in {"acme", "globex"}

    async def open_stream(
        self,
        app: AppIdentity,
        *,
        protocol: str,
        target: HostPort,
        location: str = "",
        principal: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        wait_accepted: bool = True,
        first_data: bytes = b"",
    ) -> TunnelStream:
        if location == "offline":
            raise NotConnectedError(app.subaccount, location)
        metadata = {
            "protocol": protocol,
            "host": target.host,
            "port": target.port,
            "subaccount": app.subaccount,
            "location": location,
            "app": app.app,
            "attributes": dict(attributes or {}),
        }
        self.opened.append(metadata)
        return await self._pair.gateway.open_stream(
            metadata, wait_accepted=wait_accepted, first_data=first_data
        )


@dataclass
class Connector:
    """What the fake connector saw: every request of every stream."""

    requests: list[dict[str, Any]] = field(default_factory=list)


def _error(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": to_wire(exc)}


async def _answer(stub: StubSession, request: dict[str, Any]) -> dict[str, Any]:
    """The stub's answer, with a connector's function rules and call timeout in front."""
    name = str(request.get("name", ""))
    if request.get("op") in ("describe", "call") and name == DENIED_FUNCTION:
        return _error(
            library_error(
                ExternalAuthorizationError,
                f"Access denied to function module {name} by the connector",
                RfcRc.RFC_AUTHORIZATION_FAILURE,
                "RFC_AUTHORIZATION_FAILURE",
            )
        )
    text = request.get("params", {}).get("REQUTEXT") if request.get("op") == "call" else None
    if text == "slow":  # the connector cancels the backend call at the request's timeout
        timeout = request["timeout"]
        message = f"call canceled after {timeout:g} s"
        return _error(library_error(CommunicationError, message, 7, "RFC_CANCELED"))
    if text == "hang":  # a connector that never answers
        await trio.sleep_forever()
    return stub.handle(request)


async def serve_rfc(stream: TunnelStream, system: AbapSystem, seen: Connector) -> None:
    stub = StubSession(system)
    messages = MessageStream(stream)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while stub.state != CLOSED and (request := await messages.receive()) is not None:
                seen.requests.append(request)
                await messages.send(await _answer(stub, request))


async def fake_connector(pair: TunnelPair, system: AbapSystem, seen: Connector) -> None:
    """Refuses streams to denied.virtual (no system mapping), serves the others."""
    async with trio.open_nursery() as nursery:
        async for stream in pair.accepted:
            if stream.metadata["host"] == "denied.virtual":
                await stream.reset(ResetCode.ACCESS_DENIED, "no system mapping for it")
                continue
            await stream.accept()
            nursery.start_soon(serve_rfc, stream, system, seen)


@dataclass
class Env:
    services: FakeServices
    endpoint: RfcJsonEndpoint
    connector: Connector
    port: int
    responses: list[bytes]


def check_no_password(env: Env) -> None:
    received = b"".join(env.responses)
    for password in PASSWORDS:
        assert password not in received


@asynccontextmanager
async def running(**settings: Any) -> AsyncIterator[Env]:
    """The endpoint on 127.0.0.1 (port 0), its tunnel and fake connector; on exit, checks that
    no response carried a password."""
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
        services = FakeServices(pair)
        seen = Connector()
        nursery.start_soon(fake_connector, pair, make_system(), seen)
        endpoint = RfcJsonEndpoint(services, HostPort(HOST, 0), DESTINATIONS, **settings)
        [bound] = await nursery.start(endpoint.serve)
        env = Env(services, endpoint, seen, bound.port, [])
        yield env
        nursery.cancel_scope.cancel()
    check_no_password(env)


# ------------------------------------------------------------------------------- clients


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    informational: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        error = self.json()["error"]
        assert isinstance(error, dict)
        assert self.header("X-Backchannel-Error") == f"{error['class']}:{error['key'] or ''}"
        return error


class Client:
    """An HTTP/1.1 client on one kept-alive connection (h11), recording what it receives."""

    def __init__(self, stream: trio.abc.Stream, record: list[bytes]) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.record = record

    async def _next(self) -> Any:
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            data = bytes(await self.stream.receive_some(65536))
            self.record.append(data)
            self.conn.receive_data(data)
        return event

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (("Authorization", BASIC), JSON),
    ) -> Reply:
        with trio.fail_after(20):
            if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                self.conn.start_next_cycle()
            all_headers = [("Host", "gateway"), *headers]
            if body is not None:
                all_headers.append(("Content-Length", str(len(body))))
            data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
            if body:
                data = (data or b"") + (self.conn.send(h11.Data(data=body)) or b"")
            await self.stream.send_all((data or b"") + (self.conn.send(h11.EndOfMessage()) or b""))
            informational = []
            while isinstance(response := await self._next(), h11.InformationalResponse):
                informational.append(response.status_code)
            assert isinstance(response, h11.Response), response
            content = bytearray()
            while isinstance(event := await self._next(), h11.Data):
                content += event.data
            assert isinstance(event, h11.EndOfMessage), event
            headers_out = [(k.decode(), v.decode()) for k, v in response.headers.raw_items()]
            return Reply(
                response.status_code,
                response.reason.decode(),
                headers_out,
                bytes(content),
                informational,
            )

    async def call(self, target: str, params: Any, **kwargs: Any) -> Reply:
        return await self.request("POST", target, json.dumps(params).encode(), **kwargs)


@asynccontextmanager
async def client(env: Env) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream(HOST, env.port)
    async with stream:
        yield Client(stream, env.responses)


async def post(env: Env, target: str, params: Any, **kwargs: Any) -> Reply:
    """One request on a connection of its own."""
    async with client(env) as c:
        return await c.call(target, params, **kwargs)


async def raw(env: Env, data: bytes) -> bytes:
    """Send ``data``; everything the endpoint answers until it closes the connection."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(HOST, env.port)
        async with stream:
            await stream.send_all(data)
            received = bytearray()
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some(65536):
                    received += chunk
    env.responses.append(bytes(received))
    return bytes(received)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@dataclass
class CurlReply:
    status: int
    headers: dict[str, str]
    body: bytes


async def curl(env: Env, *args: str) -> CurlReply:
    """curl -i with the app's credentials; the final response (after any 100 Continue)."""
    assert CURL is not None
    command = [CURL, "-sS", "-i", "--noproxy", "*", "-u", f"acme/app:{APP_SECRET}", *args]
    with trio.fail_after(30):
        done = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, done.stderr
    env.responses.append(done.stdout)
    rest = done.stdout
    while True:
        head, _, rest = rest.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        if not status_line.split(" ")[1].startswith("1"):
            break
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return CurlReply(int(status_line.split(" ")[1]), headers, rest)


# ------------------------------------------------------------------------------- calls


@needs_curl
async def test_stfc_connection_with_curl() -> None:
    async with running() as env:
        url = f"http://{HOST}:{env.port}/rfc/ERP/stfc_connection"
        reply = await curl(
            env, "-H", "Content-Type: application/json", "-d", '{"REQUTEXT":"Hi"}', url
        )
        assert reply.status == 200, reply.body
        assert reply.headers["content-type"] == "application/json"
        result = json.loads(reply.body)
        assert result["ECHOTEXT"] == "Hi"
        assert result["RESPTEXT"].startswith("SAP R/3 Rel. 758   Sysid: BCH")
        assert result["RESPTEXT"].endswith("Logon_Data: 100/DEMO/E")
        assert set(result) == {"ECHOTEXT", "RESPTEXT"}
        # One stream: logon with the destination's user, describe, call, close.
        [opened] = env.services.opened
        assert (opened["protocol"], opened["host"], opened["port"]) == ("rfc", "erp.virtual", 3300)
        assert opened["attributes"] == {"destination": "ERP"}
        ops = [r["op"] for r in env.connector.requests]
        assert ops == ["logon", "describe", "call", "close"]
        logon = env.connector.requests[0]
        assert (logon["client"], logon["user"], logon["passwd"]) == ("100", "DEMO", DEMO_PASSWORD)


@needs_curl
async def test_curl_large_body_with_expect_100_continue() -> None:
    rows = [{"RFCDATA1": f"row {i}", "RFCINT4": i} for i in range(200)]
    body = json.dumps({"IMPORTSTRUCT": {"RFCCHAR4": "ABCD"}, "RFCTABLE": rows})
    async with running() as env:
        url = f"http://{HOST}:{env.port}/rfc/ERP/STFC_STRUCTURE"
        reply = await curl(
            env,
            "-H",
            "Content-Type: application/json",
            "-H",
            "Expect: 100-continue",
            "-d",
            body,
            url,
        )
        assert reply.status == 200, reply.body
        table = json.loads(reply.body)["RFCTABLE"]
        assert [row["RFCINT4"] for row in table[:-1]] == list(range(200))
        assert table[-1]["RFCCHAR4"] == "ABCD"


STFC_STRUCTURE_IN = {
    "RFCFLOAT": 1.2345678901234567,
    "RFCCHAR1": "A",
    "RFCINT2": -32768,
    "RFCINT1": 255,
    "RFCICHAR4": "ab",
    "RFCINT4": 2147483647,
    "RFCHEX3": base64.b64encode(b"\x01\xfe\x00").decode(),
    "RFCCHAR2": "Zz",
    "RFCCHAR4": "ÄÖÜß",
    "RFCTIME": "235959",
    "RFCDATE": "20240229",
    "RFCDATA1": "x" * 50,
    "RFCDATA2": 'unicode ✓ and "quotes"',
}


async def test_stfc_structure_round_trips_every_field_exactly() -> None:
    row = {**STFC_STRUCTURE_IN, "RFCFLOAT": -0.1, "RFCDATE": "19991231", "RFCHEX3": "AAAA"}
    async with running() as env:
        reply = await post(
            env, "/rfc/ERP/STFC_STRUCTURE", {"IMPORTSTRUCT": STFC_STRUCTURE_IN, "RFCTABLE": [row]}
        )
        assert reply.status == 200, reply.body
        result = reply.json()
        assert result["ECHOSTRUCT"] == STFC_STRUCTURE_IN
        assert result["RFCTABLE"] == [row, STFC_STRUCTURE_IN]
        assert list(result) == ["ECHOSTRUCT", "RESPTEXT", "RFCTABLE"]  # description order


ALL_TYPES_IN = {
    "CHAR": "chars",
    "NUMC": "001234",
    "DATE": "20260102",
    "TIME": "030405",
    "BCD": "-12345.678",
    "FLOAT": 6.02214076e23,
    "DECF16": "1234567890.123456",
    "DECF34": "-1.234567890123456789012345678901234E+100",
    "INT1": 7,
    "INT2": -2,
    "INT4": -2147483648,
    "INT8": 9223372036854775807,
    "BYTE": base64.b64encode(b"\x00\xff\x10\x20").decode(),
    "XSTRING": base64.b64encode(bytes(range(256))).decode(),
    "STRING": "a string\nwith lines",
    "LINES": [{"ID": 1, "AMOUNT": "0.10", "NOTE": "n"}],
}


async def test_every_scalar_type_and_a_table_in_a_structure_round_trip_exactly() -> None:
    # Numbers sent as JSON numbers keep every digit (the body is parsed with Decimal).
    body = (
        json.dumps({"IN": ALL_TYPES_IN, "ROWS": [{"ID": -9223372036854775808}]})
        .replace('"BCD": "-12345.678"', '"BCD": -12345.678')
        .replace('"DECF16": "1234567890.123456"', '"DECF16": 1234567890.123456')
        .encode()
    )
    assert b'"BCD": -12345.678' in body
    assert b'"DECF16": 1234567890.123456' in body
    async with running() as env, client(env) as c:
        reply = await c.request("POST", "/rfc/ERP/Z_ECHO_ALL_TYPES", body)
        assert reply.status == 200, reply.body
        result = json.loads(reply.body, parse_float=Decimal)
        out = result["OUT"]
        assert out == {
            **ALL_TYPES_IN,
            "FLOAT": Decimal("6.02214076e+23"),
            "DECF34": "-1.234567890123456789012345678901234E+100",
            "LINES": [{"ID": 1, "AMOUNT": "0.10", "NOTE": "n"}],
        }
        assert float(out["FLOAT"]) == 6.02214076e23
        assert base64.b64decode(out["XSTRING"]) == bytes(range(256))
        assert result["ROWS"] == [
            {"ID": -9223372036854775808, "AMOUNT": "0.00", "NOTE": ""},
            {"ID": -1, "AMOUNT": "0.00", "NOTE": "added"},
        ]
        # With the import parameters, and fields left out come back initial.
        reply = await c.call(
            "/rfc/ERP/Z_ECHO_ALL_TYPES?return_import_params=true", {"IN": {"BCD": 1}}
        )
        assert reply.status == 200, reply.body
        result = reply.json()
        assert set(result) == {"IN", "OUT", "ROWS"}
        assert result["IN"] == result["OUT"]
        assert result["OUT"]["BCD"] == "1.000"
        assert result["OUT"]["NUMC"] == "000000"
        assert result["OUT"]["BYTE"] == "AAAAAA=="
        assert result["OUT"]["DATE"] == "00000000"


async def test_rfc_read_table() -> None:
    params = {
        "QUERY_TABLE": "SCARR",
        "DELIMITER": "|",
        "FIELDS": [{"FIELDNAME": "CARRID"}, {"FIELDNAME": "CARRNAME"}],
        "OPTIONS": [{"TEXT": "CURRCODE = 'USD'"}],
    }
    async with running() as env:
        reply = await post(env, "/rfc/ERP/RFC_READ_TABLE", params)
        assert reply.status == 200, reply.body
        result = reply.json()
        assert [row["WA"] for row in result["DATA"]] == [
            "AA |American Airlines",
            "UA |United Airlines",
        ]
        assert [(f["FIELDNAME"], f["OFFSET"], f["LENGTH"]) for f in result["FIELDS"]] == [
            ("CARRID", "000000", "000003"),
            ("CARRNAME", "000004", "000020"),
        ]
        # rstrip=false keeps trailing blanks; without FIELDS (inactive) every column comes.
        reply = await post(env, "/rfc/ERP/RFC_READ_TABLE?rstrip=false&not_requested=FIELDS", params)
        assert reply.status == 200, reply.body
        result = reply.json()
        assert result["DATA"][0]["WA"] == "AA |American Airlines   |USD  "
        assert result["FIELDS"] == []  # inactive: neither sent nor received
        call = [r for r in env.connector.requests if r["op"] == "call"][-1]
        assert call["not_requested"] == ["FIELDS"]
        assert "FIELDS" not in call["params"]


async def test_get_answers_the_function_description() -> None:
    async with running() as env, client(env) as c:
        reply = await c.request(
            "GET", "/rfc/ERP/RFC_READ_TABLE", headers=[("Authorization", BASIC)]
        )
        assert reply.status == 200, reply.body
        assert reply.json() == description_to_wire(demo_system().describe("RFC_READ_TABLE"))
        ops = [r["op"] for r in env.connector.requests]
        assert ops == ["logon", "describe", "close"]


async def test_bearer_token_and_namespaced_names() -> None:
    async with running() as env:
        headers = [("Authorization", f"Bearer {TOKEN}"), JSON]
        reply = await post(env, "/rfc/erp/RFC_PING", {}, headers=headers)
        assert reply.status == 200, reply.body
        assert reply.json() == {}
        # A /NAMESPACE/ name reaches the system (which does not have it).
        reply = await post(env, "/rfc/ERP//BSL/GET_DATA", {})
        assert reply.status == 404
        assert reply.error["key"] == "FU_NOT_FOUND"
        assert reply.error["msg_v1"] == "/BSL/GET_DATA"


async def test_keep_alive_carries_several_requests_and_survives_errors() -> None:
    async with running() as env, client(env) as c:
        first = await c.call("/rfc/ERP/STFC_CONNECTION", {"REQUTEXT": "one"})
        refused = await c.call("/rfc/ERP/NO_SUCH_FUNCTION", {})
        second = await c.call("/rfc/ERP/STFC_CONNECTION", {"REQUTEXT": "two"})
        assert (first.status, refused.status, second.status) == (200, 404, 200)
        assert (first.json()["ECHOTEXT"], second.json()["ECHOTEXT"]) == ("one", "two")
        assert first.header("Connection") is None
        # Every request had its own stream (answered only after the stream's close).
        assert len(env.services.opened) == 3
        call = ["logon", "describe", "call", "close"]
        assert [r["op"] for r in env.connector.requests] == [*call, "logon", "describe", *call]


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("target", "params", "status", "error_class", "key"),
    [
        ("/rfc/ERP/NO_SUCH_FUNCTION", {}, 404, "ABAPApplicationError", "FU_NOT_FOUND"),
        (
            "/rfc/ERP/STFC_CONNECTION",
            {"REQUTEXT": "x", "NOPE": 1},
            400,
            "ExternalRuntimeError",
            "RFC_INVALID_PARAMETER",
        ),
        (
            "/rfc/ERP/STFC_STRUCTURE",
            {"IMPORTSTRUCT": {"NOPE": 1}},
            400,
            "ExternalRuntimeError",
            "RFC_INVALID_PARAMETER",
        ),
        (
            "/rfc/ERP/STFC_CONNECTION",
            {"REQUTEXT": "x" * 256},
            400,
            "ExternalRuntimeError",
            "RFC_BUFFER_TOO_SMALL",
        ),
        ("/rfc/ERP/STFC_STRUCTURE", {"IMPORTSTRUCT": []}, 400, "TypeError", None),
        (
            "/rfc/ERP/RFC_READ_TABLE",
            {"QUERY_TABLE": "NOPE"},
            422,
            "ABAPApplicationError",
            "TABLE_NOT_AVAILABLE",
        ),
        ("/rfc/ERP/Z_DUMP", {}, 500, "ABAPRuntimeError", "RFC_ABAP_RUNTIME_FAILURE"),
        ("/rfc/BADPW/RFC_PING", {}, 502, "LogonError", "RFC_LOGON_FAILURE"),
        (
            "/rfc/LOCKED/RFC_PING",
            {},
            403,
            "ExternalAuthorizationError",
            "RFC_AUTHORIZATION_FAILURE",
        ),
        (
            f"/rfc/ERP/{DENIED_FUNCTION}",
            {"USERNAME": "DEMO"},
            403,
            "ExternalAuthorizationError",
            "RFC_AUTHORIZATION_FAILURE",
        ),
        ("/rfc/OFFLINE/RFC_PING", {}, 503, "CommunicationError", "RFC_COMMUNICATION_FAILURE"),
        ("/rfc/NOPE/RFC_PING", {}, 404, "ExternalAuthorizationError", "RFC_NOT_FOUND"),
        ("/rfc/GLOBEX/RFC_PING", {}, 404, "ExternalAuthorizationError", "RFC_NOT_FOUND"),
        (
            "/rfc/ERP/STFC_CONNECTION?timeout=0.5",
            {"REQUTEXT": "slow"},
            504,
            "CommunicationError",
            "RFC_CANCELED",
        ),
        ("/rfc/ERP/RFC_PING?colour=red", {}, 400, "RFCError", "INVALID_OPTION"),
        ("/rfc/ERP/RFC_PING?rstrip=maybe", {}, 400, "RFCError", "INVALID_OPTION"),
        ("/rfc/ERP/RFC_PING?timeout=-1", {}, 400, "RFCError", "INVALID_OPTION"),
        (
            "/rfc/ERP/RFC_PING?not_requested=NOPE",
            {},
            400,
            "ExternalRuntimeError",
            "RFC_INVALID_PARAMETER",
        ),
        ("/rfc/ERP/RFC PING", {}, 404, "RFCError", "INVALID_FUNCTION_NAME"),
        ("/rfc/ERP", {}, 404, "RFCError", "NOT_FOUND"),
        ("/other", {}, 404, "RFCError", "NOT_FOUND"),
        ("/rfc/ERP/STFC_CONNECTION", [1, 2], 400, "RFCError", "NOT_AN_OBJECT"),
    ],
)
async def test_error_statuses(
    target: str, params: Any, status: int, error_class: str, key: str | None
) -> None:
    async with running() as env, client(env) as c:
        reply = await c.call(target.replace(" ", "%20"), params)
        assert (reply.status, reply.error["class"], reply.error["key"]) == (
            status,
            error_class,
            key,
        )
        assert reply.reason  # a reason phrase
        assert reply.error["message"]
        # TypeError also carries pyrfc's arguments, so a client can rebuild it exactly.
        assert set(reply.error) - {"args"} == {
            "class",
            "code",
            "key",
            "message",
            "msg_class",
            "msg_type",
            "msg_number",
            "msg_v1",
            "msg_v2",
            "msg_v3",
            "msg_v4",
        }
        # An error never costs the connection.
        assert (await c.call("/rfc/ERP/RFC_PING", {})).status == 200


async def test_type_errors_read_as_pyrfc_reports_them() -> None:
    async with running() as env:
        reply = await post(env, "/rfc/ERP/STFC_STRUCTURE", {"IMPORTSTRUCT": {"RFCINT4": "abc"}})
        assert reply.status == 400
        assert reply.error["class"] == "TypeError"
        assert reply.error["message"] == (
            "an integer required, received 'abc' of type string, field RFCINT4 of IMPORTSTRUCT"
        )
        reply = await post(env, "/rfc/ERP/STFC_STRUCTURE", {"IMPORTSTRUCT": {"RFCINT4": 1.5}})
        assert reply.error["message"] == (
            "an integer required, received 1.5 of type number, field RFCINT4 of IMPORTSTRUCT"
        )
        reply = await post(env, "/rfc/ERP/STFC_STRUCTURE", {"IMPORTSTRUCT": {"RFCHEX3": "%%%"}})
        assert reply.status == 400
        assert reply.error["message"].startswith("a base64 string required, received '%%%'")


async def test_unknown_and_foreign_destinations_read_the_same() -> None:
    async with running() as env:
        unknown = await post(env, "/rfc/ZZZZZZ/RFC_PING", {})
        foreign = await post(env, "/rfc/GLOBEX/RFC_PING", {})
        assert unknown.status == foreign.status == 404
        assert unknown.error["message"].replace("ZZZZZZ", "GLOBEX") == foreign.error["message"]
        assert env.services.opened == []
        assert [event for event, _, _ in env.services.denied] == ["rfc_destination"] * 2


async def test_credentials_are_required_and_refusals_audited() -> None:
    wrong = "Basic " + base64.b64encode(b"acme/app:not-it").decode()
    async with running() as env, client(env) as c:
        for headers in ([JSON], [("Authorization", wrong), JSON], [("Authorization", "Bearer x")]):
            reply = await c.call("/rfc/ERP/RFC_PING", {}, headers=headers)
            assert reply.status == 401
            assert (reply.error["class"], reply.error["key"]) == ("LogonError", "RFC_LOGON_FAILURE")
            assert sorted(reply.headers_named("WWW-Authenticate")) == [
                'Basic realm="backchannel"',
                'Bearer realm="backchannel"',
            ]
            assert b"not-it" not in reply.body
        assert [event for event, _, _ in env.services.denied] == ["rfc_app_auth"] * 3
        assert env.services.denied[1][2]["app"] == "acme/app"
        assert "not-it" not in repr(env.services.denied)
        assert env.services.opened == []


async def test_malformed_json_and_media_types() -> None:
    bodies = (b"{", b'{"REQUTEXT": NaN}', b'{"A": 1, "A": 2}', b'{"A": "\\ud800"}', b"\xff")
    deep = b"[" * 100_000 + b"]" * 100_000
    async with running() as env:
        async with client(env) as c:
            for body in (*bodies, deep):
                reply = await c.request("POST", "/rfc/ERP/STFC_CONNECTION", body)
                assert (reply.status, reply.error["key"]) == (400, "MALFORMED_JSON"), body[:20]
        async with client(env) as c:
            text = [("Authorization", BASIC), ("Content-Type", "text/plain")]
            reply = await c.request("POST", "/rfc/ERP/STFC_CONNECTION", b'{"REQUTEXT":"x"}', text)
            assert (reply.status, reply.error["key"]) == (415, "UNSUPPORTED_MEDIA_TYPE")
        async with client(env) as c:
            # An empty body of any type is no parameters.
            reply = await c.request("POST", "/rfc/ERP/RFC_PING", b"", [("Authorization", BASIC)])
            assert reply.status == 200, reply.body
        assert [r["op"] for r in env.connector.requests] == ["logon", "describe", "call", "close"]


async def test_wrong_method() -> None:
    async with running() as env, client(env) as c:
        for method in ("PUT", "DELETE", "HEAD"):
            reply = await c.request(method, "/rfc/ERP/RFC_PING")
            assert reply.status == 405
            assert reply.header("Allow") == "GET, POST"
            if method != "HEAD":
                assert reply.error["key"] == "METHOD_NOT_ALLOWED"
        assert env.services.opened == []


async def test_oversized_body_is_refused_and_closes_the_connection() -> None:
    async with running(max_body=4096) as env:
        big = json.dumps({"REQUTEXT": "x" * 5000}).encode()
        async with client(env) as c:
            reply = await c.request("POST", "/rfc/ERP/STFC_CONNECTION", big)
            assert (reply.status, reply.error["key"]) == (413, "BODY_TOO_LARGE")
            assert reply.header("Connection") == "close"
        # Chunked, so that only counting tells.
        head = (
            b"POST /rfc/ERP/STFC_CONNECTION HTTP/1.1\r\nHost: g\r\n"
            b"Authorization: " + BASIC.encode() + b"\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunks = b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(5))
        answer = await raw(env, head + chunks + b"0\r\n\r\n")
        assert status_of(answer) == 413
        assert env.services.opened == []


async def test_oversized_and_malformed_heads() -> None:
    async with running() as env:
        huge = b"GET /rfc/ERP/RFC_PING HTTP/1.1\r\nHost: g\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        answer = await raw(env, huge)
        assert status_of(answer) == 431
        assert b"HEADERS_TOO_LARGE" in answer
        assert status_of(await raw(env, b"NOT HTTP AT ALL\r\n\r\n")) == 400


async def test_a_stalled_client_does_not_hold_up_others() -> None:
    async with running(request_timeout=0.5) as env:
        stalled = await trio.open_tcp_stream(HOST, env.port)
        async with stalled:
            await stalled.send_all(b"POST /rfc/ERP/RFC_PING HTTP/1.1\r\nHost: g\r\n")
            reply = await post(env, "/rfc/ERP/STFC_CONNECTION", {"REQUTEXT": "meanwhile"})
            assert reply.status == 200
            with trio.fail_after(10):
                answer = bytearray()
                while chunk := await stalled.receive_some(65536):
                    answer += chunk
            assert status_of(bytes(answer)) == 408
            assert b"REQUEST_TIMEOUT" in answer


# ------------------------------------------------------------------------------- virtual time


@asynccontextmanager
async def in_memory(**settings: Any) -> AsyncIterator[tuple[Client, Env]]:
    """The endpoint's connection handler on a memory stream (for the autojump clock)."""
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
        services = FakeServices(pair)
        seen = Connector()
        nursery.start_soon(fake_connector, pair, make_system(), seen)
        endpoint = RfcJsonEndpoint(services, HostPort(HOST, 0), DESTINATIONS, **settings)
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(endpoint.serve_connection, server_end, "memory")
        env = Env(services, endpoint, seen, 0, [])
        yield Client(client_end, env.responses), env
        nursery.cancel_scope.cancel()
    check_no_password(env)


async def test_a_connector_that_never_answers_is_given_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with in_memory() as (c, env):
        start = trio.current_time()
        reply = await c.call("/rfc/ERP/STFC_CONNECTION?timeout=2", {"REQUTEXT": "hang"})
        assert (reply.status, reply.error["key"]) == (504, "RFC_CANCELED")
        assert trio.current_time() - start == pytest.approx(7.0)
        [call] = [r for r in env.connector.requests if r["op"] == "call"]
        assert call["timeout"] == 2.0


async def test_call_timeout_caps_the_requested_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with in_memory(call_timeout=1.0) as (c, env):
        reply = await c.call("/rfc/ERP/STFC_CONNECTION?timeout=60", {"REQUTEXT": "hang"})
        assert reply.status == 504
        reply = await c.call("/rfc/ERP/STFC_CONNECTION", {"REQUTEXT": "ok"})
        assert reply.status == 200
        assert [r["timeout"] for r in env.connector.requests if r["op"] == "call"] == [1.0, 1.0]


async def test_slow_requests_get_408_and_idle_connections_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with in_memory(request_timeout=5.0, idle_timeout=20.0) as (c, _):
        await c.stream.send_all(b"POST /rfc/ERP/RFC_PING HTTP/1.1\r\nHost: g\r\nContent-Le")
        with trio.fail_after(6):
            answer = bytes(await c.stream.receive_some(65536))
        assert status_of(answer) == 408
        assert b'"key":"REQUEST_TIMEOUT"' in answer
        assert await c.stream.receive_some(65536) == b""  # and the connection is closed
    async with in_memory(idle_timeout=20.0) as (c, _):
        assert (await c.call("/rfc/ERP/RFC_PING", {})).status == 200
        start = trio.current_time()
        with trio.fail_after(30):
            assert await c.stream.receive_some(65536) == b""
        assert trio.current_time() - start == pytest.approx(20.0)


# ------------------------------------------------------------------------------- sans-IO parts


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (TypeError("an integer required, received", "x", "of type", str, "F"), 400),
        (RFCTypeError("bad", 0, "X"), 400),
        (invalid_parameter("X"), 400),
        (buffer_too_small("too long"), 400),
        (ExternalRuntimeError("c", 22, "RFC_CONVERSION_FAILURE"), 400),
        (ExternalRuntimeError("h", 13, "RFC_INVALID_HANDLE"), 502),
        (ExternalAuthorizationError("no", 29, "RFC_AUTHORIZATION_FAILURE"), 403),
        (function_not_found("Z"), 404),
        (ABAPApplicationError("raised", 5, "NOT_FOUND_IN_ABAP"), 422),
        (ABAPRuntimeError("dump", 3, "RFC_ABAP_RUNTIME_FAILURE"), 500),
        (LogonError("wrong"), 502),
        (CommunicationError("down", 1, "RFC_COMMUNICATION_FAILURE"), 502),
        (CommunicationError("late", 7, "RFC_CANCELED"), 504),
        (CommunicationError("late", 8, "RFC_TIMEOUT"), 504),
        (RFCError("unknown"), 502),
    ],
)
def test_status_for(exc: BaseException, status: int) -> None:
    assert status_for(exc) == status


def test_parse_target() -> None:
    assert parse_target(b"/rfc/ERP/stfc_connection?x=1") == ("ERP", "STFC_CONNECTION", "x=1")
    assert parse_target(b"/rfc/my%20dest/%2FBSL%2FGET") == ("my dest", "/BSL/GET", "")
    assert parse_target(b"/rfc/ERP//BSL/GET") == ("ERP", "/BSL/GET", "")
    for target in (b"/rfc/", b"/rfc/ERP", b"/rfc/ERP/", b"/rfc//F", b"/x/ERP/F", b"/rfc/E/%ff"):
        with pytest.raises(HttpRefusal) as refused:
            parse_target(target)
        assert refused.value.status == 404


def test_parse_options() -> None:
    assert parse_options("") == CallOptions()
    assert parse_options("return_import_params&rstrip=0&timeout=2.5") == CallOptions(
        return_import_params=True, rstrip=False, timeout=2.5
    )
    assert parse_options("timeout=100", call_timeout=30) == CallOptions(timeout=30)
    assert parse_options("", call_timeout=30) == CallOptions(timeout=30)
    options = parse_options("not_requested=A,B&not_requested=C")
    assert options.not_requested == ("A", "B", "C")
    for query in ("rstrip=1&rstrip=0", "timeout=nan", "timeout=0", "timeout=x", "x=1"):
        with pytest.raises(HttpRefusal) as refused:
            parse_options(query)
        assert (refused.value.status, refused.value.error["key"]) == (400, "INVALID_OPTION")


def test_codec_matches_the_client_semantics() -> None:
    fd = make_system().describe("Z_ECHO_ALL_TYPES")
    params = params_from_json(fd, parse_json(json.dumps({"IN": ALL_TYPES_IN}).encode()))
    assert params["IN"]["BYTE"] == b"\x00\xff\x10\x20"
    wire, skip = prepare_call(fd, params, {"not_requested": "ROWS"})
    assert skip == {"ROWS"}
    assert wire["IN"]["BCD"] == "-12345.678"
    assert wire["IN"]["BYTE"] == base64.b64encode(b"\x00\xff\x10\x20").decode()
    message = call_request(fd, wire, skip, return_import_params=True, timeout=3)
    assert message == {
        "op": "call",
        "name": "Z_ECHO_ALL_TYPES",
        "params": wire,
        "return_import_params": True,
        "not_requested": ["ROWS"],
        "timeout": 3.0,
    }
    result = read_result(fd, {"OUT": wire["IN"], "ROWS": [{"ID": "5"}]}, skip, rstrip=False)
    assert result["ROWS"] == []  # inactive: initial whatever came back
    assert result["OUT"]["CHAR"] == "chars"
    assert result["OUT"]["BCD"] == Decimal("-12345.678")
    assert result_to_json(result)["OUT"] == {**ALL_TYPES_IN, "FLOAT": 6.02214076e23}
    with pytest.raises(ExternalRuntimeError) as unknown:
        prepare_call(fd, {"NOPE": 1})
    assert unknown.value.key == "RFC_INVALID_PARAMETER"
    with pytest.raises(ExternalRuntimeError):
        prepare_call(fd, {}, {"not_requested": ["NOPE"]})
    with pytest.raises(TypeError):
        prepare_call(fd, {"IN": {"INT8": "1"}})
    assert result_to_json([float("inf"), float("-inf"), Decimal("1E-7")]) == [
        "Infinity",
        "-Infinity",
        "0.0000001",
    ]
