"""The wire format between ``Connection`` and the stub ABAP system: sans-IO, used by both sides.

Framing: every message is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON
encoding one object.  A length above ``MAX_MESSAGE_SIZE`` (16 MiB) is a protocol error on either
side: the sender refuses to encode it, the receiver refuses it as soon as it sees the prefix,
before buffering the body.

Requests carry an ``op``; every request gets exactly one response, in order::

    {"op": "logon", "client": "100", "user": "DEMO", "passwd": "...", "lang": "E"}
    {"op": "logon", "client": "100", "x509cert": "<base64 DER>", "lang": "E"}
        -> {"ok": true, "sysid": "BCH", "release": "758", "client": "100", "user": "DEMO",
            "language": "E"}
    {"op": "describe", "name": "STFC_CONNECTION"} -> {"ok": true, "description": {...}}
    {"op": "call", "name": "STFC_CONNECTION", "params": {...}, "return_import_params": false}
        -> {"ok": true, "result": {...}}
    {"op": "ping"} -> {"ok": true}
    {"op": "close"} -> {"ok": true}, then the server closes the connection

Any request may instead be answered ``{"ok": false, "error": to_wire(exc)}``.  The first request
on a connection must be ``logon``, and only the first; a failed logon closes the connection, as
a real gateway does.  ``params`` and ``result`` hold canonical values in the JSON form of
``_descriptions.encode_params``; descriptions use ``description_to_wire`` below.

Registered server programs (``GATEWAY_TRANSITIONS``; only the stub system's gateway accepts
them, the tunnel never carries them).  A ``Server`` opens a connection whose first request is::

    {"op": "register", "program_id": "SERVER1", "functions": ["STFC_CONNECTION"]}
        -> {"ok": true, "sysid": "BCH"}

``functions`` names what it serves at that moment (for the record: describe requests reach the
server, which may learn more functions later).  From then on the roles swap: the stub sends the
requests (``SERVER_TRANSITIONS``), each with an ``id`` that the response repeats, and the server
answers them in order::

    {"op": "describe", "id": 1, "name": "STFC_CONNECTION"}
        -> {"id": 1, "ok": true, "description": {...}}
    {"op": "call", "id": 2, "name": "STFC_CONNECTION", "params": {...},
     "return_import_params": false,
     "connection": {"client": "100", "user": "DEMO", "language": "E", "partner_host": "..."}}
        -> {"id": 2, "ok": true, "result": {...}}
    {"op": "ping", "id": 3} -> {"id": 3, "ok": true}

(a response whose ``id`` is not the one awaited answers a request whose caller gave up, and is
dropped).  The registration ends when either side closes the connection.  A client reaches a
registered program by naming it in its logon, where no user check applies (the program is the
partner, not the ABAP system); an unknown program id fails the logon with the gateway's
"program not registered"::

    {"op": "logon", "tpname": "SERVER1", "client": "100", "user": "DEMO", "lang": "E"}
        -> {"ok": true, "sysid": "", "release": "753", "client": "100", "user": "DEMO",
            "language": "E"}

after which its describe, call and ping requests go to the program (calls with the caller's
``connection`` added), and the program's answers back to it.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from ._descriptions import FunctionDescription, TypeDescription

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
_PREFIX = struct.Struct(">I")

OPS = frozenset({"logon", "call", "ping", "describe", "close"})

# The ops each connection state accepts, and the state each op leads to: the whole state machine.
AWAITING_LOGON = "awaiting_logon"
LOGGED_ON = "logged_on"
CLOSED = "closed"
TRANSITIONS: dict[str, dict[str, str]] = {
    AWAITING_LOGON: {"logon": LOGGED_ON},
    LOGGED_ON: {"call": LOGGED_ON, "ping": LOGGED_ON, "describe": LOGGED_ON, "close": CLOSED},
    CLOSED: {},
}
# The stub system's gateway takes registrations as well; a registered connection accepts no
# further request from its peer, it only answers the stub's (SERVER_TRANSITIONS).
REGISTERED = "registered"
GATEWAY_TRANSITIONS: dict[str, dict[str, str]] = {
    **TRANSITIONS,
    AWAITING_LOGON: {**TRANSITIONS[AWAITING_LOGON], "register": REGISTERED},
    REGISTERED: {},
}
# The requests a registered server program accepts from the stub.
SERVER_TRANSITIONS: dict[str, dict[str, str]] = {
    REGISTERED: {"describe": REGISTERED, "call": REGISTERED, "ping": REGISTERED},
    CLOSED: {},
}


class StubProtocolError(Exception):
    """Bytes that are not a valid stub message: too large, not JSON, not an object, cut short."""


def encode_message(message: dict[str, Any], *, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """One framed message; raises StubProtocolError if it would exceed ``max_size``."""
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    if len(body) > max_size:
        raise StubProtocolError(
            f"message of {len(body)} bytes exceeds the maximum of {max_size} bytes"
        )
    return _PREFIX.pack(len(body)) + body


class MessageDecoder:
    """Feed it bytes as they arrive (``b""`` is EOF); take complete messages out."""

    def __init__(self, *, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._max_size = max_size
        self._buffer = bytearray()
        self._eof = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof and data:
            raise StubProtocolError("data after EOF")
        if not data:
            self._eof = True
        self._buffer += data

    @property
    def at_eof(self) -> bool:
        """True once EOF was fed and every complete message has been taken."""
        return self._eof and not self._buffer

    def take_buffered(self) -> bytes:
        """Remove and return the bytes not yet taken as messages."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_message(self) -> dict[str, Any] | None:
        """The next complete message, or None if more bytes are needed (or the peer is done)."""
        if len(self._buffer) < _PREFIX.size:
            if self._eof and self._buffer:
                raise StubProtocolError("connection closed inside a length prefix")
            return None
        (length,) = _PREFIX.unpack_from(self._buffer)
        if length > self._max_size:
            raise StubProtocolError(
                f"message of {length} bytes exceeds the maximum of {self._max_size} bytes"
            )
        end = _PREFIX.size + length
        if len(self._buffer) < end:
            if self._eof:
                raise StubProtocolError("connection closed inside a message")
            return None
        body = bytes(self._buffer[_PREFIX.size : end])
        del self._buffer[:end]
        try:
            message = json.loads(body.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StubProtocolError(f"message is not UTF-8 JSON: {exc}") from exc
        if not isinstance(message, dict):
            raise StubProtocolError("message is not a JSON object")
        return message


def _type_to_wire(td: TypeDescription) -> dict[str, Any]:
    return {
        "name": td.name,
        "nuc_length": td.nuc_length,
        "uc_length": td.uc_length,
        "fields": [
            {
                **f,
                "type_description": (
                    None if f["type_description"] is None else _type_to_wire(f["type_description"])
                ),
            }
            for f in td.fields
        ],
    }


def _type_from_wire(data: dict[str, Any]) -> TypeDescription:
    td = TypeDescription(data["name"], data["nuc_length"], data["uc_length"])
    for f in data["fields"]:
        nested = f["type_description"]
        td.add_field(
            f["name"],
            f["field_type"],
            f["nuc_length"],
            f["uc_length"],
            f["nuc_offset"],
            f["uc_offset"],
            f["decimals"],
            None if nested is None else _type_from_wire(nested),
        )
    return td


def description_to_wire(fd: FunctionDescription) -> dict[str, Any]:
    """JSON-safe form of a FunctionDescription, nested type descriptions included."""
    return {
        "name": fd.name,
        "parameters": [
            {
                **p,
                "type_description": (
                    None if p["type_description"] is None else _type_to_wire(p["type_description"])
                ),
            }
            for p in fd.parameters
        ],
    }


def description_from_wire(data: dict[str, Any]) -> FunctionDescription:
    """Inverse of ``description_to_wire``."""
    fd = FunctionDescription(data["name"])
    for p in data["parameters"]:
        nested = p["type_description"]
        fd.add_parameter(
            p["name"],
            p["parameter_type"],
            p["direction"],
            p["nuc_length"],
            p["uc_length"],
            p["decimals"],
            p["default_value"],
            p["parameter_text"],
            p["optional"],
            None if nested is None else _type_from_wire(nested),
        )
    return fd
