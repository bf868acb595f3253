"""Resource rules: which URL paths of an internal web server the cloud may reach.

A system mapping carries a list of :class:`ResourceRule` (SAP Cloud Connector semantics): a URL
path that is either ``"exact"`` or ``"prefix"`` (the path and all its sub-paths), matched
case-sensitively against the request path with the query ignored; a rule is active or suspended
(a suspended rule is as if absent) and says whether a WebSocket upgrade may go through it. No
matching active rule means the request is denied.

Matching a prefix is only safe if the backend resolves the path the way we do. Backends differ:
one collapses ``//``, another decodes ``%2f`` into a separator, a third decodes twice. So
:func:`normalise_request_target` brings every request target to one canonical spelling and
raises :class:`AmbiguousPath` for anything a backend might read differently. It refuses:

* A target that is not origin-form (``/...``). Absolute-form (``http://host/p``),
  authority-form (``host:443``) and asterisk-form (``*``) are the front door's business; here
  they would let the authority or a proxy-style URL slip past path matching.
* Whitespace, NUL and other control characters, raw or percent-encoded (``%00``-``%1F``,
  ``%7F``): request smuggling through lenient parsers, and C backends that stop at NUL so
  ``/ok%00/../admin`` is read as a different file than the one that was checked.
* Non-ASCII raw bytes: servers decode them as Latin-1, UTF-8 or the system code page.
* A fragment ``#``: never sent by a client; a backend may cut the path there or keep it.
* Invalid percent-escapes (``%zz``, ``%4``, IIS ``%u002e``): some backends pass them through,
  some drop the ``%``, some decode leniently.
* ``%25`` (an encoded ``%``): a backend or filter chain that decodes twice turns ``%252e`` into
  ``.`` and ``%252f`` into ``/`` after the check (IIS double-decoding, proxies in front of
  Tomcat). A canonical path therefore never contains ``%``-``2``-``5``.
* ``%2F`` and ``%5C`` (encoded ``/`` and ``\\``): Apache with ``AllowEncodedSlashes``, Tomcat
  with ``ALLOW_ENCODED_SLASH``, many Node and Python frameworks decode them into separators.
* A literal ``\\``: Windows backends (IIS, Jetty on Windows) and some frameworks treat it as a
  separator, so ``/ok\\..\\admin`` escapes ``/ok``.
* ``;`` raw or encoded (``%3B``): Tomcat, Jetty and Spring strip ``;params`` from each segment,
  so ``/ok/..;/admin`` is ``/ok/../admin`` to them but an ordinary segment to us.
* Dot segments ``.`` and ``..``, also percent-encoded in any case mix (``%2e``, ``.%2E``), and
  any segment made only of dots and spaces (``...``, ``..%20``): RFC 3986 resolution happens in
  the backend, and Windows strips trailing dots and spaces from file names.
* Empty segments (``//``, interior only; a trailing ``/`` is fine): nginx ``merge_slashes``,
  Apache and many routers collapse them, others map them to a different handler.
* Percent-encoded bytes that are not strict UTF-8: overlong forms (``%c0%ae``,
  ``%e0%80%ae`` for ``.``), lone continuation bytes, truncated sequences, surrogates. Lenient
  decoders (old IIS, some Java containers) turned overlong ``%c0%af`` into ``/``.
* Encoded non-ASCII characters whose Unicode compatibility form (NFKC) contains one of
  ``./\\;%?#:`` or a space: backends that normalise Unicode (.NET, some Java and Python
  frameworks, case-folding file systems) turn fullwidth ``%EF%BC%8E`` into ``.`` and
  ``%E2%80%A5`` (two-dot leader) into ``..``.
* Any other character outside RFC 3986 ``pchar`` (``"<>[]^`{|}``): parsers disagree on them.

What remains is decoded where that cannot change meaning: escapes of unreserved characters
(ALPHA, DIGIT, ``-._~``) become the character, every other escape is kept and upper-cased. So
``/a%7e`` and ``/a~`` are the same path, as are ``/a%3a`` and ``/a%3A``. Resource rule paths
must already be canonical, so one string comparison decides.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "Allowed",
    "AmbiguousPath",
    "Decision",
    "Denied",
    "ResourceRule",
    "check_access",
    "normalise_request_target",
    "validate_rule_path",
]

_HEX = frozenset(string.hexdigits)
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
#: RFC 3986 ``pchar`` minus ``%`` (escapes are handled apart) and ``;`` (refused on its own).
_PCHAR = _UNRESERVED | frozenset("!$&'()*+,=:@")
_WHITESPACE = frozenset(" \t\n\r\v\f")
#: ASCII characters that must not appear in the NFKC form of an encoded non-ASCII character.
_NFKC_HAZARDS = frozenset("./\\;%?#: ")

#: Encoded bytes refused outright, with the reason.
_REFUSED_ESCAPES = {
    0x2F: "an encoded slash",
    0x5C: "an encoded backslash",
    0x25: "an encoded percent sign (possible double encoding)",
    0x3B: "an encoded ';' (path parameters)",
    0x00: "an encoded NUL byte",
}


class AmbiguousPath(ValueError):
    """A request target that a backend might resolve differently from us, so it is refused.

    ``reason`` is a short English sentence naming what was found.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ResourceRule:
    """One accessible resource of a system mapping.

    ``path`` must be canonical (as :func:`normalise_request_target` returns it) and without a
    query; ``match`` is ``"exact"`` (this path only) or ``"prefix"`` (this path and all its
    sub-paths). A suspended rule (``active=False``) is ignored. ``websocket`` allows a
    WebSocket upgrade on the paths the rule covers. Construction raises :class:`ValueError`.
    """

    path: str
    match: Literal["exact", "prefix"]
    active: bool = True
    websocket: bool = False

    def __post_init__(self) -> None:
        if self.match not in ("exact", "prefix"):
            raise ValueError(f"resource rule match must be 'exact' or 'prefix', not {self.match!r}")
        validate_rule_path(self.path)


def validate_rule_path(path: str) -> None:
    """Raise :class:`ValueError` unless ``path`` is a canonical resource rule path."""
    if not path.startswith("/"):
        raise ValueError(f"resource rule path {path!r} must start with '/'")
    if "?" in path:
        raise ValueError(f"resource rule path {path!r} must not contain a query ('?')")
    if "#" in path:
        raise ValueError(f"resource rule path {path!r} must not contain a fragment ('#')")
    try:
        canonical = normalise_request_target(path)
    except AmbiguousPath as exc:
        raise ValueError(f"resource rule path {path!r} is ambiguous: {exc.reason}") from exc
    if canonical != path:
        raise ValueError(
            f"resource rule path {path!r} is not in canonical form; write {canonical!r}"
        )


@dataclass(frozen=True, slots=True)
class Allowed:
    """The request may go through; ``rule`` is the most specific active rule that covers it."""

    rule: ResourceRule


@dataclass(frozen=True, slots=True)
class Denied:
    """The request must be refused; ``reason`` says why in one short sentence."""

    reason: str


Decision: TypeAlias = Allowed | Denied


def normalise_request_target(target: str | bytes) -> str:
    """Return the canonical path of an origin-form request target, its query dropped.

    Raises :class:`AmbiguousPath` for anything a backend might resolve differently (see the
    module docstring for every rule and why).
    """
    text = target.decode("latin-1") if isinstance(target, bytes) else target
    if _PLAIN_TARGET.fullmatch(text):
        # Nothing to decode or refuse character by character (the common case, checked once
        # by a regex instead of twice per character in Python): only the segments can be bad.
        path = text.partition("?")[0]
        _refuse_bad_segments(path, path)
        return path
    return _normalise_slowly(text)


#: Targets that pass every character check unchanged: a path of '/' and pchars other than '%'
#: and ';' (so no escapes, no path parameters), and a query of printable ASCII without '#'.
_PLAIN_TARGET = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*(?:\?[\x21\x22\x24-\x7e]*)?")


def _normalise_slowly(text: str) -> str:
    """:func:`normalise_request_target`, every rule applied character by character."""
    _refuse_bad_characters(text)
    if not text:
        raise AmbiguousPath("request target is empty")
    if text == "*":
        raise AmbiguousPath("asterisk-form request target '*' is not a path")
    if not text.startswith("/"):
        raise AmbiguousPath(f"request target {text!r} is not origin-form (must start with '/')")
    path = text.partition("?")[0]
    canonical, decoded = _canonicalise(path)
    _refuse_bad_segments(canonical, path)
    _refuse_bad_utf8(decoded, path)
    return canonical


def _refuse_bad_characters(text: str) -> None:
    """Checks that apply to the whole target, query included."""
    for char in text:
        code = ord(char)
        if code > 0x7E and code != 0x7F:
            raise AmbiguousPath(f"request target contains a non-ASCII character U+{code:04X}")
        if char in _WHITESPACE:
            raise AmbiguousPath(f"request target contains whitespace {char!r}")
        if code == 0:
            raise AmbiguousPath("request target contains a NUL byte")
        if code < 0x20 or code == 0x7F:
            raise AmbiguousPath(f"request target contains a control character 0x{code:02X}")
        if char == "#":
            raise AmbiguousPath("request target contains a fragment ('#')")


def _canonicalise(path: str) -> tuple[str, bytes]:
    """Return (canonical path, fully decoded path bytes), refusing bad characters and escapes."""
    out: list[str] = []
    decoded = bytearray()
    i = 0
    while i < len(path):
        char = path[i]
        if char == "%":
            escape = path[i : i + 3]
            if len(escape) < 3 or escape[1] not in _HEX or escape[2] not in _HEX:
                raise AmbiguousPath(f"path {path!r} contains an invalid percent-escape {escape!r}")
            byte = int(escape[1:], 16)
            if byte in _REFUSED_ESCAPES:
                raise AmbiguousPath(f"path {path!r} contains {_REFUSED_ESCAPES[byte]}")
            if byte < 0x20 or byte == 0x7F:
                raise AmbiguousPath(f"path {path!r} contains an encoded control character")
            if chr(byte) in _UNRESERVED:
                out.append(chr(byte))
            else:
                out.append(escape.upper())
            decoded.append(byte)
            i += 3
            continue
        if char == "\\":
            raise AmbiguousPath(f"path {path!r} contains a backslash")
        if char == ";":
            raise AmbiguousPath(f"path {path!r} contains ';' (path parameters)")
        if char != "/" and char not in _PCHAR:
            raise AmbiguousPath(f"path {path!r} contains {char!r}, not allowed in a URL path")
        out.append(char)
        decoded.append(ord(char))
        i += 1
    return "".join(out), bytes(decoded)


def _refuse_bad_segments(canonical: str, path: str) -> None:
    """Refuse interior empty segments and segments made only of dots and (encoded) spaces."""
    segments = canonical.split("/")[1:]
    for index, segment in enumerate(segments):
        if not segment:
            if index < len(segments) - 1:
                raise AmbiguousPath(f"path {path!r} contains an empty segment ('//')")
            continue
        if not segment.replace("%20", "").strip("."):
            raise AmbiguousPath(
                f"path {path!r} contains a dot segment ('.', '..' or only dots and spaces)"
            )


def _refuse_bad_utf8(decoded: bytes, path: str) -> None:
    """Refuse encoded bytes that are not strict UTF-8 or that Unicode normalisation subverts."""
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousPath(
            f"path {path!r} contains percent-encoded bytes that are not valid UTF-8"
        ) from None
    for char in text:
        if ord(char) > 0x7F and _NFKC_HAZARDS.intersection(unicodedata.normalize("NFKC", char)):
            raise AmbiguousPath(
                f"path {path!r} contains U+{ord(char):04X}, which Unicode normalisation turns "
                "into a path delimiter"
            )


def _covers(rule: ResourceRule, path: str) -> bool:
    """Whether ``rule`` covers the canonical ``path``, ignoring whether the rule is active."""
    if path == rule.path:
        return True
    if rule.match == "exact":
        return False
    boundary = rule.path if rule.path.endswith("/") else rule.path + "/"
    return path.startswith(boundary)


def check_access(rules: Sequence[ResourceRule], path: str, *, websocket: bool) -> Decision:
    """Decide whether a request for the canonical ``path`` may go through ``rules``.

    Suspended rules are ignored. When several active rules cover the path the most specific
    decides: the longest rule path, an exact rule before a prefix rule of the same path, then
    the earliest listed. A WebSocket upgrade (``websocket=True``) also needs that rule to allow
    it. A ``path`` that is not canonical is denied, so passing a raw target cannot slip through.
    """
    try:
        canonical = normalise_request_target(path)
    except AmbiguousPath as exc:
        return Denied(exc.reason)
    if canonical != path:
        return Denied(f"path {path!r} is not normalised (expected {canonical!r})")
    best: ResourceRule | None = None
    for rule in rules:
        if not rule.active or not _covers(rule, path):
            continue
        if best is None or _specificity(rule) > _specificity(best):
            best = rule
    if best is None:
        return Denied(f"no active resource rule covers {path}")
    if websocket and not best.websocket:
        return Denied(f"WebSocket upgrade not allowed for resource {best.path} ({best.match})")
    return Allowed(best)


def _specificity(rule: ResourceRule) -> tuple[int, bool]:
    return len(rule.path), rule.match == "exact"
