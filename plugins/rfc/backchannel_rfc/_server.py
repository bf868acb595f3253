"""``Server``: a pyrfc-compatible RFC server program that registers at the stub system's gateway.

Mirrors ``pyrfc.Server`` 3.x (SAP/PyRFC ``src/pyrfc/server.pyx``): ``add_function`` looks the
function's interface up in the backend named by ``client_params``, and the callback gets
``(request_context, **params)`` (every IMPORT, CHANGING and TABLES parameter) and returns a dict
of EXPORT, CHANGING and TABLES values.  To signal an error it raises ABAPApplicationError (an
ABAP exception: code RFC_ABAP_EXCEPTION), ABAPRuntimeError (an ABAP message: RFC_ABAP_MESSAGE)
or ExternalRuntimeError (a system failure: RFC_EXTERNAL_FAILURE); the calling client gets that
class with that code and the key and message fields given.  Any other exception becomes
ExternalRuntimeError "Invalid exception raised by callback function.", as in pyrfc.

Server parameters: ``gwhost``, ``gwserv`` (a number or ``sapgwNN``; else ``33NN`` for
``sysnr``), ``program_id``, and ``port`` as in ``Connection`` (an extension: the stub may listen
anywhere).  ``trace``, ``saprouter`` and ``reg_count`` are accepted and ignored: one
registration, which answers one call at a time.  ``config`` keys: ``rstrip`` (default True),
``auth_check`` (``f(func_name, request_context)``, anything but 0 refuses the call),
``server_log`` (log each call at INFO); ``debug`` and ``port`` (pyrfc's management console) are
ignored.

One difference: pyrfc's ``serve()`` returns once the NW RFC SDK's own threads serve; here
``serve()`` is the serving loop and blocks until ``stop()``, and ``start()`` runs it in a
background thread after registering (so registration errors are raised by ``start()``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ._connection import _ISO_LANGUAGES, Connection, _gateway_port, _ParameterTypeError
from ._descriptions import decode_params, encode_params, wrap
from ._errors import (
    ABAPApplicationError,
    ABAPRuntimeError,
    ExternalRuntimeError,
    RFCError,
    RFCLibError,
    RfcRc,
    communication_failure,
    from_wire,
    invalid_parameter,
    library_error,
    to_wire,
)
from ._stub_protocol import (
    REGISTERED,
    SERVER_TRANSITIONS,
    MessageDecoder,
    StubProtocolError,
    description_to_wire,
    encode_message,
)
from ._system import AbapSystem, Session

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 65536
_INVALID_EXCEPTION = "Invalid exception raised by callback function."

Callback = Callable[..., Any]


def _allow_every_call(func_name: str, request_context: dict[str, Any]) -> int:
    return RfcRc.RFC_OK


def _missing(parameter: str) -> ExternalRuntimeError:
    return library_error(
        ExternalRuntimeError,
        f"Parameter {parameter} is missing.",
        RfcRc.RFC_INVALID_PARAMETER,
        "RFC_INVALID_PARAMETER",
    )


#: The exceptions a callback may raise, and the code pyrfc's ``genericHandler`` gives each.
_CALLBACK_ERRORS: tuple[tuple[type[RFCLibError], RfcRc], ...] = (
    (ABAPApplicationError, RfcRc.RFC_ABAP_EXCEPTION),
    (ABAPRuntimeError, RfcRc.RFC_ABAP_MESSAGE),
    (ExternalRuntimeError, RfcRc.RFC_EXTERNAL_FAILURE),
)


def _server_error(exc: Exception) -> RFCLibError:
    """What the calling client gets for ``exc``, raised while serving a call: the class and
    its code as pyrfc sets them, with the exception's key and message fields."""
    for cls, code in _CALLBACK_ERRORS:
        if isinstance(exc, cls):
            return cls(
                exc.message,
                code,
                exc.key,
                exc.msg_class,
                exc.msg_type,
                exc.msg_number,
                exc.msg_v1,
                exc.msg_v2,
                exc.msg_v3,
                exc.msg_v4,
            )
    log.warning(
        "callback raised %r; pyrfc server callbacks may raise only ABAPApplicationError,"
        " ABAPRuntimeError or ExternalRuntimeError",
        exc,
        exc_info=exc,
    )
    return library_error(
        ExternalRuntimeError, _INVALID_EXCEPTION, RfcRc.RFC_EXTERNAL_FAILURE, "RFC_EXTERNAL_FAILURE"
    )


def _shut(sock: socket.socket) -> None:
    """Wake a thread blocked reading ``sock``: it reads EOF."""
    with contextlib.suppress(OSError):  # already shut: nobody is reading
        sock.shutdown(socket.SHUT_RDWR)


def _receive(sock: socket.socket, decoder: MessageDecoder) -> dict[str, Any] | None:
    """The next message on ``sock``, or None at its end."""
    while (message := decoder.next_message()) is None:
        if decoder.at_eof:
            return None
        decoder.receive_data(sock.recv(_RECEIVE_SIZE))
    return message


def _encoded(answer: dict[str, Any]) -> bytes:
    try:
        return encode_message(answer)
    except StubProtocolError as exc:
        error = library_error(
            RFCLibError, str(exc), RfcRc.RFC_INVALID_PROTOCOL, "RFC_INVALID_PROTOCOL"
        )
        return encode_message({"id": answer.get("id"), "ok": False, "error": to_wire(error)})


class Server:
    """An RFC server program, as ``pyrfc.Server``: registers ``program_id`` at the gateway and
    serves the functions added with ``add_function`` to clients that call that program id."""

    def __init__(
        self,
        server_params: dict[str, Any],
        client_params: dict[str, Any],
        config: dict[str, Any] | None = None,
    ) -> None:
        config = config or {}
        self.debug = bool(config.get("debug", False))
        self.rstrip = bool(config.get("rstrip", True))
        self._log_calls = bool(config.get("server_log", False))
        self._auth_check: Callable[[str, dict[str, Any]], int] = config.get(
            "auth_check", _allow_every_call
        )
        for value in server_params.values():
            if not isinstance(value, str):
                raise _ParameterTypeError(
                    f"'{type(value).__name__}' object has no attribute 'encode'"
                )
        self._params: dict[str, str] = {k.lower(): v for k, v in server_params.items()}
        if not self._params.get("gwhost"):
            raise _missing("GWHOST")
        if not self._params.get("program_id"):
            raise _missing("PROGRAM_ID")
        self.program_id = self._params["program_id"]
        self._hostname = socket.gethostname()
        self._client = Connection(**client_params)
        # The served functions live in a system of their own, whose ``call`` does what a
        # served call needs: defaults, strict checks of the callback's values, the result.
        self._functions = AbapSystem(sysid="", release="753")
        self._names: set[str] = set()
        # One call at a time: the request context of the call in progress.
        self._request_context: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._decoder = MessageDecoder()
        self._state = "RFC_SERVER_INITIAL"
        self._stopping = False
        self._busy = False
        self._peak_busy = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._loop_ended = threading.Event()

    # -- pyrfc's public surface ------------------------------------------------------------

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add_function(self, func_name: str, callback: Callback) -> None:
        """Serve ``func_name`` with ``callback``, described as in the client_params backend
        (whose error, e.g. FU_NOT_FOUND, is raised if it has no such function)."""
        if func_name.upper() in self._names:
            raise TypeError(f"Server function '{func_name}' already installed.")
        if not self._client.alive:
            self._client.open()
        try:
            description = self._client.get_function_description(func_name)
        finally:
            self._client.close()
        implementation = functools.partial(self._run_callback, description.name, callback)
        self._functions.register(description, implementation)
        self._names.add(description.name)
        if self._log_calls:
            log.info("server %s: function %s installed", self.program_id, description.name)

    def serve(self) -> None:
        """Register at the gateway and serve calls until ``stop()``.

        Raises the gateway's error if registration fails, and CommunicationError if the
        gateway goes away while serving.
        """
        self._register()
        error = self._serve_registered()
        if error is not None:
            raise error

    def start(self) -> None:
        """Register at the gateway, then serve calls in a background thread until ``stop()``."""
        self._register()
        self._thread = threading.Thread(
            target=self._serve_in_background, name=f"RFC server {self.program_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End serving: at once if idle, else once the call in progress is answered.  Returns
        when serving has ended (except in a callback, which cannot wait for itself)."""
        with self._lock:
            self._stopping = True
            if self._sock is not None:
                self._state = "RFC_SERVER_STOPPING"
                if not self._busy:
                    _shut(self._sock)
        current = threading.current_thread()
        if self._serving.is_set() and current is not self._loop_thread:
            self._loop_ended.wait()
        thread = self._thread
        if thread is not None and thread is not current:
            thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop serving and release the server; it cannot serve again."""
        self.stop()
        self._closed = True
        self._client.close()

    def get_server_attributes(self) -> dict[str, Any]:
        """pyrfc's keys: serverName, protocolType, registrationCount, state (an RFC_SERVER_*
        name), currentBusyCount, peakBusyCount."""
        with self._lock:
            return {
                "serverName": self.program_id,
                "protocolType": "multi count",
                "registrationCount": 0 if self._sock is None else 1,
                "state": self._state,
                "currentBusyCount": 1 if self._busy else 0,
                "peakBusyCount": self._peak_busy,
            }

    # -- internals ---------------------------------------------------------------------------

    def _register(self) -> None:
        if self._closed:
            raise RFCError(f"server {self.program_id} is closed")
        if self._serving.is_set():
            raise RFCError(f"server {self.program_id} is already serving")
        host, port = self._params["gwhost"], _gateway_port(self._params)
        try:
            sock = socket.create_connection((host, port))
        except OSError as exc:
            raise communication_failure(f"partner '{host}:{port}' not reached") from exc
        decoder = MessageDecoder()
        message = {
            "op": "register",
            "program_id": self.program_id,
            "functions": sorted(self._names),
        }
        try:
            sock.sendall(encode_message(message))
            response = _receive(sock, decoder)
        except (OSError, StubProtocolError) as exc:
            sock.close()
            raise communication_failure(f"connection to partner broken: {exc}") from exc
        if response is None or not response.get("ok"):
            sock.close()
            if response is None:
                raise communication_failure("connection closed by partner")
            raise from_wire(response.get("error", {}))
        with self._lock:
            self._sock, self._decoder = sock, decoder
            self._state = "RFC_SERVER_RUNNING"
            self._stopping = False
            self._loop_ended.clear()
            self._serving.set()

    def _serve_in_background(self) -> None:
        error = self._serve_registered()
        if error is not None:
            log.warning("server %s stopped serving: %s", self.program_id, error.message)

    def _serve_registered(self) -> RFCLibError | None:
        """Answer the gateway's requests until stopped (None) or the registration breaks (the
        error)."""
        sock = self._sock
        assert sock is not None  # _register succeeded
        self._loop_thread = threading.current_thread()
        try:
            while True:
                try:
                    request = _receive(sock, self._decoder)
                    broken = "connection closed by partner"
                except (OSError, StubProtocolError) as exc:
                    request, broken = None, f"connection to partner broken: {exc}"
                with self._lock:
                    if self._stopping:
                        return None
                    if request is None:
                        return communication_failure(broken)
                    self._busy = True
                    self._peak_busy = 1
                try:
                    sock.sendall(_encoded(self._answer(request)))
                    broken = ""
                except OSError as exc:
                    broken = f"connection to partner broken: {exc}"
                if self._call_answered():
                    return None
                if broken:
                    return communication_failure(broken)
        finally:
            with self._lock:
                self._sock = None
                self._state = "RFC_SERVER_STOPPED" if self._stopping else "RFC_SERVER_BROKEN"
                self._serving.clear()
            sock.close()
            self._loop_thread = None
            self._loop_ended.set()

    def _call_answered(self) -> bool:
        """Mark the call in progress answered; True if serving is to stop now."""
        with self._lock:
            self._busy = False
            return self._stopping

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to one of the gateway's requests (SERVER_TRANSITIONS)."""
        op = request.get("op")
        answer: dict[str, Any] = {"id": request.get("id")}
        if not isinstance(op, str) or op not in SERVER_TRANSITIONS[REGISTERED]:
            error = library_error(
                RFCLibError,
                f"operation {op!r} not allowed in state {REGISTERED}",
                RfcRc.RFC_INVALID_PROTOCOL,
                "RFC_INVALID_PROTOCOL",
            )
            return {**answer, "ok": False, "error": to_wire(error)}
        if op == "describe":
            try:
                fd = self._functions.describe(str(request.get("name", "")))
            except RFCLibError as exc:
                return {**answer, "ok": False, "error": to_wire(exc)}
            return {**answer, "ok": True, "description": description_to_wire(fd)}
        if op == "call":
            try:
                result = self._call(request)
            except Exception as exc:
                return {**answer, "ok": False, "error": to_wire(_server_error(exc))}
            return {**answer, "ok": True, "result": result}
        return {**answer, "ok": True}  # ping

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        fd = self._functions.describe(str(request.get("name", "")))
        caller = request.get("connection") or {}
        language = str(caller.get("language") or "E")
        session = Session(
            self._functions, str(caller.get("client", "")), str(caller.get("user", "")), language
        )
        self._request_context = {
            "connection_attributes": self._connection_attributes(caller, language),
            "server_context": {"call_type": "synchronous", "is_stateful": False},
        }
        result = self._functions.call(
            session,
            fd.name,
            decode_params(fd, request.get("params") or {}),
            return_import_params=bool(request.get("return_import_params", False)),
        )
        return encode_params(fd, result)

    def _run_callback(
        self, func_name: str, callback: Callback, session: Session, inputs: dict[str, Any]
    ) -> dict[str, Any]:
        """The implementation of a served function: the callback with pyrfc's arguments."""
        context = self._request_context
        if self._auth_check(func_name, context) != RfcRc.RFC_OK:
            raise ExternalRuntimeError(
                f"Authentication exception raised by callback function: '{func_name}'",
                RfcRc.RFC_EXTERNAL_FAILURE,
            )
        fd = self._functions.describe(func_name)
        params = {
            p["name"]: wrap(
                p["parameter_type"], inputs[p["name"]], p["type_description"], rstrip=self.rstrip
            )
            for p in fd.parameters
            if p["direction"] != "RFC_EXPORT"
        }
        if self._log_calls:
            log.info("server %s: user %s calls %s", self.program_id, session.user, func_name)
        result = callback(context, **params)
        if not isinstance(result, dict):
            raise TypeError(f"callback of {func_name} returned {type(result).__name__}, not dict")
        for name in result:
            if fd.parameter(name) is None:
                raise invalid_parameter(str(name))
        return result

    def _connection_attributes(self, caller: dict[str, Any], language: str) -> dict[str, Any]:
        """pyrfc's connection attributes as a server sees its caller."""
        partner = str(caller.get("partner_host", ""))
        return {
            "dest": "",
            "host": self._hostname,
            "partnerHost": partner,
            "sysNumber": "",
            "sysId": "",
            "client": str(caller.get("client", "")),
            "user": str(caller.get("user", "")),
            "language": language,
            "trace": self._params.get("trace", "0"),
            "isoLanguage": _ISO_LANGUAGES.get(language, language),
            "codepage": "4103",
            "partnerCodepage": "4103",
            "rfcRole": "S",
            "type": "E",
            "partnerType": "E",
            "rel": "753",
            "partnerRel": "753",
            "kernelRel": "753",
            "cpicConvId": "",
            "progName": "",
            "partnerBytesPerChar": "2",
            "partnerSystemCodepage": "4103",
            "partnerIP": partner,
            "partnerIPv6": "",
            "reserved": "",
        }
