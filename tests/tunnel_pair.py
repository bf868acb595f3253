"""Two Tunnels joined by an in-memory WebSocket (no sockets, no TLS), for stream-level tests.

The ``gateway`` side (mux initiator=False) opens streams; the ``connector`` side (initiator=True)
accepts them and hands each one to the test through :meth:`TunnelPair.open_pair`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing
import trio_websocket

from backchannel._proto._events import HelloReceived
from backchannel._proto._mux import Mux
from backchannel._stream import TunnelStream
from backchannel._transport import closed_reason
from backchannel._tunnel import Tunnel, TunnelSettings

RECEIVE_BUFFER = 256 * 1024
MAX_MESSAGE = 16 * 1024 * 1024


class GatedTransport:
    """A WebSocket whose sending the test can hold (a peer that stopped reading) and which
    can inject raw messages (a peer that breaks the protocol)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._open = trio.Event()
        self._open.set()

    def hold_sends(self) -> None:
        """From now on ``send_message`` waits until :meth:`release_sends`."""
        self._open = trio.Event()

    def release_sends(self) -> None:
        self._open.set()

    async def inject(self, message: bytes) -> None:
        """Send ``message`` as it is, bypassing the mux."""
        await self.ws.send_message(message)

    async def send_message(self, message: bytes) -> None:
        await self._open.wait()
        await self.ws.send_message(message)

    async def get_message(self) -> bytes | str:
        return await self.ws.get_message()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self.ws.aclose(code, reason)


@dataclass
class TunnelPair:
    """A running pair of tunnels; the gateway side opens, the connector side accepts."""

    gateway: Tunnel
    connector: Tunnel
    accepted: trio.MemoryReceiveChannel[TunnelStream]
    gateway_transport: GatedTransport
    connector_transport: GatedTransport

    async def open_pair(
        self, metadata: dict[str, Any] | None = None, *, wait_accepted: bool = True
    ) -> tuple[TunnelStream, TunnelStream]:
        """Open a stream from the gateway side; return (opener's end, acceptor's end)."""
        opener = await self.gateway.open_stream(
            metadata or {"protocol": "test"}, wait_accepted=wait_accepted
        )
        acceptor = await self.accepted.receive()
        assert acceptor.stream_id == opener.stream_id
        return opener, acceptor


async def _receive_hello(ws: trio_websocket.WebSocketConnection, mux: Mux) -> dict[str, Any]:
    while True:
        message = await ws.get_message()
        assert isinstance(message, bytes)
        for event in mux.receive_data(message):
            if isinstance(event, HelloReceived):
                return event.info


@asynccontextmanager
async def tunnel_pair(
    gateway_settings: TunnelSettings | None = None,
    connector_settings: TunnelSettings | None = None,
    *,
    accept: bool = True,
) -> AsyncIterator[TunnelPair]:
    """Handshaken tunnels over ``memory_stream_pair``, running until the block exits.

    With ``accept=False`` the connector side hands streams over unanswered (the test accepts
    or resets them itself).
    """
    gateway_settings = gateway_settings or TunnelSettings()
    connector_settings = connector_settings or TunnelSettings()
    client_raw, server_raw = trio.testing.memory_stream_pair()
    send_accepted, receive_accepted = trio.open_memory_channel[TunnelStream](1000)

    async def hand_over(stream: TunnelStream) -> None:
        if accept:
            await stream.accept()
        await send_accepted.send(stream)
        # The tunnel closes the stream when its handler returns: keep it alive for the test,
        # which closes it itself; tearing the pair down cancels this.
        await trio.sleep_forever()

    async with trio.open_nursery() as ws_nursery:
        server_ws: list[trio_websocket.WebSocketConnection] = []

        async def serve_upgrade() -> None:
            request = await trio_websocket.wrap_server_stream(
                ws_nursery,
                server_raw,
                max_message_size=MAX_MESSAGE,
                receive_buffer_size=RECEIVE_BUFFER,
            )
            server_ws.append(await request.accept())

        async with trio.open_nursery() as upgrade:
            upgrade.start_soon(serve_upgrade)
            client_ws = await trio_websocket.wrap_client_stream(
                ws_nursery,
                client_raw,  # type: ignore[arg-type]  # any trio stream works
                "localhost",
                "/tunnel",
                max_message_size=MAX_MESSAGE,
                receive_buffer_size=RECEIVE_BUFFER,
            )
        gateway_ws = server_ws[0]

        # The initiator (connector) sends HELLO first; the gateway answers after reading it.
        connector_mux = Mux(initiator=True, settings=connector_settings.mux)
        gateway_mux = Mux(initiator=False, settings=gateway_settings.mux)
        connector_mux.send_hello({"role": "connector"})
        await client_ws.send_message(connector_mux.data_to_send())
        connector_info = await _receive_hello(gateway_ws, gateway_mux)
        gateway_mux.send_hello({"role": "gateway"})
        await gateway_ws.send_message(gateway_mux.data_to_send())
        gateway_info = await _receive_hello(client_ws, connector_mux)

        gateway_transport, connector_transport = (
            GatedTransport(gateway_ws),
            GatedTransport(client_ws),
        )
        gateway = Tunnel(
            gateway_transport,
            gateway_mux,
            settings=gateway_settings,
            peer_info=connector_info,
            label="gateway",
            closed_translator=closed_reason,
        )
        connector = Tunnel(
            connector_transport,
            connector_mux,
            settings=connector_settings,
            peer_info=gateway_info,
            label="connector",
            stream_handler=hand_over,
            closed_translator=closed_reason,
        )
        async with trio.open_nursery() as tunnels:
            tunnels.start_soon(gateway.run)
            tunnels.start_soon(connector.run)
            try:
                yield TunnelPair(
                    gateway, connector, receive_accepted, gateway_transport, connector_transport
                )
            finally:
                gateway_transport.release_sends()
                connector_transport.release_sends()
                gateway.abort("test over")
                connector.abort("test over")
        ws_nursery.cancel_scope.cancel()
