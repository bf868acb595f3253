"""ABAP elementary types: pyrfc's input checks, canonical values, Python output and wire form.

Canonical values are what the simulated system stores: CHAR/STRING/NUMC/DATE/TIME as ``str``
in ABAP's own format ("YYYYMMDD", "HHMMSS"), INT* as ``int``, FLOAT as ``float``, BCD/DECF* as
``Decimal``, BYTE/XSTRING as ``bytes``.  Type mismatches raise pyrfc's ``TypeError`` (args:
text, value, "of type", type, field[, parameter]); values that do not fit raise the SDK's
``ExternalRuntimeError``.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ._errors import buffer_too_small, rfc_type_error

CHAR = "RFCTYPE_CHAR"
NUM = "RFCTYPE_NUM"
DATE = "RFCTYPE_DATE"
TIME = "RFCTYPE_TIME"
BCD = "RFCTYPE_BCD"
FLOAT = "RFCTYPE_FLOAT"
DECF16 = "RFCTYPE_DECF16"
DECF34 = "RFCTYPE_DECF34"
INT1 = "RFCTYPE_INT1"
INT2 = "RFCTYPE_INT2"
INT = "RFCTYPE_INT"
INT8 = "RFCTYPE_INT8"
BYTE = "RFCTYPE_BYTE"
XSTRING = "RFCTYPE_XSTRING"
STRING = "RFCTYPE_STRING"
STRUCTURE = "RFCTYPE_STRUCTURE"
TABLE = "RFCTYPE_TABLE"

ELEMENTARY_TYPES = frozenset(
    {
        CHAR,
        NUM,
        DATE,
        TIME,
        BCD,
        FLOAT,
        DECF16,
        DECF34,
        INT1,
        INT2,
        INT,
        INT8,
        BYTE,
        XSTRING,
        STRING,
    }
)
FIELD_TYPES = ELEMENTARY_TYPES | {STRUCTURE, TABLE}
INT_RANGES = {
    INT1: (0, 255),
    INT2: (-(2**15), 2**15 - 1),
    INT: (-(2**31), 2**31 - 1),
    INT8: (-(2**63), 2**63 - 1),
}
_DECIMAL_TYPES = {BCD, DECF16, DECF34}


def _date_or_none(text: str) -> datetime.date | None:
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _time_or_none(text: str) -> datetime.time | None:
    if len(text) != 6 or not text.isdigit():
        return None
    try:
        return datetime.time(int(text[:2]), int(text[2:4]), int(text[4:]))
    except ValueError:
        return None


def initial_value(field_type: str, length: int) -> Any:
    """The ABAP initial value of an elementary type (what an unset field holds)."""
    if field_type in (CHAR, STRING):
        return ""
    if field_type == NUM:
        return "0" * length
    if field_type == DATE:
        return "00000000"
    if field_type == TIME:
        return "000000"
    if field_type in INT_RANGES:
        return 0
    if field_type == FLOAT:
        return 0.0
    if field_type in _DECIMAL_TYPES:
        return Decimal("0")
    if field_type == BYTE:
        return bytes(length)
    if field_type == XSTRING:
        return b""
    raise ValueError(f"no initial value for {field_type}")


def bcd_digits(nuc_length: int) -> int:
    """Packed numbers hold two digits a byte, less a half byte for the sign."""
    return 2 * nuc_length - 1


@dataclass(frozen=True, slots=True)
class Checks:
    """Which values are checked beyond their type and length: pyrfc's ``check_date`` and
    ``check_time`` options (a real calendar date, a real time of day)."""

    date: bool = True
    time: bool = True


#: pyrfc's defaults.
STRICT = Checks()
#: What an ABAP system itself does with incoming DATS/TIMS values: takes any characters.
LENIENT = Checks(date=False, time=False)


def fill_value(
    field_type: str,
    value: Any,
    *,
    length: int,
    decimals: int,
    name: str,
    context: tuple[str, ...] = (),
    checks: Checks = STRICT,
) -> Any:
    """Check ``value`` as pyrfc does before sending it and return its canonical form."""
    if field_type in (CHAR, STRING):
        if not isinstance(value, str):
            raise rfc_type_error("an string is required, received", value, name, *context)
        if field_type == CHAR and len(value) > length:
            raise buffer_too_small(
                f"value of length {len(value)} does not fit field {name} CHAR({length})"
            )
        return value
    if field_type == NUM:
        if not isinstance(value, str) or not value.isdigit() or not value.isascii():
            raise rfc_type_error("a numeric string is required, received", value, name, *context)
        if len(value) > length:
            raise buffer_too_small(
                f"value of length {len(value)} does not fit field {name} NUMC({length})"
            )
        return value.zfill(length)
    if field_type == DATE:
        if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
            return value.strftime("%Y%m%d").zfill(8)
        if isinstance(value, str) and (
            value in ("", "00000000")
            or value == " " * 8
            or _date_or_none(value) is not None
            or (not checks.date and len(value) <= 8)
        ):
            return value
        raise rfc_type_error("date value required, received", value, name, *context)
    if field_type == TIME:
        if isinstance(value, datetime.time):
            return value.strftime("%H%M%S")
        if isinstance(value, str) and (
            value == ""
            or value == " " * 6
            or _time_or_none(value) is not None
            or (not checks.time and len(value) <= 6)
        ):
            return "000000" if value == "" else value
        raise rfc_type_error("time value required, received", value, name, *context)
    if field_type in INT_RANGES:
        if not isinstance(value, int) or isinstance(value, bool):
            raise rfc_type_error("an integer required, received", value, name, *context)
        low, high = INT_RANGES[field_type]
        if not low <= value <= high:
            raise buffer_too_small(f"value {value} out of range {low}..{high} for field {name}")
        return value
    if field_type == FLOAT or field_type in _DECIMAL_TYPES:
        return _fill_number(
            field_type, value, length=length, decimals=decimals, name=name, context=context
        )
    if field_type in (BYTE, XSTRING):
        if not isinstance(value, (bytes, bytearray)):
            raise rfc_type_error("bytes or bytearray required, received", value, name, *context)
        if field_type == BYTE:
            if len(value) > length:
                raise buffer_too_small(f"{len(value)} bytes do not fit field {name} RAW({length})")
            return bytes(value).ljust(length, b"\x00")
        return bytes(value)
    raise ValueError(f"{field_type} is not an elementary type")


def _fill_number(
    field_type: str, value: Any, *, length: int, decimals: int, name: str, context: tuple[str, ...]
) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise rfc_type_error("a decimal value required, received", value, name, *context)
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise rfc_type_error("a decimal value required, received", value, name, *context) from None
    if not number.is_finite() and field_type != FLOAT:
        raise rfc_type_error("a decimal value required, received", value, name, *context)
    if field_type == FLOAT:
        return float(number)
    if field_type == BCD:
        quantum = Decimal(1).scaleb(-decimals)
        rounded = number.quantize(quantum)
        if len(rounded.as_tuple().digits) > bcd_digits(length) and rounded != 0:
            raise buffer_too_small(
                f"value {value} does not fit field {name} P({length}) DECIMALS {decimals}"
            )
        return rounded
    digits = 16 if field_type == DECF16 else 34
    if len(number.as_tuple().digits) > digits:
        raise buffer_too_small(f"value {value} has more than {digits} digits for field {name}")
    return number


def to_python(field_type: str, value: Any, *, dtime: bool = False, rstrip: bool = True) -> Any:
    """The value as pyrfc hands it to the caller (``dtime`` and ``rstrip`` are pyrfc's options)."""
    if field_type == CHAR and rstrip:
        return str(value).rstrip()
    if field_type == DATE and dtime:
        return _date_or_none(str(value))
    if field_type == TIME and dtime:
        return _time_or_none(str(value))
    return value


def encode_scalar(field_type: str, value: Any) -> Any:
    """JSON-safe form of a canonical value: Decimal as str, bytes as base64, floats by repr."""
    if field_type in _DECIMAL_TYPES:
        return str(value)
    if field_type in (BYTE, XSTRING):
        return base64.b64encode(value).decode("ascii")
    if field_type == FLOAT:
        return repr(float(value))
    return value


def decode_scalar(field_type: str, data: Any) -> Any:
    """Inverse of ``encode_scalar``."""
    if field_type in _DECIMAL_TYPES:
        return Decimal(data)
    if field_type in (BYTE, XSTRING):
        return base64.b64decode(data, validate=True)
    if field_type == FLOAT:
        return float(data)
    return data
