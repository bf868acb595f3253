"""One conformance suite, three ways: the same calls and the same assertions against the stub
ABAP system directly, through the tunnel with the pyrfc-compatible client, and through the
gateway's HTTP JSON endpoint. Data types must round trip exactly and errors must arrive with
the same class, code and key."""

from __future__ import annotations

import base64
import datetime
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import pytest

from backchannel import HostPort
from backchannel_rfc._abap_types import (
    BCD,
    BYTE,
    CHAR,
    DATE,
    FLOAT,
    INT,
    INT1,
    INT2,
    INT8,
    NUM,
    STRING,
    STRUCTURE,
    TABLE,
    TIME,
    XSTRING,
)
from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._descriptions import FunctionDescription, decode_params, structure
from backchannel_rfc._errors import (
    ABAPApplicationError,
    ExternalRuntimeError,
    LogonError,
    from_wire,
)
from backchannel_rfc._stub_protocol import description_from_wire
from backchannel_rfc._system import AbapSystem, Session
from tests.harness import APP_SECRET
from tests.rfc_harness import LOGON, VIRTUAL_HOST, in_thread, rfc_setup

pytestmark = pytest.mark.integration

ECHO = "Z_BC_ECHO_ALL_TYPES"
_ROW = structure("ZBC_ROW", [("ID", INT, 4), ("TEXT", STRING, 0)])
_ALL = structure(
    "ZBC_ALL",
    [
        ("CHAR10", CHAR, 10),
        ("NUMC6", NUM, 6),
        ("INT1", INT1, 1),
        ("INT2", INT2, 2),
        ("INT4", INT, 4),
        ("INT8", INT8, 8),
        ("FLOAT", FLOAT, 8),
        ("DEC", BCD, 9, 2),
        ("DATE", DATE, 8),
        ("TIME", TIME, 6),
        ("RAW4", BYTE, 4),
        ("XSTR", XSTRING, 0),
        ("STR", STRING, 0),
        ("ROWS", TABLE, _ROW),
    ],
)


def _echo_all(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    rows = params["IT_ROWS"]
    return {
        "ES_ALL": params["IS_ALL"],
        "EV_COUNT": len(rows),
        "CV_COUNTER": params["CV_COUNTER"] + 1,
        "IT_ROWS": [*rows, {"ID": len(rows) + 1, "TEXT": f"added by {session.user}"}],
    }


def conformance_system() -> AbapSystem:
    """The demo system plus one module that echoes every type (registered the public way)."""
    system = demo_system()
    fd = FunctionDescription(ECHO)
    fd.add_parameter(
        "IS_ALL", STRUCTURE, "RFC_IMPORT", _ALL.nuc_length, _ALL.uc_length, 0, "", "", False, _ALL
    )
    fd.add_parameter(
        "ES_ALL", STRUCTURE, "RFC_EXPORT", _ALL.nuc_length, _ALL.uc_length, 0, "", "", False, _ALL
    )
    fd.add_parameter("EV_COUNT", INT, "RFC_EXPORT", 4, 4, 0, "", "", False, None)
    fd.add_parameter("CV_COUNTER", INT8, "RFC_CHANGING", 8, 8, 0, "", "", True, None)
    fd.add_parameter(
        "IT_ROWS", TABLE, "RFC_TABLES", _ROW.nuc_length, _ROW.uc_length, 0, "", "", True, _ROW
    )
    system.register(fd, _echo_all)
    return system


class Way(Protocol):
    """One way to call: returns pyrfc's result dict or raises pyrfc's exception."""

    def call(self, function: str, **params: Any) -> dict[str, Any]: ...

    def with_wrong_password(self) -> Way:
        """The same way, logging on with a wrong password."""
        ...


class PyrfcWay:
    def __init__(self, connect: Callable[..., Connection], **overrides: str) -> None:
        self.connect = connect
        self.overrides = overrides

    def call(self, function: str, **params: Any) -> dict[str, Any]:
        with self.connect(**self.overrides) as connection:
            result: dict[str, Any] = connection.call(function, **params)
            return result

    def with_wrong_password(self) -> Way:
        return PyrfcWay(self.connect, passwd="wrong")


class JsonWay:
    """POST /rfc/<destination>/<FUNCTION> with urllib; results decoded by the description the
    endpoint serves (GET), errors rebuilt from the JSON error body."""

    def __init__(self, endpoint: HostPort, destination: str = "ERP") -> None:
        self.base = f"http://{endpoint}/rfc/{destination}/"
        self.endpoint = endpoint
        credentials = base64.b64encode(f"acme/crm:{APP_SECRET}".encode()).decode()
        self.headers = {"Authorization": f"Basic {credentials}"}

    def _exchange(self, function: str, body: bytes | None) -> Any:
        request = urllib.request.Request(self.base + function, data=body, headers=self.headers)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                error = json.loads(exc.read())["error"]
            raise from_wire(error) from None

    def call(self, function: str, **params: Any) -> dict[str, Any]:
        body = json.dumps(params, default=_json_value).encode()
        result = self._exchange(function, body)
        description = description_from_wire(self._exchange(function, None))
        return decode_params(description, result)

    def with_wrong_password(self) -> Way:
        return JsonWay(self.endpoint, "ERP_WRONGPW")


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"not JSON: {value!r}")


DESTINATIONS = [
    {
        "name": name,
        "subaccount": "acme",
        "ashost": VIRTUAL_HOST,
        "client": "100",
        "authentication": "BasicAuthentication",
        "user": "DEMO",
        "password": password,
    }
    for name, password in (("ERP", "welcome"), ("ERP_WRONGPW", "wrong"))
]
WAYS = ["direct", "tunnel", "json"]
FUNCTIONS = [
    {"name": name}
    for name in (
        "RFC_PING",
        "STFC_CONNECTION",
        "STFC_STRUCTURE",
        "RFC_READ_TABLE",
        "BAPI_USER_GET_DETAIL",
        "Z_DOES_NOT_EXIST",
        ECHO,
    )
]


@pytest.fixture(params=WAYS)
async def way(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Way]:
    system = conformance_system()
    async with rfc_setup(
        tmp_path, system=system, functions=FUNCTIONS, destinations=DESTINATIONS
    ) as setup:
        if request.param == "direct":

            def direct(**overrides: str) -> Connection:
                params = {"ashost": "127.0.0.1", "port": str(setup.stub_port), **LOGON, **overrides}
                return Connection(None, **params)

            yield PyrfcWay(direct)
        elif request.param == "tunnel":
            yield PyrfcWay(setup.connect)
        else:
            yield JsonWay(setup.json_endpoint)


ALL_VALUES: dict[str, Any] = {
    "CHAR10": "Grüße ✓",
    "NUMC6": "000123",
    "INT1": 255,
    "INT2": -32768,
    "INT4": 2**31 - 1,
    "INT8": -(2**63),
    "FLOAT": 1.5e-10,
    "DEC": Decimal("-1234567.89"),
    "DATE": "20261127",
    "TIME": "235959",
    "RAW4": b"\x00\xff\x10\x80",
    "XSTR": bytes(range(256)) * 4,
    "STR": "a long string with\nnewlines, tabs\t and ünïcödé " * 20,
    "ROWS": [{"ID": 1, "TEXT": "one"}, {"ID": -2, "TEXT": ""}],
}


async def test_stfc_connection(way: Way) -> None:
    result = await in_thread(lambda: way.call("STFC_CONNECTION", REQUTEXT="Grüße"))
    assert result["ECHOTEXT"] == "Grüße"
    assert "Logon_Data: 100/DEMO/E" in result["RESPTEXT"]


async def test_every_type_round_trips_exactly(way: Way) -> None:
    rows = [{"ID": 7, "TEXT": "seven"}]
    result = await in_thread(
        lambda: way.call(ECHO, IS_ALL=ALL_VALUES, CV_COUNTER=2**62, IT_ROWS=rows)
    )
    assert result["ES_ALL"] == ALL_VALUES
    assert isinstance(result["ES_ALL"]["DEC"], Decimal)
    assert isinstance(result["ES_ALL"]["XSTR"], bytes)
    assert result["EV_COUNT"] == 1
    assert result["CV_COUNTER"] == 2**62 + 1
    assert result["IT_ROWS"] == [rows[0], {"ID": 2, "TEXT": "added by DEMO"}]
    assert "IS_ALL" not in result  # IMPORT parameters come back only on request


async def test_fields_not_given_are_initial(way: Way) -> None:
    result = await in_thread(lambda: way.call(ECHO, IS_ALL={"CHAR10": "x"}))
    echoed = result["ES_ALL"]
    assert echoed["CHAR10"] == "x"
    assert echoed["DEC"] == Decimal("0")
    assert echoed["DATE"] == "00000000"
    assert echoed["TIME"] == "000000"
    assert echoed["RAW4"] == b"\x00\x00\x00\x00"
    assert echoed["XSTR"] == b""
    assert echoed["ROWS"] == []
    assert result["CV_COUNTER"] == 1


async def test_stfc_structure(way: Way) -> None:
    struct = {
        "RFCFLOAT": 1.25,
        "RFCINT4": 42,
        "RFCDATE": "20260102",
        "RFCTIME": "030405",
        "RFCHEX3": b"\x01\x02\x03",
        "RFCCHAR4": "ABCD",
    }
    result = await in_thread(
        lambda: way.call("STFC_STRUCTURE", IMPORTSTRUCT=struct, RFCTABLE=[struct])
    )
    for key, value in struct.items():
        assert result["ECHOSTRUCT"][key] == value
    assert len(result["RFCTABLE"]) == 2
    assert result["RFCTABLE"][0]["RFCINT4"] == 42


async def test_read_table_options_fields_and_paging(way: Way) -> None:
    result = await in_thread(
        lambda: way.call(
            "RFC_READ_TABLE",
            QUERY_TABLE="SCARR",
            DELIMITER="|",
            FIELDS=[{"FIELDNAME": "CARRID"}, {"FIELDNAME": "CURRCODE"}],
            OPTIONS=[{"TEXT": "CURRCODE = 'USD'"}],
            ROWSKIPS=1,
            ROWCOUNT=1,
        )
    )
    assert [row["WA"] for row in result["DATA"]] == ["UA |USD"]
    assert [f["FIELDNAME"] for f in result["FIELDS"]] == ["CARRID", "CURRCODE"]


async def test_bapi_reports_errors_in_return(way: Way) -> None:
    result = await in_thread(lambda: way.call("BAPI_USER_GET_DETAIL", USERNAME="NOBODY"))
    assert result["RETURN"][0]["TYPE"] == "E"
    assert result["RETURN"][0]["MESSAGE_V1"] == "NOBODY"


@pytest.mark.parametrize(
    ("call", "error_class", "key"),
    [
        pytest.param(
            lambda w: w.call("Z_DOES_NOT_EXIST"),
            ABAPApplicationError,
            "FU_NOT_FOUND",
            id="unknown-function",
        ),
        pytest.param(
            lambda w: w.call("STFC_CONNECTION", NOPE="x"),
            ExternalRuntimeError,
            "RFC_INVALID_PARAMETER",
            id="unknown-parameter",
        ),
        pytest.param(
            lambda w: w.call("STFC_CONNECTION", REQUTEXT="x" * 256),
            ExternalRuntimeError,
            "RFC_BUFFER_TOO_SMALL",
            id="too-long",
        ),
        pytest.param(
            lambda w: w.call("RFC_READ_TABLE", QUERY_TABLE="NO_SUCH_TABLE"),
            ABAPApplicationError,
            "TABLE_NOT_AVAILABLE",
            id="abap-exception",
        ),
    ],
)
async def test_errors_keep_class_code_and_key(
    way: Way, call: Callable[[Way], Any], error_class: type[Exception], key: str
) -> None:
    with pytest.raises(error_class) as info:
        await in_thread(lambda: call(way))
    assert type(info.value) is error_class
    assert getattr(info.value, "key", None) == key


async def test_wrong_password_is_logon_failure(way: Way) -> None:
    with pytest.raises(LogonError) as info:
        await in_thread(lambda: way.with_wrong_password().call("RFC_PING"))
    assert info.value.key == "RFC_LOGON_FAILURE"
    assert info.value.code == 2


async def test_type_error_is_pyrfc_type_error(way: Way) -> None:
    with pytest.raises(TypeError) as info:
        await in_thread(lambda: way.call("STFC_CONNECTION", REQUTEXT=5))
    assert info.value.args[0] == "an string is required, received"
    assert "REQUTEXT" in info.value.args


async def test_dates_are_checked(way: Way) -> None:
    with pytest.raises((TypeError, ExternalRuntimeError)):
        await in_thread(
            lambda: way.call(ECHO, IS_ALL={"DATE": datetime.date(2026, 1, 1).isoformat()})
        )
