"""The stub ABAP system on TCP: one logon per connection, then calls, in ``_stub_protocol`` form.

Port convention: a real application server's gateway listens on 33NN for system number NN
(``sysnr="00"`` -> 3300), and ``Connection`` derives its port that way.  Tests pass port 0 and
hand the bound port to ``Connection(port=...)`` instead.

Calls run synchronously in the connection's trio task: the simulated modules are pure and fast,
so a slow module would stall every connection of this server (acceptable for a stub).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ._descriptions import decode_params, encode_params
from ._errors import RFCLibError, RfcRc, to_wire
from ._stub_protocol import (
    AWAITING_LOGON,
    CLOSED,
    TRANSITIONS,
    MessageDecoder,
    StubProtocolError,
    description_to_wire,
    encode_message,
)
from ._system import AbapSystem, Session

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 65536


def _protocol_error(message: str) -> RFCLibError:
    return RFCLibError(
        message, RfcRc.RFC_INVALID_PROTOCOL, "RFC_INVALID_PROTOCOL", "", "", "", "", "", "", ""
    )


class StubSession:
    """One connection's server side, sans-IO: a request dict in, a response dict out."""

    def __init__(self, system: AbapSystem) -> None:
        self.system = system
        self.state = AWAITING_LOGON
        self.session: Session | None = None

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The response to ``request``; after it, ``state`` may be CLOSED."""
        op = request.get("op")
        next_state = TRANSITIONS[self.state].get(op) if isinstance(op, str) else None
        if next_state is None:
            failed_state, self.state = self.state, CLOSED
            return _error(_protocol_error(f"operation {op!r} not allowed in state {failed_state}"))
        try:
            response = self._dispatch(op, request)
        except Exception as exc:
            if self.state == AWAITING_LOGON:
                self.state = CLOSED  # a failed logon ends the connection, as on a real gateway
            return _error(exc)
        self.state = next_state
        return response

    def _dispatch(self, op: Any, request: dict[str, Any]) -> dict[str, Any]:
        if op == "logon":
            self.session = self.system.logon(
                str(request.get("client", "")),
                user=request.get("user"),
                passwd=request.get("passwd"),
                x509cert=request.get("x509cert"),
                lang=str(request.get("lang") or "E"),
            )
            return {
                "ok": True,
                "sysid": self.system.sysid,
                "release": self.system.release,
                "client": self.session.client,
                "user": self.session.user,
                "language": self.session.language,
            }
        assert self.session is not None  # TRANSITIONS admits nothing else before logon
        if op == "describe":
            fd = self.system.describe(str(request["name"]))
            return {"ok": True, "description": description_to_wire(fd)}
        if op == "call":
            fd = self.system.describe(str(request["name"]))
            params = decode_params(fd, request.get("params", {}))
            result = self.system.call(
                self.session,
                fd.name,
                params,
                return_import_params=bool(request.get("return_import_params", False)),
            )
            return {"ok": True, "result": encode_params(fd, result)}
        return {"ok": True}  # ping, close


def _error(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": to_wire(exc)}


async def _serve_connection(system: AbapSystem, stream: trio.SocketStream) -> None:
    stub = StubSession(system)
    decoder = MessageDecoder()
    async with stream:
        try:
            while stub.state != CLOSED:
                try:
                    request = decoder.next_message()
                except StubProtocolError as exc:
                    await stream.send_all(encode_message(_error(_protocol_error(str(exc)))))
                    return
                if request is None:
                    if decoder.at_eof:
                        return
                    decoder.receive_data(await stream.receive_some(_RECEIVE_SIZE))
                    continue
                response = stub.handle(request)
                try:
                    data = encode_message(response)
                except StubProtocolError as exc:
                    data = encode_message(_error(_protocol_error(str(exc))))
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; nothing to answer
        except Exception:
            # One broken connection must never take the server down.
            log.exception("stub connection failed")


async def serve_stub(
    system: AbapSystem,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``system`` on ``host:port`` (0: any free port) until cancelled; reports the port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            trio.serve_listeners, lambda stream: _serve_connection(system, stream), listeners
        )
        task_status.started(listeners[0].socket.getsockname()[1])
