"""Function rules: which function modules of a backend the cloud may call (SAP Cloud Connector's
"accessible resources" of an RFC system mapping).

A rule names a function module either ``exact`` or by ``prefix`` (``BAPI_USER_`` covers every
name starting with it). Names compare upper-cased, as ABAP stores them and pyrfc sends them. A
name that is not a function module name (letters, digits, ``_`` and ``/NAMESPACE/`` parts, at
most 30 characters) is refused before any rule is consulted, so a rule cannot be sidestepped by
spelling. No matching active rule: denied.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from backchannel import TableReader

FUNCTION_NAME = re.compile(r"(?:/[A-Z0-9_]+/)?[A-Z0-9_]+")
_PREFIX = re.compile(r"(?:/[A-Z0-9_]*(?:/[A-Z0-9_]*)?|[A-Z0-9_]+)")
MAX_NAME_LENGTH = 30
MATCHES = ("exact", "prefix")


@dataclass(frozen=True, slots=True)
class FunctionRule:
    """One ``[[...mappings.functions]]`` entry."""

    name: str
    match: Literal["exact", "prefix"] = "exact"
    active: bool = True

    def covers(self, function: str) -> bool:
        """Whether this rule (if active) allows ``function`` (already upper-cased)."""
        if self.match == "exact":
            return function == self.name
        return function.startswith(self.name)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a function check: allowed, or the reason it is not."""

    allowed: bool
    reason: str = ""


def canonical_name(function: str) -> str | None:
    """The upper-cased name if it is a valid function module name, else None.

    Only ASCII is upper-cased: ``str.upper`` maps some other letters onto ASCII ones (U+017F
    long s to ``S``, U+0131 dotless i to ``I``, the ligature U+FB05 to ``ST``), so a name
    spelled with them would be checked, audited and called as a different, allowed name.
    """
    if not function.isascii():
        return None
    name = function.upper()
    if len(name) > MAX_NAME_LENGTH or not FUNCTION_NAME.fullmatch(name):
        return None
    return name


def shown_name(function: str) -> str:
    """``function`` for messages and audit lines: the canonical name if it is one, else quoted
    (control characters escaped) and cut short, since the caller may send any length."""
    name = canonical_name(function)
    if name is not None:
        return name
    cut = function[: MAX_NAME_LENGTH + 1]
    return repr(cut) + ("..." if len(function) > len(cut) else "")


def _prefix_name(text: str) -> str | None:
    if not text.isascii():
        return None
    name = text.upper()
    if not 0 < len(name) <= MAX_NAME_LENGTH or not _PREFIX.fullmatch(name):
        return None
    return name


def check_function(rules: Sequence[FunctionRule], function: str) -> Decision:
    """Allow ``function`` if an active rule covers it."""
    name = canonical_name(function)
    if name is None:
        return Decision(False, f"{shown_name(function)} is not a valid function module name")
    for rule in rules:
        if rule.active and rule.covers(name):
            return Decision(True)
    return Decision(False, f"no active function rule covers {name}")


def read_function_rules(mapping: TableReader) -> tuple[FunctionRule, ...]:
    """Read ``[[...mappings.functions]]`` of one RFC mapping."""
    rules: list[FunctionRule] = []
    for entry in mapping.tables("functions"):
        match = entry.string("match", "exact")
        if match not in MATCHES:
            raise entry.error("match", f"must be one of {', '.join(MATCHES)}")
        text = entry.string("name", required=True)
        name = canonical_name(text) if match == "exact" else _prefix_name(text)
        if name is None:
            raise entry.error(
                "name",
                f"{text!r} is not a function module name{' prefix' if match == 'prefix' else ''} "
                "(letters, digits, '_' and an optional /NAMESPACE/ part, up to "
                f"{MAX_NAME_LENGTH} characters)",
            )
        active = entry.boolean("active", True)
        entry.finish()
        rules.append(FunctionRule(name, "prefix" if match == "prefix" else "exact", active))
    return tuple(rules)
