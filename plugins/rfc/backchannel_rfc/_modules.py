"""Standard function modules: RFC_PING, RFC_PING_AND_WAIT, STFC_CONNECTION, STFC_STRUCTURE,
RFC_READ_TABLE, BAPI_USER_GET_DETAIL, with their real interfaces and behaviour."""

from __future__ import annotations

import re
import time
from typing import Any

from . import _abap_types as t
from ._descriptions import FunctionDescription, TypeDescription, structure
from ._errors import abap_exception
from ._system import AbapSystem, Session

_STFC_STRUCT = structure(
    "RFCTEST",
    [
        ("RFCFLOAT", t.FLOAT, 8),
        ("RFCCHAR1", t.CHAR, 1),
        ("RFCINT2", t.INT2, 2),
        ("RFCINT1", t.INT1, 1),
        ("RFCICHAR4", t.CHAR, 4),
        ("RFCINT4", t.INT, 4),
        ("RFCHEX3", t.BYTE, 3),
        ("RFCCHAR2", t.CHAR, 2),
        ("RFCCHAR4", t.CHAR, 4),
        ("RFCTIME", t.TIME, 6),
        ("RFCDATE", t.DATE, 8),
        ("RFCDATA1", t.CHAR, 50),
        ("RFCDATA2", t.CHAR, 50),
    ],
)
_RFC_DB_OPT = structure("RFC_DB_OPT", [("TEXT", t.CHAR, 72)])
_RFC_DB_FLD = structure(
    "RFC_DB_FLD",
    [
        ("FIELDNAME", t.CHAR, 30),
        ("OFFSET", t.NUM, 6),
        ("LENGTH", t.NUM, 6),
        ("TYPE", t.CHAR, 1),
        ("FIELDTEXT", t.CHAR, 60),
    ],
)
_TAB512 = structure("TAB512", [("WA", t.CHAR, 512)])
_BAPIRET2 = structure(
    "BAPIRET2",
    [
        ("TYPE", t.CHAR, 1),
        ("ID", t.CHAR, 20),
        ("NUMBER", t.NUM, 3),
        ("MESSAGE", t.CHAR, 220),
        ("MESSAGE_V1", t.CHAR, 50),
        ("MESSAGE_V2", t.CHAR, 50),
    ],
)
_ADDRESS = structure(
    "BAPIADDR3", [("FIRSTNAME", t.CHAR, 40), ("LASTNAME", t.CHAR, 40), ("FULLNAME", t.CHAR, 80)]
)
_LOGONDATA = structure(
    "BAPILOGOND", [("USTYP", t.CHAR, 1), ("CLASS", t.CHAR, 12), ("GLTGV", t.DATE, 8)]
)
_DEFAULTS = structure("BAPIDEFAUL", [("LANGU", t.CHAR, 1), ("DATFM", t.CHAR, 1)])


def _param(
    fd: FunctionDescription,
    name: str,
    ftype: str,
    direction: str,
    length: int = 0,
    td: TypeDescription | None = None,
    *,
    optional: bool = True,
    default: str = "",
) -> None:
    length = td.nuc_length if td is not None else length
    uc = 2 * length if ftype in (t.CHAR, t.NUM, t.DATE, t.TIME) else length
    fd.add_parameter(name, ftype, direction, length, uc, 0, default, "", optional, td)


def _resptext(session: Session) -> str:
    now = session.system.now()
    return (
        f"SAP R/3 Rel. {session.system.release}   Sysid: {session.system.sysid}"
        f"      Date: {now:%Y%m%d}   Time: {now:%H%M%S}"
        f"   Logon_Data: {session.client}/{session.user}/{session.language}"
    )


def rfc_ping(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    return {}


#: RFC_PING_AND_WAIT waits at most this long, whatever SECONDS says: a stub must not be
#: tied up for days by one call.
MAX_WAIT_SECONDS = 3600


def rfc_ping_and_wait(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    """Return after SECONDS seconds (at most MAX_WAIT_SECONDS).  Real systems ship this module
    for testing timeouts and cancellation; it is the one module here that blocks, which is why
    the stub server runs calls in worker threads."""
    time.sleep(min(max(params["SECONDS"], 0), MAX_WAIT_SECONDS))
    return {}


def stfc_connection(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    return {"ECHOTEXT": params["REQUTEXT"], "RESPTEXT": _resptext(session)}


def stfc_structure(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    echo = dict(params["IMPORTSTRUCT"])
    return {
        "ECHOSTRUCT": echo,
        "RESPTEXT": _resptext(session),
        "RFCTABLE": [*params["RFCTABLE"], echo],
    }


_CONDITION = re.compile(r"\s*(\w+)\s*(=|EQ|<>|NE|LIKE)\s*'((?:[^']|'')*)'\s*", re.IGNORECASE)


def _parse_where(text: str, known: set[str]) -> list[tuple[str, str, str]]:
    """``FIELD = 'v' [AND ...]`` with =, EQ, <>, NE, LIKE ('%', '_'); anything else is refused."""
    conditions: list[tuple[str, str, str]] = []
    if not text.strip():
        return conditions
    for part in re.split(r"\s+AND\s+", text.strip(), flags=re.IGNORECASE):
        match = _CONDITION.fullmatch(part)
        if match is None or match.group(1).upper() not in known:
            raise abap_exception("OPTION_NOT_VALID")
        conditions.append(
            (match.group(1).upper(), match.group(2).upper(), match.group(3).replace("''", "'"))
        )
    return conditions


def _matches(row: dict[str, str], conditions: list[tuple[str, str, str]]) -> bool:
    for field, op, value in conditions:
        actual = row.get(field, "").rstrip()
        if op == "LIKE":
            pattern = "".join(
                ".*" if c == "%" else "." if c == "_" else re.escape(c) for c in value
            )
            ok = re.fullmatch(pattern, actual, re.DOTALL) is not None
        elif op in ("=", "EQ"):
            ok = actual == value.rstrip()
        else:
            ok = actual != value.rstrip()
        if not ok:
            return False
    return True


def rfc_read_table(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    table = session.system.tables.get(params["QUERY_TABLE"].rstrip().upper())
    if table is None:
        raise abap_exception("TABLE_NOT_AVAILABLE")
    columns, rows = table
    by_name = {c[0]: c for c in columns}
    wanted = [f["FIELDNAME"].rstrip().upper() for f in params["FIELDS"]] or [c[0] for c in columns]
    for name in wanted:
        if name not in by_name:
            raise abap_exception("FIELD_NOT_VALID")
    delimiter = params["DELIMITER"].rstrip()
    fields: list[dict[str, Any]] = []
    offset = 0
    for name in wanted:
        _, letter, length, text = by_name[name]
        fields.append(
            {
                "FIELDNAME": name,
                "OFFSET": str(offset),
                "LENGTH": str(length),
                "TYPE": letter,
                "FIELDTEXT": text,
            }
        )
        offset += length + len(delimiter)
    if offset - len(delimiter) > 512:
        raise abap_exception("DATA_BUFFER_EXCEEDED")
    where = " ".join(o["TEXT"] for o in params["OPTIONS"])
    conditions = _parse_where(where, set(by_name))
    data: list[dict[str, Any]] = []
    if not params["NO_DATA"].strip():
        selected = [r for r in rows if _matches(r, conditions)][params["ROWSKIPS"] :]
        if params["ROWCOUNT"] > 0:
            selected = selected[: params["ROWCOUNT"]]
        for r in selected:
            cells = [r.get(name, "").ljust(by_name[name][2])[: by_name[name][2]] for name in wanted]
            data.append({"WA": delimiter.join(cells)})
    return {"FIELDS": fields, "DATA": data}


def bapi_user_get_detail(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    name = params["USERNAME"].rstrip().upper()
    user = session.system.users[session.client].get(name)
    if user is None:
        message = {
            "TYPE": "E",
            "ID": "01",
            "NUMBER": "124",
            "MESSAGE": f"User {name} does not exist",
            "MESSAGE_V1": name,
        }
        return {"RETURN": [*params["RETURN"], message]}
    return {
        "ADDRESS": {
            "FIRSTNAME": user.first_name,
            "LASTNAME": user.last_name,
            "FULLNAME": f"{user.first_name} {user.last_name}".strip(),
        },
        "LOGONDATA": {"USTYP": "A", "CLASS": "", "GLTGV": "00000000"},
        "DEFAULTS": {"LANGU": user.language, "DATFM": "1"},
    }


def install_standard_modules(system: AbapSystem) -> None:
    """Register every standard module of this file on ``system``."""
    fd = FunctionDescription("RFC_PING")
    system.register(fd, rfc_ping)

    fd = FunctionDescription("RFC_PING_AND_WAIT")
    _param(fd, "SECONDS", t.INT, "RFC_IMPORT", 4, default="0")
    system.register(fd, rfc_ping_and_wait)

    fd = FunctionDescription("STFC_CONNECTION")
    _param(fd, "REQUTEXT", t.CHAR, "RFC_IMPORT", 255, optional=False)
    _param(fd, "ECHOTEXT", t.CHAR, "RFC_EXPORT", 255)
    _param(fd, "RESPTEXT", t.CHAR, "RFC_EXPORT", 255)
    system.register(fd, stfc_connection)

    fd = FunctionDescription("STFC_STRUCTURE")
    _param(fd, "IMPORTSTRUCT", t.STRUCTURE, "RFC_IMPORT", td=_STFC_STRUCT, optional=False)
    _param(fd, "ECHOSTRUCT", t.STRUCTURE, "RFC_EXPORT", td=_STFC_STRUCT)
    _param(fd, "RESPTEXT", t.CHAR, "RFC_EXPORT", 255)
    _param(fd, "RFCTABLE", t.TABLE, "RFC_TABLES", td=_STFC_STRUCT)
    system.register(fd, stfc_structure)

    fd = FunctionDescription("RFC_READ_TABLE")
    _param(fd, "QUERY_TABLE", t.CHAR, "RFC_IMPORT", 30, optional=False)
    _param(fd, "DELIMITER", t.CHAR, "RFC_IMPORT", 1, default="SPACE")
    _param(fd, "NO_DATA", t.CHAR, "RFC_IMPORT", 1, default="SPACE")
    _param(fd, "ROWSKIPS", t.INT, "RFC_IMPORT", 4, default="0")
    _param(fd, "ROWCOUNT", t.INT, "RFC_IMPORT", 4, default="0")
    _param(fd, "OPTIONS", t.TABLE, "RFC_TABLES", td=_RFC_DB_OPT)
    _param(fd, "FIELDS", t.TABLE, "RFC_TABLES", td=_RFC_DB_FLD)
    _param(fd, "DATA", t.TABLE, "RFC_TABLES", td=_TAB512)
    system.register(fd, rfc_read_table)

    fd = FunctionDescription("BAPI_USER_GET_DETAIL")
    _param(fd, "USERNAME", t.CHAR, "RFC_IMPORT", 12, optional=False)
    _param(fd, "ADDRESS", t.STRUCTURE, "RFC_EXPORT", td=_ADDRESS)
    _param(fd, "LOGONDATA", t.STRUCTURE, "RFC_EXPORT", td=_LOGONDATA)
    _param(fd, "DEFAULTS", t.STRUCTURE, "RFC_EXPORT", td=_DEFAULTS)
    _param(fd, "RETURN", t.TABLE, "RFC_TABLES", td=_BAPIRET2)
    system.register(fd, bapi_user_get_detail)
