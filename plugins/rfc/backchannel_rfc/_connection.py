"""``Connection``: a blocking, pyrfc-compatible RFC client speaking to the stub ABAP system.

Mirrors ``pyrfc.Connection`` (SAP/PyRFC ``src/pyrfc/_cyrfc.pyx``): it connects and logs on in
``__init__``; ``call`` fills parameters client-side (so type errors and unknown parameters are
raised before anything is sent, as the NW RFC SDK does) and returns pyrfc's result dict.

Addressing: ``ashost`` plus the gateway port, which is ``port`` if given (an extension: the stub
may listen anywhere, e.g. on port 0 in tests), else ``gwserv`` (a number or ``sapgwNN``), else
``33NN`` for ``sysnr`` NN.  Load balancing, SAProuter and SNC parameters (``mshost``, ``msserv``,
``sysid``, ``group``, ``saprouter``, ``snc_*``) and ``dest`` are accepted and ignored.

Through a backchannel gateway (``gateway``, an extension like the other parameters of
:data:`BACKCHANNEL_PARAMETERS`) the connection also carries a ``route`` for the gateway: the
app's credentials, the destination or virtual system and, for principal propagation, the cloud
user's ``token`` (a JWT). The route goes to the gateway only: a direct connection to an ABAP
system never sends any of it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from types import TracebackType
from typing import Any

from ._abap_types import Checks
from ._call_codec import call_request, prepare_call, read_result
from ._descriptions import (
    FunctionDescription,
)
from ._errors import (
    ABAPRuntimeError,
    CommunicationError,
    ExternalRuntimeError,
    LogonError,
    RFCError,
    RFCLibError,
    RfcRc,
    communication_failure,
    from_wire,
    library_error,
)
from ._stub_protocol import (
    MessageDecoder,
    StubProtocolError,
    description_from_wire,
    encode_message,
)

_CONFIG_KEYS = ("dtime", "return_import_params", "rstrip", "timeout", "check_date", "check_time")
_RECEIVE_SIZE = 65536
# pyrfc re-opens the connection after errors of these classes (its error groups
# ABAP_RUNTIME_FAILURE, LOGON_FAILURE, COMMUNICATION_FAILURE, EXTERNAL_RUNTIME_FAILURE).
_REOPEN_AFTER = (ABAPRuntimeError, LogonError, CommunicationError, ExternalRuntimeError)
_ISO_LANGUAGES = {"E": "EN", "D": "DE", "F": "FR", "S": "ES", "I": "IT", "J": "JA"}
_handles = itertools.count(1)


class _ParameterTypeError(TypeError, AttributeError):
    """pyrfc encodes every connection parameter with ``value.encode()``, so a non-str raises
    AttributeError there; this is also a TypeError, which is what it means."""


def _invalid_handle() -> ExternalRuntimeError:
    return library_error(
        ExternalRuntimeError,
        "An invalid handle was passed to the API call",
        RfcRc.RFC_INVALID_HANDLE,
        "RFC_INVALID_HANDLE",
    )


def _gateway_port(params: dict[str, str]) -> int:
    if "port" in params:
        return int(params["port"])
    gwserv = params.get("gwserv", "")
    if gwserv.isdigit():
        return int(gwserv)
    if gwserv.lower().startswith("sapgw") and gwserv[5:].isdigit():
        return 3300 + int(gwserv[5:])
    return 3300 + int(params.get("sysnr", "00"))


#: The parameters that send a connection through a backchannel gateway, and the environment
#: variables that supply them when not passed (so code written for pyrfc runs unchanged).
BACKCHANNEL_PARAMETERS = {
    "gateway": "BACKCHANNEL_RFC_GATEWAY",
    "app": "BACKCHANNEL_RFC_APP",
    "app_secret": "BACKCHANNEL_RFC_APP_SECRET",
    "app_token": "BACKCHANNEL_RFC_APP_TOKEN",
    "location_id": "BACKCHANNEL_RFC_LOCATION_ID",
    "token": "BACKCHANNEL_RFC_TOKEN",
}
#: Through a gateway the connector enforces a call's timeout and answers RFC_CANCELED; the
#: client waits this much longer before cancelling on its own.
GATEWAY_TIMEOUT_MARGIN = 5.0


def _backchannel_parameters(params: dict[str, str]) -> dict[str, str]:
    found = {
        key: params.get(key) or os.environ.get(variable, "")
        for key, variable in BACKCHANNEL_PARAMETERS.items()
    }
    return {k: v for k, v in found.items() if v}


def _split_gateway(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of the gateway's RFC front door."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise library_error(
            ExternalRuntimeError,
            f"gateway {text!r} is not host:port (the gateway's RFC front door)",
            RfcRc.RFC_INVALID_PARAMETER,
            "RFC_INVALID_PARAMETER",
        )
    return host.strip("[]"), int(port)


class _Channel:
    """One logged-on TCP connection to the stub: blocking socket plus the sans-IO codec."""

    def __init__(self, host: str, port: int, logon: dict[str, Any]) -> None:
        self.handle = next(_handles)
        try:
            self.sock = socket.create_connection((host, port))
        except OSError as exc:
            raise communication_failure(f"partner '{host}:{port}' not reached") from exc
        self.decoder = MessageDecoder()
        self.cancelled = False
        try:
            self.info = self.request({"op": "logon", **logon})
        except BaseException:
            self.sock.close()
            raise

    def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return its ``ok`` response; raise the error it carries."""
        try:
            self.sock.settimeout(None)
            self.sock.sendall(encode_message(message))
            self.sock.settimeout(timeout)
            while (response := self.decoder.next_message()) is None:
                if self.decoder.at_eof:
                    if self.cancelled:
                        raise TimeoutError("cancelled")
                    raise communication_failure("connection closed by partner")
                self.decoder.receive_data(self.sock.recv(_RECEIVE_SIZE))
        except TimeoutError:
            raise
        except OSError as exc:
            if self.cancelled:
                raise TimeoutError("cancelled") from exc
            raise communication_failure(f"connection to partner broken: {exc}") from exc
        except StubProtocolError as exc:
            raise communication_failure(str(exc)) from exc
        if not response.get("ok"):
            raise from_wire(response.get("error", {}))
        return response

    def cancel(self) -> None:
        """Abort the request in progress (from another thread): it ends as a timeout."""
        self.cancelled = True
        with contextlib.suppress(OSError):  # already closed: nothing is in progress
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        try:
            self.sock.settimeout(None)
            self.sock.sendall(encode_message({"op": "close"}))
        except OSError:
            pass  # closing a connection the partner already dropped is not an error
        finally:
            self.sock.close()


class Connection:
    """A connection to an (here simulated) SAP backend system, as ``pyrfc.Connection``.

    ``config`` keys: ``dtime``, ``rstrip``, ``return_import_params``, ``timeout``,
    ``check_date`` and ``check_time`` (default true: DATE and TIME values must be real dates
    and times of day before they are sent; false sends any 8 / 6 characters, as ABAP takes).
    """

    def __init__(self, config: dict[str, Any] | None = None, **params: Any) -> None:
        config = config or {}
        for k in config:
            if k not in _CONFIG_KEYS:
                raise RFCError(f"Connection configuration option '{k}' is not supported")
        self.__config: dict[str, Any] = {
            "dtime": config.get("dtime", False),
            "return_import_params": config.get("return_import_params", False),
            "rstrip": config.get("rstrip", True),
            "timeout": config.get("timeout", None),
            "check_date": config.get("check_date", True),
            "check_time": config.get("check_time", True),
        }
        if len(params) < 1:
            raise RFCError("Connection parameters missing")
        for value in params.values():
            if not isinstance(value, str):
                raise _ParameterTypeError(
                    f"'{type(value).__name__}' object has no attribute 'encode'"
                )
        self._params: dict[str, str] = {k.lower(): v for k, v in params.items()}
        self._backchannel = _backchannel_parameters(self._params)
        self._channel: _Channel | None = None
        self._descriptions: dict[str, FunctionDescription] = {}
        self._open()

    # -- pyrfc's public surface ------------------------------------------------------------

    @property
    def options(self) -> dict[str, Any]:
        return self.__config

    @property
    def alive(self) -> bool:
        return self._channel is not None

    @property
    def handle(self) -> int | None:
        return None if self._channel is None else self._channel.handle

    def __bool__(self) -> bool:
        return self.alive

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def __del__(self) -> None:
        if getattr(self, "_channel", None) is not None:
            self._close()

    def open(self) -> None:
        self._open()

    def reopen(self) -> None:
        self._close()
        self._open()

    def close(self) -> None:
        self._close()

    def free(self) -> None:
        self._close()

    def is_valid(self) -> bool:
        return self.alive

    def cancel(self) -> None:
        """Cancel the call in progress, from another thread (pyrfc's ``cancel``): it raises
        CommunicationError RFC_CANCELED and the connection is opened anew."""
        channel = self._channel
        if channel is not None:
            channel.cancel()

    def ping(self) -> None:
        self._request({"op": "ping"})

    def get_connection_attributes(self) -> dict[str, Any]:
        """pyrfc's keys, as far as they mean something here; ``{}`` when closed, as pyrfc."""
        channel = self._channel
        if channel is None:
            return {}
        info = channel.info
        local_host = socket.gethostname()
        peer = channel.sock.getpeername()
        return {
            "dest": self._params.get("dest", ""),
            "host": local_host,
            "partnerHost": self._params.get("ashost", ""),
            "sysNumber": self._params.get("sysnr", ""),
            "sysId": info["sysid"],
            "client": info["client"],
            "user": info["user"],
            "language": info["language"],
            "trace": self._params.get("trace", "0"),
            "isoLanguage": _ISO_LANGUAGES.get(info["language"], info["language"]),
            "codepage": "4103",
            "partnerCodepage": "4103",
            "rfcRole": "C",
            "type": "E",
            "partnerType": "3",
            "rel": "753",
            "partnerRel": info["release"],
            "kernelRel": info["release"],
            "cpicConvId": f"{channel.handle:08d}",
            "progName": "SAPLSYST",
            "partnerBytesPerChar": "2",
            "partnerSystemCodepage": "4103",
            "partnerIP": str(peer[0]),
            "partnerIPv6": "",
            "reserved": "",
            "active_unit": False,
        }

    def get_function_description(self, func_name: str) -> FunctionDescription:
        """The description of ``func_name`` (upper-cased, as pyrfc), cached per connection."""
        name = func_name.upper()
        if name not in self._descriptions:
            response = self._request({"op": "describe", "name": name})
            self._descriptions[name] = description_from_wire(response["description"])
        return self._descriptions[name]

    def call(
        self, func_name: str, options: dict[str, Any] | None = None, **params: Any
    ) -> dict[str, Any]:
        """Invoke a function module; the result holds EXPORT, CHANGING and TABLES parameters
        (and IMPORT ones if ``return_import_params``)."""
        if type(func_name) is not str:
            raise RFCError(
                "Remote function module name must be unicode string, received:",
                func_name,
                type(func_name),
            )
        if self._channel is None:
            raise RFCError(
                f"Remote function module '{func_name}' invocation rejected because the "
                "connection is closed"
            )
        options = options or {}
        fd = self.get_function_description(func_name)
        checks = Checks(
            date=bool(options.get("check_date", self.__config["check_date"])),
            time=bool(options.get("check_time", self.__config["check_time"])),
        )
        wire_params, skip = prepare_call(fd, params, options, checks=checks)
        return_imports = options.get("return_import_params", self.__config["return_import_params"])
        timeout = options.get("timeout", self.__config["timeout"])
        message = call_request(
            fd,
            wire_params,
            skip,
            return_import_params=bool(return_imports),
            timeout=None if timeout is None else float(timeout),
        )
        if timeout is not None and "gateway" in self._backchannel:
            timeout = float(timeout) + GATEWAY_TIMEOUT_MARGIN
        response = self._invoke(message, timeout)
        return read_result(
            fd,
            response["result"],
            skip,
            dtime=bool(self.__config["dtime"]),
            rstrip=bool(self.__config["rstrip"]),
        )

    # -- internals ---------------------------------------------------------------------------

    def _open(self) -> None:
        if self._channel is not None:
            return
        logon: dict[str, Any] = {
            k: self._params[k]
            for k in ("client", "user", "passwd", "x509cert", "lang", "tpname")
            if k in self._params
        }
        gateway = self._backchannel.get("gateway")
        if gateway:
            gateway_host, gateway_port = _split_gateway(gateway)
            logon["route"] = self._route()
            self._channel = _Channel(gateway_host, gateway_port, logon)
            return
        host = self._params.get("ashost") or self._params.get("gwhost")
        if not host:
            raise library_error(
                ExternalRuntimeError,
                "Parameter ASHOST, GWHOST, MSHOST or SERVER_PORT is missing.",
                RfcRc.RFC_INVALID_PARAMETER,
                "RFC_INVALID_PARAMETER",
            )
        self._channel = _Channel(host, _gateway_port(self._params), logon)

    def _route(self) -> dict[str, str]:
        """What the backchannel gateway needs to route this connection: the app's
        credentials and a destination name or the virtual system and location."""
        route = {
            k: v
            for k, v in self._backchannel.items()
            if k in ("app", "app_secret", "app_token", "location_id", "token")
        }
        for key in ("dest", "ashost", "sysnr", "gwserv"):
            if key in self._params:
                route[key] = self._params[key]
        return route

    def _close(self) -> None:
        channel, self._channel = self._channel, None
        self._descriptions.clear()
        if channel is not None:
            channel.close()

    def _drop(self) -> None:
        channel, self._channel = self._channel, None
        self._descriptions.clear()
        if channel is not None:
            channel.sock.close()

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        if self._channel is None:
            raise _invalid_handle()
        try:
            return self._channel.request(message)
        except CommunicationError:
            self._drop()
            raise

    def _invoke(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """``RfcInvoke`` with pyrfc's recovery: after a failure of the groups above, and after
        a timeout (pyrfc's cancel), open a fresh connection; if that fails, raise its error."""
        assert self._channel is not None
        closed_handle = self._channel.handle
        try:
            return self._channel.request(message, timeout)
        except TimeoutError:
            error: RFCLibError = CommunicationError(
                "", RfcRc.RFC_CANCELED, "RFC_CANCELED", "", "", "", "", "", "", ""
            )
        except _REOPEN_AFTER as exc:
            error = exc
        self._drop()
        try:
            self._open()
        except RFCLibError as open_error:
            raise open_error from error
        if error.code == RfcRc.RFC_CANCELED:
            error.message = f"Connection was canceled: {closed_handle}. New handle: {self.handle}"
            error.args = (error.message,)
        raise error
