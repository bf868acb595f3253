"""Subject pattern rules: from a validated token's claims to the X.509 subject of the user's
short-lived certificate, the way SAP Cloud Connector's principal propagation names it.

An ordered list of :class:`SubjectRule`; each has an optional :class:`Condition` and a pattern
in RFC 4514 text with ``${...}`` placeholders, such as ``CN=${name},O=Example,C=DE``. The first
rule whose condition holds and whose placeholders all resolve names the subject; when none
does, :class:`~backchannel._principal_errors.PrincipalError` ``NO_SUBJECT`` lists the rules
tried and why each one did not apply.

What SAP Cloud Connector does (SCC), and where this module follows it
--------------------------------------------------------------------

Sources: SAP Help, "Configure Subject Patterns for Principal Propagation" (loio 58803a2,
github.com/SAP-docs/btp-connectivity, docs/1-connectivity-documentation/
configure-subject-patterns-for-principal-propagation-58803a2.md and its newer copy
configure-subject-patterns-58803a2.md) and "Set Up Trust" (set-up-trust-a4ee70f.md), read
in 2026-11.

- The rules are "an ordered list containing entries that have a specified condition, and the
  respective subject pattern"; SCC's last entry has no condition and always matches as a
  fallback. Here the list is the caller's; a rule without a condition is such a fallback.
- Variables offered for conditions: ``${user_type}``, ``${name}``, ``${mail}``, ``${email}``,
  ``${user_uuid}``, ``${display_name}``, ``${login_name}``; for patterns ``${name}``,
  ``${mail}``, ``${display_name}``, ``${login_name}``, and any other attribute name may be
  typed in (``${email}``, ``${user_uuid}``...).
- ``${name}`` "is a virtual variable of the token, it represents the principal name. When JWTs
  are used ... the value is determined depending [on] the user type ... the first one
  available will define the content": for a **Business** user the claims ``user_name``,
  ``email``, ``mail``, ``user_uuid``, ``sub``; for a **Technical** user ``client_id``, ``cid``,
  ``sub``, ``azp``. Implemented exactly so; "available" is taken as "present": the first claim
  present decides, and if its value is unusable ``${name}`` does not resolve rather than
  silently naming the user by another attribute.
- Operators: SCC has *exists*, *does not exist*, *is* (present and equal) and *is not* (present
  and not equal). Here: ``exists``, ``not_exists``, ``equals``, ``not_equals``, plus
  ``matches`` (a regular expression that must match the whole value, ``re.fullmatch``).
- ``${user_type}`` is ``Business`` or ``Technical`` (technical user propagation, an OAuth
  client acting as itself). SCC does not document how it tells them apart; here a token is
  Technical when ``grant_type`` is ``client_credentials``, or when it carries no user claim
  (``user_name``, ``user_id``, ``email``, ``mail``, ``user_uuid``) and its ``sub`` is its own
  client id (``client_id``, ``cid`` or ``azp``), as XSUAA and IAS client-credentials tokens
  are. Otherwise Business.
- In the Cloud Foundry environment SCC also reads custom attributes from the token's
  ``xs.user.attributes`` object (copied by XSUAA from a SAML assertion); such an attribute wins
  over a root claim of the same name, which stays reachable as ``${cp.<name>}``. Implemented for
  every variable that is not one of the virtual ones above (those read root claims only, so an
  IdP attribute cannot replace the principal name).

Not documented by SCC for JWTs, so chosen here: ``${mail}`` is the ``mail`` claim, else
``email``; ``${email}`` the ``email`` claim, else ``mail``; ``${login_name}`` the
``login_name`` claim (SAP Cloud Identity Services), else ``user_name`` (XSUAA's login name);
``${user_uuid}`` and ``${display_name}`` are those claims only. Any other ``${claim}`` is that
claim. A usable value is a non-empty string (or an integer, or a list of exactly one of those)
of at most :data:`MAX_VALUE_LENGTH` characters without control or formatting characters
(bidirectional overrides could make one DN look like another).

Injection: placeholders are replaced *after* the pattern is parsed into attributes, so a value
is only ever the value of the attribute it stands in; ``x,O=Admin`` becomes a common name
containing a comma (``CN=x\\,O=Admin`` in RFC 4514 text), never a second RDN.
:meth:`Subject.rfc4514` is cryptography's escaping of the built :class:`x509.Name`.

Pattern syntax: RFC 4514 (``,`` between RDNs, ``+`` inside a multi-valued RDN, ``\\`` escapes
``,+"\\<>;=#`` and ``$``, or ``\\XX`` hex pairs of UTF-8), tolerating spaces around separators.
Attribute types, in any case: CN, C, L, ST, O, OU, STREET, DC, UID, EMAIL (also E,
emailAddress), SN, GN, SERIALNUMBER, TITLE, or a dotted OID.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from ._principal_errors import PrincipalError, PrincipalReason

BUSINESS: Final = "Business"
TECHNICAL: Final = "Technical"
#: Claims that name the principal (``${name}``), first present wins (SCC's documented order).
NAME_CLAIMS: Final[Mapping[str, tuple[str, ...]]] = {
    BUSINESS: ("user_name", "email", "mail", "user_uuid", "sub"),
    TECHNICAL: ("client_id", "cid", "sub", "azp"),
}
#: The virtual variables and the root claims they read, first present wins.
_VIRTUAL_CLAIMS: Final[Mapping[str, tuple[str, ...]]] = {
    "mail": ("mail", "email"),
    "email": ("email", "mail"),
    "login_name": ("login_name", "user_name"),
    "user_uuid": ("user_uuid",),
    "display_name": ("display_name",),
}
VIRTUAL_VARIABLES: Final = frozenset({"name", "user_type", *_VIRTUAL_CLAIMS})
_USER_CLAIMS: Final = ("user_name", "user_id", "email", "mail", "user_uuid")
_CLIENT_CLAIMS: Final = ("client_id", "cid", "azp")
#: XSUAA's object of custom user attributes, and the prefix that reaches root claims instead.
XS_USER_ATTRIBUTES: Final = "xs.user.attributes"
ROOT_PREFIX: Final = "cp."

MAX_VALUE_LENGTH: Final = 256
MAX_COMMON_NAME_BYTES: Final = 64

_VARIABLE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_DOTTED_OID: Final = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_HEX_PAIR: Final = re.compile(r"[0-9A-Fa-f]{2}")
_ESCAPABLE: Final = frozenset(',+"\\<>;=# $')
#: Zero-width (non-)joiners are part of several scripts' spelling; other format characters
#: (bidirectional overrides, invisible separators) only disguise a name.
_ALLOWED_FORMAT_CHARACTERS: Final = frozenset("\u200c\u200d")

_ATTRIBUTE_TYPES: Final[Mapping[str, ObjectIdentifier]] = {
    "CN": NameOID.COMMON_NAME,
    "C": NameOID.COUNTRY_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "STREET": NameOID.STREET_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
    "EMAIL": NameOID.EMAIL_ADDRESS,
    "E": NameOID.EMAIL_ADDRESS,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
    "SN": NameOID.SURNAME,
    "SURNAME": NameOID.SURNAME,
    "GN": NameOID.GIVEN_NAME,
    "GIVENNAME": NameOID.GIVEN_NAME,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "TITLE": NameOID.TITLE,
}
#: Short names in :attr:`Subject.rfc4514` beyond cryptography's own (CN, O, OU, C, L, ST...).
RFC4514_NAMES: Final[Mapping[ObjectIdentifier, str]] = {
    NameOID.EMAIL_ADDRESS: "EMAIL",
    NameOID.SURNAME: "SN",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SERIAL_NUMBER: "SERIALNUMBER",
    NameOID.TITLE: "TITLE",
}
#: Attributes that X.509 encodes as IA5String (ASCII) or PrintableString.
_IA5_ATTRIBUTES: Final = frozenset({NameOID.EMAIL_ADDRESS, NameOID.DOMAIN_COMPONENT})
_PRINTABLE_ATTRIBUTES: Final = frozenset({NameOID.COUNTRY_NAME, NameOID.SERIAL_NUMBER})
_PRINTABLE: Final = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*")


class _Resolved(NamedTuple):
    value: str | None
    problem: str  # why ``value`` is None, for messages (never the value itself)
    present: bool = True  # the token has the claim, usable or not


def _text_of(value: object, source: str) -> _Resolved:
    if isinstance(value, list):
        if len(value) != 1:
            return _Resolved(None, f"{source} has {len(value)} values, not one")
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return _Resolved(None, f"{source} is not text")
    if not value:
        return _Resolved(None, f"{source} is empty")
    if len(value) > MAX_VALUE_LENGTH:
        return _Resolved(None, f"{source} is longer than {MAX_VALUE_LENGTH} characters")
    for character in value:
        category = unicodedata.category(character)
        if category in ("Cc", "Cs") or (
            category == "Cf" and character not in _ALLOWED_FORMAT_CHARACTERS
        ):
            return _Resolved(None, f"{source} contains control or formatting characters")
    return _Resolved(value, "")


def user_type(claims: Mapping[str, Any]) -> str:
    """``Technical`` for a client acting as itself (client-credentials token), else
    ``Business``; see the module docstring."""
    if claims.get("grant_type") == "client_credentials":
        return TECHNICAL
    if any(claim in claims for claim in _USER_CLAIMS):
        return BUSINESS
    subject = claims.get("sub")
    if isinstance(subject, str) and any(claims.get(claim) == subject for claim in _CLIENT_CLAIMS):
        return TECHNICAL
    return BUSINESS


def _first_present(claims: Mapping[str, Any], names: Iterable[str], variable: str) -> _Resolved:
    names = tuple(names)
    for claim in names:
        if claims.get(claim) is not None:
            return _text_of(claims[claim], f"claim {claim!r} (for ${{{variable}}})")
    return _Resolved(
        None, f"${{{variable}}} is not in the token (looked for {', '.join(names)})", False
    )


def _resolve(claims: Mapping[str, Any], variable: str) -> _Resolved:
    if variable == "user_type":
        return _Resolved(user_type(claims), "")
    if variable == "name":
        return _first_present(claims, NAME_CLAIMS[user_type(claims)], variable)
    if variable in _VIRTUAL_CLAIMS:
        return _first_present(claims, _VIRTUAL_CLAIMS[variable], variable)
    if variable.startswith(ROOT_PREFIX) and len(variable) > len(ROOT_PREFIX):
        return _first_present(claims, (variable[len(ROOT_PREFIX) :],), variable)
    attributes = claims.get(XS_USER_ATTRIBUTES)
    if isinstance(attributes, Mapping) and attributes.get(variable) is not None:
        return _text_of(attributes[variable], f"{XS_USER_ATTRIBUTES}.{variable}")
    return _first_present(claims, (variable,), variable)


def resolve_variable(claims: Mapping[str, Any], variable: str) -> str | None:
    """The value ``${variable}`` stands for in a token with these claims, or None when the
    token lacks it or its value is unusable (see the module docstring)."""
    return _resolve(claims, variable).value


class Operator(enum.Enum):
    """How a :class:`Condition` tests its variable (SCC's exists / does not exist / is / is not,
    plus a regular expression)."""

    EXISTS = "exists"
    NOT_EXISTS = "not_exists"
    EQUALS = "equals"
    NOT_EQUALS = "not_equals"
    MATCHES = "matches"


@dataclass(frozen=True)
class Condition:
    """When a rule applies: ``variable`` (a name as in ``${...}``, without the braces) tested
    with ``operator`` against ``value``. ``equals`` is exact and case-sensitive; ``matches``
    must match the whole value (``(?i)`` in the expression ignores case). ``not_equals`` and
    ``matches`` need the variable present, as SCC's *is not* does."""

    variable: str
    operator: Operator
    value: str | None = None
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "operator", Operator(self.operator))
        if not isinstance(self.variable, str) or not _VARIABLE.fullmatch(self.variable):
            raise ValueError(
                f"condition variable {self.variable!r} must be a claim name such as "
                "'mail' or 'user_type' (letters, digits, '_', '.', '-')"
            )
        needs_value = self.operator in (Operator.EQUALS, Operator.NOT_EQUALS, Operator.MATCHES)
        if needs_value and not isinstance(self.value, str):
            raise ValueError(f"condition '{self.variable} {self.operator.value}' needs a value")
        if not needs_value and self.value is not None:
            raise ValueError(
                f"condition '{self.variable} {self.operator.value}' takes no value, "
                f"got {self.value!r}"
            )
        if (
            self.variable == "user_type"
            and needs_value
            and self.operator is not Operator.MATCHES
            and self.value not in (BUSINESS, TECHNICAL)
        ):
            raise ValueError(f"user_type is {BUSINESS!r} or {TECHNICAL!r}, not {self.value!r}")
        if self.operator is Operator.MATCHES:
            assert self.value is not None
            try:
                object.__setattr__(self, "_regex", re.compile(self.value))
            except re.error as exc:
                raise ValueError(
                    f"condition '{self.variable} matches {self.value!r}': not a regular "
                    f"expression: {exc}"
                ) from None

    def describe(self) -> str:
        """The condition as text: ``mail exists``, ``user_type equals 'Technical'``..."""
        if self.value is None:
            return f"{self.variable} {self.operator.value}"
        return f"{self.variable} {self.operator.value} {self.value!r}"

    def _test(self, claims: Mapping[str, Any]) -> tuple[bool, str]:
        resolved = _resolve(claims, self.variable)
        if self.operator is Operator.EXISTS:
            return resolved.value is not None, resolved.problem
        if self.operator is Operator.NOT_EXISTS:
            return not resolved.present, f"{self.variable} is in the token"
        if resolved.value is None:
            return False, resolved.problem
        if self.operator is Operator.EQUALS:
            return resolved.value == self.value, f"{self.variable} has another value"
        if self.operator is Operator.NOT_EQUALS:
            return resolved.value != self.value, f"{self.variable} has that value"
        assert self._regex is not None
        return self._regex.fullmatch(resolved.value) is not None, f"{self.variable} differs"

    def holds(self, claims: Mapping[str, Any]) -> bool:
        """Whether the condition holds for a token with these claims."""
        return self._test(claims)[0]


class _Part(NamedTuple):
    text: str
    variable: bool  # ``text`` is a variable name, not literal text


_Attribute = tuple[ObjectIdentifier, tuple[_Part, ...]]
_Rdn = tuple[_Attribute, ...]


def _attribute_oid(text: str, pattern: str) -> ObjectIdentifier:
    if _DOTTED_OID.fullmatch(text):
        return ObjectIdentifier(text)
    oid = _ATTRIBUTE_TYPES.get(text.upper())
    if oid is None:
        raise ValueError(
            f"subject pattern {pattern!r}: unknown attribute type {text!r}; use one of "
            f"{', '.join(sorted(_ATTRIBUTE_TYPES))} or a dotted OID"
        )
    return oid


def _parse_value(pattern: str, start: int) -> tuple[tuple[_Part, ...], int, str | None]:
    """The value starting at ``start``: its parts, where it ends, and the separator there."""
    # (text, escaped, variable) per token, so unescaped edge spaces can be trimmed afterwards.
    tokens: list[tuple[str, bool, bool]] = []
    i = start
    separator: str | None = None
    while i < len(pattern):
        character = pattern[i]
        if character in ",+":
            separator = character
            i += 1
            break
        if character == "\\":
            pair = pattern[i + 1 : i + 3]
            if _HEX_PAIR.fullmatch(pair):
                raw = bytearray()
                while pattern.startswith("\\", i) and _HEX_PAIR.fullmatch(pattern[i + 1 : i + 3]):
                    raw.append(int(pattern[i + 1 : i + 3], 16))
                    i += 3
                try:
                    tokens.extend((c, True, False) for c in raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise ValueError(
                        f"subject pattern {pattern!r}: \\XX escapes must spell UTF-8"
                    ) from None
                continue
            if pair[:1] and pair[0] in _ESCAPABLE:
                tokens.append((pair[0], True, False))
                i += 2
                continue
            raise ValueError(f"subject pattern {pattern!r}: bad escape at position {i}")
        if character == "$" and pattern.startswith("${", i):
            end = pattern.find("}", i)
            name = pattern[i + 2 : end] if end > 0 else ""
            if not _VARIABLE.fullmatch(name):
                raise ValueError(
                    f"subject pattern {pattern!r}: placeholder at position {i} must look like "
                    "${claim_name}"
                )
            tokens.append((name, False, True))
            i = end + 1
            continue
        if character in '"<>;' or unicodedata.category(character) == "Cc":
            raise ValueError(
                f"subject pattern {pattern!r}: {character!r} at position {i} must be escaped"
            )
        if character == "#" and all(t == " " and not e and not v for t, e, v in tokens):
            raise ValueError(
                f"subject pattern {pattern!r}: a value starting with '#' must escape it as \\#"
            )
        tokens.append((character, False, False))
        i += 1
    while tokens and tokens[0][:2] == (" ", False):
        tokens.pop(0)
    while tokens and tokens[-1][:2] == (" ", False):
        tokens.pop()
    parts: list[_Part] = []
    for text, _, variable in tokens:
        if variable or not parts or parts[-1].variable:
            parts.append(_Part(text, variable))
        else:
            parts[-1] = _Part(parts[-1].text + text, False)
    return tuple(parts), i, separator


def _parse_pattern(pattern: str) -> tuple[_Rdn, ...]:
    """RDNs in written order (most specific first, as RFC 4514 writes them)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("a subject pattern must not be empty")
    rdns: list[_Rdn] = []
    attributes: list[_Attribute] = []
    i = 0
    while True:
        equals = pattern.find("=", i)
        if equals < 0:
            raise ValueError(f"subject pattern {pattern!r}: expected TYPE=value at position {i}")
        oid = _attribute_oid(pattern[i:equals].strip(), pattern)
        parts, i, separator = _parse_value(pattern, equals + 1)
        if not parts:
            raise ValueError(f"subject pattern {pattern!r}: {pattern[:equals]!r} has no value")
        attributes.append((oid, parts))
        if separator == "+":
            continue
        rdns.append(tuple(attributes))
        attributes = []
        if separator is None:
            return tuple(rdns)


def _attribute(oid: ObjectIdentifier, value: str) -> x509.NameAttribute[str]:
    """The attribute, or ValueError saying why the value does not fit it."""
    label = RFC4514_NAMES.get(oid) or _short_name(oid)
    if oid in _IA5_ATTRIBUTES and not value.isascii():
        raise ValueError(f"{label} must be ASCII")
    if oid in _PRINTABLE_ATTRIBUTES and not _PRINTABLE.fullmatch(value):
        raise ValueError(f"{label} allows only letters, digits, spaces and '()+,-./:=?")
    # cryptography bounds CN by its UTF-8 length (RFC 5280's ub-common-name is 64).
    if oid == NameOID.COMMON_NAME and len(value.encode("utf-8")) > MAX_COMMON_NAME_BYTES:
        raise ValueError(
            f"CN would be {len(value.encode('utf-8'))} bytes of UTF-8; "
            f"at most {MAX_COMMON_NAME_BYTES} fit"
        )
    try:
        return x509.NameAttribute(oid, value)
    except ValueError as exc:
        raise ValueError(f"{label}: {exc}") from None


def _short_name(oid: ObjectIdentifier) -> str:
    for name, known in _ATTRIBUTE_TYPES.items():
        if known == oid:
            return name
    return oid.dotted_string


@dataclass(frozen=True)
class SubjectRule:
    """One subject pattern rule: when ``condition`` holds (always, without one) and every
    placeholder of ``pattern`` resolves, the user's subject is ``pattern`` filled in.
    ``description`` names the rule in messages (the pattern does otherwise)."""

    pattern: str
    condition: Condition | None = None
    description: str = ""
    _rdns: tuple[_Rdn, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rdns = _parse_pattern(self.pattern)
        object.__setattr__(self, "_rdns", rdns)
        for rdn in rdns:
            oids = [oid for oid, _ in rdn]
            if len(set(oids)) != len(oids):
                raise ValueError(f"subject pattern {self.pattern!r} repeats a type within an RDN")
            for oid, parts in rdn:
                if all(not part.variable for part in parts):
                    try:
                        _attribute(oid, "".join(part.text for part in parts))
                    except ValueError as exc:
                        raise ValueError(f"subject pattern {self.pattern!r}: {exc}") from None

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The variables the pattern uses, in order of first appearance."""
        seen: dict[str, None] = {}
        for rdn in self._rdns:
            for _, parts in rdn:
                seen.update((part.text, None) for part in parts if part.variable)
        return tuple(seen)

    def label(self) -> str:
        """How messages name this rule."""
        text = self.description or self.pattern
        return f"{text!r} (if {self.condition.describe()})" if self.condition else repr(text)

    def apply(self, claims: Mapping[str, Any]) -> x509.Name:
        """The subject for these claims, or ValueError saying why this rule does not apply."""
        if self.condition is not None:
            holds, why = self.condition._test(claims)
            if not holds:
                raise ValueError(f"condition not met: {why}")
        values: dict[str, str] = {}
        for variable in self.placeholders:
            resolved = _resolve(claims, variable)
            if resolved.value is None:
                raise ValueError(resolved.problem)
            values[variable] = resolved.value
        # x509.Name lists RDNs from the root (C, O...) to the leaf (CN), the reverse of RFC 4514.
        return x509.Name(
            [
                x509.RelativeDistinguishedName(
                    [
                        _attribute(
                            oid,
                            "".join(values[p.text] if p.variable else p.text for p in parts),
                        )
                        for oid, parts in rdn
                    ]
                )
                for rdn in reversed(self._rdns)
            ]
        )


@dataclass(frozen=True)
class Subject:
    """The subject chosen for a user: the name, its RFC 4514 text, and which rule produced it
    (``rule_index`` counts from 0)."""

    name: x509.Name
    rfc4514: str
    rule_index: int
    rule: SubjectRule


def rfc4514_string(name: x509.Name) -> str:
    """RFC 4514 text of ``name``, with the short attribute names patterns use."""
    return name.rfc4514_string(dict(RFC4514_NAMES))


@dataclass(frozen=True)
class SubjectRules:
    """The ordered subject pattern rules of a connector."""

    rules: tuple[SubjectRule, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if not self.rules:
            raise ValueError("at least one subject pattern rule is needed")
        for rule in self.rules:
            if not isinstance(rule, SubjectRule):
                raise ValueError(f"subject rules must be SubjectRule, not {type(rule).__name__}")

    def subject_for(self, claims: Mapping[str, Any]) -> Subject:
        """The subject from the first rule that applies to these (validated) claims; raises
        PrincipalError ``NO_SUBJECT`` naming each rule tried and why it did not apply."""
        tried: list[str] = []
        for index, rule in enumerate(self.rules):
            try:
                name = rule.apply(claims)
            except ValueError as exc:
                tried.append(f"rule {index + 1} {rule.label()}: {exc}")
                continue
            return Subject(name, rfc4514_string(name), index, rule)
        raise PrincipalError(
            PrincipalReason.NO_SUBJECT,
            "no subject pattern rule produced a certificate subject for this user; "
            + "; ".join(tried)
            + ". Add a rule for such users, or have the identity provider send the claims",
            {"rules_tried": str(len(tried))},
        )
