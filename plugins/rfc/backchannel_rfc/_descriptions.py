"""pyrfc's ``TypeDescription`` / ``FunctionDescription``, and filling, wrapping and wire-coding
whole parameters (structures as dicts of fields, tables as lists of dicts) by description."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

from . import _abap_types as t
from ._errors import invalid_parameter

DIRECTIONS = frozenset({"RFC_IMPORT", "RFC_EXPORT", "RFC_CHANGING", "RFC_TABLES"})


class FieldDict(TypedDict):
    name: str
    field_type: str
    nuc_length: int
    nuc_offset: int
    uc_length: int
    uc_offset: int
    decimals: int
    type_description: TypeDescription | None


class ParameterDict(TypedDict):
    name: str
    parameter_type: str
    direction: str
    nuc_length: int
    uc_length: int
    decimals: int
    default_value: str
    parameter_text: str
    optional: bool
    type_description: TypeDescription | None


class TypeDescription:
    """A structure or table line type, as pyrfc's class of the same name."""

    def __init__(self, name: str, nuc_length: int, uc_length: int) -> None:
        self.fields: list[FieldDict] = []
        if len(name) < 1 or len(name) > 30:
            raise TypeError(f"field 'name' (string) '{name}' should be from 1-30 chars.")
        for int_field in (nuc_length, uc_length):
            if not isinstance(int_field, int):
                raise TypeError(f"field '{name}' length '{int_field}' must be of type integer")
        self.name = name
        self.nuc_length = nuc_length
        self.uc_length = uc_length

    def add_field(
        self,
        name: str,
        field_type: str,
        nuc_length: int,
        uc_length: int,
        nuc_offset: int,
        uc_offset: int,
        decimals: int = 0,
        type_description: TypeDescription | None = None,
    ) -> None:
        if len(name) < 1:
            return
        if len(name) > 30:
            raise TypeError(f"field 'name' (string) '{name}' should be from 1-30 chars.")
        if field_type not in t.FIELD_TYPES:
            raise TypeError(
                f"'field_type' (string) '{field_type}' must be in {sorted(t.FIELD_TYPES)}"
            )
        for int_field in (nuc_length, nuc_offset, uc_length, uc_offset):
            if not isinstance(int_field, int):
                raise TypeError(f"field '{name}' length '{int_field}' must be of type integer")
        self.fields.append(
            FieldDict(
                name=name,
                field_type=field_type,
                nuc_length=nuc_length,
                nuc_offset=nuc_offset,
                uc_length=uc_length,
                uc_offset=uc_offset,
                decimals=decimals,
                type_description=type_description,
            )
        )
        return

    def __repr__(self) -> str:
        return (
            f"<TypeDescription '{self.name}' with {len(self.fields)} "
            f"fields (n/uclength={self.nuc_length}/{self.uc_length})>"
        )


class FunctionDescription:
    """A function module's interface, as pyrfc's class of the same name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parameters: list[ParameterDict] = []

    def add_parameter(
        self,
        name: str,
        parameter_type: str,
        direction: str,
        nuc_length: int,
        uc_length: int,
        decimals: int = 0,
        default_value: str = "",
        parameter_text: str = "",
        optional: bool = False,
        type_description: TypeDescription | None = None,
    ) -> None:
        if len(name) < 1 or len(name) > 30:
            raise TypeError(f"field 'name' (string) {name} should be from 1-30 chars.")
        if parameter_type not in t.FIELD_TYPES:
            raise TypeError(
                f"'parameter_type' (string) '{parameter_type}' must be in {sorted(t.FIELD_TYPES)}"
            )
        if direction not in DIRECTIONS:
            raise TypeError(f"'direction' (string) '{direction}' must be in '{sorted(DIRECTIONS)}'")
        if len(default_value) > 30:
            raise TypeError(f"'default_value' (string) '{default_value}' must not exceed 30 chars.")
        if len(parameter_text) > 79:
            raise TypeError(
                f"'parameter_text' (string) '{parameter_text}' must not exceed 79 chars."
            )
        self.parameters.append(
            ParameterDict(
                name=name,
                parameter_type=parameter_type,
                direction=direction,
                nuc_length=nuc_length,
                uc_length=uc_length,
                decimals=decimals,
                default_value=default_value,
                parameter_text=parameter_text,
                optional=optional,
                type_description=type_description,
            )
        )

    def parameter(self, name: str) -> ParameterDict | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.parameters if p["name"] == name), None)

    def __repr__(self) -> str:
        return f"<FunctionDescription '{self.name}' with {len(self.parameters)} params>"


def _uc_length(field_type: str, nuc_length: int) -> int:
    # Unicode systems store characters as UTF-16 code units: two bytes each.
    return 2 * nuc_length if field_type in (t.CHAR, t.NUM, t.DATE, t.TIME) else nuc_length


def structure(
    name: str,
    fields: Sequence[
        tuple[str, str, int] | tuple[str, str, int, int] | tuple[str, str, TypeDescription]
    ],
) -> TypeDescription:
    """A TypeDescription from ``(name, type, length[, decimals])`` or ``(name, type, line type)``,
    with offsets laid out back to back."""
    laid_out: list[tuple[str, str, int, int, TypeDescription | None]] = []
    for spec in fields:
        if isinstance(spec[2], TypeDescription):
            line = spec[2]
            laid_out.append((spec[0], spec[1], line.nuc_length, 0, line))
        else:
            decimals = spec[3] if len(spec) == 4 else 0
            laid_out.append((spec[0], spec[1], spec[2], int(decimals), None))
    nuc_total = sum(length for _, _, length, _, _ in laid_out)
    uc_total = sum(_uc_length(ft, length) for _, ft, length, _, _ in laid_out)
    desc = TypeDescription(name, nuc_total, uc_total)
    nuc_offset = uc_offset = 0
    for fname, ftype, length, decimals, td in laid_out:
        uc = _uc_length(ftype, length)
        desc.add_field(fname, ftype, length, uc, nuc_offset, uc_offset, decimals, td)
        nuc_offset += length
        uc_offset += uc
    return desc


def _require_td(td: TypeDescription | None, name: str) -> TypeDescription:
    if td is None:
        raise ValueError(f"{name} has no type description")
    return td


def fill(
    field_type: str,
    value: Any,
    *,
    length: int,
    decimals: int,
    td: TypeDescription | None,
    name: str,
    context: tuple[str, ...] = (),
    checks: t.Checks = t.STRICT,
) -> Any:
    """Check a parameter or field value as pyrfc does and return its canonical form."""
    if field_type == t.STRUCTURE:
        if not isinstance(value, dict):
            raise TypeError(
                "dictionary required for structure parameter, received", str(type(value)), name
            )
        return fill_structure(_require_td(td, name), value, name, checks=checks)
    if field_type == t.TABLE:
        if not isinstance(value, list):
            raise TypeError("list required for table parameter, received", str(type(value)), name)
        return [fill_structure(_require_td(td, name), row, name, checks=checks) for row in value]
    return t.fill_value(
        field_type,
        value,
        length=length,
        decimals=decimals,
        name=name,
        context=context,
        checks=checks,
    )


def fill_structure(
    td: TypeDescription, value: Any, param: str, *, checks: t.Checks = t.STRICT
) -> dict[str, Any]:
    """A complete canonical structure: given fields checked, missing fields initial."""
    if not isinstance(value, dict):
        raise TypeError(
            "dictionary required for structure parameter, received", str(type(value)), param
        )
    known = {f["name"] for f in td.fields}
    for key in value:
        if key not in known:
            raise invalid_parameter(str(key))
    row: dict[str, Any] = {}
    for f in td.fields:
        if f["name"] in value:
            row[f["name"]] = fill(
                f["field_type"],
                value[f["name"]],
                length=f["nuc_length"],
                decimals=f["decimals"],
                td=f["type_description"],
                name=f["name"],
                context=(param,),
                checks=checks,
            )
        else:
            row[f["name"]] = initial(f["field_type"], f["nuc_length"], f["type_description"])
    return row


def initial(field_type: str, length: int, td: TypeDescription | None) -> Any:
    """The initial value of any field or parameter type."""
    if field_type == t.STRUCTURE:
        return {
            f["name"]: initial(f["field_type"], f["nuc_length"], f["type_description"])
            for f in _require_td(td, "structure").fields
        }
    if field_type == t.TABLE:
        return []
    return t.initial_value(field_type, length)


def wrap(
    field_type: str,
    value: Any,
    td: TypeDescription | None,
    *,
    dtime: bool = False,
    rstrip: bool = True,
) -> Any:
    """A canonical value as pyrfc returns it to Python."""
    if field_type == t.STRUCTURE:
        return {
            f["name"]: wrap(
                f["field_type"], value[f["name"]], f["type_description"], dtime=dtime, rstrip=rstrip
            )
            for f in _require_td(td, "structure").fields
        }
    if field_type == t.TABLE:
        return [wrap(t.STRUCTURE, row, td, dtime=dtime, rstrip=rstrip) for row in value]
    return t.to_python(field_type, value, dtime=dtime, rstrip=rstrip)


def encode(field_type: str, value: Any, td: TypeDescription | None) -> Any:
    """JSON-safe form of a canonical value of any type."""
    if field_type == t.STRUCTURE:
        fields = _require_td(td, "structure").fields
        return {
            f["name"]: encode(f["field_type"], value[f["name"]], f["type_description"])
            for f in fields
            if f["name"] in value
        }
    if field_type == t.TABLE:
        return [encode(t.STRUCTURE, row, td) for row in value]
    return t.encode_scalar(field_type, value)


def decode(field_type: str, data: Any, td: TypeDescription | None) -> Any:
    """Inverse of ``encode``."""
    if field_type == t.STRUCTURE:
        fields = _require_td(td, "structure").fields
        return {
            f["name"]: decode(f["field_type"], data[f["name"]], f["type_description"])
            for f in fields
            if f["name"] in data
        }
    if field_type == t.TABLE:
        return [decode(t.STRUCTURE, row, td) for row in data]
    return t.decode_scalar(field_type, data)


def encode_params(fd: FunctionDescription, params: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe form of canonical call parameters (only names the description declares)."""
    out: dict[str, Any] = {}
    for p in fd.parameters:
        if p["name"] in params:
            out[p["name"]] = encode(p["parameter_type"], params[p["name"]], p["type_description"])
    return out


def decode_params(fd: FunctionDescription, data: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``encode_params``."""
    out: dict[str, Any] = {}
    for p in fd.parameters:
        if p["name"] in data:
            out[p["name"]] = decode(p["parameter_type"], data[p["name"]], p["type_description"])
    return out
