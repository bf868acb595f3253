"""What a client sent before its stream was open goes with the OPEN (``first_data`` of
``Tunnel.open_stream`` and ``GatewayServices.open_stream``; the TCP port forward reads it).

Over the in-memory tunnel pair: the OPEN and the first bytes leave in one message; the peer
holds them until it accepts and drops them when it refuses; what the peer's initial window does
not take follows the ACCEPT; a cancelled open resets the stream. Through the port forward on a
real 127.0.0.1 listener: a client that wrote before the gateway accepted its connection has
those bytes handed to ``open_stream``, and the exchange is whole.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import trio
import trio.testing

from backchannel import AppIdentity, ResetCode, StreamError, TunnelStream
from backchannel._proto._frames import FrameType
from backchannel._proto._mux import MuxSettings
from backchannel._tunnel import TunnelSettings

from .test_send_at_once_review import frames_of, recorded_pair
from .test_serve_review import ECHO, Services, echo_pair, forward, read_to_end, serving
from .test_wslink_review import GUARD
from .tunnel_pair import tunnel_pair

REQUEST = b"GET /small HTTP/1.1\r\nHost: backend\r\n\r\n"


async def test_the_first_data_leaves_in_the_opens_message() -> None:
    with trio.fail_after(GUARD):
        async with recorded_pair(accept=False) as (pair, eager):
            await trio.testing.wait_all_tasks_blocked()
            eager.wire.clear()
            opener = await pair.gateway.open_stream(
                {"protocol": "test"}, wait_accepted=False, first_data=REQUEST
            )
            await trio.testing.wait_all_tasks_blocked()  # the recorder writes it out
            (message,) = frames_of(eager.wire)
            assert [(kind, sid) for kind, sid, _ in message] == [
                (FrameType.OPEN, opener.stream_id),
                (FrameType.DATA, opener.stream_id),
            ]
            assert message[1][2] == REQUEST
            acceptor = await pair.accepted.receive()
            await acceptor.accept()
            assert await acceptor.receive_some() == REQUEST


async def test_without_first_data_the_open_leaves_alone() -> None:
    with trio.fail_after(GUARD):
        async with recorded_pair(accept=False) as (pair, eager):
            await trio.testing.wait_all_tasks_blocked()
            eager.wire.clear()
            opener = await pair.gateway.open_stream({"protocol": "test"}, wait_accepted=False)
            await trio.testing.wait_all_tasks_blocked()
            kinds = [(kind, sid) for message in frames_of(eager.wire) for kind, sid, _ in message]
            assert kinds == [(FrameType.OPEN, opener.stream_id)]


async def test_the_peer_holds_the_first_data_until_it_accepts() -> None:
    with trio.fail_after(GUARD):
        async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
            opened: list[TunnelStream] = []

            async def open_and_wait() -> None:
                opened.append(
                    await pair.gateway.open_stream({"protocol": "test"}, first_data=REQUEST)
                )

            nursery.start_soon(open_and_wait)
            acceptor = await pair.accepted.receive()
            await trio.testing.wait_all_tasks_blocked()
            assert acceptor.buffered == len(REQUEST)  # here before the answer
            assert opened == []  # the opener still waits for it
            await acceptor.accept()
            assert await acceptor.receive_some() == REQUEST
            await trio.testing.wait_all_tasks_blocked()
            (opener,) = opened
            await opener.send_all(b"more")
            assert await acceptor.receive_some() == b"more"


async def test_a_refusal_drops_the_first_data_and_the_opener_hears_why() -> None:
    with trio.fail_after(GUARD):
        async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
            failures: list[StreamError] = []

            async def open_and_wait() -> None:
                try:
                    await pair.gateway.open_stream({"protocol": "test"}, first_data=REQUEST)
                except StreamError as exc:
                    failures.append(exc)

            nursery.start_soon(open_and_wait)
            acceptor = await pair.accepted.receive()
            await trio.testing.wait_all_tasks_blocked()
            assert acceptor.buffered == len(REQUEST)
            await acceptor.reset(ResetCode.ACCESS_DENIED, "not in the access control list")
            assert acceptor.buffered == 0
            await trio.testing.wait_all_tasks_blocked()
            (failure,) = failures
            assert failure.code == ResetCode.ACCESS_DENIED
            assert failure.reason == "not in the access control list"
            assert pair.gateway.stream_count == 0


@pytest.mark.parametrize("wait_accepted", [True, False])
async def test_what_the_peers_window_does_not_take_follows_the_accept(
    wait_accepted: bool,
) -> None:
    window = 1000
    connector = TunnelSettings(mux=MuxSettings(initial_window=window))
    data = os.urandom(5000)
    with trio.fail_after(GUARD):
        async with tunnel_pair(None, connector, accept=False) as pair:
            async with trio.open_nursery() as nursery:
                opened: list[TunnelStream] = []

                async def open_stream() -> None:
                    opened.append(
                        await pair.gateway.open_stream(
                            {"protocol": "test"}, wait_accepted=wait_accepted, first_data=data
                        )
                    )

                nursery.start_soon(open_stream)
                acceptor = await pair.accepted.receive()
                await trio.testing.wait_all_tasks_blocked()
                assert acceptor.buffered == window  # the rest waits for the answer
                assert opened == []  # open_stream returns once all of it is handed over
                await acceptor.accept()
                received = b""
                while len(received) < len(data):
                    received += await acceptor.receive_some()
                assert received == data
            assert len(opened) == 1


async def test_a_cancelled_open_resets_the_stream_and_its_first_data() -> None:
    with trio.fail_after(GUARD):
        async with tunnel_pair(accept=False) as pair:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        lambda: pair.gateway.open_stream({"protocol": "test"}, first_data=REQUEST)
                    )
                    acceptor = await pair.accepted.receive()
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert acceptor.error is not None
            assert acceptor.error.code == ResetCode.CANCELLED
            assert acceptor.buffered == 0
            assert pair.gateway.stream_count == 0


# --------------------------------------------------------------------------- the port forward


class RecordingServices(Services):
    """The review's fake services, recording each ``first_data`` the forward hands over."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.first_data: list[bytes] = []

    async def open_stream(
        self, app: AppIdentity, *, first_data: bytes = b"", **kwargs: Any
    ) -> TunnelStream:
        self.first_data.append(first_data)
        return await super().open_stream(app, first_data=first_data, **kwargs)


async def test_the_forward_sends_what_the_client_wrote_first_with_the_open() -> None:
    with trio.fail_after(GUARD):
        async with echo_pair() as pair:
            services = RecordingServices(pair)
            async with serving(forward(services, ECHO)) as served:
                # Connected and written before the gateway's task runs: the bytes are there
                # when the forward accepts the connection.
                raw = socket.create_connection(("127.0.0.1", served.listener.port))
                raw.sendall(REQUEST)
                raw.setblocking(False)
                client = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
                async with client:
                    await client.send_eof()
                    assert await read_to_end(client) == REQUEST
                await served.assert_all_closed()
                assert services.first_data == [REQUEST]


async def test_the_forward_opens_without_first_data_for_a_client_that_waits() -> None:
    with trio.fail_after(GUARD):
        async with echo_pair() as pair:
            services = RecordingServices(pair)
            async with serving(forward(services, ECHO)) as served:
                client = await served.connect()
                async with client:
                    await served.settle()  # the stream is open, nothing sent yet
                    assert services.first_data == [b""]
                    await client.send_all(REQUEST)
                    await client.send_eof()
                    assert await read_to_end(client) == REQUEST
                await served.assert_all_closed()


async def test_a_forward_whose_client_ended_before_the_open_still_closes_cleanly() -> None:
    with trio.fail_after(GUARD):
        async with echo_pair() as pair:
            services = RecordingServices(pair)
            async with serving(forward(services, ECHO)) as served:
                raw = socket.create_connection(("127.0.0.1", served.listener.port))
                raw.sendall(REQUEST)
                raw.shutdown(socket.SHUT_WR)  # the request and the end, both before the open
                raw.setblocking(False)
                client = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
                async with client:
                    assert await read_to_end(client) == REQUEST
                await served.assert_all_closed()
                assert services.first_data == [REQUEST]
