"""HTTP/1.1 heads without h11, for the common exchange.

h11 parses and frames every message through a state machine, which costs more per request
than everything else the relay does (``docs/performance.md``, "HTTP proxy per-request cost").
Most exchanges are plain: an HTTP/1.1 request without a body or with a Content-Length one,
answered with a Content-Length response (or none, for HEAD, 204 and 304). For those the relay
parses and writes the heads here and leaves its h11 connections untouched; anything else
(chunked bodies, ``Expect``, upgrades, ``Connection: close``, HTTP/1.0, 1xx answers, a byte
this grammar does not allow) returns None and goes to h11 exactly as before.

The grammar is RFC 9112's, narrowed: field values are visible characters, spaces and tabs
only (h11 also lets most control bytes through), the version is ``HTTP/1.1``, the status
``200``-``599``. So what this module accepts, h11 accepts too and reads the same way: the same
method, target, status, reason and fields (names lower-cased, values without surrounding
whitespace) and the same body length; ``tests/test_h1.py`` checks that against h11 itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import trio

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: ((?:[ \t]|" + _VCHAR + rb")*))?")
_FIELD_LINE = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*(" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?[ \t]*"
)
#: A field as h11 writes it: ``name: value`` with nothing around the value.
_FIELD_OUT = re.compile(_TOKEN + rb": (?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?")
_LENGTH = re.compile(rb"[0-9]{1,18}")
_METHOD = re.compile(_TOKEN)
_TARGET = re.compile(rb"[\x21-\x7e]+")
_REASON = re.compile(rb"(?:[ \t]|" + _VCHAR + rb")*")

#: Fields that hand the message to h11: other framings, an interim answer expected, a switch
#: of protocol, a connection that ends after this message.
_H11_ONLY = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"te"})


class Fields(Sequence[tuple[bytes, bytes]]):
    """A head's fields like h11's ``Headers``: items are ``(lower-cased name, value)``,
    :meth:`raw_items` keeps the names as sent."""

    __slots__ = ("_lower", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]], lower: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._lower = lower

    def __len__(self) -> int:
        return len(self._lower)

    def __getitem__(self, index: int) -> tuple[bytes, bytes]:  # type: ignore[override]
        return self._lower[index]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._lower)

    def raw_items(self) -> list[tuple[bytes, bytes]]:
        """The fields with their names as sent."""
        return list(self._raw)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A plain request head: ``body_length`` bytes of body follow (0: none)."""

    method: bytes
    target: bytes
    headers: Fields
    body_length: int
    http_version: bytes = b"1.1"


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A plain final response head: ``body_length`` bytes of body follow (0: none)."""

    status_code: int
    reason: bytes
    headers: Fields
    body_length: int


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """The length of the head at the start of ``buffer`` (through its empty line), or -1."""
    end = buffer.find(b"\r\n\r\n", start)
    return -1 if end == -1 else end + 4


async def read_head(
    stream: trio.abc.ReceiveStream, into: bytearray, *, limit: int, chunk: int
) -> tuple[int, bool]:
    """Read from ``stream`` into ``into`` until it holds a whole head: ``(its length, False)``;
    ``(-1, True)`` if the stream ended first, ``(-1, False)`` once ``into`` holds more than
    ``limit`` bytes without one. Errors propagate; ``into`` keeps what was read before."""
    while len(into) <= limit:
        data = await stream.receive_some(chunk)
        if not data:
            return -1, True
        into += data
        end = head_end(into, max(0, len(into) - len(data) - 3))
        if end != -1:
            return end, False
    return -1, False


def _fields(lines: list[bytes]) -> Fields | None:
    raw: list[tuple[bytes, bytes]] = []
    lower: list[tuple[bytes, bytes]] = []
    match = _FIELD_LINE.fullmatch
    for line in lines:
        found = match(line)
        if found is None:
            return None
        name, value = found.group(1, 2)
        if value is None:
            value = b""
        raw.append((name, value))
        lower.append((name.lower(), value))
    return Fields(raw, lower)


def _content_length(fields: Fields) -> int | None:
    """The one Content-Length's value (0 without one); None for more than one, a bad value
    or a field only h11 handles."""
    length: int | None = 0
    seen = False
    for name, value in fields:
        if name in _H11_ONLY:
            return None
        if name == b"content-length":
            if seen or not _LENGTH.fullmatch(value):
                return None
            seen, length = True, int(value)
        elif name == b"connection" and _names_close_or_upgrade(value):
            return None
    return length


def _names_close_or_upgrade(value: bytes) -> bool:
    tokens = {token.strip(b" \t").lower() for token in value.split(b",")}
    return b"close" in tokens or b"upgrade" in tokens


def parse_request(head: bytes | bytearray) -> RequestHead | None:
    """``head`` (a request head through its empty line) if it is plain, else None."""
    lines = bytes(head).split(b"\r\n")
    if len(lines) < 3 or lines[-1] or lines[-2]:
        return None
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    method, target = line.group(1, 2)
    fields = _fields(lines[1:-2])
    if fields is None or method == b"CONNECT":
        return None
    if sum(1 for name, _ in fields if name == b"host") != 1:
        return None  # h11 refuses HTTP/1.1 without exactly one Host: its error text
    length = _content_length(fields)
    if length is None:
        return None
    return RequestHead(method, target, fields, length)


def parse_response(head: bytes | bytearray, request_method: bytes) -> ResponseHead | None:
    """``head`` (a response head through its empty line), answering ``request_method``, if it
    is a plain final response, else None. A response without Content-Length is plain only
    where it has no body anyway (204, 304); the answer to HEAD has none either way."""
    lines = bytes(head).split(b"\r\n")
    if len(lines) < 2 or lines[-1] or lines[-2]:
        return None
    line = _STATUS_LINE.fullmatch(lines[0])
    if line is None:
        return None
    status = int(line.group(1))
    reason = line.group(2) or b""
    fields = _fields(lines[1:-2])
    if fields is None:
        return None
    length = _content_length(fields)
    if length is None:
        return None
    if status in (204, 304):
        return ResponseHead(status, reason, fields, 0)
    if not any(name == b"content-length" for name, _ in fields):
        return None  # read until the connection closes: h11's framing
    return ResponseHead(status, reason, fields, 0 if request_method == b"HEAD" else length)


def _write_fields(out: list[bytes], headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Append ``name: value\\r\\n`` for each field, Host first (as h11 writes them); False if
    a field is not one h11 would write."""
    check = _FIELD_OUT.fullmatch
    later: list[bytes] = []
    for name, value in headers:
        field = name + b": " + value
        if check(field) is None:
            return False
        (out if name.lower() == b"host" else later).append(field + b"\r\n")
    out.extend(later)
    out.append(b"\r\n")
    return True


def _plain_framing(headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, bool] | None:
    """(Host fields, whether there is a Content-Length) if ``headers`` frame a plain message
    (at most one valid Content-Length; no Transfer-Encoding, Connection or other field only
    h11 handles), else None."""
    hosts = 0
    length = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"host":
            hosts += 1
        elif lower == b"content-length":
            if length or not _LENGTH.fullmatch(value):
                return None
            length = True
        elif lower in _H11_ONLY or lower == b"connection":
            return None
    return hosts, length


def request_bytes(
    method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> bytes | None:
    """The head h11 would write for this plain request (one Host, at most one
    Content-Length), or None where h11 would refuse it or frame it otherwise."""
    if not _METHOD.fullmatch(method) or not _TARGET.fullmatch(target):
        return None
    framing = _plain_framing(headers)
    if framing is None or framing[0] != 1:
        return None
    out = [method + b" " + target + b" HTTP/1.1\r\n"]
    if not _write_fields(out, headers):
        return None
    return b"".join(out)


def response_bytes(
    status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> bytes | None:
    """The head h11 would write for this plain final response on a kept-alive HTTP/1.1
    connection (a Content-Length, or none for 204 and 304), or None where h11 would refuse
    it or change its fields."""
    if not 200 <= status <= 999 or not _REASON.fullmatch(reason):
        return None
    framing = _plain_framing(headers)
    if framing is None or not (framing[1] or status in (204, 304)):
        return None
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    if not _write_fields(out, headers):
        return None
    return b"".join(out)
