"""Review of ``first_data``: what a client sent before its stream was open travels with the OPEN
(``Tunnel.open_stream``, ``GatewayServices.open_stream``, the TCP port forward's
``_sent_already``), and the connector holds it until its access check accepted the stream.

Checked here, beyond tests/test_open_first_data.py:

- the tunnel (in-memory pair): the OPEN's message carries at least one send step; what the peer's
  window does not take follows the ACCEPT, then whatever the opener sends next, in order, at every
  boundary (exactly the window, one past it, exactly one send step); a refusal, the tunnel dying
  or a cancellation while that rest waits for credit reset the stream and raise a
  ``StreamError`` (not a trio stream error), but a stream broken after the ACCEPT is returned
  with its error; a peer that never answers times the open out
  (``stream_open_timeout``) with the first bytes dropped on its side; DATA behind an OPEN the
  connector's mux refuses (open rate) is dropped without hurting the tunnel; on a congested
  tunnel (output queue at its high-water mark) the bytes still arrive whole;
- the port forward (fake services over a tunnel pair, a real 127.0.0.1 listener): a client that
  wrote more than ``FIRST_DATA_LIMIT`` before the open, also against a connector window below it,
  gets every byte through once and in order; a client that closed, or sent and then reset,
  before the open; the refusal WARNING line is the same whether the client spoke first or not;
- a real gateway and connector (tests/harness.py): the TCP handler writes the held bytes to the
  backend first, also with DATA and FIN before the ACCEPT, also through a ``tcps`` mapping (TLS
  to the backend), and against the smallest connector window a configuration allows; refusals
  (no mapping, unsupported protocol, unreachable backend) give the same error, audit lines on
  both sides and connector log lines with ``first_data`` as without, reach no backend, and leave
  no stream behind;
- the HTTP plugin's connector handler serves requests that came with the OPEN, and its path
  check refuses a denied one without the backend.

The review found five defects, written as strict xfails and fixed since (the tests now pass): a
client reset before the open ended its stream with a clean FIN instead of a reset (now no stream
is opened); a refused client that spoke first was closed with FIN instead of RST (now reset, as
when its bytes were unread); ``open_stream(wait_accepted=False)`` with ``first_data`` larger than
the peer's window waited for the peer without ``stream_open_timeout`` (now the wait for the
answer is bounded); a stream the connector accepted that broke while the rest of
``first_data`` was being sent was audited as denied by the gateway (now returned, with its
error on it); a ``GatewayServices`` written before ``first_data`` no longer served a port
forward (now the forward sends first bytes only to one whose ``open_stream`` takes them).

Each passing test was seen to fail against a deliberately broken copy of the change (no rest
after the ACCEPT, no StreamError for a broken rest, no reset on giving up, the rest sent before
the ACCEPT is awaited, a read limit one short, a peeking read, buffered bytes dropped at the
splice's start or kept after a reset, a protocol error for DATA of a refused OPEN, first_data
not passed through the gateway, the gateway's audit or the forward's log changed, early data
dropped by the acceptor); the two "as before" tests (a client reset before the open, a refused
client that spoke first) pass against the tree before the change too.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from backchannel import AppIdentity, HostPort, ResetCode, StreamError, TunnelStream
from backchannel._config import AuditConfig
from backchannel._pki import TlsMaterial
from backchannel._proto._frames import FrameType
from backchannel._proto._mux import MuxSettings
from backchannel._transport import server_ssl_context
from backchannel._tunnel import FIRST_SEND_CHUNK, TunnelSettings
from backchannel_http._handler import HttpHandler
from backchannel_tcp._front_doors import FIRST_DATA_LIMIT

from .harness import Pair, audit_lines, echo_server, running_pair, tls_material
from .test_http_handler import RecordingAudit, http_session, start_backend
from .test_security_claims import dead_port, tcp_mapping
from .test_send_at_once_review import frames_of, recorded_pair
from .test_serve_review import ECHO, REFUSE, Services, echo_streams, forward, read_to_end, serving
from .test_wslink_review import GUARD
from .tunnel_pair import TunnelPair, tunnel_pair

APP = AppIdentity("acme", "crm")
REQUEST = b"GET /x HTTP/1.1\r\nHost: backend\r\n\r\n"


# --------------------------------------------------------------------------- helpers


async def read_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, f"EOF after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


async def how_it_ends(stream: TunnelStream) -> str:
    """Read ``stream`` to its end: "fin" (a clean end) or "reset CODE: reason"."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        assert stream.error is not None
        return f"reset {stream.error.code.name}: {stream.error.reason}"
    return "fin"


async def assert_dropped(acceptor: TunnelStream) -> None:
    """The reset ``acceptor`` holds none of the bytes that came before it: nothing buffered,
    and a read raises instead of handing out a fragment."""
    assert acceptor.buffered == 0
    with pytest.raises(trio.BrokenResourceError):
        await acceptor.receive_some()


def window(size: int) -> TunnelSettings:
    """Tunnel settings promising the peer a stream window of ``size`` bytes."""
    return TunnelSettings(mux=MuxSettings(initial_window=size))


def reset_socket(raw: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashing client would."""
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


def wrapped(raw: socket.socket) -> trio.SocketStream:
    raw.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(raw))


def send_before_the_open(port: int, data: bytes) -> socket.socket:
    """Connect to ``port`` and write ``data`` before any trio task runs (so before the gateway
    accepted the connection); over loopback the bytes are in its receive queue on return."""
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setblocking(False)
    sent = 0
    while sent < len(data):
        sent += raw.send(data[sent:])  # BlockingIOError: the test's premise failed
    return raw


@asynccontextmanager
async def recording_ends(pair: TunnelPair) -> AsyncIterator[list[str]]:
    """The connector side of ``pair`` reads every stream to its end, records how it ended
    (:func:`how_it_ends`) and closes it."""
    endings: list[str] = []

    async def read(stream: TunnelStream) -> None:
        async with stream:
            endings.append(await how_it_ends(stream))

    async def take() -> None:
        async with trio.open_nursery() as streams:
            async for stream in pair.accepted:
                streams.start_soon(read, stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        yield endings
        nursery.cancel_scope.cancel()


class RecordingServices(Services):
    """The serve review's fake services, recording each ``first_data`` the forward hands over."""

    def __init__(self, pair: TunnelPair | None = None) -> None:
        super().__init__(pair)
        self.first_data: list[bytes] = []

    async def open_stream(
        self, app: AppIdentity, *, first_data: bytes = b"", **kwargs: Any
    ) -> TunnelStream:
        self.first_data.append(first_data)
        if first_data:  # (only then: the file also runs against the tree before first_data)
            kwargs["first_data"] = first_data
        return await super().open_stream(app, **kwargs)


class ServicesBeforeFirstData(Services):
    """A plugin author's fake of GatewayServices written against the API before first_data."""

    async def open_stream(  # type: ignore[override]  # the old signature, on purpose
        self,
        app: AppIdentity,
        *,
        protocol: str,
        target: HostPort,
        location: str = "",
        principal: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        wait_accepted: bool = True,
    ) -> TunnelStream:
        assert self.pair is not None
        return await self.pair.gateway.open_stream(
            {"protocol": protocol, "host": target.host, "port": target.port},
            wait_accepted=wait_accepted,
        )


@asynccontextmanager
async def echoing(pair: TunnelPair) -> AsyncIterator[None]:
    """The connector side of ``pair`` echoes every stream."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo_streams, pair)
        yield
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- the tunnel


@pytest.mark.parametrize(
    "size", [1, FIRST_SEND_CHUNK - 1, FIRST_SEND_CHUNK, FIRST_SEND_CHUNK + 1, 3 * FIRST_SEND_CHUNK]
)
async def test_the_opens_message_carries_one_send_step_and_every_byte_arrives_once(
    size: int,
) -> None:
    """With the default window: the first message is the OPEN followed by at least
    min(size, one send step) of the first bytes; over all messages the stream's DATA is the
    first bytes exactly, and the acceptor reads them, then what the opener sends after."""
    data = os.urandom(size)
    with trio.fail_after(GUARD):
        async with recorded_pair(accept=False) as (pair, eager):
            await trio.testing.wait_all_tasks_blocked()
            eager.wire.clear()
            opener = await pair.gateway.open_stream(
                {"protocol": "test"}, wait_accepted=False, first_data=data
            )
            acceptor = await pair.accepted.receive()
            await acceptor.accept()
            await opener.send_all(b"after")
            await opener.send_eof()
            assert await read_until_eof(acceptor) == data + b"after"
            messages = frames_of(eager.wire)
            first = messages[0]
            assert first[0][:2] == (FrameType.OPEN, opener.stream_id)
            in_first = b"".join(p for k, s, p in first[1:] if k == FrameType.DATA)
            assert len(in_first) >= min(size, FIRST_SEND_CHUNK)
            sent = b"".join(
                p
                for message in messages
                for k, s, p in message
                if k == FrameType.DATA and s == opener.stream_id
            )
            assert sent == data + b"after"


@pytest.mark.parametrize("wait_accepted", [True, False])
@pytest.mark.parametrize("size", [1000, 1001, 5000])
async def test_the_rest_beyond_the_window_follows_the_accept_then_what_the_opener_sends(
    size: int, wait_accepted: bool
) -> None:
    """Peer window 1000: the peer holds exactly min(size, 1000) until it accepts; then the rest,
    then the opener's own next bytes and FIN, in order, each byte once."""
    data = os.urandom(size)
    with trio.fail_after(GUARD):
        async with (
            tunnel_pair(None, window(1000), accept=False) as pair,
            trio.open_nursery() as nursery,
        ):

            async def opener_side() -> None:
                opener = await pair.gateway.open_stream(
                    {"protocol": "test"}, wait_accepted=wait_accepted, first_data=data
                )
                await opener.send_all(b"next")
                await opener.send_eof()

            nursery.start_soon(opener_side)
            acceptor = await pair.accepted.receive()
            await trio.testing.wait_all_tasks_blocked()
            assert acceptor.buffered == min(size, 1000)
            await acceptor.accept()
            assert await read_until_eof(acceptor) == data + b"next"


async def test_cancelling_the_open_while_the_rest_waits_for_credit_resets_the_stream() -> None:
    """The peer accepted and does not read: the opener waits in the rest's send; cancelled
    there, the stream is reset ("opener gave up waiting") and forgotten, the peer's buffer
    dropped."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(None, window(1000), accept=False) as pair:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(
                            pair.gateway.open_stream,
                            {"protocol": "test"},
                            first_data=os.urandom(5000),
                        )
                    )
                    acceptor = await pair.accepted.receive()
                    await acceptor.accept()
                    await trio.testing.wait_all_tasks_blocked()
                    assert pair.gateway.stream_count == 1  # still opening: the rest waits
                    scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert acceptor.error is not None
            assert (acceptor.error.code, acceptor.error.reason) == (
                ResetCode.CANCELLED,
                "opener gave up waiting",
            )
            await assert_dropped(acceptor)
            assert pair.gateway.stream_count == 0


async def test_a_refusal_while_the_rest_waits_for_credit_is_the_openers_stream_error() -> None:
    """wait_accepted=False and more first bytes than the window: the opener waits for credit;
    the peer refuses: the opener raises the peer's StreamError, both sides drop the bytes."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(None, window(1000), accept=False) as pair:
            failures: list[StreamError] = []
            async with trio.open_nursery() as nursery:

                async def open_stream() -> None:
                    with pytest.raises(StreamError) as info:
                        await pair.gateway.open_stream(
                            {"protocol": "test"}, wait_accepted=False, first_data=os.urandom(5000)
                        )
                    failures.append(info.value)

                nursery.start_soon(open_stream)
                acceptor = await pair.accepted.receive()
                await trio.testing.wait_all_tasks_blocked()
                await acceptor.reset(ResetCode.ACCESS_DENIED, "no mapping")
            (failure,) = failures
            assert (failure.code, failure.reason) == (ResetCode.ACCESS_DENIED, "no mapping")
            await assert_dropped(acceptor)
            assert pair.gateway.stream_count == 0


@pytest.mark.parametrize("when", ["before the accept", "while the rest waits"])
async def test_the_tunnel_dying_during_the_open_is_not_connected(when: str) -> None:
    """The connector's tunnel goes away between OPEN and ACCEPT: open_stream raises StreamError
    NOT_CONNECTED (what a front door maps; never trio's BrokenResourceError). After the ACCEPT,
    while the rest of the first bytes waits for credit: the accepted stream is returned with
    that error on it (it was not refused; see the audit test below). No stream is kept."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(None, window(1000), accept=False) as pair:
            failures: list[StreamError] = []
            async with trio.open_nursery() as nursery:

                async def open_stream() -> None:
                    try:
                        stream = await pair.gateway.open_stream(
                            {"protocol": "test"}, first_data=os.urandom(5000)
                        )
                    except StreamError as exc:
                        assert when == "before the accept"
                        failures.append(exc)
                    else:
                        assert when == "while the rest waits"
                        assert stream.error is not None
                        failures.append(stream.error)
                        await stream.aclose()

                nursery.start_soon(open_stream)
                acceptor = await pair.accepted.receive()
                if when == "while the rest waits":
                    await acceptor.accept()
                await trio.testing.wait_all_tasks_blocked()
                pair.connector.abort("connector went away")
            (failure,) = failures
            assert failure.code == ResetCode.NOT_CONNECTED
            assert pair.gateway.stream_count == 0


@pytest.mark.parametrize("size", [100, 5000])
async def test_a_peer_that_never_answers_times_the_open_out_and_drops_the_first_data(
    size: int, autojump_clock: trio.testing.MockClock
) -> None:
    """stream_open_timeout 1 s, peer window 1000, the peer never answers: BACKEND_TIMEOUT
    after 1 s (first bytes within the window or beyond it); the peer's stream is reset
    ("opener gave up waiting") and holds none of the bytes."""
    gateway = TunnelSettings(stream_open_timeout=1.0)
    with trio.fail_after(GUARD):
        async with tunnel_pair(gateway, window(1000), accept=False) as pair:
            started = trio.current_time()
            failures: list[StreamError] = []
            async with trio.open_nursery() as nursery:

                async def open_stream() -> None:
                    with pytest.raises(StreamError) as info:
                        await pair.gateway.open_stream(
                            {"protocol": "test"}, first_data=os.urandom(size)
                        )
                    failures.append(info.value)

                nursery.start_soon(open_stream)
                acceptor = await pair.accepted.receive()
            took = trio.current_time() - started
            (failure,) = failures
            assert failure.code == ResetCode.BACKEND_TIMEOUT
            assert 1.0 <= took < 1.5
            await trio.testing.wait_all_tasks_blocked()
            assert acceptor.error is not None
            assert (acceptor.error.code, acceptor.error.reason) == (
                ResetCode.CANCELLED,
                "opener gave up waiting",
            )
            await assert_dropped(acceptor)
            assert pair.gateway.stream_count == 0


async def test_an_open_that_does_not_wait_for_the_accept_is_bounded_by_the_open_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """wait_accepted=False, first bytes beyond the peer's window, a peer that never answers:
    open_stream returns, or fails with BACKEND_TIMEOUT, within stream_open_timeout (1 s)."""
    gateway = TunnelSettings(stream_open_timeout=1.0)
    with trio.fail_after(GUARD):
        async with tunnel_pair(gateway, window(1000), accept=False) as pair:
            outcome: list[object] = []
            with trio.move_on_after(5.0):
                try:
                    outcome.append(
                        await pair.gateway.open_stream(
                            {"protocol": "test"}, wait_accepted=False, first_data=os.urandom(5000)
                        )
                    )
                except StreamError as exc:
                    outcome.append(exc.code)
            assert outcome, "open_stream(wait_accepted=False) still waited for the peer after 5 s"
            assert isinstance(outcome[0], TunnelStream) or outcome[0] == ResetCode.BACKEND_TIMEOUT


async def test_data_behind_an_open_the_mux_refuses_is_dropped_and_the_tunnel_lives() -> None:
    """The connector's mux refuses an OPEN itself (max_stream_opens_per_second) with the first
    bytes right behind it: the opener gets REFUSED, the DATA for the refused stream is dropped
    without a protocol error, and the tunnel and its other stream go on."""
    connector = TunnelSettings(mux=MuxSettings(max_stream_opens_per_second=1))
    with trio.fail_after(GUARD):
        async with tunnel_pair(None, connector) as pair:
            first = await pair.gateway.open_stream({"protocol": "test"}, first_data=b"one")
            acceptor = await pair.accepted.receive()
            with pytest.raises(StreamError) as info:
                await pair.gateway.open_stream(
                    {"protocol": "test"}, first_data=os.urandom(FIRST_DATA_LIMIT)
                )
            assert info.value.code == ResetCode.REFUSED
            await first.send_all(b" two")
            assert await read_exactly(acceptor, 7) == b"one two"
            assert not pair.gateway.closed
            assert not pair.connector.closed
            assert (pair.gateway.stream_count, pair.connector.stream_count) == (1, 1)


async def test_on_a_congested_tunnel_the_first_data_follows_the_accept_whole() -> None:
    """The gateway's output queue is at its high-water mark when the stream opens (its writer
    stuck in a send, a CONTROL document queued behind): the first bytes cannot go with the
    OPEN; once the queue drains they follow the ACCEPT, whole and in order."""
    gateway = TunnelSettings(output_high_water=64 * 1024)
    data = os.urandom(5000)
    padding = {"padding": "x" * 100_000}
    with trio.fail_after(GUARD):
        async with tunnel_pair(gateway) as pair, trio.open_nursery() as nursery:
            pair.gateway_transport.hold_sends()
            pair.gateway.send_control(padding)  # the writer takes it and waits in its send
            await trio.testing.wait_all_tasks_blocked()
            pair.gateway.send_control(padding)  # queued: at the high-water mark
            assert pair.gateway._mux.pending_bytes >= gateway.output_high_water
            opened: list[TunnelStream] = []

            async def open_stream() -> None:
                opened.append(await pair.gateway.open_stream({"protocol": "t"}, first_data=data))

            nursery.start_soon(open_stream)
            await trio.testing.wait_all_tasks_blocked()
            (stream_id,) = pair.gateway._streams
            assert pair.gateway._mux.queued_data(stream_id) == 0  # none went with the OPEN
            pair.gateway_transport.release_sends()
            acceptor = await pair.accepted.receive()
            assert await read_exactly(acceptor, len(data)) == data
        assert len(opened) == 1


# --------------------------------------------------------------------------- the port forward


@pytest.mark.parametrize("connector_window", [1024 * 1024, 16 * 1024, 1000])
async def test_a_client_that_sent_more_than_the_limit_before_the_open_gets_every_byte_once(
    connector_window: int,
) -> None:
    """The client wrote FIRST_DATA_LIMIT + 10,000 bytes before the gateway accepted it: the
    forward hands exactly the first FIRST_DATA_LIMIT to open_stream; the echo returns every
    byte once, in order, also against a connector window below the limit."""
    before = os.urandom(FIRST_DATA_LIMIT + 10_000)
    after = os.urandom(30_000)
    with trio.fail_after(GUARD):
        async with tunnel_pair(None, window(connector_window)) as pair, echoing(pair):
            services = RecordingServices(pair)
            async with serving(forward(services, ECHO)) as served:
                served.listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                client = wrapped(send_before_the_open(served.listener.port, before))
                echoed: list[bytes] = []
                async with client, trio.open_nursery() as nursery:

                    async def read() -> None:
                        echoed.append(await read_to_end(client))

                    nursery.start_soon(read)
                    await client.send_all(after)
                    await client.send_eof()
                assert echoed == [before + after]
                await served.assert_all_closed()
            assert services.first_data == [before[:FIRST_DATA_LIMIT]]


async def test_a_client_that_half_closed_before_the_open_still_gets_the_answer() -> None:
    """Connected and half-closed without a byte before the open (a client that only reads a
    server's greeting): no first data, a stream is opened and ends with a clean FIN, the
    backend's answer reaches the client, and the forward closes its socket."""
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair:
            services = RecordingServices(pair)
            async with serving(forward(services, ECHO)) as served:
                raw = socket.create_connection(("127.0.0.1", served.listener.port))
                raw.shutdown(socket.SHUT_WR)
                client = wrapped(raw)
                acceptor = await pair.accepted.receive()
                assert await how_it_ends(acceptor) == "fin"
                await acceptor.send_all(b"220 greeting\r\n")
                await acceptor.aclose()
                async with client:
                    assert await read_to_end(client) == b"220 greeting\r\n"
                await served.assert_all_closed()
            assert services.first_data == [b""]


async def test_a_client_that_sent_and_then_reset_before_the_open_resets_its_stream() -> None:
    """The client's bytes and then its RST came before the open: the bytes go with the OPEN,
    the reset still reaches the splice's read, and the stream ends reset ("the client connection
    broke"), never with a clean FIN."""
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, recording_ends(pair) as endings:
            services = RecordingServices(pair)
            async with serving(forward(services, ECHO)) as served:
                reset_socket(send_before_the_open(served.listener.port, REQUEST))
                await served.assert_all_closed()
            assert endings == ["reset CANCELLED: the client connection broke"]
            assert services.first_data == [REQUEST]


async def test_a_client_reset_before_the_open_never_ends_a_stream_cleanly() -> None:
    """Connected and reset (RST, no byte) before the open: a stream opened for it ends reset
    ("the client connection broke"), as the splice reported it before first_data, never with a
    clean FIN (opening no stream at all would do too)."""
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, recording_ends(pair) as endings:
            services = RecordingServices(pair)
            async with serving(forward(services, ECHO)) as served:
                reset_socket(send_before_the_open(served.listener.port, b""))
                await served.assert_all_closed()
            assert endings in ([], ["reset CANCELLED: the client connection broke"])


async def test_a_refused_client_that_spoke_first_is_reset_as_before() -> None:
    """A client that wrote before the open to a forward whose open is refused sees its
    connection reset, not an orderly end."""
    with trio.fail_after(GUARD):
        services = RecordingServices()
        async with serving(forward(services, REFUSE)) as served:
            client = wrapped(send_before_the_open(served.listener.port, REQUEST))
            async with client:
                with pytest.raises(trio.BrokenResourceError):
                    await client.receive_some()
            await served.assert_all_closed()


async def test_the_forwards_refusal_warning_is_the_same_whether_the_client_spoke_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One WARNING line per refused connection, naming the forward, the client and the
    StreamError, for a client that wrote before the open as for one that did not; nothing
    logged as an unexpected failure."""
    caplog.set_level(logging.DEBUG, logger="backchannel.tcp")
    with trio.fail_after(GUARD):
        services = RecordingServices()
        async with serving(forward(services, REFUSE)) as served:
            spoke_first = wrapped(send_before_the_open(served.listener.port, REQUEST))
            async with spoke_first:
                await read_to_end(spoke_first)
            await served.assert_all_closed()
            silent = await served.connect()
            async with silent:
                await read_to_end(silent)
            await served.assert_all_closed()
    assert services.first_data == [REQUEST, b""]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    pattern = (
        re.escape(f"forward {served.door.name} from 127.0.0.1:")
        + r"\d+"
        + re.escape(": BACKEND_UNREACHABLE: no route")
    )
    for record in warnings:
        assert re.fullmatch(pattern, record.getMessage()), record.getMessage()


async def test_a_gateway_services_written_before_first_data_still_serves_a_forward() -> None:
    """A fake GatewayServices without first_data serves a forward whose client speaks only
    after the stream is open (nothing to send with the OPEN)."""
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, echoing(pair):
            services = ServicesBeforeFirstData(pair)
            async with serving(forward(services, ECHO)) as served:
                client = await served.connect()
                async with client:
                    await served.settle()
                    await client.send_all(REQUEST)
                    await client.send_eof()
                    assert await read_to_end(client) == REQUEST
                await served.assert_all_closed()


# --------------------------------------------------------------------------- a real pair


async def open_with(
    pair: Pair, target: str, first_data: bytes, *, protocol: str = "tcp", wait: bool = True
) -> TunnelStream:
    host, port = target.rsplit(":", 1)
    return await pair.gateway.open_stream(
        APP,
        protocol=protocol,
        target=HostPort(host, int(port)),
        first_data=first_data,
        wait_accepted=wait,
    )


async def exchange(stream: TunnelStream, after: bytes) -> bytes:
    """Send ``after`` and FIN on ``stream`` while reading it to its end; what was read."""
    received: list[bytes] = []
    async with stream, trio.open_nursery() as nursery:

        async def read() -> None:
            received.append(await read_until_eof(stream))

        nursery.start_soon(read)
        if after:
            await stream.send_all(after)
        await stream.send_eof()
    return received[0]


async def test_the_tcp_handler_writes_held_bytes_first_against_the_smallest_window(
    tmp_path: Path,
) -> None:
    """Connector window 16 KiB (the least [tunnel] initial_window allows): through
    open_stream and through the port forward (a client that wrote 70 KiB before the open),
    the echo backend gets the first bytes first, then the rest, each once."""
    before = os.urandom(FIRST_DATA_LIMIT + 6000)
    after = os.urandom(50_000)
    connector_tunnel = {
        "reconnect_min_delay": 0.05,
        "reconnect_max_delay": 0.2,
        "initial_window": 16 * 1024,
    }
    async with echo_server() as port:
        mappings = [tcp_mapping("echo.virtual:7", f"127.0.0.1:{port}")]
        forwards = [{"listen": "127.0.0.1:0", "subaccount": "acme", "target": "echo.virtual:7"}]
        async with running_pair(
            tmp_path, mappings, forwards=forwards, connector_tunnel=connector_tunnel
        ) as pair:
            with trio.fail_after(GUARD):
                stream = await open_with(pair, "echo.virtual:7", before[:FIRST_DATA_LIMIT])
                assert await exchange(stream, after) == before[:FIRST_DATA_LIMIT] + after
                address = pair.forward()
                client = wrapped(send_before_the_open(address.port, before))
                received: list[bytes] = []
                async with client, trio.open_nursery() as nursery:

                    async def read() -> None:
                        received.append(await read_to_end(client))

                    nursery.start_soon(read)
                    await client.send_all(after)
                    await client.send_eof()
                assert received == [before + after]


async def test_data_and_fin_before_the_accept_reach_the_backend_in_order(tmp_path: Path) -> None:
    """wait_accepted=False, FIN right after the first bytes (both can reach the connector
    before its ACCEPT): the TCP handler writes the bytes, then half-closes the backend, which
    answers and closes."""
    data = os.urandom(40_000)
    async with echo_server() as port:
        mappings = [tcp_mapping("echo.virtual:7", f"127.0.0.1:{port}")]
        async with running_pair(tmp_path, mappings) as pair:
            with trio.fail_after(GUARD):
                stream = await open_with(pair, "echo.virtual:7", data, wait=False)
                async with stream:
                    await stream.send_eof()
                    assert await read_until_eof(stream) == data
                    assert stream.error is None


@asynccontextmanager
async def tls_recording_echo(tls: TlsMaterial) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TLS echo server on 127.0.0.1 (certificate of ``tls``) that also keeps what each
    connection sent after its handshake; yields (port, one entry per connection)."""
    context = server_ssl_context(tls.cert_file, tls.key_file)
    received: list[bytes] = []

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            await stream.do_handshake()
            index = len(received)
            received.append(b"")
            while data := await stream.receive_some(65536):
                received[index] += data
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], received
        nursery.cancel_scope.cancel()


async def test_a_tcps_backend_gets_the_first_data_over_tls_and_an_untrusted_one_nothing(
    tmp_path: Path,
) -> None:
    """A tcps mapping: the held bytes go through the backend's TLS first (echoed back whole).
    A tcps mapping whose backend certificate is not trusted: BACKEND_UNREACHABLE, and no TLS
    session carries any byte."""
    tls = tls_material(tmp_path / "tls")
    data = os.urandom(30_000)
    async with tls_recording_echo(tls) as (port, received):
        mappings = [
            tcp_mapping("tls.virtual:636", f"localhost:{port}", "tcps", ca_file=str(tls.ca_file)),
            tcp_mapping("untrusted.virtual:636", f"localhost:{port}", "tcps"),
        ]
        async with running_pair(tmp_path, mappings) as pair:
            with trio.fail_after(GUARD):
                with pytest.raises(StreamError) as info:
                    await open_with(pair, "untrusted.virtual:636", b"SECRET")
                assert info.value.code == ResetCode.BACKEND_UNREACHABLE
                assert received == []
                stream = await open_with(pair, "tls.virtual:636", data)
                async with stream:
                    await stream.send_all(b"+more")
                    assert await read_exactly(stream, len(data) + 5) == data + b"+more"
    assert received == [data + b"+more"]


def without_time(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in line.items() if k != "time"} for line in lines]


async def test_refusals_with_first_data_are_audited_logged_and_raised_as_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refusal (unmapped port, unsupported protocol, unreachable backend) is opened once
    without first bytes and once with 64 KiB of them: the same StreamError, the same new audit
    lines on the gateway and on the connector (allowed lines included), the same connector log
    lines; the recording backend gets no connection; no stream is left on either tunnel."""
    caplog.set_level(logging.INFO, logger="backchannel")
    received: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        received.append(await read_to_end(stream))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, record, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        mappings = [
            tcp_mapping("rec.virtual:7000", f"127.0.0.1:{port}"),
            tcp_mapping("dead.virtual:7000", f"127.0.0.1:{dead_port()}"),
        ]
        async with running_pair(tmp_path, mappings) as pair:
            pair.gateway.audit._config = AuditConfig(pair.gateway_audit, True)
            pair.connector.audit._config = AuditConfig(pair.connector_audit, True)
            cases = [
                ("tcp", "rec.virtual:7001"),  # no mapping for the port
                ("ldap", "rec.virtual:7000"),  # no plugin for the protocol
                ("tcp", "dead.virtual:7000"),  # mapped, the backend refuses the connection
            ]
            with trio.fail_after(GUARD):
                for protocol, target in cases:
                    outcomes = []
                    for first_data in (b"", os.urandom(FIRST_DATA_LIMIT)):
                        gateway_seen = len(audit_lines(pair.gateway_audit))
                        connector_seen = len(audit_lines(pair.connector_audit))
                        caplog.clear()
                        with pytest.raises(StreamError) as info:
                            await open_with(pair, target, first_data, protocol=protocol)
                        await trio.testing.wait_all_tasks_blocked()
                        host = target.split(":")[0]
                        logged = [
                            (r.name, r.levelno, r.getMessage())
                            for r in caplog.records
                            if r.name != "backchannel.audit" and host in r.getMessage()
                        ]
                        outcomes.append(
                            (
                                info.value.code,
                                info.value.reason,
                                without_time(audit_lines(pair.gateway_audit)[gateway_seen:]),
                                without_time(audit_lines(pair.connector_audit)[connector_seen:]),
                                logged,
                            )
                        )
                    assert outcomes[0] == outcomes[1], (protocol, target)
                    assert outcomes[0][2], "the refusal was audited on the gateway"
                    assert outcomes[0][3], "and on the connector"
                tunnel = await pair.connector.wait_connected()
                gateway_tunnel = pair.gateway.registry.lookup("acme", "")
                assert gateway_tunnel is not None
                assert gateway_tunnel.tunnel is not None
                assert tunnel.stream_count == 0
                assert gateway_tunnel.tunnel.stream_count == 0
        nursery.cancel_scope.cancel()
    assert received == []


async def test_a_stream_broken_after_its_accept_is_audited_the_same_with_first_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connector window 16 KiB; its TCP handler accepts and then resets the stream (as when the
    backend connection breaks at once): the gateway's audit lines and open_stream's outcome are
    the same with 64 KiB of first bytes as without them."""

    async def accept_then_break(session: Any, stream: TunnelStream) -> None:
        await stream.accept()
        await stream.reset(ResetCode.BACKEND_UNREACHABLE, "the backend connection broke")

    connector_tunnel = {
        "reconnect_min_delay": 0.05,
        "reconnect_max_delay": 0.2,
        "initial_window": 16 * 1024,
    }
    async with echo_server() as port:
        mappings = [tcp_mapping("echo.virtual:7", f"127.0.0.1:{port}")]
        async with running_pair(tmp_path, mappings, connector_tunnel=connector_tunnel) as pair:
            pair.gateway.audit._config = AuditConfig(pair.gateway_audit, True)
            pair.connector.audit._config = AuditConfig(pair.connector_audit, True)
            monkeypatch.setattr(pair.connector.handlers["tcp"], "handle", accept_then_break)
            outcomes = []
            with trio.fail_after(GUARD):
                for first_data in (b"", os.urandom(FIRST_DATA_LIMIT)):
                    seen = len(audit_lines(pair.gateway_audit))
                    try:
                        stream = await open_with(pair, "echo.virtual:7", first_data)
                    except StreamError as exc:
                        outcome = f"raised {exc.code.name}"
                    else:
                        await stream.aclose()
                        outcome = "returned"
                    lines = audit_lines(pair.gateway_audit)[seen:]
                    outcomes.append((outcome, [line["decision"] for line in lines]))
    assert outcomes[0] == ("returned", ["allow"])
    assert outcomes[1] == outcomes[0]


# --------------------------------------------------------------------------- the HTTP handler


async def test_the_http_handler_serves_requests_that_came_with_the_open(
    nursery: trio.Nursery,
) -> None:
    """The HTTP plugin's connector handler gets a stream whose OPEN came with two requests and
    the FIN (a gateway may send that): it accepts, refuses the denied path with 403 without the
    backend, forwards the allowed one, and ends the stream."""
    backend = await start_backend(nursery)
    audit = RecordingAudit()
    session = http_session(backend.port, audit)
    host = b"Host: erp.virtual:8000\r\n"
    requests = (
        b"GET /private HTTP/1.1\r\n" + host + b"\r\n" + b"GET /exact HTTP/1.1\r\n" + host + b"\r\n"
    )
    metadata = {"protocol": "http", "host": "erp.virtual", "port": 8000, "attributes": {}}
    with trio.fail_after(GUARD):
        async with tunnel_pair(accept=False) as pair, trio.open_nursery() as inner:
            opener = await pair.gateway.open_stream(
                metadata, wait_accepted=False, first_data=requests
            )
            await opener.send_eof()
            acceptor = await pair.accepted.receive()
            await trio.testing.wait_all_tasks_blocked()
            assert acceptor.buffered == len(requests)  # held until the handler accepts

            async def handle() -> None:
                try:
                    await HttpHandler(connect_timeout=5).handle(session, acceptor)
                finally:
                    await acceptor.aclose()

            inner.start_soon(handle)
            answer = await read_until_eof(opener)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert answer.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 200 " in answer
    assert [r["target"] for r in backend.requests] == ["/exact"]
    assert [d["path"] for d in audit.denials_seen] == ["/private"]
