"""The JSON endpoint's HTTP rules, sans-IO: request targets, options, credentials and bodies
read into what a call needs, and pyrfc exceptions mapped to HTTP statuses and JSON error
bodies (the tables are in :mod:`backchannel_rfc._json_endpoint`'s docstring)."""

from __future__ import annotations

import json
import logging
import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import h11

from backchannel import (
    AuthenticationError,
    PrincipalReason,
    ResetCode,
    parse_authorization,
)

from ._call_codec import (
    parse_json,
)
from ._errors import (
    ABAPApplicationError,
    ABAPRuntimeError,
    CommunicationError,
    ExternalAuthorizationError,
    ExternalRuntimeError,
    RFCLibError,
    RfcRc,
    RFCTypeError,
    library_error,
    principal_refusal_reason,
    to_wire,
)
from ._functions import MAX_NAME_LENGTH, canonical_name

log = logging.getLogger("backchannel.rfc")

NAME = "rfc.json"
MAX_BODY = 1 << 20
#: Largest request head (request line and headers); h11 refuses a larger one with 431.
MAX_HEAD = 16 * 1024
RECEIVE_SIZE = 64 * 1024
#: Time a client has to take one response off the socket.
SEND_TIMEOUT = 60.0
#: How much longer than a call's ``timeout`` the gateway waits for the connector's answer (the
#: connector cancels the backend call at ``timeout`` and answers RFC_CANCELED itself).
TIMEOUT_MARGIN = 5.0
PREFIX = "/rfc/"
ALLOW = "GET, POST"
CHALLENGE = (
    ("WWW-Authenticate", 'Basic realm="backchannel"'),
    ("WWW-Authenticate", 'Bearer realm="backchannel"'),
)
OPTIONS = ("return_import_params", "rstrip", "timeout", "not_requested")
ERROR_FIELDS = (
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
)
_BAD_VALUE_KEYS = frozenset(
    {"RFC_INVALID_PARAMETER", "RFC_CONVERSION_FAILURE", "RFC_BUFFER_TOO_SMALL"}
)
_TIME_UP = frozenset({RfcRc.RFC_CANCELED, RfcRc.RFC_TIMEOUT})
#: The status of a refused or reset tunnel stream, by reset code (otherwise 502).
RESET_STATUS = {
    ResetCode.NOT_CONNECTED: 503,
    ResetCode.ACCESS_DENIED: 403,
    ResetCode.BACKEND_TIMEOUT: 504,
}
_TRUE = frozenset({"", "1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_JSON_TYPES = {
    str: "string",
    int: "integer",
    float: "number",
    Decimal: "number",
    bool: "boolean",
    type(None): "null",
    dict: "object",
    list: "array",
}
_FRAMING = (b"content-length", b"transfer-encoding")
#: The header that carries the cloud user's token for principal propagation, as in SAP BTP.
PRINCIPAL_HEADER = "SAP-Connectivity-Authentication"
#: Principal propagation refusals that the caller cannot fix with a fresh token: the
#: connector's CA, or the backend's trust in it (answered 502, not 401).
_NOT_THE_USERS = frozenset(
    {
        PrincipalReason.CA_UNUSABLE.code,
        PrincipalReason.BACKEND_NOT_MUTUAL.code,
        PrincipalReason.BACKEND_REJECTED_CERTIFICATE.code,
    }
)
#: The blank line that ends a request head (h11 accepts bare LF line ends too).
HEAD_END = re.compile(rb"\n\r?\n")
_HEADER_UNSAFE = re.compile(r"[^\x21-\x7e]")


# ---------------------------------------------------------------------------- errors


class HttpRefusal(Exception):
    """An answer other than 200: status, the ``error`` object, extra headers, and whether the
    connection closes after it."""

    def __init__(
        self,
        status: int,
        error: dict[str, Any],
        headers: Sequence[tuple[str, str]] = (),
        *,
        close: bool = False,
    ) -> None:
        super().__init__(f"{status} {error['class']}:{error['key']}: {error['message']}")
        self.status = status
        self.error = error
        self.headers = tuple(headers)
        self.close = close


def gateway_error(key: str, message: str) -> dict[str, Any]:
    """The ``error`` object of a failure of the HTTP exchange itself."""
    return {**dict.fromkeys(ERROR_FIELDS), "class": "RFCError", "key": key, "message": message}


def gateway_refusal(
    status: int,
    key: str,
    message: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    close: bool = False,
) -> HttpRefusal:
    return HttpRefusal(status, gateway_error(key, message), headers, close=close)


def error_body(exc: BaseException) -> dict[str, Any]:
    """The ``error`` object of a pyrfc exception (or of pyrfc's TypeError)."""
    wire = to_wire(exc)
    body = {field: wire.get(field) for field in ERROR_FIELDS}
    if "args" in wire:
        body["args"] = wire["args"]  # pyrfc's TypeError arguments, for clients that rebuild it
    if body["message"] is None:
        body["message"] = (
            describe_type_error(exc) if isinstance(exc, TypeError) else _text_of_args(exc.args)
        )
    return body


def status_for(exc: BaseException) -> int:
    """The HTTP status of a pyrfc exception (the table in the module docstring)."""
    if isinstance(exc, TypeError | RFCTypeError):
        return 400
    if not isinstance(exc, RFCLibError):
        return 502
    if exc.code in _TIME_UP or exc.key in ("RFC_CANCELED", "RFC_TIMEOUT"):
        return 504
    if isinstance(exc, ExternalRuntimeError) and exc.key in _BAD_VALUE_KEYS:
        return 400
    if isinstance(exc, ExternalAuthorizationError):
        return 403
    if isinstance(exc, ABAPApplicationError):
        return 404 if exc.key == "FU_NOT_FOUND" else 422
    if isinstance(exc, ABAPRuntimeError):
        return 500
    reason = principal_refusal_reason(exc)
    if reason is not None and reason not in _NOT_THE_USERS:
        return 401  # the user's token was refused: a fresh one may do
    return 502


def refusal_for(exc: BaseException, status: int | None = None) -> HttpRefusal:
    """The answer to a pyrfc exception (with its own status unless ``status`` is given)."""
    return HttpRefusal(status_for(exc) if status is None else status, error_body(exc))


def describe_type_error(exc: TypeError) -> str:
    """pyrfc's TypeError ``(text, value, "of type", type, field[, parameter])`` as one line,
    with JSON's type names and long values cut short."""
    args = exc.args
    if len(args) >= 5 and args[2] == "of type" and isinstance(args[3], type):
        text = f"{args[0]} {_short(args[1])} of type {_type_name(args[3])}, field {args[4]}"
        return text + "".join(f" of {parent}" for parent in args[5:])
    return _text_of_args(args)


def _short(value: Any) -> str:
    text = str(value) if isinstance(value, Decimal | int | float) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(value, value.__name__) if isinstance(value, type) else str(value)


def _text_of_args(args: tuple[Any, ...]) -> str:
    return " ".join(_type_name(a) for a in args)[:1000]


def error_header(error: Mapping[str, Any]) -> str:
    text = f"{error['class'] or ''}:{error['key'] or ''}"
    return _HEADER_UNSAFE.sub("?", text)[:200]


def canceled(message: str) -> CommunicationError:
    return library_error(CommunicationError, message, RfcRc.RFC_CANCELED, "RFC_CANCELED")


class Failed(Exception):
    """A pyrfc exception where one is expected: in an answer, or from filling parameters
    (other exceptions there are bugs, answered 500)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class CallOptions:
    """The query parameters of a request."""

    return_import_params: bool = False
    rstrip: bool = True
    #: Seconds, already capped by the endpoint's ``call_timeout``; None: no limit.
    timeout: float | None = None
    not_requested: tuple[str, ...] = ()


def parse_target(target: bytes) -> tuple[str, str, str]:
    """``/rfc/<destination>/<FUNCTION>[?query]`` → (destination, FUNCTION upper-cased, query);
    raises HttpRefusal 404."""
    path, _, query = target.decode("ascii", "replace").partition("?")
    usage = f"not found: use {PREFIX}<destination>/<FUNCTION>"
    if not path.startswith(PREFIX):
        raise gateway_refusal(404, "NOT_FOUND", usage)
    raw_destination, slash, raw_function = path[len(PREFIX) :].partition("/")
    try:
        destination = urllib.parse.unquote(raw_destination, errors="strict")
        function = urllib.parse.unquote(raw_function, errors="strict")
    except UnicodeDecodeError:
        raise gateway_refusal(404, "NOT_FOUND", f"{usage} (percent-encoded UTF-8)") from None
    if not destination or not slash or not function:
        raise gateway_refusal(404, "NOT_FOUND", usage)
    name = canonical_name(function)
    if name is None:
        raise gateway_refusal(
            404,
            "INVALID_FUNCTION_NAME",
            f"{function[:64]!r} is not a function module name (letters, digits, '_' and an "
            f"optional /NAMESPACE/ part, up to {MAX_NAME_LENGTH} characters)",
        )
    return destination, name, query


def _option_error(message: str) -> HttpRefusal:
    return gateway_refusal(400, "INVALID_OPTION", message)


def _boolean(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise _option_error(f"option {name}: {value[:32]!r} is neither true nor false")


def parse_options(query: str, *, call_timeout: float | None = None) -> CallOptions:
    """The options of a query string; HttpRefusal 400 for anything else."""
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, errors="strict", max_num_fields=100
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise _option_error(f"malformed query string: {exc}") from None
    given: dict[str, str] = {}
    not_requested: list[str] = []
    for key, value in pairs:
        if key not in OPTIONS:
            known = ", ".join(OPTIONS)
            raise _option_error(f"unknown option {key[:32]!r}: the options are {known}")
        if key == "not_requested":
            not_requested.extend(name.strip() for name in value.split(",") if name.strip())
            continue
        if key in given:
            raise _option_error(f"option {key} given twice")
        given[key] = value
    timeout = call_timeout
    if "timeout" in given:
        text = given["timeout"]
        try:
            requested = float(text)
        except ValueError:
            requested = math.nan
        if not (math.isfinite(requested) and requested > 0):
            raise _option_error(f"option timeout: {text[:32]!r} is not a positive number")
        timeout = requested if call_timeout is None else min(requested, call_timeout)
    return CallOptions(
        return_import_params=_boolean(
            "return_import_params", given.get("return_import_params", "false")
        ),
        rstrip=_boolean("rstrip", given.get("rstrip", "true")),
        timeout=timeout,
        not_requested=tuple(not_requested),
    )


def credentials_of(request: h11.Request) -> tuple[str, str] | str:
    """``(subaccount/app, secret)`` from Basic or the app token from Bearer (one
    ``Authorization`` header); raises AuthenticationError (whose message never repeats a
    secret)."""
    values = [value for name, value in request.headers if name == b"authorization"]
    if len(values) > 1:
        raise AuthenticationError("more than one Authorization header")
    return parse_authorization(values[0] if values else None)


def user_principal_of(request: h11.Request) -> str | None:
    """The cloud user's token, ``SAP-Connectivity-Authentication: Bearer <JWT>``, as it goes to
    the connector (which checks scheme and token); None without the header. HttpRefusal 400 if
    it is given twice or is not ASCII."""
    name = PRINCIPAL_HEADER.lower().encode("ascii")
    values = [value.strip() for key, value in request.headers if key == name]
    if len(values) > 1:
        message = f"more than one {PRINCIPAL_HEADER} header"
        raise gateway_refusal(400, "BAD_REQUEST", message)
    if not values or not values[0]:
        return None
    if not values[0].isascii():
        message = f"{PRINCIPAL_HEADER} must be ASCII: 'Bearer <the user's JWT>'"
        raise gateway_refusal(400, "BAD_REQUEST", message)
    return values[0].decode("ascii")


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of parameters (``{}`` for an empty body); HttpRefusal 400 if not."""
    if not body.strip():
        return {}
    try:
        params = parse_json(body)
    except ValueError as exc:
        message = f"the body is not JSON: {str(exc)[:200]}"
        raise gateway_refusal(400, "MALFORMED_JSON", message) from None
    if not isinstance(params, dict):
        message = "the body must be a JSON object of parameters by name"
        raise gateway_refusal(400, "NOT_AN_OBJECT", message)
    return params


def is_json(content_type: bytes) -> bool:
    """Whether a Content-Type value is JSON (``application/json`` or ``application/*+json``)."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def declares_no_body(request: h11.Request) -> bool:
    framing = {name: value for name, value in request.headers if name in _FRAMING}
    return (
        framing.get(b"content-length", b"0").strip() == b"0" and b"transfer-encoding" not in framing
    )


def json_bytes(document: Any) -> bytes:
    """Compact UTF-8 JSON; strings that UTF-8 cannot carry are written as escapes."""
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(document, separators=(",", ":")).encode("ascii")
