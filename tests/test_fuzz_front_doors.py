"""Fuzz the gateway's front doors through real listening sockets: the HTTP proxy's request parsing
and the SOCKS5 front door, each in front of a real tunnel pair (tests/tunnel_pair.py) whose
connector side answers every stream.

Each example is one client connection: bytes built as a plausible request or handshake (valid
credentials included, so parsing gets past authentication), then damaged, sent in pieces,
followed by a half-close. The claims, per example: the front door answers and closes, never
hangs; every HTTP answer starts with a status line; nothing reaches the gateway log at ERROR
("unexpected failure"); whatever the HTTP proxy forwarded parses cleanly as HTTP/1.1 on the
connector side (it only ever forwards what h11 serialised). After the run, a well-formed request
still gets through.

The examples run in a worker thread (hypothesis is synchronous) and each one calls into the
trio loop that serves the front doors.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio
from hypothesis import strategies as st

from backchannel import HostPort, TunnelStream
from backchannel_http._front_door import HttpProxyFrontDoor
from backchannel_http._relay import HttpLimits
from backchannel_tcp._front_doors import Socks5FrontDoor
from tests.test_fuzz_codecs import mutated, run_target, splits
from tests.test_http_front_door import CONNECTED, FakeServices
from tests.tunnel_pair import TunnelPair, tunnel_pair

pytestmark = pytest.mark.fuzz

AUTH = "Basic " + base64.b64encode(b"acme/crm:secret").decode()
STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] ")


class ErrorRecords(logging.Handler):
    """Keeps every record at ERROR or above (an "unexpected failure" of a front door)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Connector:
    """The far side of the tunnel: serves HTTP on ``http`` streams, echoes ``tcp`` ones."""

    parse_errors: list[str] = field(default_factory=list)
    requests: int = 0

    async def serve(self, pair: TunnelPair) -> None:
        async with trio.open_nursery() as nursery:
            async for stream in pair.accepted:
                await stream.accept()
                if stream.metadata.get("protocol") == "http":
                    nursery.start_soon(self._http, stream)
                else:
                    nursery.start_soon(self._echo, stream)

    async def _echo(self, stream: TunnelStream) -> None:
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _http(self, stream: TunnelStream) -> None:
        conn = h11.Connection(h11.SERVER)
        head_request = False
        try:
            async with stream:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is h11.IDLE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        self.requests += 1
                        head_request = event.method == b"HEAD"
                    elif isinstance(event, h11.EndOfMessage):
                        body = b"fine\n"
                        head = h11.Response(
                            status_code=200, headers=[("Content-Length", str(len(body)))]
                        )
                        out = conn.send(head) or b""
                        if not head_request:  # h11 (rightly) refuses a body after HEAD
                            out += conn.send(h11.Data(data=body)) or b""
                        await stream.send_all(out + (conn.send(h11.EndOfMessage()) or b""))
                        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                            return
                        conn.start_next_cycle()
                    elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        return
        except h11.RemoteProtocolError as exc:
            self.parse_errors.append(str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@dataclass
class Doors:
    http: HostPort
    socks: HostPort
    connector: Connector
    errors: ErrorRecords


@asynccontextmanager
async def front_doors() -> AsyncIterator[Doors]:
    errors = ErrorRecords()
    logger = logging.getLogger("backchannel")
    logger.addHandler(errors)
    try:
        async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
            services = FakeServices(pair, set(CONNECTED))
            connector = Connector()
            nursery.start_soon(connector.serve, pair)
            listen = HostPort("127.0.0.1", 0)
            limits = HttpLimits(header_timeout=30)
            [http] = await nursery.start(HttpProxyFrontDoor(services, listen, limits).serve)
            door = Socks5FrontDoor(services, listen, handshake_timeout=30)
            [socks] = await nursery.start(door.serve)
            yield Doors(http, socks, connector, errors)
            nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(errors)


async def exchange(address: HostPort, chunks: list[bytes]) -> bytes:
    """Send ``chunks``, half-close, read until the front door closes; fail if it hangs."""
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream(address.host, address.port)
        received = bytearray()
        async with stream:
            try:
                for chunk in chunks:
                    await stream.send_all(chunk)
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the front door may close as soon as it has seen enough
            try:
                while data := await stream.receive_some(65536):
                    received += data
            except trio.BrokenResourceError:
                pass
        return bytes(received)


async def fuzz_in_thread(
    strategy: st.SearchStrategy[Any],
    probe: Callable[[Any], Any],
    examples: int,
    short: int,
) -> None:
    """Run the hypothesis target in a worker thread; ``probe`` runs in this trio loop."""
    token = trio.lowlevel.current_trio_token()

    def check(case: Any) -> None:
        trio.from_thread.run(probe, case, trio_token=token)

    await trio.to_thread.run_sync(run_target, strategy, check, examples, short)


# --------------------------------------------------------------------------- HTTP proxy

methods = st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "CONNECT", "G\x00T"])
targets = st.sampled_from(
    [
        "http://erp.virtual/",
        "http://erp.virtual:8080/a/b?c=d",
        "http://erp.virtual/%2e%2e/%00",
        "http://ERP.virtual./x",
        "http://user@erp.virtual/",
        "https://erp.virtual/",
        "erp.virtual:443",
        "/relative",
        "*",
        "http://[::1]/",
        "http://erp.virtual:99999/",
    ]
)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1"])
extra_headers = st.lists(
    st.sampled_from(
        [
            ("Connection", "close"),
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket"),
            ("Expect", "100-continue"),
            ("Transfer-Encoding", "chunked"),
            ("Transfer-Encoding", "gzip, chunked"),
            ("Content-Length", "0"),
            ("Content-Length", "5"),
            ("Content-Length", "-1"),
            ("Content-Length", "99999999999999999999"),
            ("SAP-Connectivity-SCC-Location_ID", "bG9jMQ=="),
            ("SAP-Connectivity-SCC-Location_ID", "%%%"),
            ("X-Backchannel-Location", "loc2"),
            ("SAP-Connectivity-Authentication", "Bearer a.b.c"),
            ("Proxy-Authorization", "Bearer token-acme-crm"),
            ("Proxy-Authorization", "Basic !!!"),
            ("Trailer", "X-Sum"),
            ("Host", "other.virtual"),
        ]
    )
    | st.tuples(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=30),
    ),
    max_size=5,
)
bodies = st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n"]) | st.binary(
    max_size=64
)


@st.composite
def http_request(draw: st.DrawFn) -> bytes:
    target = draw(targets)
    host = target.split("/")[2] if "://" in target else "erp.virtual"
    headers = [("Host", host), ("Proxy-Authorization", AUTH), *draw(extra_headers)]
    lines = [f"{draw(methods)} {target} {draw(versions)}"]
    lines += [f"{name}: {value}" for name, value in draw(st.permutations(headers))]
    head = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
    return head + draw(bodies)


@st.composite
def http_cases(draw: st.DrawFn) -> list[bytes]:
    if draw(st.integers(0, 9)) == 0:
        return draw(splits(draw(st.binary(max_size=400))))
    wire = b"".join(draw(st.lists(http_request(), min_size=1, max_size=3)))
    return draw(splits(draw(mutated(wire))))


async def test_http_proxy_request_parsing_survives_mutated_requests(fuzz_examples: int) -> None:
    async with front_doors() as doors:

        async def probe(chunks: list[bytes]) -> None:
            answer = await exchange(doors.http, chunks)
            if answer:
                assert STATUS_LINE.match(answer), answer[:200]
            assert not doors.errors.records, doors.errors.records[0].getMessage()
            assert not doors.connector.parse_errors, doors.connector.parse_errors

        await fuzz_in_thread(http_cases(), probe, fuzz_examples // 10, short=100)
        # Still serving, and the connector saw requests (the fuzzer got past the checks).
        assert doors.connector.requests > 0
        head = f"GET http://erp.virtual/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {AUTH}\r\n"
        answer = await exchange(doors.http, [head.encode() + b"\r\n"])
        assert answer.startswith(b"HTTP/1.1 200 "), answer


# --------------------------------------------------------------------------- SOCKS5 front door


@st.composite
def socks_cases(draw: st.DrawFn) -> list[bytes]:
    if draw(st.integers(0, 9)) == 0:
        return draw(splits(draw(st.binary(max_size=300))))
    wire = bytes([5, 2, 2, 0x80]) if draw(st.booleans()) else bytes([5, 1, 2])
    if wire[2:3] == b"\x02" and draw(st.booleans()):
        user, pwd = b"acme/crm", b"secret"
        wire += bytes([1, len(user)]) + user + bytes([len(pwd)]) + pwd
    else:
        token = draw(st.sampled_from([b"token-acme-crm", b"forged"]))
        location = base64.b64encode(draw(st.sampled_from([b"", b"loc1", b"nowhere"])))
        wire = bytes([5, 1, 0x80])
        wire += b"\x01" + len(token).to_bytes(4, "big") + token + bytes([len(location)]) + location
    host = draw(st.sampled_from([b"echo.virtual", b"", b"\xff\xfe", b"a" * 255]))
    atyp = draw(st.sampled_from([3, 3, 3, 1, 4, 9]))
    if atyp == 3:
        address = bytes([3, len(host)]) + host
    else:
        address = bytes([atyp]) + bytes(16 if atyp == 4 else 4)
    wire += bytes([5, draw(st.sampled_from([1, 1, 2, 3])), 0]) + address
    wire += draw(st.integers(0, 65535)).to_bytes(2, "big") + draw(st.binary(max_size=32))
    return draw(splits(draw(mutated(wire))))


async def test_socks5_front_door_survives_mutated_handshakes(fuzz_examples: int) -> None:
    async with front_doors() as doors:

        async def probe(chunks: list[bytes]) -> None:
            await exchange(doors.socks, chunks)
            assert not doors.errors.records, doors.errors.records[0].getMessage()

        await fuzz_in_thread(socks_cases(), probe, fuzz_examples // 10, short=100)
        user, pwd = b"acme/crm", b"secret"
        hello = bytes([5, 1, 2]) + bytes([1, len(user)]) + user + bytes([len(pwd)]) + pwd
        host = b"echo.virtual"
        request = bytes([5, 1, 0, 3, len(host)]) + host + (7).to_bytes(2, "big")
        answer = await exchange(doors.socks, [hello + request + b"ping"])
        assert answer == bytes([5, 2, 1, 0, 5, 0, 0, 1]) + bytes(6) + b"ping"
