"""Sans-IO SOCKS5 server side: RFC 1928, RFC 1929 and SAP's JWT authentication method 0x80.

Bytes from the client go into :meth:`Socks5ServerConnection.receive_data`, which returns
events; the server's answers are bytes returned by :meth:`~Socks5ServerConnection.choose_method`,
:meth:`~Socks5ServerConnection.auth_reply` and :meth:`~Socks5ServerConnection.reply`. Nothing
here does I/O, so the front door owns sockets, timeouts and credential checks.

Every malformed input raises :class:`SocksError` and nothing else; calling methods in the wrong
state or with bad arguments is a bug in the caller and raises ``RuntimeError``/``ValueError``.
"""

from __future__ import annotations

import binascii
import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "AddressType",
    "AuthMethod",
    "Command",
    "ConnectRequest",
    "Greeting",
    "ReplyCode",
    "SapToken",
    "Socks5Event",
    "Socks5ServerConnection",
    "SocksError",
    "State",
    "UsernamePassword",
    "encode_reply",
]


class ReplyCode(enum.IntEnum):
    """The REP field of a SOCKS5 reply (RFC 1928 section 6).

    Codes 2-5 are used the way SAP's Cloud Connector SOCKS5 proxy uses them, so that clients
    written against SAP interpret our failures the same way: NOT_ALLOWED means no mapping or
    access denied, NETWORK_UNREACHABLE means the connector is not connected, HOST_UNREACHABLE
    means the backend cannot be reached, and CONNECTION_REFUSED means bad credentials.
    """

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class AuthMethod(enum.IntEnum):
    """Authentication method numbers offered in the greeting and chosen by the server."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    SAP_TOKEN = 0x80
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """The CMD field of a request; only CONNECT is served."""

    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class AddressType(enum.IntEnum):
    """The ATYP field of a request or reply."""

    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class State(enum.Enum):
    """Where the handshake is; the *_PENDING states wait for the server, not the client."""

    GREETING = enum.auto()
    METHOD_PENDING = enum.auto()
    AUTH = enum.auto()
    AUTH_PENDING = enum.auto()
    REQUEST = enum.auto()
    REPLY_PENDING = enum.auto()
    DONE = enum.auto()
    CLOSED = enum.auto()


_VERSION = 5
_SUBNEG_VERSION = 1
_NO_ACCEPTABLE_REPLY = bytes((_VERSION, AuthMethod.NO_ACCEPTABLE))
_AUTH_SUCCESS = bytes((_SUBNEG_VERSION, 0))
_AUTH_FAILURE = bytes((_SUBNEG_VERSION, 1))
_PARSEABLE_METHODS = frozenset(
    {AuthMethod.NO_AUTH, AuthMethod.USERNAME_PASSWORD, AuthMethod.SAP_TOKEN}
)
_VISIBLE_ASCII = bytes(range(0x21, 0x7F))
# A well-behaved client waits for each answer, so anything it sends while the server owes one is
# pipelining; allow a generous amount (optimistic payload after CONNECT) but not without bound.
_MAX_EARLY_DATA = 64 * 1024
_WAITING = frozenset({State.METHOD_PENDING, State.AUTH_PENDING, State.REPLY_PENDING})


class SocksError(Exception):
    """The client sent something that is not acceptable SOCKS5; the connection must be closed.

    ``reply_code`` is the request-phase reply to send before closing, when one is appropriate.
    ``reply`` is the exact bytes to send before closing in any phase (it encodes ``reply_code``
    when that is set); empty means just close.
    """

    def __init__(
        self, message: str, reply_code: ReplyCode | None = None, *, reply: bytes | None = None
    ) -> None:
        super().__init__(message)
        self.reply_code = reply_code
        if reply is None:
            reply = b"" if reply_code is None else encode_reply(reply_code)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Socks5Event:
    """Base class of everything :meth:`Socks5ServerConnection.receive_data` returns."""


@dataclass(frozen=True, slots=True)
class Greeting(Socks5Event):
    """The client's method list, in the order it sent them."""

    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UsernamePassword(Socks5Event):
    """RFC 1929 credentials."""

    username: str
    # Events end up in log lines and tracebacks; secrets must not.
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SapToken(Socks5Event):
    """SAP method 0x80 credentials: a JWT and the (base64-decoded) Cloud Connector location id."""

    token: str = field(repr=False)
    location_id: str


@dataclass(frozen=True, slots=True)
class ConnectRequest(Socks5Event):
    """A CONNECT request: host is dotted IPv4, compressed IPv6, or an ASCII domain name."""

    command: Command
    host: str
    port: int
    address_type: AddressType


def encode_reply(code: ReplyCode, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:  # noqa: S104
    """Serialize a SOCKS5 reply; ``bind_host`` must be an IPv4 or IPv6 literal."""
    code = ReplyCode(code)
    try:
        address = ipaddress.ip_address(bind_host)
    except ValueError:
        raise ValueError(f"bind_host must be an IP address literal, not {bind_host!r}") from None
    if not 0 <= bind_port <= 0xFFFF:
        raise ValueError(f"bind_port {bind_port} is out of range")
    atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes((_VERSION, code, 0, atyp)) + address.packed + bind_port.to_bytes(2, "big")


def _decode_utf8(raw: bytes | bytearray, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SocksError(f"{what} is not valid UTF-8: {exc.reason}", reply=_AUTH_FAILURE) from None


def _greeting_version_error(version: int) -> SocksError:
    if version == 4:
        return SocksError("client speaks SOCKS4, only SOCKS5 is supported")
    if 0x41 <= version <= 0x5A:
        # Browsers and curl pointed at the wrong port send "GET", "CONNECT", ... here.
        return SocksError(
            f"client speaks a text protocol (first byte {chr(version)!r}), not SOCKS5"
        )
    return SocksError(f"greeting has version {version}, expected 5")


def _parse_greeting(buf: bytearray) -> tuple[Greeting, int] | None:
    if not buf:
        return None
    if buf[0] != _VERSION:
        raise _greeting_version_error(buf[0])
    if len(buf) < 2:
        return None
    if buf[1] == 0:
        raise SocksError("greeting offers no methods (NMETHODS=0)", reply=_NO_ACCEPTABLE_REPLY)
    end = 2 + buf[1]
    if len(buf) < end:
        return None
    return Greeting(tuple(buf[2:end])), end


def _check_subneg_version(buf: bytearray, what: str) -> None:
    if buf[0] != _SUBNEG_VERSION:
        raise SocksError(f"{what} sub-negotiation has version {buf[0]}, expected 1")


def _parse_username_password(buf: bytearray) -> tuple[UsernamePassword, int] | None:
    if not buf:
        return None
    _check_subneg_version(buf, "username/password")
    if len(buf) < 2:
        return None
    # RFC 1929 draws ULEN/PLEN as 1-255, but clients send empty passwords; rejecting those is
    # the credential check's job, which can say "bad credentials" rather than "bad protocol".
    plen_at = 2 + buf[1]
    if len(buf) <= plen_at:
        return None
    end = plen_at + 1 + buf[plen_at]
    if len(buf) < end:
        return None
    username = _decode_utf8(buf[2:plen_at], "username")
    password = _decode_utf8(buf[plen_at + 1 : end], "password")
    return UsernamePassword(username, password), end


def _parse_sap_token(buf: bytearray, max_token_length: int) -> tuple[SapToken, int] | None:
    if not buf:
        return None
    _check_subneg_version(buf, "SAP token (method 0x80)")
    if len(buf) < 5:
        return None
    token_length = int.from_bytes(buf[1:5], "big")
    if token_length == 0:
        raise SocksError("SAP token (method 0x80) has an empty JWT", reply=_AUTH_FAILURE)
    if token_length > max_token_length:
        # Decided from the length prefix alone, so a hostile length never makes us buffer.
        raise SocksError(
            f"SAP JWT is {token_length} bytes, more than the limit of {max_token_length}",
            reply=_AUTH_FAILURE,
        )
    llen_at = 5 + token_length
    if len(buf) <= llen_at:
        return None
    end = llen_at + 1 + buf[llen_at]
    if len(buf) < end:
        return None
    raw_token = bytes(buf[5:llen_at])
    if raw_token.translate(None, _VISIBLE_ASCII):
        raise SocksError("SAP JWT contains non-ASCII, control or space bytes", reply=_AUTH_FAILURE)
    try:
        raw_location = binascii.a2b_base64(bytes(buf[llen_at + 1 : end]), strict_mode=True)
    except binascii.Error as exc:
        raise SocksError(
            f"SAP location id is not valid base64: {exc}", reply=_AUTH_FAILURE
        ) from None
    location_id = _decode_utf8(raw_location, "SAP location id")
    return SapToken(raw_token.decode("ascii"), location_id), end


def _decode_domain(raw: bytes) -> str:
    if raw.translate(None, _VISIBLE_ASCII):
        # Non-ASCII must arrive IDNA-encoded; whitespace and control bytes (NUL above all) would
        # let one name mean different things to us, the resolver and the access rules.
        raise SocksError(
            f"domain name {raw!r} contains non-ASCII, whitespace or control bytes",
            ReplyCode.GENERAL_FAILURE,
        )
    return raw.decode("ascii")


def _parse_request(buf: bytearray) -> tuple[ConnectRequest, int] | None:
    # Each field is judged as soon as it arrives, so a bad request is answered without waiting
    # for (or buffering) the rest of it.
    if not buf:
        return None
    if buf[0] != _VERSION:
        raise SocksError(f"request has version {buf[0]}, expected 5")
    if len(buf) < 2:
        return None
    if buf[1] != Command.CONNECT:
        known = {c.value: c.name for c in Command}
        name = known.get(buf[1], f"{buf[1]:#04x}")
        raise SocksError(f"command {name} is not supported", ReplyCode.COMMAND_NOT_SUPPORTED)
    if len(buf) < 3:
        return None
    if buf[2] != 0:
        raise SocksError(f"request RSV is {buf[2]:#04x}, must be 0", ReplyCode.GENERAL_FAILURE)
    if len(buf) < 4:
        return None
    atyp = buf[3]
    if atyp == AddressType.IPV4:
        address_end = 8
    elif atyp == AddressType.IPV6:
        address_end = 20
    elif atyp == AddressType.DOMAIN:
        if len(buf) < 5:
            return None
        if buf[4] == 0:
            raise SocksError("request has an empty domain name", ReplyCode.GENERAL_FAILURE)
        address_end = 5 + buf[4]
    else:
        raise SocksError(
            f"address type {atyp} is not supported", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
        )
    end = address_end + 2
    if len(buf) < end:
        return None
    port = int.from_bytes(buf[address_end:end], "big")
    if port == 0:
        raise SocksError("request has destination port 0", ReplyCode.GENERAL_FAILURE)
    if atyp == AddressType.IPV4:
        host = str(ipaddress.IPv4Address(bytes(buf[4:8])))
    elif atyp == AddressType.IPV6:
        host = ipaddress.IPv6Address(bytes(buf[4:20])).compressed
    else:
        host = _decode_domain(bytes(buf[5:address_end]))
    return ConnectRequest(Command.CONNECT, host, port, AddressType(atyp)), end


class Socks5ServerConnection:
    """The server side of one SOCKS5 handshake.

    Flow: GREETING -> METHOD_PENDING -> [AUTH -> AUTH_PENDING] -> REQUEST -> REPLY_PENDING ->
    DONE (or CLOSED after any failure). After answering with :meth:`choose_method` or
    :meth:`auth_reply`, call :meth:`pending_events` before reading again: a pipelining client
    may already have sent the next message, and it would otherwise sit unparsed.

    ``accepted_methods`` are the methods the server will choose, in order of preference; only
    NO_AUTH, USERNAME_PASSWORD and SAP_TOKEN are understood.
    """

    def __init__(self, accepted_methods: Sequence[int], max_token_length: int = 16384) -> None:
        accepted = tuple(accepted_methods)
        if not accepted:
            raise ValueError("accepted_methods must not be empty")
        unknown = [hex(m) for m in accepted if m not in _PARSEABLE_METHODS]
        if unknown:
            raise ValueError(f"cannot serve authentication methods {', '.join(unknown)}")
        if max_token_length < 1:
            raise ValueError("max_token_length must be positive")
        self._accepted = accepted
        self._max_token_length = max_token_length
        self._state = State.GREETING
        self._buffer = bytearray()
        self._offered: tuple[int, ...] = ()
        self._method: int | None = None
        self._eof = False

    @property
    def state(self) -> State:
        """The current handshake state."""
        return self._state

    @property
    def method(self) -> int | None:
        """The authentication method chosen with :meth:`choose_method`, if any."""
        return self._method

    @property
    def client_eof(self) -> bool:
        """Whether the client has half-closed (``receive_data(b"")`` was called)."""
        return self._eof

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request: payload to forward once connected."""
        if self._state in (State.REPLY_PENDING, State.DONE):
            return bytes(self._buffer)
        return b""

    def receive_data(self, data: bytes) -> list[Socks5Event]:
        """Feed bytes from the client (``b""`` for EOF) and return the events now complete."""
        if self._state in (State.DONE, State.CLOSED):
            raise RuntimeError(f"receive_data() called in state {self._state.name}")
        if self._eof:
            raise RuntimeError("receive_data() called after EOF")
        if not data:
            self._eof = True
        else:
            self._buffer += data
            if self._state in _WAITING and len(self._buffer) > _MAX_EARLY_DATA:
                self._fail()
                raise SocksError(
                    f"client sent over {_MAX_EARLY_DATA} bytes without waiting for an answer"
                )
        return self.pending_events()

    def pending_events(self) -> list[Socks5Event]:
        """Parse what is already buffered; needed after answering a pipelining client."""
        # Every event leaves the server owing an answer, so one call yields at most one event.
        try:
            event = self._next_event()
        except SocksError:
            self._fail()
            raise
        return [] if event is None else [event]

    def preferred_method(self) -> int:
        """The first of ``accepted_methods`` that the client offered (state METHOD_PENDING)."""
        self._require(State.METHOD_PENDING, "preferred_method")
        return next(m for m in self._accepted if m in self._offered)

    def choose_method(self, method: int | None) -> bytes:
        """Answer the greeting; ``None`` refuses every method and ends the handshake."""
        self._require(State.METHOD_PENDING, "choose_method")
        if method is None:
            self._fail()
            return _NO_ACCEPTABLE_REPLY
        if method not in self._accepted:
            raise ValueError(f"method {method:#04x} is not in accepted_methods")
        if method not in self._offered:
            raise ValueError(f"method {method:#04x} was not offered by the client")
        self._method = method
        self._state = State.REQUEST if method == AuthMethod.NO_AUTH else State.AUTH
        return bytes((_VERSION, method))

    def auth_reply(self, success: bool) -> bytes:
        """Answer the credentials; failure ends the handshake."""
        self._require(State.AUTH_PENDING, "auth_reply")
        if success:
            self._state = State.REQUEST
            return _AUTH_SUCCESS
        self._fail()
        return _AUTH_FAILURE

    def reply(
        self,
        code: ReplyCode,
        bind_host: str = "0.0.0.0",  # noqa: S104
        bind_port: int = 0,
    ) -> bytes:
        """Answer the request; anything but SUCCEEDED ends the handshake."""
        self._require(State.REPLY_PENDING, "reply")
        data = encode_reply(code, bind_host, bind_port)
        self._state = State.DONE if code == ReplyCode.SUCCEEDED else State.CLOSED
        return data

    def _require(self, state: State, caller: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"{caller}() called in state {self._state.name}")

    def _fail(self) -> None:
        self._state = State.CLOSED
        self._buffer.clear()

    def _next_event(self) -> Socks5Event | None:
        parsed: tuple[Socks5Event, int] | None
        if self._state is State.GREETING:
            parsed, what = _parse_greeting(self._buffer), "greeting"
        elif self._state is State.AUTH and self._method == AuthMethod.SAP_TOKEN:
            parsed = _parse_sap_token(self._buffer, self._max_token_length)
            what = "SAP token"
        elif self._state is State.AUTH:
            parsed, what = _parse_username_password(self._buffer), "username/password"
        elif self._state is State.REQUEST:
            parsed, what = _parse_request(self._buffer), "request"
        else:
            return None
        if parsed is None:
            if not self._eof:
                return None
            if self._buffer:
                raise SocksError(f"{what} truncated: client closed after {len(self._buffer)} bytes")
            raise SocksError(f"client closed the connection before sending its {what}")
        event, consumed = parsed
        del self._buffer[:consumed]
        if isinstance(event, Greeting):
            if not any(m in event.methods for m in self._accepted):
                offered = ", ".join(f"{m:#04x}" for m in event.methods)
                raise SocksError(
                    f"client offered methods {offered}, none of which is accepted",
                    reply=_NO_ACCEPTABLE_REPLY,
                )
            self._offered = event.methods
            self._state = State.METHOD_PENDING
        elif isinstance(event, ConnectRequest):
            self._state = State.REPLY_PENDING
        else:
            self._state = State.AUTH_PENDING
        return event
