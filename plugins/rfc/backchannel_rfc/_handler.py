"""Connector side: serve one cloud RFC connection (a tunnel stream) against an ABAP backend.

The stream carries the stub protocol (``_stub_protocol``): a logon, then describe / call /
ping requests, then close. The handler checks every function name against the mapping's
function rules before the backend sees it, runs each blocking backend call in a worker thread
on a pooled connection, and answers with the result or the backend's exception (class, code,
key and message fields). The internal host never appears in an answer: error texts naming it
are rewritten to the virtual host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from backchannel import Session, TableReader, TunnelStream

from ._backend import BackendConnection, BackendPool, Lease, is_alive
from ._descriptions import decode_params, encode_params
from ._errors import (
    CommunicationError,
    ExternalAuthorizationError,
    RFCLibError,
    RfcRc,
    library_error,
    to_wire,
)
from ._functions import FunctionRule, check_function, read_function_rules
from ._message_stream import MessageStream
from ._stub_protocol import (
    AWAITING_LOGON,
    CLOSED,
    MAX_MESSAGE_SIZE,
    TRANSITIONS,
    StubProtocolError,
    description_to_wire,
)

log = logging.getLogger("backchannel.rfc")

#: Extra time the worker thread gets beyond the call timeout before the connector gives up on
#: the backend connection itself (the backend client's own timeout should have fired first).
CANCEL_GRACE = 2.0
_LOGON_KEYS = ("client", "user", "passwd", "lang", "x509cert")


@dataclass(frozen=True, slots=True)
class RfcMappingOptions:
    """What an ``rfc`` mapping adds to the core's mapping keys."""

    functions: tuple[FunctionRule, ...]
    call_timeout: float


@dataclass(frozen=True, slots=True)
class HandlerSettings:
    """Connector-wide settings of the RFC handler (``[plugins.rfc]``)."""

    #: Default ``call_timeout`` of mappings that do not set their own.
    call_timeout: float = 60.0
    #: A session with no request for this long is closed.
    idle_timeout: float = 3600.0
    #: Largest request or answer, in bytes.
    max_message_size: int = MAX_MESSAGE_SIZE


def _protocol_error(message: str) -> RFCLibError:
    return library_error(RFCLibError, message, RfcRc.RFC_INVALID_PROTOCOL, "RFC_INVALID_PROTOCOL")


def _canceled(message: str) -> CommunicationError:
    return library_error(CommunicationError, message, RfcRc.RFC_CANCELED, "RFC_CANCELED")


class RfcHandler:
    """Handles streams of protocol ``rfc`` for mappings of protocol ``rfc``."""

    name = "rfc"
    mapping_protocols: tuple[str, ...] = ("rfc",)

    def __init__(
        self,
        pool: BackendPool,
        settings: HandlerSettings = HandlerSettings(),
        *,
        backend_kind: str = "stub",
    ) -> None:
        self.pool = pool
        self.settings = settings
        #: ``pyrfc`` (SAP's library) or ``stub`` (backchannel's client of the stub system).
        self.backend_kind = backend_kind
        log.info(
            "RFC backends are reached through %s",
            "SAP pyrfc" if backend_kind == "pyrfc" else "the stub client (pyrfc is not installed)",
        )

    def parse_mapping_options(self, mapping: TableReader) -> RfcMappingOptions:
        """``[[...mappings.functions]]`` rules and an optional ``call_timeout``."""
        mapping.string("protocol", required=True)
        functions = read_function_rules(mapping)
        call_timeout = mapping.number(
            "call_timeout", self.settings.call_timeout, minimum=0.01, maximum=86400
        )
        mapping.finish()
        return RfcMappingOptions(functions, call_timeout)

    async def aclose(self) -> None:
        """Close the pooled backend connections (called once when the connector stops)."""
        await self.pool.aclose()

    async def handle(self, session: Session, stream: TunnelStream) -> None:
        """Accept the stream and serve the RFC connection until it closes."""
        await stream.accept()
        server = _RfcConnection(
            self, session, MessageStream(stream, max_size=self.settings.max_message_size)
        )
        try:
            await server.serve()
        finally:
            with trio.CancelScope(shield=True):
                await server.release()


class _RfcConnection:
    """One cloud RFC connection: the protocol state, the leased backend connection."""

    def __init__(self, handler: RfcHandler, session: Session, messages: MessageStream) -> None:
        self.handler = handler
        self.pool = handler.pool
        self.session = session
        self.messages = messages
        options = session.mapping.options
        assert isinstance(options, RfcMappingOptions)
        self.options = options
        self.state = AWAITING_LOGON
        self.lease: Lease | None = None
        self.user = ""
        self.descriptions: dict[str, Any] = {}

    async def release(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            await self.pool.release(lease)

    async def serve(self) -> None:
        while self.state != CLOSED:
            with trio.move_on_after(self.handler.settings.idle_timeout) as idle:
                try:
                    request = await self.messages.receive()
                except StubProtocolError as exc:
                    await self._answer({"ok": False, "error": to_wire(_protocol_error(str(exc)))})
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if idle.cancelled_caught:
                log.info(
                    "%s: RFC connection idle for %g s, closed",
                    self.session.virtual,
                    self.handler.settings.idle_timeout,
                )
                return
            if request is None:
                return
            response = await self._respond(request)
            if not await self._answer(response):
                return

    async def _answer(self, response: dict[str, Any]) -> bool:
        try:
            await self.messages.send(response)
        except StubProtocolError as exc:
            await self.messages.send({"ok": False, "error": to_wire(_protocol_error(str(exc)))})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _respond(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        next_state = TRANSITIONS[self.state].get(op) if isinstance(op, str) else None
        if next_state is None:
            failed, self.state = self.state, CLOSED
            return _error(_protocol_error(f"operation {op!r} not allowed in state {failed}"))
        try:
            response = await self._dispatch(str(op), request)
        except Exception as exc:  # every failure goes back to the caller as a pyrfc error
            if self.state == AWAITING_LOGON:
                self.state = CLOSED  # a failed logon ends the connection, as on a real gateway
            if not isinstance(exc, (RFCLibError, TypeError)) and not _is_pyrfc_error(exc):
                log.exception("%s: RFC request %s failed", self.session.virtual, op)
            return _error(self._scrub(exc))
        self.state = next_state
        return response

    async def _dispatch(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        if op == "logon":
            return await self._logon(request)
        if op == "describe":
            name = self._check(str(request.get("name", "")), "describe")
            return {"ok": True, "description": description_to_wire(await self._describe(name))}
        if op == "call":
            return await self._call(request)
        if op == "ping":
            await self._backend_call(lambda c: c.ping(), None)
        return {"ok": True}  # ping, close

    async def _logon(self, request: dict[str, Any]) -> dict[str, Any]:
        logon = {k: str(request[k]) for k in _LOGON_KEYS if request.get(k) not in (None, "")}
        self.lease = await self.pool.lease(self.session.internal, logon)
        attributes = await self._backend_call(lambda c: c.get_connection_attributes(), None)
        self.user = str(attributes.get("user", ""))
        self.session.audit.allowed(
            "rfc_logon",
            **self._audit_fields(),
            client=str(attributes.get("client", "")),
            user=self.user,
        )
        return {
            "ok": True,
            "sysid": attributes.get("sysId", ""),
            "release": attributes.get("partnerRel", ""),
            "client": attributes.get("client", ""),
            "user": self.user,
            "language": attributes.get("language", ""),
        }

    def _check(self, function: str, action: str) -> str:
        decision = check_function(self.options.functions, function)
        fields = {
            **self._audit_fields(),
            "function": function[:64],
            "action": action,
            "user": self.user,
        }
        if not decision.allowed:
            self.session.audit.denied("rfc_call", decision.reason, **fields)
            raise library_error(
                ExternalAuthorizationError,
                f"Access denied to function module {function.upper()[:64]} on system "
                f"{self.session.virtual} by the connector: {decision.reason}",
                RfcRc.RFC_AUTHORIZATION_FAILURE,
                "RFC_AUTHORIZATION_FAILURE",
            )
        self.session.audit.allowed("rfc_call", **fields)
        return function.upper()

    async def _describe(self, name: str) -> Any:
        if name not in self.descriptions:
            self.descriptions[name] = await self._backend_call(
                lambda c: c.get_function_description(name), None
            )
        return self.descriptions[name]

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        name = self._check(str(request.get("name", "")), "call")
        description = await self._describe(name)
        params = decode_params(description, request.get("params") or {})
        timeout = self.options.call_timeout
        requested = request.get("timeout")
        if isinstance(requested, (int, float)) and requested > 0:
            timeout = min(timeout, float(requested))
        options: dict[str, Any] = {
            "return_import_params": bool(request.get("return_import_params", False)),
            "timeout": timeout,
        }
        not_requested = request.get("not_requested")
        if isinstance(not_requested, list) and not_requested:
            options["not_requested"] = [str(n) for n in not_requested]
        result = await self._backend_call(lambda c: c.call(name, options, **params), timeout)
        return {"ok": True, "result": encode_params(description, result)}

    async def _backend_call(
        self, function: Callable[[BackendConnection], Any], call_timeout: float | None
    ) -> Any:
        """Run ``function`` on the leased connection in a worker thread.

        With a ``call_timeout`` the backend client cancels the call itself; should it not return
        within CANCEL_GRACE after that, the connection is cancelled and given up here.
        """
        lease = self.lease
        assert lease is not None  # TRANSITIONS admits no backend request before logon
        connection = lease.connection
        limit = float("inf") if call_timeout is None else call_timeout + CANCEL_GRACE
        try:
            with trio.fail_after(limit):
                return await self.pool.run(lambda: function(connection))
        except trio.TooSlowError:
            lease.broken = True
            trio.lowlevel.start_thread_soon(connection.cancel, lambda _r: None)
            raise _canceled(
                f"call to {self.session.virtual} canceled after {call_timeout:g} s"
            ) from None
        except BaseException:
            if not is_alive(connection):
                lease.broken = True
            raise
        finally:
            if not is_alive(connection):
                lease.broken = True

    def _scrub(self, exc: BaseException) -> BaseException:
        """The exception with the internal host replaced by the virtual one in its texts."""
        internal, virtual = self.session.internal, self.session.virtual
        replacements = ((str(internal), str(virtual)), (internal.host, virtual.host))
        for attribute in ("message", "msg_v1", "msg_v2", "msg_v3", "msg_v4"):
            value = getattr(exc, attribute, None)
            if isinstance(value, str):
                for old, new in replacements:
                    value = value.replace(old, new)
                setattr(exc, attribute, value)
        exc.args = tuple(
            _replace_all(a, replacements) if isinstance(a, str) else a for a in exc.args
        )
        return exc

    def _audit_fields(self) -> dict[str, str]:
        s = self.session
        return {
            "subaccount": s.subaccount,
            "location": s.location,
            "app": s.app,
            "system": str(s.virtual),
        }


def _replace_all(text: str, replacements: tuple[tuple[str, str], ...]) -> str:
    for old, new in replacements:
        text = text.replace(old, new)
    return text


def _is_pyrfc_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "RFCError" for cls in type(exc).__mro__)


def _error(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": to_wire(exc)}
