"""The pyrfc-compatible ``Connection`` against the stub ABAP system served over 127.0.0.1.

The server runs in a background thread with its own ``trio.run``, so the blocking client is
driven directly, exactly as pyrfc code drives ``pyrfc.Connection``.  ``assert_same`` runs each
call both through the wire and directly on an ``AbapSystem``: the seed of the conformance suite
that will also run against the tunnel and against a real system.
"""

from __future__ import annotations

import datetime
import json
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._descriptions import wrap
from backchannel_rfc._errors import (
    ABAPApplicationError,
    CommunicationError,
    ExternalRuntimeError,
    LogonError,
    RFCError,
    RFCLibError,
)
from backchannel_rfc._stub_protocol import (
    MAX_MESSAGE_SIZE,
    MessageDecoder,
    StubProtocolError,
    description_from_wire,
    description_to_wire,
    encode_message,
)
from backchannel_rfc._stub_server import StubSession, serve_stub
from backchannel_rfc._system import AbapSystem, Session
from tests.rfc_harness import DEMO_NOW, LogonCA

HOST = "127.0.0.1"


class StubThread:
    """``serve_stub`` in its own thread and trio loop; ``stop()`` kills it and its connections."""

    def __init__(self, system: AbapSystem) -> None:
        started: queue.Queue[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

        async def main() -> None:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    port = await nursery.start(serve_stub, system, HOST, 0)
                    started.put((port, trio.lowlevel.current_trio_token(), scope))

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self._thread.start()
        self.port, self._token, self._scope = started.get(timeout=10)

    def stop(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            self._thread.join(timeout=10)


@pytest.fixture
def stub() -> Iterator[StubThread]:
    server = StubThread(demo_system())
    yield server
    server.stop()


def params(stub: StubThread, **overrides: str) -> dict[str, Any]:
    base = {
        "ashost": HOST,
        "sysnr": "00",
        "port": str(stub.port),
        "client": "100",
        "user": "demo",
        "passwd": "welcome",
        "lang": "E",
    }
    return {**base, **overrides}


@pytest.fixture
def conn(stub: StubThread) -> Iterator[Connection]:
    with Connection(**params(stub)) as connection:
        yield connection


def direct(system: AbapSystem, session: Session, name: str, **kwargs: Any) -> dict[str, Any]:
    """What pyrfc would return for a call made straight on ``system``."""
    fd = system.describe(name)
    result = system.call(session, name, kwargs)
    return {
        p["name"]: wrap(p["parameter_type"], result[p["name"]], p["type_description"])
        for p in fd.parameters
        if p["name"] in result
    }


def assert_same(conn: Connection, name: str, **kwargs: Any) -> dict[str, Any]:
    system = demo_system()
    session = system.logon("100", user="demo", passwd="welcome")
    over_wire = conn.call(name, **kwargs)
    assert over_wire == direct(system, session, name, **kwargs)
    return over_wire


# -- bytes: the codec and the server's sans-IO session ----------------------------------------


def test_codec_byte_at_a_time_and_limits() -> None:
    messages: list[dict[str, Any]] = [
        {"op": "ping"},
        {"op": "call", "name": "Ä" * 10, "params": {"X": [1, None]}},
    ]
    data = b"".join(encode_message(m) for m in messages)
    decoder = MessageDecoder()
    seen = []
    for i in range(len(data)):
        decoder.receive_data(data[i : i + 1])
        while (m := decoder.next_message()) is not None:
            seen.append(m)
    decoder.receive_data(b"")
    assert seen == messages
    assert decoder.at_eof
    with pytest.raises(StubProtocolError, match="exceeds the maximum"):
        encode_message({"x": "a" * 100}, max_size=50)
    too_big = MessageDecoder()
    too_big.receive_data((MAX_MESSAGE_SIZE + 1).to_bytes(4, "big"))
    with pytest.raises(StubProtocolError, match="exceeds the maximum of 16777216 bytes"):
        too_big.next_message()
    for bad in (b"\x00\x00\x00\x02[]", b"\x00\x00\x00\x01\xff", b"\x00\x00\x00\x05ab"):
        decoder = MessageDecoder()
        decoder.receive_data(bad)
        decoder.receive_data(b"")
        with pytest.raises(StubProtocolError):
            decoder.next_message()


def test_description_wire_round_trip() -> None:
    system = demo_system()
    for name in ("STFC_STRUCTURE", "RFC_READ_TABLE", "BAPI_USER_GET_DETAIL"):
        fd = system.describe(name)
        wire = json.loads(json.dumps(description_to_wire(fd)))
        assert description_to_wire(description_from_wire(wire)) == description_to_wire(fd)


def test_session_state_machine() -> None:
    stub = StubSession(demo_system())
    refused = stub.handle({"op": "ping"})
    assert refused["error"]["key"] == "RFC_INVALID_PROTOCOL"
    assert stub.state == "closed"
    stub = StubSession(demo_system())
    assert stub.handle({"op": "logon", "client": "100", "user": "demo", "passwd": "welcome"})["ok"]
    again = stub.handle({"op": "logon", "client": "100", "user": "demo", "passwd": "welcome"})
    assert not again["ok"]
    failed = StubSession(demo_system())
    response = failed.handle({"op": "logon", "client": "100", "user": "demo", "passwd": "x"})
    assert response["error"]["class"] == "LogonError"
    assert failed.state == "closed"


# -- real sockets on 127.0.0.1 ----------------------------------------------------------------


def test_logon_ok_and_attributes(conn: Connection, stub: StubThread) -> None:
    assert conn.alive
    conn.ping()
    attrs = conn.get_connection_attributes()
    assert (attrs["sysId"], attrs["client"], attrs["user"], attrs["language"]) == (
        "BCH",
        "100",
        "DEMO",
        "E",
    )
    assert (attrs["partnerHost"], attrs["sysNumber"], attrs["partnerRel"]) == (HOST, "00", "758")
    assert attrs["active_unit"] is False


def test_wrong_password(stub: StubThread) -> None:
    with pytest.raises(LogonError) as ex:
        Connection(**params(stub, passwd="wrong"))
    assert (ex.value.code, ex.value.key) == (2, "RFC_LOGON_FAILURE")
    assert ex.value.message == "Name or password is incorrect (repeat logon)"


def test_certificate_logon() -> None:
    ca = LogonCA.create(at=DEMO_NOW)
    system = demo_system()
    system.trust_certificate_authority(ca.certificate)
    server = StubThread(system)
    try:
        p = params(server, x509cert=ca.issue("alice", at=DEMO_NOW))
        del p["user"], p["passwd"]
        with Connection(**p) as conn:
            assert conn.get_connection_attributes()["user"] == "ALICE"
            assert assert_alice(conn)
        for refused in (
            ca.issue("mallory", at=DEMO_NOW),  # trusted, but mapped to nobody
            LogonCA.create("other", at=DEMO_NOW).issue("alice", at=DEMO_NOW),  # not trusted
        ):
            p["x509cert"] = refused
            with pytest.raises(LogonError):
                Connection(**p)
    finally:
        server.stop()


def assert_alice(conn: Connection) -> bool:
    text = conn.call("STFC_CONNECTION", REQUTEXT="x")["RESPTEXT"]
    return "Logon_Data: 100/ALICE/E" in text


def test_standard_modules_equal_direct_calls(conn: Connection) -> None:
    result = assert_same(conn, "STFC_CONNECTION", REQUTEXT="Hällo SAP!")
    assert result["ECHOTEXT"] == "Hällo SAP!"
    imp = {
        "RFCINT1": 255,
        "RFCDATE": datetime.date(2012, 10, 3),
        "RFCTIME": "123456",
        "RFCHEX3": b"fgh",
    }
    result = assert_same(conn, "STFC_STRUCTURE", IMPORTSTRUCT=imp, RFCTABLE=[imp] * 3)
    assert result["ECHOSTRUCT"]["RFCDATE"] == "20121003"
    assert len(result["RFCTABLE"]) == 4
    result = assert_same(
        conn,
        "RFC_READ_TABLE",
        QUERY_TABLE="SCARR",
        DELIMITER="|",
        FIELDS=[{"FIELDNAME": "CARRID"}, {"FIELDNAME": "CURRCODE"}],
    )
    assert [r["WA"] for r in result["DATA"]] == ["AA |USD", "LH |EUR", "UA |USD"]
    result = assert_same(conn, "BAPI_USER_GET_DETAIL", USERNAME="ALICE")
    assert result["ADDRESS"]["LASTNAME"] == "Example"
    missing = assert_same(conn, "BAPI_USER_GET_DETAIL", USERNAME="GHOST")["RETURN"][0]
    assert missing["MESSAGE"] == "User GHOST does not exist"


def test_config_options(stub: StubThread) -> None:
    config = {"dtime": True, "rstrip": False, "return_import_params": True}
    with Connection(config=config, **params(stub)) as conn:
        assert conn.options["timeout"] is None
        result = conn.call("STFC_STRUCTURE", IMPORTSTRUCT={"RFCDATE": "20240229"})
        assert result["ECHOSTRUCT"]["RFCDATE"] == datetime.date(2024, 2, 29)
        assert "IMPORTSTRUCT" in result
        assert conn.call("STFC_CONNECTION", REQUTEXT="hi  ")["ECHOTEXT"] == "hi  "
    with pytest.raises(RFCError, match="option 'bogus' is not supported"):
        Connection(config={"bogus": 1}, **params(stub))


def test_check_date_and_check_time(stub: StubThread) -> None:
    struct = {"RFCDATE": "20260231", "RFCTIME": "256000"}  # no such day, no such time
    with Connection(**params(stub)) as conn:
        assert conn.options["check_date"] is True
        with pytest.raises(TypeError) as info:
            conn.call("STFC_STRUCTURE", IMPORTSTRUCT={"RFCDATE": "20260231"})
        assert info.value.args[0] == "date value required, received"
    config = {"check_date": False, "check_time": False}
    with Connection(config=config, **params(stub)) as conn:
        echoed = conn.call("STFC_STRUCTURE", IMPORTSTRUCT=struct)["ECHOSTRUCT"]
    # ABAP takes the characters as they are, as it does from SAP's pyrfc.
    assert (echoed["RFCDATE"], echoed["RFCTIME"]) == ("20260231", "256000")
    with Connection(config={"check_date": False}, **params(stub)) as conn:
        with pytest.raises(TypeError) as info:
            conn.call("STFC_STRUCTURE", IMPORTSTRUCT=struct)
        assert info.value.args[0] == "time value required, received"


def test_not_requested_parameter_is_initial(conn: Connection) -> None:
    result = conn.call(
        "BAPI_USER_GET_DETAIL", options={"not_requested": ["ADDRESS"]}, USERNAME="ALICE"
    )
    assert result["ADDRESS"]["LASTNAME"] == ""
    assert result["DEFAULTS"]["LANGU"] == "E"


def test_errors_carry_class_code_and_key(conn: Connection) -> None:
    with pytest.raises(ABAPApplicationError) as ex:
        conn.call("NO_SUCH_FM")
    assert (ex.value.code, ex.value.key, ex.value.msg_class, ex.value.msg_number) == (
        5,
        "FU_NOT_FOUND",
        "FL",
        "046",
    )
    with pytest.raises(ExternalRuntimeError) as ex2:
        conn.call("STFC_CONNECTION", NOPE="x")
    assert (ex2.value.code, ex2.value.key) == (20, "RFC_INVALID_PARAMETER")
    with pytest.raises(ABAPApplicationError) as ex3:
        conn.call("RFC_READ_TABLE", QUERY_TABLE="NOPE")
    assert (ex3.value.code, ex3.value.key) == (5, "TABLE_NOT_AVAILABLE")
    with pytest.raises(TypeError) as ex4:
        conn.call("STFC_STRUCTURE", IMPORTSTRUCT={"RFCINT1": "1"})
    assert ex4.value.args[1:] == ("1", "of type", str, "RFCINT1", "IMPORTSTRUCT")
    assert conn.alive
    assert conn.call("STFC_CONNECTION", REQUTEXT="still here")["ECHOTEXT"] == "still here"


def test_connection_parameter_checks(stub: StubThread) -> None:
    with pytest.raises(TypeError, match="'int' object has no attribute 'encode'") as ex:
        Connection(ashost=HOST, sysnr=0, client="100", user="demo", passwd="welcome")
    assert isinstance(ex.value, AttributeError)  # what pyrfc's ``value.encode()`` raises
    with pytest.raises(RFCError, match="Connection parameters missing"):
        Connection()
    ignored = dict.fromkeys(
        ("dest", "saprouter", "mshost", "msserv", "sysid", "group", "snc_qop", "snc_lib"), "x"
    )
    with Connection(**params(stub, **ignored)) as conn:
        assert conn.get_connection_attributes()["dest"] == "x"


def test_closed_connection(conn: Connection, stub: StubThread) -> None:
    conn.close()
    assert not conn.alive
    assert conn.get_connection_attributes() == {}
    with pytest.raises(RFCError) as ex:
        conn.call("STFC_CONNECTION", REQUTEXT="x")
    assert type(ex.value) is RFCError
    assert ex.value.args == (
        "Remote function module 'STFC_CONNECTION' invocation rejected because the connection"
        " is closed",
    )
    conn.open()
    old = conn.handle
    assert old is not None
    conn.reopen()
    assert conn.handle not in (None, old)


def test_context_manager_closes(stub: StubThread) -> None:
    with Connection(**params(stub)) as conn:
        assert conn.alive
    assert not conn.alive


def test_server_killed_mid_session(stub: StubThread) -> None:
    conn = Connection(**params(stub))
    assert conn.call("STFC_CONNECTION", REQUTEXT="a")["ECHOTEXT"] == "a"
    stub.stop()
    with pytest.raises(CommunicationError) as ex:
        conn.call("STFC_CONNECTION", REQUTEXT="b")
    assert (ex.value.code, ex.value.key) == (1, "RFC_COMMUNICATION_FAILURE")
    assert not conn.alive
    with pytest.raises(CommunicationError) as ex2:
        Connection(**params(stub))
    assert ex2.value.code == 1


def test_get_function_description(conn: Connection) -> None:
    fd = conn.get_function_description("stfc_connection")
    assert fd.name == "STFC_CONNECTION"
    assert [(p["name"], p["direction"]) for p in fd.parameters] == [
        ("REQUTEXT", "RFC_IMPORT"),
        ("ECHOTEXT", "RFC_EXPORT"),
        ("RESPTEXT", "RFC_EXPORT"),
    ]
    nested = conn.get_function_description("STFC_STRUCTURE").parameters[0]["type_description"]
    assert nested is not None
    assert nested.name == "RFCTEST"
    with pytest.raises(ABAPApplicationError):
        conn.get_function_description("NO_SUCH_FM")


def test_port_convention() -> None:
    from backchannel_rfc._connection import _gateway_port

    assert _gateway_port({"sysnr": "00"}) == 3300
    assert _gateway_port({"sysnr": "42"}) == 3342
    assert _gateway_port({"sysnr": "00", "gwserv": "sapgw07"}) == 3307
    assert _gateway_port({"sysnr": "00", "gwserv": "4711"}) == 4711
    assert _gateway_port({"sysnr": "00", "port": "5000"}) == 5000


def test_timeout_cancels_and_reconnects() -> None:
    """A server that logs on but never answers a call: pyrfc's cancel is a CommunicationError
    RFC_CANCELED, after which the connection is open again on a new handle."""
    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            sock, _addr = listener.accept()
            decoder = MessageDecoder()
            while (m := decoder.next_message()) is None:
                decoder.receive_data(sock.recv(4096))
            assert m["op"] == "logon"
            sock.sendall(
                encode_message(
                    {
                        "ok": True,
                        "sysid": "BCH",
                        "release": "758",
                        "client": "100",
                        "user": "DEMO",
                        "language": "E",
                    }
                )
            )
            held.append(sock)  # and never answer anything else

    held: list[socket.socket] = []
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = Connection(ashost=HOST, port=str(port), client="100", user="demo", passwd="x")
    # The description comes first, so give the stub one, then let the call hang.
    conn._descriptions["STFC_CONNECTION"] = demo_system().describe("STFC_CONNECTION")
    old = conn.handle
    with pytest.raises(CommunicationError) as ex:
        conn.call("STFC_CONNECTION", options={"timeout": 0.05}, REQUTEXT="x")
    assert (ex.value.code, ex.value.key) == (7, "RFC_CANCELED")
    assert ex.value.message is not None
    assert ex.value.message.startswith("Connection was canceled")
    assert conn.alive
    assert conn.handle != old
    thread.join(timeout=10)
    conn._drop()
    for sock in held:
        sock.close()
    listener.close()


def test_error_classes_are_rfc_lib_errors() -> None:
    assert issubclass(CommunicationError, RFCLibError)
