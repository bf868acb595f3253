"""The stub ABAP system on TCP: one logon per connection, then calls, in ``_stub_protocol`` form;
and its gateway, where ``Server`` programs register and clients reach them by program id.

Port convention: a real application server's gateway listens on 33NN for system number NN
(``sysnr="00"`` -> 3300), and ``Connection`` derives its port that way.  Tests pass port 0 and
hand the bound port to ``Connection(port=...)`` instead.

Module calls run in worker threads, at most ``call_threads`` at a time, so a slow module
(RFC_PING_AND_WAIT) holds up only its own connection.  While a call runs, or a request waits for
a registered program's answer, the connection is watched: if the client hangs up, the request
is given up (a worker thread is abandoned; it finishes on its own and its result is dropped).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, Container, Iterator
from typing import Any, TypeVar

import trio

from ._descriptions import decode_params, encode_params
from ._errors import CommunicationError, RFCLibError, RfcRc, communication_failure, to_wire
from ._stub_protocol import (
    AWAITING_LOGON,
    CLOSED,
    GATEWAY_TRANSITIONS,
    LOGGED_ON,
    REGISTERED,
    MessageDecoder,
    StubProtocolError,
    description_to_wire,
    encode_message,
)
from ._system import AbapSystem, Session

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 65536
#: The requests of a client logged on to a registered program that the program answers.
_RELAYED_OPS = frozenset({"call", "describe", "ping"})
#: The partner release a client sees for a registered program: that of the NW RFC SDK.
_SDK_RELEASE = "753"
#: The longest program id a gateway registers (SM59's "Program ID" field).
_MAX_PROGRAM_ID = 64
_T = TypeVar("_T")


def _protocol_error(message: str) -> RFCLibError:
    return RFCLibError(
        message, RfcRc.RFC_INVALID_PROTOCOL, "RFC_INVALID_PROTOCOL", "", "", "", "", "", "", ""
    )


def program_not_registered(program_id: str, gateway: str) -> CommunicationError:
    """A logon naming a program id no server registered: the gateway's CPI-C return code 679
    (TP_NOTREGISTERED), in the layout the RFC library gives gateway errors."""
    return communication_failure(
        f"\nLOCATION    SAP-Gateway on host {gateway}"
        f"\nERROR       program {program_id} not registered"
        "\nCOMPONENT   SAP-Gateway"
        "\nRC          679"
        "\nMODULE      gwr3cpic.c"
        f"\nDETAIL      TP {program_id} not registered"
    )


class StubSession:
    """One connection's server side, sans-IO: a request dict in, a response dict out.

    ``programs`` holds the program ids registered at the gateway.  After a logon naming one of
    them (``tpname``), ``relayed`` gives the message that program answers instead, and
    ``relay_response`` turns its answer into the client's response.  After ``register``, the
    connection belongs to the program ``program_id`` (state REGISTERED).
    """

    def __init__(
        self,
        system: AbapSystem,
        programs: Container[str] = frozenset(),
        *,
        gateway: str = "localhost / sapgw00",
        peer: str = "",
    ) -> None:
        self.system = system
        self.programs = programs
        self.gateway = gateway
        self.peer = peer
        self.state = AWAITING_LOGON
        self.session: Session | None = None
        #: The program this connection reaches (``tpname`` logon) or registers (``register``).
        self.program_id: str | None = None
        self.functions: list[str] = []
        self._caller: dict[str, str] = {}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The response to ``request``; after it, ``state`` may be CLOSED or REGISTERED."""
        op = request.get("op")
        next_state = GATEWAY_TRANSITIONS[self.state].get(op) if isinstance(op, str) else None
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

    def relayed(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """The message for the registered program that answers ``request``, or None if this
        session answers it itself (``handle``)."""
        op = request.get("op")
        if self.state != LOGGED_ON or self.program_id is None or op not in _RELAYED_OPS:
            return None
        message: dict[str, Any] = {"op": op}
        if op in ("call", "describe"):
            message["name"] = str(request.get("name", ""))
        if op == "call":
            message["params"] = request.get("params", {})
            message["return_import_params"] = bool(request.get("return_import_params", False))
            message["connection"] = dict(self._caller)
        return message

    def relay_response(self, answer: dict[str, Any] | None) -> dict[str, Any]:
        """The client's response to the program's ``answer``; None means the program went away,
        which ends this connection as a broken conversation does."""
        if answer is None:
            self.state = CLOSED
            return _error(communication_failure(f"connection to program {self.program_id} broken"))
        return {k: v for k, v in answer.items() if k != "id"}

    def _dispatch(self, op: Any, request: dict[str, Any]) -> dict[str, Any]:
        if op == "logon":
            if request.get("tpname") is not None:
                return self._logon_to_program(request)
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
        if op == "register":
            return self._register(request)
        if op == "close":
            return {"ok": True}
        # GATEWAY_TRANSITIONS admits nothing else before logon; a program's clients go through
        # ``relayed`` for everything but close.
        assert self.session is not None
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
        return {"ok": True}  # ping

    def _logon_to_program(self, request: dict[str, Any]) -> dict[str, Any]:
        program_id = str(request["tpname"])
        if program_id not in self.programs:
            raise program_not_registered(program_id, self.gateway)
        self.program_id = program_id
        # The program is the partner, not the ABAP system: nobody checks the user here.
        self._caller = {
            "client": str(request.get("client", "")),
            "user": str(request.get("user", "")).upper(),
            "language": str(request.get("lang") or "E"),
            "partner_host": self.peer,
        }
        return {
            "ok": True,
            "sysid": "",
            "release": _SDK_RELEASE,
            "client": self._caller["client"],
            "user": self._caller["user"],
            "language": self._caller["language"],
        }

    def _register(self, request: dict[str, Any]) -> dict[str, Any]:
        program_id = request.get("program_id")
        functions = request.get("functions", [])
        if (
            not isinstance(program_id, str)
            or not 0 < len(program_id) <= _MAX_PROGRAM_ID
            or not isinstance(functions, list)
            or not all(isinstance(name, str) for name in functions)
        ):
            raise _protocol_error(
                f"register needs a program_id of 1 to {_MAX_PROGRAM_ID} characters"
                " and a list of function names"
            )
        self.program_id = program_id
        self.functions = functions
        return {"ok": True, "sysid": self.system.sysid}


def _error(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": to_wire(exc)}


@dataclasses.dataclass
class _Registration:
    """One registered server connection: the stub sends it requests and reads its answers."""

    program_id: str
    stream: trio.abc.Stream
    answers: trio.MemoryReceiveChannel[dict[str, Any]]
    lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    ids: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))


class _Gateway:
    """The server programs registered at one stub, by program id, and relaying to them.

    A program may register several connections; each answers one request at a time, and a
    request goes to an idle one if there is one.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._programs: dict[str, list[_Registration]] = {}

    def __contains__(self, program_id: object) -> bool:
        return program_id in self._programs

    async def serve_registration(
        self,
        program_id: str,
        functions: list[str],
        stream: trio.abc.Stream,
        decoder: MessageDecoder,
    ) -> None:
        """Keep ``stream`` registered for ``program_id`` until it ends, reading its answers."""
        send, receive = trio.open_memory_channel[dict[str, Any]](0)
        registration = _Registration(program_id, stream, receive)
        entries = self._programs.setdefault(program_id, [])
        entries.append(registration)
        log.info("program %s registered, serving %s", program_id, ", ".join(functions) or "-")
        try:
            async with send:
                while (answer := await _receive(stream, decoder)) is not None:
                    await send.send(answer)
        except StubProtocolError as exc:
            log.warning("program %s sent a bad message, registration dropped: %s", program_id, exc)
        finally:
            entries.remove(registration)
            if not entries and self._programs.get(program_id) is entries:
                del self._programs[program_id]
            log.info("program %s: registration ended", program_id)

    async def relay(self, program_id: str, message: dict[str, Any]) -> dict[str, Any] | None:
        """The program's answer to ``message``, or None if it has no registration left or its
        registration broke before answering."""
        entries = self._programs.get(program_id)
        if not entries:
            return None
        registration = next((r for r in entries if not r.lock.locked()), entries[0])
        async with registration.lock:
            request_id = next(registration.ids)
            data = encode_message({**message, "id": request_id})
            try:
                # Shielded: a message cut off half-way by a hang-up would garble the stream.
                with trio.CancelScope(shield=True):
                    await registration.stream.send_all(data)
                while True:
                    answer = await registration.answers.receive()
                    if answer.get("id") == request_id:
                        return answer
                    # else: the answer to a request whose client hung up before it came
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
                return None


@dataclasses.dataclass(frozen=True)
class _Stub:
    """What all connections of one ``serve_stub`` share."""

    system: AbapSystem
    gateway: _Gateway
    limiter: trio.CapacityLimiter


class _HungUp(Exception):
    """The client closed its connection while its request was being worked on."""


async def _receive(stream: trio.abc.Stream, decoder: MessageDecoder) -> dict[str, Any] | None:
    """The next message on ``stream``, or None at its end; StubProtocolError for bad bytes."""
    while (message := decoder.next_message()) is None:
        if decoder.at_eof:
            return None
        decoder.receive_data(await stream.receive_some(_RECEIVE_SIZE))
    return message


async def _unless_hangup(
    stream: trio.abc.Stream, decoder: MessageDecoder, work: Callable[[], Awaitable[_T]]
) -> _T:
    """``work()``'s result, or _HungUp if the client hangs up first (``work`` is cancelled).

    Bytes that arrive meanwhile are a pipelined request: they go to ``decoder`` and watching
    stops there, so a client cannot make the server buffer more than one read.
    """
    done: list[_T] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except trio.BrokenResourceError:
                data = b""
            decoder.receive_data(data)
            if not data:
                nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        done.append(await work())
        nursery.cancel_scope.cancel()
    if not done:
        raise _HungUp
    return done[0]


async def _respond(
    stub: _Stub,
    session: StubSession,
    request: dict[str, Any],
    stream: trio.abc.Stream,
    decoder: MessageDecoder,
) -> dict[str, Any]:
    message = session.relayed(request)
    if message is not None:
        program_id = session.program_id
        assert program_id is not None  # ``relayed`` gives a message only then

        async def relay() -> dict[str, Any] | None:
            return await stub.gateway.relay(program_id, message)

        return session.relay_response(await _unless_hangup(stream, decoder, relay))
    if request.get("op") == "call":

        async def call() -> dict[str, Any]:
            return await trio.to_thread.run_sync(
                session.handle, request, limiter=stub.limiter, abandon_on_cancel=True
            )

        return await _unless_hangup(stream, decoder, call)
    return session.handle(request)


def _peer_host(stream: trio.abc.Stream) -> str:
    if not isinstance(stream, trio.SocketStream):
        return ""
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return ""


async def _serve_connection(stub: _Stub, stream: trio.abc.Stream) -> None:
    session = StubSession(
        stub.system, stub.gateway, gateway=stub.gateway.name, peer=_peer_host(stream)
    )
    decoder = MessageDecoder()
    async with stream:
        try:
            while session.state not in (CLOSED, REGISTERED):
                try:
                    request = await _receive(stream, decoder)
                except StubProtocolError as exc:
                    await stream.send_all(encode_message(_error(_protocol_error(str(exc)))))
                    return
                if request is None:
                    return
                response = await _respond(stub, session, request, stream, decoder)
                try:
                    data = encode_message(response)
                except StubProtocolError as exc:
                    data = encode_message(_error(_protocol_error(str(exc))))
                await stream.send_all(data)
            if session.state == REGISTERED:
                assert session.program_id is not None  # set by the register request
                await stub.gateway.serve_registration(
                    session.program_id, session.functions, stream, decoder
                )
        except _HungUp:
            log.info("client hung up during a request; it was given up")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; nothing to answer
        except Exception:
            # One broken connection must never take the server down.
            log.exception("stub connection failed")


def _gateway_name(port: int) -> str:
    """``host / sapgwNN`` as a gateway names itself in errors (the port if not 33NN)."""
    service = f"sapgw{port - 3300:02d}" if 3300 <= port <= 3399 else str(port)
    return f"{socket.gethostname()} / {service}"


async def serve_stub(
    system: AbapSystem,
    host: str,
    port: int,
    *,
    call_threads: int = 32,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``system`` on ``host:port`` (0: any free port) until cancelled; reports the port.

    At most ``call_threads`` module calls run at once, each in a worker thread; more wait.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]
    stub = _Stub(system, _Gateway(_gateway_name(bound)), trio.CapacityLimiter(call_threads))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            trio.serve_listeners, lambda stream: _serve_connection(stub, stream), listeners
        )
        task_status.started(bound)
