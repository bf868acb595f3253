"""The pure core of the simulated ABAP system: errors, ABAP types, wire form and modules."""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from backchannel_rfc import _abap_types as t
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._descriptions import decode, encode, fill, structure
from backchannel_rfc._errors import (
    ABAPApplicationError,
    ExternalRuntimeError,
    LogonError,
    RFCLibError,
    from_wire,
    logon_failure,
    to_wire,
)
from backchannel_rfc._system import AbapSystem, Session
from tests.rfc_harness import DEMO_NOW, LogonCA


@pytest.fixture
def system() -> AbapSystem:
    return demo_system()


@pytest.fixture
def session(system: AbapSystem) -> Session:
    return system.logon("100", user="demo", passwd="welcome")


def test_rfclib_error_str_matches_pyrfc() -> None:
    err = ABAPApplicationError(
        "ID:FL Type:E Number:046 X", 5, "FU_NOT_FOUND", "FL", "E", "046", "X", "", "", ""
    )
    assert str(err) == (
        "RFC_ABAP_EXCEPTION (rc=5): key=FU_NOT_FOUND, message=ID:FL Type:E Number:046 X"
        " [MSG: class=FL, type=E, number=046, v1-4:=X;;;]"
    )
    assert LogonError("x").code == 2
    assert LogonError("x").key == "RFC_LOGON_FAILURE"


def test_unknown_function_and_parameter(system: AbapSystem, session: Session) -> None:
    with pytest.raises(ABAPApplicationError) as ex:
        system.call(session, "NO_SUCH_FM", {})
    assert (ex.value.code, ex.value.key, ex.value.msg_v1) == (5, "FU_NOT_FOUND", "NO_SUCH_FM")
    with pytest.raises(ExternalRuntimeError) as ex2:
        system.call(session, "STFC_CONNECTION", {"NOPE": "x"})
    assert (ex2.value.code, ex2.value.key) == (20, "RFC_INVALID_PARAMETER")


def test_logon_by_password_and_certificate(system: AbapSystem) -> None:
    ca = LogonCA.create(at=DEMO_NOW)
    system.trust_certificate_authority(ca.certificate)
    assert system.logon("100", x509cert=ca.issue("alice", at=DEMO_NOW)).user == "ALICE"
    assert system.logon("100", user="Demo", passwd="welcome").user == "DEMO"
    for kwargs in (
        {"user": "demo", "passwd": "bad"},
        {"user": "ghost", "passwd": "x"},
        {"x509cert": "bm90IGRlcg=="},
        {"x509cert": ca.issue("mallory", at=DEMO_NOW)},  # trusted, but mapped to nobody
    ):
        with pytest.raises(LogonError) as ex:
            system.logon("100", **kwargs)
        assert (ex.value.code, ex.value.key) == (2, "RFC_LOGON_FAILURE")
    with pytest.raises(LogonError):
        system.logon("999", user="demo", passwd="welcome")


def test_certificate_logon_checks_the_certificate_as_strust_does() -> None:
    """Only a certificate a trusted CA signed, valid at the system's time and fit for client
    authentication logs on; every refusal reads exactly like a wrong password."""
    ca = LogonCA.create(at=DEMO_NOW)
    other = LogonCA.create("other CA", at=DEMO_NOW)
    untrusted = demo_system()
    assert untrusted.trusted_cas == []
    with pytest.raises(LogonError):
        untrusted.logon("100", x509cert=ca.issue("alice", at=DEMO_NOW))

    system = demo_system()
    system.trust_certificate_authority(ca.pem)  # PEM text, as exported from a CA
    good = [
        ca.issue("alice", at=DEMO_NOW),
        ca.issue("alice", at=DEMO_NOW, usage=None),  # no extended key usage: any use
        ca.issue(
            "alice",
            at=DEMO_NOW,
            usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        ),
    ]
    for x509cert in good:
        assert system.logon("100", x509cert=x509cert).user == "ALICE"
    day = datetime.timedelta(days=1)
    bad = {
        "another CA's": other.issue("alice", at=DEMO_NOW),
        "forged": ca.issue("alice", at=DEMO_NOW, signer=other.key),
        "expired": ca.issue("alice", at=DEMO_NOW, valid_from=-3 * day, valid_to=-2 * day),
        "not yet valid": ca.issue("alice", at=DEMO_NOW, valid_from=2 * day, valid_to=3 * day),
        "server only": ca.issue("alice", at=DEMO_NOW, usage=[ExtendedKeyUsageOID.SERVER_AUTH]),
    }
    for why, x509cert in bad.items():
        with pytest.raises(LogonError) as ex:
            system.logon("100", x509cert=x509cert)
        assert str(ex.value) == str(logon_failure()), why
    # The CA's own validity counts too: one that expired before the system's now is useless.
    expired_ca = LogonCA.create("old CA", at=DEMO_NOW - datetime.timedelta(days=800))
    system.trust_certificate_authority(expired_ca.certificate)
    with pytest.raises(LogonError):
        system.logon("100", x509cert=expired_ca.issue("alice", at=DEMO_NOW))


def test_ping_and_stfc_connection(system: AbapSystem, session: Session) -> None:
    assert system.call(session, "RFC_PING", {}) == {}
    result = system.call(session, "STFC_CONNECTION", {"REQUTEXT": "Hällo"})
    assert result["ECHOTEXT"] == "Hällo"
    assert result["RESPTEXT"].startswith("SAP R/3 Rel. 758   Sysid: BCH")
    assert "Date: 20260102   Time: 030405   Logon_Data: 100/DEMO/E" in result["RESPTEXT"]
    assert "REQUTEXT" not in result
    assert (
        system.call(session, "STFC_CONNECTION", {"REQUTEXT": "a"}, return_import_params=True)[
            "REQUTEXT"
        ]
        == "a"
    )


def test_stfc_structure_echo_and_table(system: AbapSystem, session: Session) -> None:
    imp = {
        "RFCINT1": 255,
        "RFCDATE": datetime.date(2012, 10, 3),
        "RFCTIME": "123456",
        "RFCHEX3": b"fgh",
    }
    result = system.call(session, "STFC_STRUCTURE", {"IMPORTSTRUCT": imp, "RFCTABLE": [imp] * 3})
    assert result["ECHOSTRUCT"]["RFCDATE"] == "20121003"
    assert result["ECHOSTRUCT"]["RFCINT1"] == 255
    assert len(result["RFCTABLE"]) == 4


@pytest.mark.parametrize(
    ("ftype", "length", "good", "bad", "error"),
    [
        (t.INT1, 1, [0, 255], [256, -1], ExternalRuntimeError),
        (t.INT1, 1, [], ["1", 1.0, True], TypeError),
        (t.INT2, 2, [-32768, 32767], [32768], ExternalRuntimeError),
        (t.INT, 4, [2**31 - 1], [2**31], ExternalRuntimeError),
        (t.INT8, 8, [-(2**63)], [2**63], ExternalRuntimeError),
        (t.CHAR, 4, ["", "abcd"], [None, 1], TypeError),
        (t.CHAR, 4, [], ["abcde"], ExternalRuntimeError),
        (t.NUM, 3, ["007"], ["", " ", "a1", 1], TypeError),
        (
            t.DATE,
            8,
            ["20161231", "", " " * 8, "00000000"],
            ["2016123", " ", "20161232", 20161231],
            TypeError,
        ),
        (t.TIME, 6, ["123456", "", " " * 6], ["12345", "123466", 123456], TypeError),
        (t.FLOAT, 8, [1.5, "1.2", Decimal("2")], ["A", "1,2", []], TypeError),
        (t.BCD, 3, [Decimal("99.99"), "-1.5"], ["x"], TypeError),
        (t.BCD, 3, [], [Decimal("1000.00")], ExternalRuntimeError),
        (t.BYTE, 3, [b"abc", bytearray(b"a")], ["abc"], TypeError),
        (t.BYTE, 3, [], [b"abcd"], ExternalRuntimeError),
    ],
)
def test_type_checks(
    ftype: str, length: int, good: list[Any], bad: list[Any], error: type[Exception]
) -> None:
    for value in good:
        t.fill_value(ftype, value, length=length, decimals=2, name="F")
    for value in bad:
        with pytest.raises(error) as ex:
            t.fill_value(ftype, value, length=length, decimals=2, name="F", context=("P",))
        if error is TypeError:
            assert ex.value.args[1:] == (value, "of type", type(value), "F", "P")


def test_pyrfc_output_conventions() -> None:
    assert t.fill_value(t.TIME, "", length=6, decimals=0, name="T") == "000000"
    assert t.fill_value(t.BYTE, b"a", length=3, decimals=0, name="B") == b"a\x00\x00"
    assert t.to_python(t.CHAR, "ab  ") == "ab"
    assert t.to_python(t.CHAR, "ab  ", rstrip=False) == "ab  "
    assert t.to_python(t.DATE, "20240229", dtime=True) == datetime.date(2024, 2, 29)
    assert t.to_python(t.DATE, "00000000", dtime=True) is None
    with pytest.raises(TypeError, match="dictionary required"):
        fill(t.STRUCTURE, [], length=0, decimals=0, td=structure("S", [("A", t.CHAR, 1)]), name="P")


def test_error_wire_round_trip() -> None:
    err = ABAPApplicationError("m", 5, "K", "C", "E", "001", "1", "2", "3", "4")
    back = from_wire(json.loads(json.dumps(to_wire(err))))
    assert type(back) is ABAPApplicationError
    assert isinstance(back, RFCLibError)
    assert str(back) == str(err)
    te = from_wire(
        json.loads(
            json.dumps(
                to_wire(TypeError("an integer required, received", "1", "of type", str, "F"))
            )
        )
    )
    assert type(te) is TypeError
    assert te.args[3] is str


LINE = structure(
    "LINE",
    [
        ("D", t.DATE, 8),
        ("T", t.TIME, 6),
        ("P", t.BCD, 8, 2),
        ("X", t.XSTRING, 8),
        ("F", t.FLOAT, 8),
        ("C", t.CHAR, 10),
    ],
)
OUTER = structure("OUTER", [("S", t.STRUCTURE, LINE), ("TAB", t.TABLE, LINE), ("I", t.INT8, 8)])

line_values = st.fixed_dictionaries(
    {
        "D": st.dates(datetime.date(1, 1, 1)).map(lambda d: d.strftime("%Y%m%d").zfill(8)),
        "T": st.times().map(lambda x: x.strftime("%H%M%S")),
        "P": st.decimals(min_value=-(10**12), max_value=10**12, places=2),
        "X": st.binary(max_size=40),
        "F": st.floats(allow_nan=False),
        "C": st.text(max_size=10),
    }
)


@given(
    st.fixed_dictionaries(
        {
            "S": line_values,
            "TAB": st.lists(line_values, max_size=4),
            "I": st.integers(-(2**63), 2**63 - 1),
        }
    )
)
def test_value_wire_round_trip(value: dict[str, Any]) -> None:
    canonical = fill(t.STRUCTURE, value, length=0, decimals=0, td=OUTER, name="P")
    data = json.loads(json.dumps(encode(t.STRUCTURE, canonical, OUTER)))
    assert decode(t.STRUCTURE, data, OUTER) == canonical


def _read(system: AbapSystem, session: Session, **params: Any) -> dict[str, Any]:
    return system.call(session, "RFC_READ_TABLE", params)


def test_rfc_read_table(system: AbapSystem, session: Session) -> None:
    result = _read(
        system,
        session,
        QUERY_TABLE="SCARR",
        DELIMITER="|",
        FIELDS=[{"FIELDNAME": "CARRID"}, {"FIELDNAME": "CURRCODE"}],
    )
    assert [r["WA"] for r in result["DATA"]] == ["AA |USD  ", "LH |EUR  ", "UA |USD  "]
    assert result["FIELDS"][1] == {
        "FIELDNAME": "CURRCODE",
        "OFFSET": "000004",
        "LENGTH": "000005",
        "TYPE": "C",
        "FIELDTEXT": "Local currency of airline",
    }
    opts = [{"TEXT": "CURRCODE = 'USD' AND"}, {"TEXT": "CARRNAME LIKE 'Un%'"}]
    assert [
        r["WA"][:2] for r in _read(system, session, QUERY_TABLE="SCARR", OPTIONS=opts)["DATA"]
    ] == ["UA"]
    paged = _read(system, session, QUERY_TABLE="SCARR", ROWSKIPS=1, ROWCOUNT=1)["DATA"]
    assert [r["WA"][:2] for r in paged] == ["LH"]
    assert _read(system, session, QUERY_TABLE="SCARR", NO_DATA="X")["DATA"] == []
    cases: list[tuple[dict[str, Any], str]] = [
        ({"QUERY_TABLE": "NOPE"}, "TABLE_NOT_AVAILABLE"),
        ({"QUERY_TABLE": "SCARR", "FIELDS": [{"FIELDNAME": "NOPE"}]}, "FIELD_NOT_VALID"),
        ({"QUERY_TABLE": "SCARR", "OPTIONS": [{"TEXT": "CARRID IN ('AA')"}]}, "OPTION_NOT_VALID"),
        ({"QUERY_TABLE": "WIDE"}, "DATA_BUFFER_EXCEEDED"),
    ]
    for params, key in cases:
        with pytest.raises(ABAPApplicationError) as ex:
            _read(system, session, **params)
        assert (ex.value.code, ex.value.key) == (5, key)


def test_bapi_user_get_detail(system: AbapSystem, session: Session) -> None:
    found = system.call(session, "BAPI_USER_GET_DETAIL", {"USERNAME": "ALICE"})
    assert found["ADDRESS"]["LASTNAME"] == "Example"
    assert found["RETURN"] == []
    missing = system.call(session, "BAPI_USER_GET_DETAIL", {"USERNAME": "GHOST"})["RETURN"][0]
    assert (missing["TYPE"], missing["ID"], missing["NUMBER"]) == ("E", "01", "124")
    assert missing["MESSAGE"] == "User GHOST does not exist"
