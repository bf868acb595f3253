"""Stub-protocol messages over a trio stream: the async twin of the blocking client's socket loop.

Used wherever RFC messages cross trio code: the connector's handler (server side of a tunnel
stream), the gateway's front door (reading the first message before routing) and the JSON
endpoint (client side of a tunnel stream).
"""

from __future__ import annotations

import json
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
        while (message := self._next_message()) is None:
            if self._decoder.at_eof:
                return None
            self._decoder.receive_data(await self.stream.receive_some(RECEIVE_SIZE))
        return message

    async def watch_for_hangup(self) -> bool:
        """Read ahead while a request is being worked on: True once the peer has closed or
        broken the stream (nobody waits for the answer any more).

        Bytes that arrive meanwhile (a pipelined request) are kept for :meth:`receive`; after
        ``max_size`` of them watching stops and this returns False, so a peer cannot make us
        buffer more than one message while we are busy.
        """
        taken = 0
        while taken <= self._max_size:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self._decoder.receive_data(data)
            if not data:
                return True
            taken += len(data)
        return False

    def _next_message(self) -> dict[str, Any] | None:
        """The decoder's next message, with what the JSON parser lets through also refused:
        numbers longer than Python converts and nesting deeper than it parses (which it raises
        as ValueError and RecursionError) and lone surrogates (which no answer could carry,
        since a str holding one cannot be encoded as UTF-8)."""
        try:
            message = self._decoder.next_message()
            if message is not None:
                json.dumps(message, ensure_ascii=False, check_circular=False).encode()
        except UnicodeEncodeError as exc:
            raise StubProtocolError("message holds a lone surrogate, which is not Unicode") from exc
        except RecursionError as exc:
            raise StubProtocolError("message is nested too deeply") from exc
        except ValueError as exc:  # int() refuses numbers of more than 4300 digits
            raise StubProtocolError("message holds a number too long to convert") from exc
        return message

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message (StubProtocolError if it exceeds the size limit, or holds a string
        that UTF-8 cannot carry, as a backend's broken data may)."""
        try:
            data = encode_message(message, max_size=self._max_size)
        except UnicodeEncodeError as exc:
            raise StubProtocolError("message holds a lone surrogate, which is not Unicode") from exc
        await self.stream.send_all(data)

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
