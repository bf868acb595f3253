"""Connector side: serve one cloud RFC connection (a tunnel stream) against an ABAP backend.

The stream carries the stub protocol (``_stub_protocol``): a logon, then describe / call /
ping requests, then close. The handler checks every function name against the mapping's
function rules before the backend sees it, runs each blocking backend call in a worker thread
on a pooled connection, and answers with the result or the backend's exception (class, code,
key and message fields). The internal host never appears in an answer: error texts naming it
are rewritten to the virtual host.

A mapping with ``principal_propagation = true`` logs each cloud user on as themselves: at logon
the handler asks the core for the user behind the stream's token
(:meth:`backchannel.Session.propagated_user`) and logs on to the backend with the short-lived
certificate issued for them (``x509cert``, base64 DER) instead of any user and password the
application sent. A refused token is a LogonError ``principal propagation (<reason>): ...``;
the token itself never reaches an answer, a log or an audit line.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from backchannel import (
    PrincipalError,
    PrincipalReason,
    PropagatedUser,
    Session,
    TableReader,
    TunnelStream,
)

from ._backend import BackendConnection, BackendPool, Lease, close_quietly, is_alive
from ._descriptions import decode_params, encode_params
from ._errors import (
    CommunicationError,
    ExternalAuthorizationError,
    RFCLibError,
    RfcRc,
    communication_failure,
    library_error,
    principal_refusal,
    to_wire,
)
from ._functions import FunctionRule, check_function, read_function_rules, shown_name
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
#: What an application may send that a principal propagation logon does not use.
_CREDENTIAL_KEYS = ("user", "passwd", "x509cert")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RfcMappingOptions:
    """What an ``rfc`` mapping adds to the core's mapping keys."""

    functions: tuple[FunctionRule, ...]
    call_timeout: float
    #: Log each cloud user on with the certificate issued for their token (``x509cert``).
    principal_propagation: bool = False


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


class _GaveUp(Exception):
    """Work on a request was cancelled: its time ran out, or the cloud client hung up."""

    def __init__(self, *, timed_out: bool) -> None:
        super().__init__("time ran out" if timed_out else "the client hung up")
        self.timed_out = timed_out


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
        """``[[...mappings.functions]]`` rules, an optional ``call_timeout`` and
        ``principal_propagation`` (default false)."""
        mapping.string("protocol", required=True)
        functions = read_function_rules(mapping)
        call_timeout = mapping.number(
            "call_timeout", self.settings.call_timeout, minimum=0.01, maximum=86400
        )
        propagation = mapping.boolean("principal_propagation", False)
        mapping.finish()
        return RfcMappingOptions(functions, call_timeout, propagation)

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
        #: With principal propagation: when the user's token (or certificate) must be checked
        #: again; a session never outlives its user's token.
        self.recheck_at = math.inf
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
            try:
                await self.messages.send(response)
            except StubProtocolError as exc:  # too large, or a string UTF-8 cannot carry
                await self.messages.send(_error(_protocol_error(str(exc))))
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
        if op != "close":
            self._recheck_user()
        if op == "describe":
            name = self._check(str(request.get("name", "")), "describe")
            return {"ok": True, "description": description_to_wire(await self._describe(name))}
        if op == "call":
            return await self._call(request)
        if op == "ping":
            await self._backend_call("ping", lambda c: c.ping(), self.options.call_timeout)
        return {"ok": True}  # ping, close

    async def _logon(self, request: dict[str, Any]) -> dict[str, Any]:
        logon = {k: str(request[k]) for k in _LOGON_KEYS if request.get(k) not in (None, "")}
        propagated: PropagatedUser | None = None
        ignored = ""
        if self.options.principal_propagation:
            propagated = self._propagated_user()
            self.recheck_at = propagated.valid_until
            ignored = ",".join(k for k in _CREDENTIAL_KEYS if k in logon)
            logon = {k: logon[k] for k in ("client", "lang") if k in logon}
            logon["x509cert"] = propagated.certificate.der_base64()
        timeout = self.options.call_timeout

        async def lease() -> None:
            # Kept the moment the pool hands it out (no checkpoint in between), so that a
            # cancellation can never drop it unreleased.
            self.lease = await self.pool.lease(
                self.session.internal, logon, connect_timeout=timeout + CANCEL_GRACE
            )

        try:
            # The pool bounds both the wait for a slot and the logon itself.
            await self._unless_hung_up(lease, math.inf)
        except trio.TooSlowError:
            raise _canceled(
                f"logon to {self.session.virtual} canceled after {timeout:g} s"
            ) from None
        except _GaveUp:
            raise self._hung_up("logon") from None
        except Exception as exc:
            if propagated is not None and _is_logon_error(exc):
                raise self._certificate_refused(propagated, exc) from None
            raise
        attributes = await self._backend_call(
            "logon", lambda c: c.get_connection_attributes(), timeout
        )
        self.user = str(attributes.get("user", ""))
        extra = {}
        if propagated is not None:
            extra = {
                "subject": propagated.subject,
                "identity_provider": propagated.identity_provider,
            }
            if ignored:
                extra["ignored_credentials"] = ignored
        self.session.audit.allowed(
            "rfc_logon",
            **self._audit_fields(),
            client=str(attributes.get("client", "")),
            user=self.user,
            **extra,
        )
        return {
            "ok": True,
            "sysid": attributes.get("sysId", ""),
            "release": attributes.get("partnerRel", ""),
            "client": attributes.get("client", ""),
            "user": self.user,
            "language": attributes.get("language", ""),
        }

    def _recheck_user(self) -> None:
        """Past ``recheck_at``, validate the user's token again: an expired one ends the
        session (LogonError naming the reason), a valid one carries on."""
        resolver = self.session.principal_resolver
        now = resolver.clock() if resolver is not None else time.time()
        if now < self.recheck_at:
            return
        try:
            self.recheck_at = self._propagated_user().valid_until
        except RFCLibError:
            self.state = CLOSED  # the user's session on the backend ends with the token
            raise

    def _propagated_user(self) -> PropagatedUser:
        """The cloud user behind the stream's token (the core validates and audits it)."""
        try:
            return self.session.propagated_user()
        except PrincipalError as exc:
            raise principal_refusal(exc.code, exc.message) from None

    def _certificate_refused(self, user: PropagatedUser, exc: BaseException) -> RFCLibError:
        """The backend refused the user's certificate: the operator's to fix, so audited and
        explained (the backend itself, like a real system, does not say why)."""
        reason = PrincipalReason.BACKEND_REJECTED_CERTIFICATE
        backend = getattr(exc, "message", None) or str(exc)
        message = (
            f"{self.session.virtual} refused the certificate issued for {user.subject} "
            f"({backend}): the system must trust the connector's user CA (STRUST) and map "
            "the subject to a user (certificate mapping, VUSREXTID)"
        )
        self.session.audit.denied(
            "principal_propagation",
            reason.code,
            **self._audit_fields(),
            subject=user.subject,
            identity_provider=user.identity_provider,
        )
        return principal_refusal(reason.code, message)

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
                f"Access denied to function module {shown_name(function)} on system "
                f"{self.session.virtual} by the connector: {decision.reason}",
                RfcRc.RFC_AUTHORIZATION_FAILURE,
                "RFC_AUTHORIZATION_FAILURE",
            )
        self.session.audit.allowed("rfc_call", **fields)
        return function.upper()

    async def _describe(self, name: str) -> Any:
        if name not in self.descriptions:
            self.descriptions[name] = await self._backend_call(
                "describe", lambda c: c.get_function_description(name), self.options.call_timeout
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
        result = await self._backend_call(
            "call", lambda c: c.call(name, options, **params), timeout
        )
        return {"ok": True, "result": encode_params(description, result)}

    async def _backend_call(
        self, what: str, function: Callable[[BackendConnection], Any], call_timeout: float
    ) -> Any:
        """Run ``function`` on the leased connection in a worker thread.

        For calls the backend client cancels the call itself after ``call_timeout``; should
        no answer come within CANCEL_GRACE after that, or the cloud client hang up first, the
        connection is cancelled and given up here. So it is whenever this is cancelled from
        outside (the tunnel went down): the abandoned thread may still be using it, so it must
        never go back to the pool.
        """
        lease = self.lease
        assert lease is not None  # TRANSITIONS admits no backend request before logon
        connection = lease.connection
        lock = threading.Lock()
        ended = abandoned = False

        def run() -> Any:
            nonlocal ended
            try:
                return function(connection)
            finally:
                with lock:
                    ended, given_up = True, abandoned
                if given_up:
                    # Closed again now that nothing runs on it: a client that recovers from
                    # the cancel as pyrfc does has opened a fresh connection meanwhile.
                    close_quietly(connection)

        try:
            return await self._unless_hung_up(
                lambda: self.pool.run(run), call_timeout + CANCEL_GRACE
            )
        except _GaveUp as exc:
            if exc.timed_out:
                # The connection is cancelled below; the client opens a new session, as after
                # pyrfc's own RFC_CANCELED.
                self.state = CLOSED
                raise _canceled(
                    f"{what} to {self.session.virtual} canceled after {call_timeout:g} s"
                ) from None
            raise self._hung_up(what) from None
        finally:
            with lock:
                abandoned = not ended
            if abandoned:
                lease.broken = True
                trio.lowlevel.start_thread_soon(connection.cancel, lambda _result: None)
            elif not is_alive(connection):
                lease.broken = True

    async def _unless_hung_up(self, work: Callable[[], Awaitable[_T]], limit: float) -> _T:
        """``work()``'s result or exception, watching the cloud client meanwhile: if it hangs
        up, or ``limit`` seconds pass, ``work`` is cancelled and _GaveUp raised."""
        results: list[_T] = []
        errors: list[Exception] = []
        with trio.move_on_after(limit) as deadline:
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    try:
                        results.append(await work())
                    except Exception as exc:  # raised below, not wrapped in an ExceptionGroup
                        errors.append(exc)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(run)
                if await self.messages.watch_for_hangup():
                    nursery.cancel_scope.cancel()
        if errors:
            raise errors[0]
        if results:
            return results[0]
        raise _GaveUp(timed_out=deadline.cancelled_caught)

    def _hung_up(self, what: str) -> CommunicationError:
        """The session ends: the cloud client is gone, nobody reads the answer."""
        log.info(
            "%s: the RFC client hung up during a %s; it was cancelled", self.session.virtual, what
        )
        self.state = CLOSED
        return communication_failure("connection closed by the client during the request")

    def _scrub(self, exc: BaseException) -> BaseException:
        """The exception with the internal host replaced by the virtual one in its texts."""
        for attribute in ("message", "msg_v1", "msg_v2", "msg_v3", "msg_v4"):
            value = getattr(exc, attribute, None)
            if isinstance(value, str):
                setattr(exc, attribute, self._scrub_text(value))
        exc.args = tuple(self._scrub_text(a) if isinstance(a, str) else a for a in exc.args)
        return exc

    def _scrub_text(self, text: str) -> str:
        internal, virtual = self.session.internal, self.session.virtual
        # host:port also unbracketed (how clients name an IPv6 partner), then the host alone;
        # in one pass, so that the virtual text put in is not rewritten again.
        replacements = {
            str(internal).lower(): str(virtual),
            f"{internal.host}:{internal.port}".lower(): str(virtual),
            internal.host.lower(): virtual.host,
        }
        pattern = "|".join(re.escape(old) for old in sorted(replacements, key=len, reverse=True))
        return re.sub(
            pattern, lambda m: replacements[m.group(0).lower()], text, flags=re.IGNORECASE
        )

    def _audit_fields(self) -> dict[str, str]:
        s = self.session
        return {
            "subaccount": s.subaccount,
            "location": s.location,
            "app": s.app,
            "system": str(s.virtual),
        }


def _is_pyrfc_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "RFCError" for cls in type(exc).__mro__)


def _is_logon_error(exc: BaseException) -> bool:
    """A LogonError of the stub client or of SAP's pyrfc (a class of its own)."""
    return any(cls.__name__ == "LogonError" for cls in type(exc).__mro__)


def _error(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": to_wire(exc)}
