"""One RFC call, sans-IO: parameters checked and filled by the function description, the ``call``
request of the stub protocol, and pyrfc's result dict read back from the answer; and the JSON
form of parameters and results.

Shared by every caller of a function module, so that all of them check, send and return values
the same way as ``pyrfc.Connection.call``: ``not_requested`` names are checked first, then each
parameter in the order given (an unknown name is ExternalRuntimeError RFC_INVALID_PARAMETER, a
value of the wrong type pyrfc's TypeError, a value too long RFC_BUFFER_TOO_SMALL), all before
anything is sent.

The JSON form is for callers that speak JSON rather than Python: numbers parsed as Decimal (no
digit lost), BYTE / XSTRING as base64, decimals as strings; the whole mapping is documented with
its user, :mod:`backchannel_rfc._json_endpoint`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Any, NoReturn

from . import _abap_types as t
from ._descriptions import (
    FunctionDescription,
    TypeDescription,
    decode_params,
    encode_params,
    fill,
    initial,
    wrap,
)
from ._errors import invalid_parameter, rfc_type_error


def not_requested(fd: FunctionDescription, options: Mapping[str, Any]) -> frozenset[str]:
    """The parameters ``options["not_requested"]`` deactivates (a name or a list of names);
    each must be a parameter of ``fd``."""
    names = options.get("not_requested", [])
    names = names if isinstance(names, list) else [names]
    for name in names:
        if fd.parameter(name) is None:
            raise invalid_parameter(name)
    return frozenset(names)


def prepare_call(
    fd: FunctionDescription,
    params: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
    *,
    checks: t.Checks = t.STRICT,
) -> tuple[dict[str, Any], frozenset[str]]:
    """Check and fill ``params`` (pyrfc's Python values) by ``fd`` (``checks``: pyrfc's
    ``check_date`` and ``check_time``).

    Returns the ``params`` of the call request (wire form, without the inactive parameters,
    which are checked all the same) and the set of inactive parameters for
    :func:`read_result`.
    """
    skip = not_requested(fd, options or {})
    canonical: dict[str, Any] = {}
    for name, value in params.items():
        p = fd.parameter(name)
        if p is None:
            raise invalid_parameter(name)
        canonical[name] = fill(
            p["parameter_type"],
            value,
            length=p["nuc_length"],
            decimals=p["decimals"],
            td=p["type_description"],
            name=name,
            checks=checks,
        )
    sent = {name: value for name, value in canonical.items() if name not in skip}
    return encode_params(fd, sent), skip


def call_request(
    fd: FunctionDescription,
    wire_params: dict[str, Any],
    skip: Collection[str] = (),
    *,
    return_import_params: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """The stub protocol's ``call`` request; ``timeout`` (seconds) is the connector's limit
    for the backend call."""
    message: dict[str, Any] = {
        "op": "call",
        "name": fd.name,
        "params": wire_params,
        "return_import_params": return_import_params,
    }
    if skip:
        message["not_requested"] = sorted(skip)
    if timeout is not None:
        message["timeout"] = float(timeout)
    return message


def read_result(
    fd: FunctionDescription,
    wire_result: dict[str, Any],
    skip: Collection[str] = (),
    *,
    dtime: bool = False,
    rstrip: bool = True,
) -> dict[str, Any]:
    """pyrfc's result dict from the answer's ``result``: the parameters in description order,
    inactive ones initial, values as pyrfc returns them (``dtime`` and ``rstrip`` are its
    options)."""
    result = decode_params(fd, wire_result)
    out: dict[str, Any] = {}
    for p in fd.parameters:
        name = p["name"]
        if name not in result:
            continue
        value = result[name]
        if name in skip:
            # An inactive parameter is neither sent nor received: its value stays initial.
            value = initial(p["parameter_type"], p["nuc_length"], p["type_description"])
        out[name] = wrap(
            p["parameter_type"], value, p["type_description"], dtime=dtime, rstrip=rstrip
        )
    return out


# ---------------------------------------------------------------------------- the JSON form


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A name given twice would otherwise silently take its last value.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:64]!r}")
        result[key] = value
    return result


def _check_text(value: Any) -> None:
    """Refuse lone surrogates (``"\\ud800"``): JSON allows them, UTF-8 cannot carry them."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            key.encode("utf-8")
            _check_text(item)
    elif isinstance(value, list):
        for item in value:
            _check_text(item)


def parse_json(data: bytes) -> Any:
    """UTF-8 JSON with numbers as Decimal or int; ValueError for anything else (invalid
    UTF-8, NaN / Infinity, a key given twice, a lone surrogate, nesting too deep)."""
    try:
        document = json.loads(
            data.decode("utf-8"),
            parse_float=Decimal,
            parse_constant=_no_constant,
            object_pairs_hook=_unique_keys,
        )
        _check_text(document)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None
    return document


def params_from_json(fd: FunctionDescription, data: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as pyrfc takes them: the base64 strings of BYTE / XSTRING fields decoded,
    everything else as it is (filling by the description reports what does not fit, unknown
    names too)."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        p = fd.parameter(name)
        out[name] = (
            value
            if p is None
            else _value_from_json(p["parameter_type"], value, p["type_description"], name, ())
        )
    return out


def _value_from_json(
    field_type: str, value: Any, td: TypeDescription | None, name: str, context: tuple[str, ...]
) -> Any:
    if td is not None and field_type == t.STRUCTURE and isinstance(value, dict):
        return _structure_from_json(td, value, name)
    if td is not None and field_type == t.TABLE and isinstance(value, list):
        return [
            _structure_from_json(td, row, name) if isinstance(row, dict) else row for row in value
        ]
    if field_type in (t.BYTE, t.XSTRING):
        if isinstance(value, str):
            with contextlib.suppress(binascii.Error, ValueError):
                return base64.b64decode(value, validate=True)
        raise rfc_type_error("a base64 string required, received", value, name, *context)
    return value


def _structure_from_json(td: TypeDescription, value: dict[str, Any], param: str) -> dict[str, Any]:
    fields = {f["name"]: f for f in td.fields}
    out: dict[str, Any] = {}
    for key, item in value.items():
        f = fields.get(key)
        out[key] = (
            item
            if f is None
            else _value_from_json(f["field_type"], item, f["type_description"], key, (param,))
        )
    return out


def _decimal_text(value: Decimal) -> str:
    # Plain notation ("0.0000001000", not "1.000E-7") unless the exponent is extreme (DECF34).
    if value.is_finite() and abs(value.adjusted()) <= 64:
        return format(value, "f")
    return str(value)


def result_to_json(value: Any) -> Any:
    """A result (or any value) of pyrfc's Python values in JSON form."""
    if isinstance(value, dict):
        return {key: result_to_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [result_to_json(item) for item in value]
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value
