"""Stub-protocol messages over a trio stream: the async twin of the blocking client's socket loop.

Used wherever RFC messages cross trio code: the connector's handler (server side of a tunnel
stream), the gateway's front door (reading the first message before routing) and the JSON
endpoint (client side of a tunnel stream).
"""

from __future__ import annotations

from typing import Any

import trio

from ._errors import communication_failure, from_wire
from ._stub_protocol import MAX_MESSAGE_SIZE, MessageDecoder, StubProtocolError, encode_message

RECEIVE_SIZE = 65536


class MessageStream:
    """Send and receive whole stub-protocol messages on a byte stream."""

    def __init__(self, stream: trio.abc.Stream, *, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.stream = stream
        self._decoder = MessageDecoder(max_size=max_size)
        self._max_size = max_size

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None at a clean end of stream (between messages).

        Raises StubProtocolError for bytes that are not a message, and trio's
        BrokenResourceError if the stream breaks.
        """
        while (message := self._decoder.next_message()) is None:
            if self._decoder.at_eof:
                return None
            self._decoder.receive_data(await self.stream.receive_some(RECEIVE_SIZE))
        return message

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message (StubProtocolError if it exceeds the size limit)."""
        await self.stream.send_all(encode_message(message, max_size=self._max_size))

    def take_buffered(self) -> bytes:
        """Bytes received after the last message taken (to hand on when switching to a splice)."""
        return self._decoder.take_buffered()

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return its ``ok`` response; raise the pyrfc error it carries.

        A stream that ends or breaks before the answer is a CommunicationError, as in pyrfc.
        """
        try:
            await self.send(message)
            response = await self.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise communication_failure(f"connection to partner broken: {exc}") from exc
        except StubProtocolError as exc:
            raise communication_failure(str(exc)) from exc
        if response is None:
            raise communication_failure("connection closed by partner")
        if not response.get("ok"):
            raise from_wire(response.get("error", {}))
        return response
