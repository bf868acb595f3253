"""Tests for the sans-IO SOCKS5 server codec (RFC 1928, RFC 1929, SAP method 0x80)."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backchannel_tcp._socks5 import (
    AddressType,
    AuthMethod,
    Command,
    ConnectRequest,
    Greeting,
    ReplyCode,
    SapToken,
    Socks5Event,
    Socks5ServerConnection,
    SocksError,
    State,
    UsernamePassword,
    encode_reply,
)

ALL_METHODS = (AuthMethod.NO_AUTH, AuthMethod.USERNAME_PASSWORD, AuthMethod.SAP_TOKEN)
VISIBLE_ASCII = "".join(map(chr, range(0x21, 0x7F)))
AUTH_FAILED = b"\x01\x01"
NO_ACCEPTABLE = b"\x05\xff"


# --- a tiny client-side encoder ---------------------------------------------------------------


def enc_greeting(methods: Sequence[int]) -> bytes:
    return bytes([5, len(methods), *methods])


def enc_userpass(username: str, password: str) -> bytes:
    user, pwd = username.encode(), password.encode()
    return bytes([1, len(user)]) + user + bytes([len(pwd)]) + pwd


def enc_sap(token: str, location_id: str) -> bytes:
    raw_token = token.encode("ascii")
    location = base64.b64encode(location_id.encode())
    return (
        b"\x01" + len(raw_token).to_bytes(4, "big") + raw_token + bytes([len(location)]) + location
    )


def enc_request(host: str, port: int) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        target = bytes([AddressType.DOMAIN, len(name)]) + name
    else:
        atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
        target = bytes([atyp]) + address.packed
    return bytes([5, Command.CONNECT, 0]) + target + port.to_bytes(2, "big")


# --- driving a connection the way a server would ------------------------------------------------


def state(conn: Socks5ServerConnection) -> State:
    # A call, not the property, so mypy does not narrow it across state-changing calls.
    return conn.state


def answer(conn: Socks5ServerConnection, event: Socks5Event) -> bytes:
    if isinstance(event, Greeting):
        return conn.choose_method(conn.preferred_method())
    if isinstance(event, UsernamePassword | SapToken):
        return conn.auth_reply(True)
    return b""  # leave the request unanswered so trailing data stays observable


def run(
    conn: Socks5ServerConnection, chunks: Sequence[bytes]
) -> tuple[list[Socks5Event], list[bytes]]:
    events: list[Socks5Event] = []
    sent: list[bytes] = []
    for chunk in chunks:
        new = conn.receive_data(chunk)
        while new:
            events.extend(new)
            if out := answer(conn, new[-1]):
                sent.append(out)
            new = conn.pending_events()
    return events, sent


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def advance(stage: str, max_token_length: int = 16384) -> Socks5ServerConnection:
    """A connection that is waiting for the client's message of the given stage."""
    if stage == "greeting":
        return Socks5ServerConnection([0, 2])  # no 0x80, so a GSSAPI-only greeting is refused
    conn = Socks5ServerConnection(ALL_METHODS, max_token_length=max_token_length)
    method = {"userpass": 2, "sap": 0x80, "request": 0}[stage]
    run(conn, [enc_greeting([method])])
    assert state(conn) is (State.REQUEST if method == 0 else State.AUTH)
    return conn


def test_greeting_and_method_choice() -> None:
    conn = Socks5ServerConnection([AuthMethod.SAP_TOKEN, AuthMethod.USERNAME_PASSWORD])
    assert conn.receive_data(enc_greeting([0, 2, 0x80, 0x42])) == [Greeting((0, 2, 0x80, 0x42))]
    assert state(conn) is State.METHOD_PENDING
    assert conn.preferred_method() == 0x80  # the server's preference order wins
    assert conn.choose_method(2) == b"\x05\x02"
    assert conn.method == 2
    assert state(conn) is State.AUTH


def test_no_auth_connect_ipv4() -> None:
    conn = Socks5ServerConnection([0])
    events, sent = run(conn, [enc_greeting([0]), enc_request("10.0.0.7", 3300)])
    assert sent == [b"\x05\x00"]
    assert events[1] == ConnectRequest(Command.CONNECT, "10.0.0.7", 3300, AddressType.IPV4)
    assert state(conn) is State.REPLY_PENDING
    assert conn.reply(ReplyCode.SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert state(conn) is State.DONE


def test_username_password() -> None:
    conn = advance("userpass")
    assert conn.receive_data(enc_userpass("jörg", "s3cret")) == [UsernamePassword("jörg", "s3cret")]
    assert state(conn) is State.AUTH_PENDING
    assert conn.auth_reply(True) == b"\x01\x00"
    assert state(conn) is State.REQUEST


def test_sap_token() -> None:
    conn = advance("sap")
    assert conn.receive_data(enc_sap("eyJ.abc.def", "Berlin-🐻")) == [
        SapToken("eyJ.abc.def", "Berlin-🐻")
    ]
    assert conn.auth_reply(True) == b"\x01\x00"


@pytest.mark.parametrize(
    ("stage", "wire", "event"),
    [
        ("userpass", b"\x01\x00\x00", UsernamePassword("", "")),
        ("sap", enc_sap("t", ""), SapToken("t", "")),
        ("sap", enc_sap("x" * 10, "loc"), SapToken("x" * 10, "loc")),  # exactly at the limit
    ],
)
def test_auth_edge_cases(stage: str, wire: bytes, event: Socks5Event) -> None:
    assert advance(stage, max_token_length=10).receive_data(wire) == [event]


@pytest.mark.parametrize(
    ("host", "expected", "atyp"),
    [
        ("192.0.2.1", "192.0.2.1", AddressType.IPV4),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1", AddressType.IPV6),
        ("::1", "::1", AddressType.IPV6),
        ("erp.internal", "erp.internal", AddressType.DOMAIN),
        ("xn--bcher-kva.example", "xn--bcher-kva.example", AddressType.DOMAIN),
        ("a" * 255, "a" * 255, AddressType.DOMAIN),
    ],
)
def test_request_address_types(host: str, expected: str, atyp: AddressType) -> None:
    conn = advance("request")
    assert conn.receive_data(enc_request(host, 65535)) == [
        ConnectRequest(Command.CONNECT, expected, 65535, atyp)
    ]


def test_secrets_are_not_in_repr() -> None:
    assert "hunter2" not in repr(UsernamePassword("bob", "hunter2"))
    assert "eyJsecret" not in repr(SapToken("eyJsecret", "loc"))


CONVERSATIONS = {
    "no-auth/ipv4": ((0,), enc_greeting([0]) + enc_request("127.0.0.1", 80)),
    "userpass/ipv6": ((2,), enc_greeting([0, 2]) + enc_userpass("u", "p") + enc_request("::1", 1)),
    "sap/domain": ((0x80,), enc_greeting([0x80]) + enc_sap("a.b.c", "ID") + enc_request("h", 22)),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_byte_at_a_time_equals_whole(name: str) -> None:
    methods, wire = CONVERSATIONS[name]
    whole = Socks5ServerConnection(methods)
    single = Socks5ServerConnection(methods)
    assert run(whole, [wire + b"payload"]) == run(single, bytewise(wire + b"payload"))
    assert whole.trailing_data == single.trailing_data == b"payload"
    assert whole.state is single.state is State.REPLY_PENDING


def test_pipelined_handshake_and_payload() -> None:
    conn = Socks5ServerConnection([2])
    wire = enc_greeting([2]) + enc_userpass("u", "p") + enc_request("db", 5432) + b"\x00SELECT"
    assert conn.receive_data(wire) == [Greeting((2,))]
    assert conn.trailing_data == b""  # not yet: the rest is still handshake
    conn.choose_method(2)
    assert conn.pending_events() == [UsernamePassword("u", "p")]
    conn.auth_reply(True)
    assert conn.pending_events() == [
        ConnectRequest(Command.CONNECT, "db", 5432, AddressType.DOMAIN)
    ]
    assert conn.trailing_data == b"\x00SELECT"
    assert conn.receive_data(b" 1") == []
    assert conn.receive_data(b"") == []
    assert conn.client_eof
    conn.reply(ReplyCode.SUCCEEDED, "192.0.2.9", 40000)
    assert conn.trailing_data == b"\x00SELECT 1"


def test_eof_while_server_decides_is_reported_when_parsing_resumes() -> None:
    conn = Socks5ServerConnection([2])
    conn.receive_data(enc_greeting([2]))
    assert conn.receive_data(b"") == []
    conn.choose_method(2)
    with pytest.raises(SocksError, match="before sending its username/password"):
        conn.pending_events()
    assert state(conn) is State.CLOSED


@pytest.mark.parametrize(
    ("stage", "prefix", "message"),
    [
        ("greeting", b"", "before sending its greeting"),
        ("greeting", b"\x05\x02\x00", "greeting truncated: client closed after 3 bytes"),
        ("userpass", b"\x01\x03ab", "username/password truncated"),
        ("sap", b"\x01\x00\x00", "SAP token truncated"),
        ("sap", enc_sap("tok", "loc")[:-1], "SAP token truncated"),
        ("request", b"", "before sending its request"),
        ("request", enc_request("::1", 80)[:-1], "request truncated"),
    ],
)
def test_eof_mid_handshake(stage: str, prefix: bytes, message: str) -> None:
    conn = advance(stage)
    if prefix:
        assert conn.receive_data(prefix) == []
    with pytest.raises(SocksError, match=message) as info:
        conn.receive_data(b"")
    assert info.value.reply_code is None
    assert info.value.reply == b""


def test_early_data_is_bounded() -> None:
    conn = Socks5ServerConnection([0])
    conn.receive_data(enc_greeting([0]))
    assert conn.receive_data(b"x" * 65536) == []  # a client may pipeline, up to a point
    with pytest.raises(SocksError, match="without waiting"):
        conn.receive_data(b"x")
    assert state(conn) is State.CLOSED


def request_reply(code: ReplyCode) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


GF = ReplyCode.GENERAL_FAILURE
REJECTIONS: list[tuple[str, bytes, ReplyCode | None, bytes, str]] = [
    ("greeting", b"\x04", None, b"", "SOCKS4"),
    ("greeting", b"C", None, b"", "text protocol"),
    ("greeting", b"\x00", None, b"", "greeting has version 0, expected 5"),
    ("greeting", b"\x05\x00", None, NO_ACCEPTABLE, "NMETHODS=0"),
    ("greeting", b"\x05\x02\x01\x03", None, NO_ACCEPTABLE, "0x01, 0x03, none of which"),
    ("userpass", b"\x05", None, b"", "username/password sub-negotiation has version 5"),
    ("userpass", b"\x01\x01\xff\x00", None, AUTH_FAILED, "username is not valid UTF-8"),
    ("userpass", b"\x01\x01a\x01\xc3", None, AUTH_FAILED, "password is not valid UTF-8"),
    ("sap", b"\x02", None, b"", "SAP token .* has version 2"),
    ("sap", b"\x01\x00\x00\x00\x00", None, AUTH_FAILED, "empty JWT"),
    ("sap", b"\x01\x00\x00\x40\x01", None, AUTH_FAILED, "16385 bytes, more than .* 16384"),
    ("sap", b"\x01\xff\xff\xff\xff", None, AUTH_FAILED, "4294967295 bytes"),
    ("sap", b"\x01\x00\x00\x00\x02a\x00\x00", None, AUTH_FAILED, "JWT contains non-ASCII"),
    ("sap", b"\x01\x00\x00\x00\x02\xc3\xa9\x00", None, AUTH_FAILED, "JWT contains non-ASCII"),
    ("sap", b"\x01\x00\x00\x00\x02a \x00", None, AUTH_FAILED, "JWT contains non-ASCII"),
    ("sap", b"\x01\x00\x00\x00\x01a\x03abc", None, AUTH_FAILED, "location id is not valid base64"),
    ("sap", b"\x01\x00\x00\x00\x01a\x05YW Jj", None, AUTH_FAILED, "not valid base64"),
    ("sap", b"\x01\x00\x00\x00\x01a\x04/w==", None, AUTH_FAILED, "location id is not valid UTF-8"),
    ("request", b"\x04", None, b"", "request has version 4"),
    ("request", b"\x05\x02", ReplyCode.COMMAND_NOT_SUPPORTED, b"", "command BIND"),
    ("request", b"\x05\x03", ReplyCode.COMMAND_NOT_SUPPORTED, b"", "UDP_ASSOCIATE"),
    ("request", b"\x05\x09", ReplyCode.COMMAND_NOT_SUPPORTED, b"", "command 0x09"),
    ("request", b"\x05\x01\x01", GF, b"", "RSV is 0x01"),
    ("request", b"\x05\x01\x00\x02", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, b"", "type 2"),
    ("request", b"\x05\x01\x00\x00", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, b"", "type 0"),
    ("request", b"\x05\x01\x00\x03\x00", GF, b"", "empty domain name"),
    ("request", b"\x05\x01\x00\x03\x03a\x00b\x00\x50", GF, b"", "domain name"),
    ("request", b"\x05\x01\x00\x03\x03a b\x00\x50", GF, b"", "whitespace"),
    ("request", b"\x05\x01\x00\x03\x03a\tb\x00\x50", GF, b"", "control"),
    ("request", b"\x05\x01\x00\x03\x02a\n\x00\x50", GF, b"", "control"),
    ("request", b"\x05\x01\x00\x03\x02a\x7f\x00\x50", GF, b"", "control"),
    ("request", b"\x05\x01\x00\x03\x02\xc3\xa9\x00\x50", GF, b"", "non-ASCII"),
    ("request", enc_request("127.0.0.1", 0), GF, b"", "port 0"),
    ("request", enc_request("::1", 0), GF, b"", "port 0"),
    ("request", enc_request("host", 0), GF, b"", "port 0"),
]


@pytest.mark.parametrize(("stage", "wire", "code", "reply", "message"), REJECTIONS)
def test_rejection(
    stage: str, wire: bytes, code: ReplyCode | None, reply: bytes, message: str
) -> None:
    conn = advance(stage)
    # Each case is the shortest input that is already wrong, so the error must come on its last
    # byte: nothing is buffered past the point where the answer is known.
    for byte in bytewise(wire[:-1]):
        assert conn.receive_data(byte) == []
    with pytest.raises(SocksError, match=message) as info:
        conn.receive_data(wire[-1:])
    assert info.value.reply_code is code
    assert info.value.reply == (request_reply(code) if code is not None else reply)
    assert state(conn) is State.CLOSED
    with pytest.raises(RuntimeError):
        conn.receive_data(b"more")
    with pytest.raises(SocksError, match=message) as info:  # all at once, with excess
        advance(stage).receive_data(wire + b"\x00" * 8)
    assert info.value.reply_code is code


@pytest.mark.parametrize("code", list(ReplyCode))
def test_reply_codes(code: ReplyCode) -> None:
    conn = advance("request")
    conn.receive_data(enc_request("h", 1))
    assert conn.reply(code) == request_reply(code)
    assert state(conn) is (State.DONE if code == ReplyCode.SUCCEEDED else State.CLOSED)


def test_reply_bind_addresses() -> None:
    v4 = encode_reply(ReplyCode.SUCCEEDED, "10.1.2.3", 1080)
    assert v4 == bytes.fromhex("05000001 0a010203 0438")
    v6 = encode_reply(ReplyCode.HOST_UNREACHABLE, "2001:db8::1", 443)
    assert v6 == b"\x05\x04\x00\x04" + ipaddress.IPv6Address("2001:db8::1").packed + b"\x01\xbb"


def test_refusals_end_the_handshake() -> None:
    conn = Socks5ServerConnection([0])
    conn.receive_data(enc_greeting([0]))
    assert conn.choose_method(None) == NO_ACCEPTABLE
    assert state(conn) is State.CLOSED
    conn = advance("userpass")
    conn.receive_data(enc_userpass("u", "wrong"))
    assert conn.auth_reply(False) == AUTH_FAILED
    assert state(conn) is State.CLOSED


def test_caller_misuse_is_not_a_socks_error() -> None:
    for bad in ([], [1], [0xFF]):
        with pytest.raises(ValueError, match=r"accepted_methods|cannot serve"):
            Socks5ServerConnection(bad)
    with pytest.raises(ValueError, match="max_token_length"):
        Socks5ServerConnection([0], max_token_length=0)
    conn = Socks5ServerConnection([0, 2])
    with pytest.raises(RuntimeError, match=r"choose_method\(\) called in state GREETING"):
        conn.choose_method(0)
    with pytest.raises(RuntimeError, match=r"auth_reply\(\) called in state GREETING"):
        conn.auth_reply(True)
    with pytest.raises(RuntimeError, match=r"reply\(\) called in state GREETING"):
        conn.reply(ReplyCode.SUCCEEDED)
    conn.receive_data(enc_greeting([0]))
    with pytest.raises(ValueError, match="not offered"):
        conn.choose_method(2)
    with pytest.raises(ValueError, match="not in accepted_methods"):
        conn.choose_method(0x80)
    conn.choose_method(0)
    conn.receive_data(enc_request("h", 1))
    with pytest.raises(ValueError, match="IP address literal"):
        conn.reply(ReplyCode.SUCCEEDED, "example.com")
    with pytest.raises(ValueError, match="out of range"):
        conn.reply(ReplyCode.SUCCEEDED, "::", 65536)
    assert state(conn) is State.REPLY_PENDING  # a rejected call changes nothing
    conn.receive_data(b"")
    with pytest.raises(RuntimeError, match="after EOF"):
        conn.receive_data(b"x")
    conn.reply(ReplyCode.SUCCEEDED)
    with pytest.raises(RuntimeError, match="state DONE"):
        conn.receive_data(b"x")


accepted_methods = st.lists(st.sampled_from(ALL_METHODS), min_size=1, max_size=3, unique=True)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)]) if a < b]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# (what the client encodes, the host the server must report, the address type on the wire)
hosts = st.one_of(
    st.ip_addresses(v=4).map(lambda a: (str(a), str(a), AddressType.IPV4)),
    st.ip_addresses(v=6).map(lambda a: (a.exploded, a.compressed, AddressType.IPV6)),
    st.text(VISIBLE_ASCII, min_size=1, max_size=255)
    .filter(lambda h: not _is_ip(h))
    .map(lambda h: (h, h, AddressType.DOMAIN)),
)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[int, bytes, list[Socks5Event], bytes]:
    method = draw(st.sampled_from(ALL_METHODS))
    others = draw(st.lists(st.integers(0, 255).filter(lambda m: m != method), max_size=20))
    offered = [*others]
    offered.insert(draw(st.integers(0, len(others))), method)
    wire = enc_greeting(offered)
    events: list[Socks5Event] = [Greeting(tuple(offered))]
    if method == AuthMethod.USERNAME_PASSWORD:
        user, pwd = draw(st.text(max_size=60)), draw(st.text(max_size=60))
        wire += enc_userpass(user, pwd)
        events.append(UsernamePassword(user, pwd))
    elif method == AuthMethod.SAP_TOKEN:
        token = draw(st.text(VISIBLE_ASCII, min_size=1, max_size=400))
        location = draw(st.text(max_size=45))
        wire += enc_sap(token, location)
        events.append(SapToken(token, location))
    (host, expected_host, atyp), port = draw(hosts), draw(st.integers(1, 65535))
    wire += enc_request(host, port)
    events.append(ConnectRequest(Command.CONNECT, expected_host, port, atyp))
    return method, wire, events, draw(st.binary(max_size=64))


@given(st.data(), conversations())
def test_round_trip(data: st.DataObject, conv: tuple[int, bytes, list[Socks5Event], bytes]) -> None:
    method, wire, expected, payload = conv
    conn = Socks5ServerConnection([method], max_token_length=400)
    events, sent = run(conn, data.draw(chunked(wire + payload)))
    assert events == expected
    assert sent[0] == bytes([5, method])
    assert sent[1:] == ([] if method == 0 else [b"\x01\x00"])
    assert conn.trailing_data == payload
    assert conn.reply(ReplyCode.SUCCEEDED) == request_reply(ReplyCode.SUCCEEDED)


garbage = st.one_of(
    st.binary(max_size=600),
    st.tuples(conversations(), st.integers(0, 600), st.binary(max_size=300)).map(
        lambda t: t[0][1][: t[1]] + t[2]  # a valid prefix reaches the later states
    ),
)


@settings(max_examples=500)
@given(st.data(), garbage, accepted_methods, st.integers(1, 64), st.booleans())
def test_garbage_raises_only_socks_error(
    data: st.DataObject, wire: bytes, methods: list[int], max_token: int, eof: bool
) -> None:
    conn = Socks5ServerConnection(methods, max_token_length=max_token)
    chunks = data.draw(chunked(wire)) + ([b""] if eof else [])
    try:
        run(conn, chunks)
    except SocksError as exc:
        error = exc
    else:
        return
    assert state(conn) is State.CLOSED
    assert error.reply in (b"", NO_ACCEPTABLE, AUTH_FAILED) or error.reply_code is not None


def longest_message(conn: Socks5ServerConnection, max_token: int) -> int:
    if state(conn) is State.GREETING:
        return 2 + 255
    if state(conn) is State.REQUEST:
        return 4 + 1 + 255 + 2
    if conn.method == AuthMethod.SAP_TOKEN:
        return 1 + 4 + max_token + 1 + 255
    return 1 + 1 + 255 + 1 + 255


@given(garbage, accepted_methods, st.integers(1, 64))
def test_buffering_never_exceeds_the_longest_message(
    wire: bytes, methods: list[int], max_token: int
) -> None:
    conn = Socks5ServerConnection(methods, max_token_length=max_token)
    held = 0
    with contextlib.suppress(SocksError):
        for byte in bytewise(wire):
            if state(conn) is State.REPLY_PENDING:
                break
            new = conn.receive_data(byte)
            held = 0 if new else held + 1
            if new:
                answer(conn, new[0])
                assert conn.pending_events() == []
            assert held < longest_message(conn, max_token)
