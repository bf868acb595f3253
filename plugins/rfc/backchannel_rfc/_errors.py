"""pyrfc's exception tree, RFC_RC codes, and the classic errors as a real system reports them."""

from __future__ import annotations

import builtins
from enum import IntEnum
from typing import Any, TypeVar


class RfcRc(IntEnum):
    """RFC_RC return codes of the NW RFC SDK (sapnwrfc.h), as pyrfc's ``code2txt`` lists them."""

    RFC_OK = 0
    RFC_COMMUNICATION_FAILURE = 1
    RFC_LOGON_FAILURE = 2
    RFC_ABAP_RUNTIME_FAILURE = 3
    RFC_ABAP_MESSAGE = 4
    RFC_ABAP_EXCEPTION = 5
    RFC_CLOSED = 6
    RFC_CANCELED = 7
    RFC_TIMEOUT = 8
    RFC_MEMORY_INSUFFICIENT = 9
    RFC_VERSION_MISMATCH = 10
    RFC_INVALID_PROTOCOL = 11
    RFC_SERIALIZATION_FAILURE = 12
    RFC_INVALID_HANDLE = 13
    RFC_RETRY = 14
    RFC_EXTERNAL_FAILURE = 15
    RFC_EXECUTED = 16
    RFC_NOT_FOUND = 17
    RFC_NOT_SUPPORTED = 18
    RFC_ILLEGAL_STATE = 19
    RFC_INVALID_PARAMETER = 20
    RFC_CODEPAGE_CONVERSION_FAILURE = 21
    RFC_CONVERSION_FAILURE = 22
    RFC_BUFFER_TOO_SMALL = 23
    RFC_TABLE_MOVE_BOF = 24
    RFC_TABLE_MOVE_EOF = 25
    RFC_START_SAPGUI_FAILURE = 26
    RFC_ABAP_CLASS_EXCEPTION = 27
    RFC_UNKNOWN_ERROR = 28
    RFC_AUTHORIZATION_FAILURE = 29


class RFCError(Exception):
    """Exception base class: an error in the Python connector."""


class RFCLibError(RFCError):
    """RFC library error: the base of errors reported by the (here simulated) RFC library."""

    code2txt: dict[int, str] = {rc.value: rc.name for rc in RfcRc}

    def __init__(
        self,
        message: str | None = None,
        code: int | None = None,
        key: str | None = None,
        msg_class: str | None = None,
        msg_type: str | None = None,
        msg_number: str | None = None,
        msg_v1: str | None = None,
        msg_v2: str | None = None,
        msg_v3: str | None = None,
        msg_v4: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.key = key
        self.msg_class = msg_class
        self.msg_type = msg_type
        self.msg_number = msg_number
        self.msg_v1 = msg_v1
        self.msg_v2 = msg_v2
        self.msg_v3 = msg_v3
        self.msg_v4 = msg_v4

    def __str__(self) -> str:
        return (
            f"{self.code2txt.get(self.code, '???') if self.code is not None else '???'}"
            f" (rc={self.code}): key={self.key}, message={self.message}"
            f" [MSG: class={self.msg_class}, type={self.msg_type}, number={self.msg_number},"
            f" v1-4:={self.msg_v1};{self.msg_v2};{self.msg_v3};{self.msg_v4}]"
        )


_Error = TypeVar("_Error", bound=RFCLibError)


def library_error(cls: type[_Error], message: str, code: int, key: str) -> _Error:
    """An error the RFC library raises itself: its ABAP message fields are all empty."""
    return cls(message, code, key, "", "", "", "", "", "", "")


class ABAPApplicationError(RFCLibError):
    """RFC_ERROR_GROUP ABAP_APPLICATION_FAILURE: an ABAP exception or message."""


class ABAPRuntimeError(RFCLibError):
    """RFC_ERROR_GROUP ABAP_RUNTIME_FAILURE: a short dump in the ABAP system."""


class LogonError(RFCLibError):
    """RFC_ERROR_GROUP LOGON_FAILURE; code and key default as in pyrfc."""

    def __init__(
        self,
        message: str | None = None,
        code: int | None = 2,
        key: str | None = "RFC_LOGON_FAILURE",
        msg_class: str | None = None,
        msg_type: str | None = None,
        msg_number: str | None = None,
        msg_v1: str | None = None,
        msg_v2: str | None = None,
        msg_v3: str | None = None,
        msg_v4: str | None = None,
    ) -> None:
        super().__init__(
            message, code, key, msg_class, msg_type, msg_number, msg_v1, msg_v2, msg_v3, msg_v4
        )


class CommunicationError(RFCLibError):
    """RFC_ERROR_GROUP COMMUNICATION_FAILURE."""


class ExternalRuntimeError(RFCLibError):
    """RFC_ERROR_GROUP EXTERNAL_RUNTIME_FAILURE: e.g. an unknown parameter, a conversion failure."""


class ExternalApplicationError(RFCLibError):
    """RFC_ERROR_GROUP EXTERNAL_APPLICATION_FAILURE."""


class ExternalAuthorizationError(RFCLibError):
    """RFC_ERROR_GROUP EXTERNAL_AUTHORIZATION_FAILURE."""


class RFCTypeError(RFCLibError):
    """RFC_ERROR_GROUP RFC_TYPE_ERROR."""


_LIB_CLASSES: dict[str, type[RFCLibError]] = {
    cls.__name__: cls
    for cls in (
        RFCLibError,
        ABAPApplicationError,
        ABAPRuntimeError,
        LogonError,
        CommunicationError,
        ExternalRuntimeError,
        ExternalApplicationError,
        ExternalAuthorizationError,
        RFCTypeError,
    )
}
_FIELDS = (
    "message",
    "code",
    "key",
    "msg_class",
    "msg_type",
    "msg_number",
    "msg_v1",
    "msg_v2",
    "msg_v3",
    "msg_v4",
)


# The classic errors, with the class, code, key and message texts a real system reports.


def function_not_found(name: str) -> ABAPApplicationError:
    """A call of a function module the system does not have (message FL 046)."""
    return ABAPApplicationError(
        f"ID:FL Type:E Number:046 {name}", 5, "FU_NOT_FOUND", "FL", "E", "046", name, "", "", ""
    )


def communication_failure(message: str) -> CommunicationError:
    """The partner cannot be reached or the connection broke."""
    return library_error(
        CommunicationError, message, RfcRc.RFC_COMMUNICATION_FAILURE, "RFC_COMMUNICATION_FAILURE"
    )


def invalid_parameter(name: str) -> ExternalRuntimeError:
    """A parameter name the function module does not declare."""
    return ExternalRuntimeError(
        f"field '{name}' not found", 20, "RFC_INVALID_PARAMETER", "", "", "", "", "", "", ""
    )


def logon_failure() -> LogonError:
    """Wrong client, user, password or certificate: the system does not say which."""
    return library_error(
        LogonError, "Name or password is incorrect (repeat logon)", 2, "RFC_LOGON_FAILURE"
    )


#: How the connector's refusal to log a cloud user on by principal propagation begins:
#: ``principal propagation (<reason code>): <what to fix>``.
PRINCIPAL_REFUSAL = "principal propagation ("


def principal_refusal(reason: str, message: str) -> LogonError:
    """The connector could not log the cloud user on as themselves (``reason`` is the
    PrincipalError's code, such as ``expired``); the message never holds the token."""
    return library_error(
        LogonError, f"principal propagation ({reason}): {message}", 2, "RFC_LOGON_FAILURE"
    )


def principal_refusal_reason(exc: BaseException) -> str | None:
    """The reason code of a :func:`principal_refusal`, or None for any other exception."""
    message = getattr(exc, "message", None)
    if not isinstance(exc, LogonError) or not isinstance(message, str):
        return None
    if not message.startswith(PRINCIPAL_REFUSAL):
        return None
    reason, closing, _ = message[len(PRINCIPAL_REFUSAL) :].partition("):")
    return reason if closing else None


def abap_exception(key: str, message: str | None = None) -> ABAPApplicationError:
    """A classic ABAP exception (RAISE key) of a function module."""
    return ABAPApplicationError(message or key, 5, key, "", "", "", "", "", "", "")


def conversion_failure(message: str) -> ExternalRuntimeError:
    """A value the library cannot convert to the field's ABAP type."""
    return ExternalRuntimeError(message, 22, "RFC_CONVERSION_FAILURE", "", "", "", "", "", "", "")


def buffer_too_small(message: str) -> ExternalRuntimeError:
    """A value longer than its fixed-length field."""
    return ExternalRuntimeError(message, 23, "RFC_BUFFER_TOO_SMALL", "", "", "", "", "", "", "")


def rfc_type_error(message: str, value: Any, name: str, *context: str) -> TypeError:
    """pyrfc's fill-time TypeError: args are (text, value, "of type", type, field[, parameter])."""
    return TypeError(message, value, "of type", type(value), name, *context)


# Crossing the tunnel.

_BUILTIN_TYPES = {t.__name__: t for t in (str, int, float, bytes, list, dict, type(None), bool)}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, type):
        return {"type": value.__name__}
    return {"repr": repr(value)}


def _unjsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if "type" in value:
            return _BUILTIN_TYPES.get(value["type"], object)
        return value.get("repr")
    return value


def to_wire(exc: BaseException) -> dict[str, Any]:
    """A JSON-safe dict naming the exception's class and carrying every pyrfc field.

    Exceptions of the real pyrfc are recognised by class name (its classes have the same
    names and fields), so a connector using SAP's pyrfc sends the same form as the stub.
    """
    names = [cls.__name__ for cls in type(exc).__mro__]
    lib_class = next((name for name in names if name in _LIB_CLASSES), None)
    if lib_class is not None and hasattr(exc, "code"):
        fields = {f: getattr(exc, f, None) for f in _FIELDS}
        return {"class": lib_class, **{k: _jsonable(v) for k, v in fields.items()}}
    if "RFCError" in names:
        return {"class": "RFCError", "args": [_jsonable(a) for a in exc.args]}
    if isinstance(exc, TypeError):
        return {"class": "TypeError", "args": [_jsonable(a) for a in exc.args]}
    return {"class": "RFCError", "args": [f"{type(exc).__name__}: {exc}"]}


def from_wire(data: dict[str, Any]) -> Exception:
    """The exception ``to_wire`` encoded; unknown classes become a plain RFCError."""
    name = data.get("class")
    if isinstance(name, str) and name in _LIB_CLASSES:
        return _LIB_CLASSES[name](**{f: data.get(f) for f in _FIELDS})
    args = [_unjsonable(a) for a in data.get("args", [])]
    if name == "TypeError":
        return builtins.TypeError(*args)
    return RFCError(*args)
