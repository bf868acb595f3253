"""Second review of the plain (h11-free) HTTP exchanges: what the first one
(``tests/test_h1_review.py``) left out.

* the connector's ``unsent`` logic (the write of head + body to the backend fails): every
  combination, fresh and kept-alive backend connections, the retry rule, reuse;
* HTTPS backends and principal propagation (``certificate``, ``header``, a token or certificate
  running out between two requests of one stream);
* the destinations front door (injected ``Authorization``);
* cancellation and shutdown with a plain exchange in flight;
* memory bounds and back-pressure;
* audit records and access decisions.

Differential where it can be: the same scenario runs once plain and once with ``parse_request``
made to refuse everything (so the old h11 path carries it), and both must agree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import backchannel_http._front_door as front_door_module
import backchannel_http._handler as handler_module
from backchannel import (
    AuditLog,
    CertificateAuthority,
    HostPort,
    ResetCode,
    Role,
    Secret,
    Session,
    TunnelStream,
)
from backchannel._identity import PrincipalPropagationConfig, PrincipalResolver
from backchannel._jwt_trust import TrustedIdp, TrustList
from backchannel._subject_rules import SubjectRule, SubjectRules
from backchannel._user_ca import UserCertificateAuthority
from backchannel_http._destinations import Destination, DestinationsRouter, parse_destination_url
from backchannel_http._front_door import ClientConnection, serve_http
from backchannel_http._handler import _StreamServer
from backchannel_http._relay import Client, HttpLimits, ProxyRouter, Router
from tests.test_h1_review import (
    Action,
    BackendLog,
    ConnectorLog,
    _scripted_backend,
    _scripted_stream,
    ok,
    origin_request,
    read_responses,
    request,
)
from tests.test_http_front_door import AUTH, CONNECTED, FakeServices
from tests.test_http_handler import Backend, http_session, serving, start_backend
from tests.tunnel_pair import tunnel_pair

VHOST, VPORT = "erp.virtual", 8000
ISSUER = "https://idp.test"

# --------------------------------------------------------------------------- shared helpers


class Recorder(AuditLog):
    """Keeps every audit decision (allowed ones too), without the time."""

    def __init__(self, role: Role) -> None:
        super().__init__(role)
        self.records: list[tuple[Any, ...]] = []

    def allowed(self, event: str, **fields: Any) -> None:
        self.records.append(("allow", event, fields))

    def denied(self, event: str, reason: str, **fields: Any) -> None:
        self.records.append(("deny", event, reason, fields))
        super().denied(event, reason, **fields)


@contextmanager
def through_h11(monkeypatch: pytest.MonkeyPatch, h11_only: bool) -> Iterator[None]:
    """With ``h11_only``, no request is plain on either side: the old h11 path carries all."""
    with monkeypatch.context() as patch:
        if h11_only:
            patch.setattr(handler_module, "parse_request", lambda head: None)
            patch.setattr(front_door_module, "parse_request", lambda head: None)
        yield


@dataclass
class PlainCalls:
    connector: int = 0
    gateway: int = 0


@pytest.fixture
def plain_calls(monkeypatch: pytest.MonkeyPatch) -> PlainCalls:
    """Counts plain exchanges started on each side (so a differential test knows it compared
    the plain path with h11, not h11 with itself)."""
    calls = PlainCalls()
    relay_plain = _StreamServer._relay_plain
    serve_plain = ClientConnection._serve_plain

    async def connector(self: _StreamServer, *args: Any) -> bool:
        calls.connector += 1
        return await relay_plain(self, *args)

    async def gateway(self: ClientConnection, *args: Any) -> bool:
        calls.gateway += 1
        return await serve_plain(self, *args)

    monkeypatch.setattr(_StreamServer, "_relay_plain", connector)
    monkeypatch.setattr(ClientConnection, "_serve_plain", gateway)
    return calls


@asynccontextmanager
async def connector(
    port: int,
    table: dict[str, Any] | None = None,
    *,
    protocol: str = "http",
    base_dir: Path = Path("."),
    principal: str | None = None,
    resolver: PrincipalResolver | None = None,
) -> AsyncIterator[tuple[TunnelStream, Recorder, trio.Event]]:
    """A handler serving one tunnel stream for erp.virtual:8000 → 127.0.0.1:``port``: the
    gateway's end of the stream, the audit records, and an event set when the handler is done."""
    audit = Recorder(Role.CONNECTOR)
    session = http_session(
        port,
        audit,
        table,
        protocol=protocol,
        base_dir=base_dir,
        app="crm",
        principal=principal,
        principal_resolver=resolver,
    )
    async with serving(session) as (opener, done):
        with trio.fail_after(10):
            yield opener, audit, done


async def exchange(stream: TunnelStream, data: bytes, method: bytes = b"GET") -> tuple[int, bytes]:
    """Send one request, read its answer: (status, body); (0, b"") if none came."""
    await stream.send_all(data)
    _, answers, _ = await read_responses(stream, [method])
    return answers[0] if answers else (0, b"")


# --------------------------------------------------------------------------- 1. unsent


class FakeBackend(trio.abc.Stream):
    """A backend connection: takes ``room`` bytes (None: all), then the write fails as a reset
    would; its reads give ``answers`` one per read, then the end (or, with ``reset_reads``
    once a write failed, a reset: as a kernel gives what came before the RST first)."""

    def __init__(
        self, answers: list[bytes], room: int | None = None, *, reset_reads: bool = False
    ) -> None:
        self.answers = list(answers)
        self.room = room
        self.reset_reads = reset_reads
        self.taken = bytearray()
        self.failed = False
        self.closed = False
        #: Writes tried after one failed: the connection was used again.
        self.reused_after_failure = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise trio.ClosedResourceError
        self.reused_after_failure += self.failed
        if self.room is not None and len(self.taken) + len(data) > self.room:
            self.taken += bytes(data[: self.room - len(self.taken)])
            self.failed = True
            raise trio.BrokenResourceError("connection reset by peer")
        self.taken += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise trio.ClosedResourceError
        if self.answers:
            return self.answers.pop(0)
        if self.failed and self.reset_reads:  # what came before a reset is read first
            raise trio.BrokenResourceError("connection reset by peer")
        return b""

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


def fake_backends(monkeypatch: pytest.MonkeyPatch, *backends: FakeBackend) -> list[FakeBackend]:
    """The connector's backend connections are ``backends``, in order; the list returned holds
    those it opened."""
    queue, opened = list(backends), []

    async def connect(*args: object) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        opened.append(queue.pop(0))
        return opened[-1]

    monkeypatch.setattr(handler_module, "_connect", connect)
    return opened


POST_BODY = b"b" * 8192
CHUNKED_413 = (
    b"HTTP/1.1 413 Payload Too Large\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"8\r\ntoo big\n\r\n0\r\n\r\n"
)
PLAIN_413 = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n"
#: After the failed write: what the backend's connection still gives.
_AFTER_FAILURE: dict[str, tuple[list[bytes], bool]] = {
    "nothing, then the end": ([], False),
    "nothing, then a reset": ([], True),
    "a chunked answer": ([CHUNKED_413], False),
    "a chunked answer cut in two reads": ([CHUNKED_413[:20], CHUNKED_413[20:]], False),
    "a plain answer": ([PLAIN_413], False),
    "a plain answer cut in its head": ([PLAIN_413[:30], PLAIN_413[30:]], False),
    "a plain answer, then a reset": ([PLAIN_413], True),
}


async def _post_then_get(
    monkeypatch: pytest.MonkeyPatch, after: str, *, h11_only: bool
) -> tuple[list[tuple[int, bytes]], list[FakeBackend]]:
    """A POST whose write fails after 4 KiB (the head passed) on a fresh backend connection,
    then a GET on the same stream."""
    answers, reset_reads = _AFTER_FAILURE[after]
    opened = fake_backends(
        monkeypatch,
        FakeBackend(answers, 4096, reset_reads=reset_reads),
        FakeBackend([ok(b"next")]),
    )
    results = []
    with through_h11(monkeypatch, h11_only):
        async with connector(1) as (stream, _, _):
            post = origin_request(b"POST", b"/public/upload", POST_BODY)
            results.append(await exchange(stream, post, b"POST"))
            if results[0][0]:
                results.append(await exchange(stream, origin_request(path=b"/public/next")))
    return results, opened


@pytest.mark.parametrize("after", sorted(_AFTER_FAILURE))
async def test_a_failed_write_of_a_plain_body_ends_as_on_the_h11_path(
    monkeypatch: pytest.MonkeyPatch, plain_calls: PlainCalls, after: str
) -> None:
    through = await _post_then_get(monkeypatch, after, h11_only=True)
    assert plain_calls.connector == 0
    plain = await _post_then_get(monkeypatch, after, h11_only=False)
    assert plain_calls.connector >= 1
    assert plain[0] == through[0]
    expected = 502 if after.startswith("nothing") else 413
    assert plain[0][0][0] == expected
    assert plain[1][0].failed  # the plain write did fail (h11's upload may not get that far)
    for backends in (plain[1], through[1]):
        first = backends[0]
        assert first.closed  # the connection with half a request is closed...
        # ... and never used again: the next request went to a new connection.
        assert first.reused_after_failure == 0
        assert first.taken.count(b"HTTP/1.1\r\n") == 1
    if len(plain[0]) > 1:
        assert plain[0][1] == (200, b"next")
        assert len(plain[1]) == 2


@pytest.mark.parametrize("method", [b"GET", b"DELETE", b"POST"])
@pytest.mark.parametrize("reset_reads", [False, True], ids=["then the end", "then a reset"])
async def test_a_kept_alive_connection_whose_write_fails_is_retried_only_without_a_body(
    monkeypatch: pytest.MonkeyPatch, plain_calls: PlainCalls, method: bytes, reset_reads: bool
) -> None:
    """The first request leaves a kept-alive connection; the second one's write fails on it
    (the backend closed it meanwhile) and nothing is answered: a request without a body is
    sent again on a new connection, one with a body gets a 502; the same on both paths."""
    first_request = origin_request(path=b"/public/one")
    body = b"xyz" if method == b"POST" else b""
    second_request = origin_request(method, b"/public/two", body)
    outcomes = []
    for h11_only in (True, False):
        kept = FakeBackend([ok(b"one")], reset_reads=reset_reads)
        opened = fake_backends(monkeypatch, kept, FakeBackend([ok(b"two")]))
        with through_h11(monkeypatch, h11_only):
            async with connector(1) as (stream, _, _):
                one = await exchange(stream, first_request)
                kept.room = len(kept.taken)  # closed by the backend: no more writes
                two = await exchange(stream, second_request, method)
        assert kept.closed
        outcomes.append((one, two, len(opened)))
    assert plain_calls.connector >= 2
    assert outcomes[0] == outcomes[1]
    if body:
        assert outcomes[1] == ((200, b"one"), (502, outcomes[1][1][1]), 1)
    else:
        assert outcomes[1] == ((200, b"one"), (200, b"two"), 2)


class _IdleTimeoutBackend:
    """Answers the first request of a connection (kept alive), then, as a backend whose idle
    timeout struck, says 408 and resets the connection (unread data, SO_LINGER 0)."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.idle = trio.Event()  # set by the test once the first answer came through
        self.timed_out = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        data = bytearray()
        try:
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            self.requests.append(bytes(data))
            await stream.send_all(ok(b"one" if self.connections == 1 else b"fresh"))
            if self.connections == 1:
                await self.idle.wait()
                await stream.send_all(
                    b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 5\r\n\r\nidle\n"
                )
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                stream.socket.close()  # a reset: the kernel still holds the 408 for the peer
                self.timed_out.set()
                return
            await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def _get_after_an_idle_timeout(*, h11_only: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    backend = _IdleTimeoutBackend()
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, backend.serve, 0, host="127.0.0.1")
        [listener] = await nursery.start(serve)
        with through_h11(monkeypatch, h11_only):
            async with connector(listener.socket.getsockname()[1]) as (stream, _, _):
                one = await exchange(stream, origin_request(path=b"/public/one"))
                backend.idle.set()
                await backend.timed_out.wait()
                await trio.testing.wait_all_tasks_blocked()
                two = await exchange(stream, origin_request(path=b"/public/two"))
        nursery.cancel_scope.cancel()
    return one, two, backend.connections


async def test_through_h11_a_get_on_a_connection_reset_while_idle_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await _get_after_an_idle_timeout(h11_only=True, monkeypatch=monkeypatch) == (
        (200, b"one"),
        (200, b"fresh"),
        2,
    )


async def test_plain_a_get_on_a_connection_reset_while_idle_is_retried(
    monkeypatch: pytest.MonkeyPatch, plain_calls: PlainCalls
) -> None:
    outcome = await _get_after_an_idle_timeout(h11_only=False, monkeypatch=monkeypatch)
    assert plain_calls.connector >= 2
    assert outcome == ((200, b"one"), (200, b"fresh"), 2)


# --------------------------------------------------------------------------- 2. HTTPS


@dataclass(frozen=True)
class BackendPki:
    folder: Path
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self, client_ca: Path | None = None) -> ssl.SSLContext:
        """The backend's TLS; with ``client_ca``, clients must present a certificate from it."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def table(self, **extra: Any) -> dict[str, Any]:
        return {"ca_file": str(self.ca_file), "server_name": "backend.corp", **extra}


@pytest.fixture(scope="module")
def backend_pki(tmp_path_factory: pytest.TempPathFactory) -> BackendPki:
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create("backend CA")
    ca_file, _ = ca.save(folder, name="ca")
    server_cert, server_key = ca.issue_server_certificate(["backend.corp"]).save(folder, "srv")
    client_cert, client_key = ca.issue_client_certificate("connector-7").save(folder, "cli")
    return BackendPki(folder, ca_file, server_cert, server_key, client_cert, client_key)


class _ResetAfter(trio.abc.Stream):
    """A TCP connection to the backend whose writes, once ``armed``, get ``room`` bytes through
    and then fail as a reset does, once the backend has answered (``answered``)."""

    def __init__(self, tcp: trio.SocketStream, room: int, answered: trio.Event) -> None:
        self.tcp = tcp
        self.room = room
        self.answered = answered
        self.armed = False
        self.failed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.armed:
            await self.tcp.send_all(data)
            return
        passed = bytes(data[: max(0, self.room)])
        self.room -= len(passed)
        if passed:
            await self.tcp.send_all(passed)
        if len(passed) < len(data):
            await self.answered.wait()
            self.failed = True
            raise trio.BrokenResourceError("connection reset by peer")

    async def wait_send_all_might_not_block(self) -> None:
        await self.tcp.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.tcp.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.tcp.aclose()


async def _early_answer_over_tls(
    monkeypatch: pytest.MonkeyPatch, pki: BackendPki, *, split: bool
) -> tuple[int, bool]:
    """POST 40 kB to an HTTPS backend that reads the head, answers 413 and resets the rest
    (20 kB get through). ``split``: the body follows the head later (the h11 path).
    The status that came back, and whether the connector's write failed."""
    answered = trio.Event()
    transports: list[_ResetAfter] = []

    async def serve(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, pki.server_context(), server_side=True)
        try:
            data = bytearray()
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            await stream.send_all(PLAIN_413)
            answered.set()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def connect(session: Session, tls: Any, timeout: float) -> trio.abc.Stream:
        tcp = await trio.open_tcp_stream(session.internal.host, session.internal.port)
        transports.append(_ResetAfter(tcp, 20_000, answered))
        stream = trio.SSLStream(transports[-1], tls.context, server_hostname=tls.server_name)
        await stream.do_handshake()
        transports[-1].armed = True
        return stream

    monkeypatch.setattr(handler_module, "_connect", connect)
    body = b"b" * 40_000
    whole = origin_request(b"POST", b"/public/upload", body)
    cut = whole.index(b"\r\n\r\n") + 4
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with connector(port, pki.table(), protocol="https") as (stream, _, _):
            if split:
                await stream.send_all(whole[:cut])
                await answered.wait()
                await trio.testing.wait_all_tasks_blocked()
                await stream.send_all(whole[cut:])
            else:
                await stream.send_all(whole)
            _, answers, _ = await read_responses(stream, [b"POST"])
        nursery.cancel_scope.cancel()
    return (answers[0][0] if answers else 0), transports[0].failed


async def test_through_h11_an_https_backend_answering_early_and_resetting_is_relayed(
    monkeypatch: pytest.MonkeyPatch, backend_pki: BackendPki
) -> None:
    assert await _early_answer_over_tls(monkeypatch, backend_pki, split=True) == (413, False)


async def test_a_body_for_an_https_backend_goes_h11s_way_and_an_early_answer_is_relayed(
    monkeypatch: pytest.MonkeyPatch, backend_pki: BackendPki, plain_calls: PlainCalls
) -> None:
    """Sent plain, the failed write would break the trio.SSLStream for reading too and the
    413 would be lost (a 502, as this review found): a request with a body to a TLS backend
    takes the h11 path, whose upload runs beside the read of the answer."""
    status, _ = await _early_answer_over_tls(monkeypatch, backend_pki, split=False)
    assert plain_calls.connector == 0
    assert status == 413


@dataclass
class Idp:
    key: ec.EllipticCurvePrivateKey
    trusted: TrustedIdp

    def token(self, now: float, lifetime: int) -> str:
        claims = {
            "iss": ISSUER,
            "aud": "backchannel",
            "iat": int(now),
            "exp": int(now) + lifetime,
            "user_name": "alice",
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "k1"})


@pytest.fixture(scope="module")
def idp() -> Idp:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Idp(key, TrustedIdp.from_pem("corp", ISSUER, pem, ["backchannel"], "k1"))


@pytest.fixture(scope="module")
def user_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    saved: tuple[Path, Path] = UserCertificateAuthority.create(valid_days=30).save(
        tmp_path_factory.mktemp("user-ca")
    )
    return saved


def _resolver(user_ca: tuple[Path, Path], idp: Idp, clock: Callable[[], float]) -> Any:
    config = PrincipalPropagationConfig(
        user_ca[0], user_ca[1], None, 120, 60, SubjectRules((SubjectRule("CN=${name},O=Example"),))
    )
    resolver = PrincipalResolver.load(config, source="connector.toml", clock=clock)
    resolver.update_trust("acme", TrustList([idp.trusted]))
    return resolver


@dataclass
class PropagationRun:
    answers: list[tuple[int, bytes]] = field(default_factory=list)
    connections: int = 0
    peers: list[str] = field(default_factory=list)
    certificates: list[str] = field(default_factory=list)
    audit: list[tuple[Any, ...]] = field(default_factory=list)


async def _propagate_twice(
    mode: str,
    lifetime: int,
    *,
    renew: bool,
    pki: BackendPki,
    user_ca: tuple[Path, Path],
    idp: Idp,
) -> PropagationRun:
    """Two GETs on one stream with ``mode`` propagation; between them the clock moves past the
    token's end (or, with ``renew``, past the user certificate's renewal point). The clock
    starts where the backend (real clock) accepts every certificate issued and the user CA
    (valid from a minute before it was made) is valid."""
    resolver_clock = [0.0]
    resolver = _resolver(user_ca, idp, lambda: resolver_clock[0])
    renew_before = resolver.cache.renew_before.total_seconds()
    jump = (120 - renew_before + 1) if renew else (lifetime + 60 + 1)
    resolver_clock[0] = time.time() - jump + 100
    token = idp.token(resolver_clock[0], lifetime)
    if mode == "certificate":
        context = pki.server_context(client_ca=user_ca[0])
        table = pki.table(principal_propagation="certificate")
    else:
        context = pki.server_context(client_ca=pki.ca_file)
        table = pki.table(
            principal_propagation="header",
            client_cert=str(pki.client_cert),
            client_key=str(pki.client_key),
        )
    run = PropagationRun()
    async with trio.open_nursery() as nursery:
        backend: Backend = await start_backend(nursery, context)
        async with connector(
            backend.port,
            table,
            protocol="https",
            principal=f"Bearer {token}",
            resolver=resolver,
        ) as (stream, audit, _):
            run.answers.append(await exchange(stream, origin_request(path=b"/public/one")))
            resolver_clock[0] += jump
            run.answers.append(await exchange(stream, origin_request(path=b"/public/two")))
        nursery.cancel_scope.cancel()
    run.connections = backend.connections
    run.peers = backend.peer_names
    run.certificates = [
        str(v) for seen in backend.requests for k, v in seen["headers"] if k == "ssl_client_cert"
    ]
    run.audit = audit.records
    return run


def _timeless(value: object) -> str:
    """``value`` without its times (two runs straddle a second now and then) and without the
    echo of a 200 (it holds the user certificate)."""
    if isinstance(value, list) and value and isinstance(value[0], tuple) and len(value[0]) == 2:
        value = [a if a[0] != 200 else (200, b"") for a in value]
    return re.sub(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d", "<time>", repr(value))


@pytest.mark.parametrize("renew", [False, True], ids=["token expires", "certificate renewed"])
@pytest.mark.parametrize("mode", ["certificate", "header"])
async def test_principal_propagation_on_a_kept_alive_stream_is_the_same_plain_or_through_h11(
    monkeypatch: pytest.MonkeyPatch,
    plain_calls: PlainCalls,
    backend_pki: BackendPki,
    user_ca: tuple[Path, Path],
    idp: Idp,
    mode: str,
    renew: bool,
) -> None:
    lifetime = 3600 if renew else 30
    run = partial(_propagate_twice, mode, lifetime, renew=renew, pki=backend_pki)
    with through_h11(monkeypatch, True):
        through = await run(user_ca=user_ca, idp=idp)
    assert plain_calls.connector == 0
    plain = await run(user_ca=user_ca, idp=idp)
    assert plain_calls.connector == (2 if renew else 1)
    # The backend echoes the request, user certificate included, and the 401 names the time.
    assert _timeless(plain.answers) == _timeless(through.answers)
    assert plain.connections == through.connections
    assert plain.peers == through.peers
    assert _timeless(plain.audit) == _timeless(through.audit)
    assert len(plain.certificates) == len(through.certificates)
    if renew:
        assert [status for status, _ in plain.answers] == [200, 200]
    else:
        assert plain.answers[1][0] == 401
        assert b"(expired)" in plain.answers[1][1]
    if mode == "certificate":
        # A new connection for the renewed certificate; the old one closed with the token.
        assert plain.connections == (2 if renew else 1)
        assert plain.peers == ["Example", "alice"] * plain.connections
    else:
        assert plain.connections == 1  # the system certificate's connection stays
        assert len(set(plain.certificates)) == len(plain.certificates) == (2 if renew else 1)


def _refusing_tls_backend(context: ssl.SSLContext) -> tuple[socket.socket, Callable[[], None]]:
    """A listening socket and the blocking server for one connection: OpenSSL's own handshake,
    which (unlike trio's SSLStream) sends its alert when it refuses the client certificate."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one() -> None:
        conn, _ = listener.accept()
        tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with tls, contextlib.suppress(ssl.SSLError, OSError):
            tls.settimeout(5)
            tls.do_handshake()

    return listener, serve_one


async def _rejected_user_certificate(pki: BackendPki, user_ca: tuple[Path, Path], idp: Idp) -> Any:
    """certificate propagation to a backend that trusts another CA than the connector's."""
    now = time.time()
    resolver = _resolver(user_ca, idp, lambda: now)
    token = idp.token(now, 300)
    listener, serve_one = _refusing_tls_backend(pki.server_context(client_ca=pki.ca_file))
    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, serve_one)
            table = pki.table(principal_propagation="certificate")
            port = listener.getsockname()[1]
            async with connector(
                port, table, protocol="https", principal=f"Bearer {token}", resolver=resolver
            ) as (stream, audit, _):
                answer = await exchange(stream, origin_request(path=b"/public/one"))
    denials = [r[1:3] for r in audit.records if r[0] == "deny"]
    return answer, denials


async def test_a_backend_rejecting_the_user_certificate_reads_the_same_plain_or_through_h11(
    monkeypatch: pytest.MonkeyPatch,
    plain_calls: PlainCalls,
    backend_pki: BackendPki,
    user_ca: tuple[Path, Path],
    idp: Idp,
) -> None:
    with through_h11(monkeypatch, True):
        through = await _rejected_user_certificate(backend_pki, user_ca, idp)
    plain = await _rejected_user_certificate(backend_pki, user_ca, idp)
    assert plain_calls.connector == 1
    assert plain == through
    assert plain[0][0] == 502


async def test_a_backend_rejecting_the_user_certificate_is_named_and_audited(
    backend_pki: BackendPki, user_ca: tuple[Path, Path], idp: Idp
) -> None:
    (status, body), denials = await _rejected_user_certificate(backend_pki, user_ca, idp)
    assert status == 502
    assert denials == [("principal_propagation", "backend_rejected_certificate")]
    assert b"rejected the certificate issued for CN=alice" in body


# --------------------------------------------------------------------------- gateway harness


@asynccontextmanager
async def gateway(
    actions: Callable[[int], Action],
    *,
    router: Callable[[FakeServices], Router] = ProxyRouter,
    client: trio.abc.HalfCloseableStream | None = None,
) -> AsyncIterator[tuple[trio.abc.HalfCloseableStream, ConnectorLog, Recorder, trio.Nursery]]:
    """A ClientConnection in front of a scripted connector (``actions(n)`` answers the n-th
    request): the client's end (or ``client``'s peer given), what the connector got, the
    gateway's audit records, and the nursery running the connection."""
    log = ConnectorLog()
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:

        async def scripted_connector() -> None:
            async with trio.open_nursery() as inner:
                async for stream in pair.accepted:
                    await stream.accept()
                    log.streams += 1
                    inner.start_soon(_scripted_stream, stream, actions, log)

        nursery.start_soon(scripted_connector)
        services = FakeServices(pair, set(CONNECTED))
        audit = Recorder(Role.GATEWAY)
        services.audit = audit
        ours, theirs = trio.testing.memory_stream_pair() if client is None else (client, client)
        connection = ClientConnection(
            services, ours, Client("127.0.0.1", 1), router(services), HttpLimits(), "t"
        )
        nursery.start_soon(connection.run)
        with trio.fail_after(10):
            yield theirs, log, audit, nursery
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- 3. destinations


def _destinations_router(services: FakeServices) -> Router:
    erp, base = parse_destination_url("http://erp.virtual:8000/sap/opu/")
    destinations = [
        Destination(
            "erp", "acme", erp, base, "loc1", "BasicAuthentication", "RFC_USER",
            Secret("s3cret", "test"),
        ),
        Destination("shop", "globex", HostPort("shop.virtual", 80), "", "", "NoAuthentication"),
    ]  # fmt: skip
    return DestinationsRouter(services, destinations)


def _destination_request(
    target: bytes,
    authorization: bytes | None = AUTH.encode(),
    body: bytes = b"",
    extra: bytes = b"",
) -> bytes:
    method = b"POST" if body else b"GET"
    auth = b"Authorization: " + authorization + b"\r\n" if authorization else b""
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (
        method + b" " + target + b" HTTP/1.1\r\nHost: gw.example\r\n" + auth + extra + length
        + b"\r\n" + body
    )  # fmt: skip


_DESTINATION_REQUESTS = [
    _destination_request(b"/destinations/erp/api/x?q=1", extra=b"X-Backchannel-Location: l2\r\n"),
    _destination_request(b"/destinations/erp/api/y", body=b"data"),
    _destination_request(b"/destinations/erp"),
    _destination_request(b"/destinations/erp/x", authorization=None),
    _destination_request(b"/destinations/erp/x", authorization=b"Basic " + b"bm9wZQ=="),
    _destination_request(b"/destinations/shop/x"),  # another subaccount's destination
    _destination_request(b"/destinations/erp/a/../../admin"),
    _destination_request(b"/elsewhere"),
    _destination_request(b"/destinations/erp/z", extra=b"Authorization: Basic eA==\r\n"),
    _destination_request(b"/destinations/erp/after"),
]


async def _through_destinations(h11_only: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    results = []
    with through_h11(monkeypatch, h11_only):
        async with gateway(lambda i: ok(b"n%d" % i), router=_destinations_router) as (
            client,
            log,
            audit,
            _,
        ):
            for data in _DESTINATION_REQUESTS:
                await client.send_all(data)
                raw, _, closed = await read_responses(client, [data.split(b" ")[0]])
                results.append((raw, closed))
                if closed:
                    break
    return results, bytes(log.received), log.streams, audit.records


async def test_the_destinations_front_door_is_the_same_plain_or_through_h11(
    monkeypatch: pytest.MonkeyPatch, plain_calls: PlainCalls
) -> None:
    through = await _through_destinations(True, monkeypatch)
    assert plain_calls.gateway == 0
    plain = await _through_destinations(False, monkeypatch)
    assert plain_calls.gateway == len(_DESTINATION_REQUESTS)
    assert plain == through
    results, received, _, records = plain
    assert len(results) == len(_DESTINATION_REQUESTS)
    # The client's credentials never reach the connector; the destination's do, once each.
    assert AUTH.encode() not in received
    assert b"Basic eA==" not in received
    assert received.count(b"Authorization: Basic UkZDX1VTRVI6czNjcmV0\r\n") == 4
    assert b"GET /sap/opu/api/x?q=1 HTTP/1.1\r\n" in received
    assert b"GET /sap/opu HTTP/1.1\r\n" in received
    statuses = [raw.split(b" ", 2)[1] for raw, _ in results]
    assert statuses == [b"200", b"200", b"200", b"401", b"401", b"404", b"400", b"404", b"401",
                        b"200"]  # fmt: skip
    auth, destination = "http_destination_auth", "http_destination"
    assert [r[1] for r in records if r[0] == "deny"] == [auth, auth, destination, auth]


# --------------------------------------------------------------------------- 4. cancellation


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


class _SlowBackend:
    """Answers every request with a head for ``size`` bytes and ``sent_first`` of them, then
    more only when ``more`` is set; notes when the connector closed the connection."""

    def __init__(self, size: int = 1_000_000, sent_first: int = 1000) -> None:
        self.size = size
        self.sent_first = sent_first
        self.more = trio.Event()
        self.closed = trio.Event()
        self.started = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        try:
            data = bytearray()
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            if self.sent_first >= 0:
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size
                await stream.send_all(head + b"x" * self.sent_first)
            self.started.set()
            async with trio.open_nursery() as nursery:

                async def feed() -> None:
                    await self.more.wait()
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while True:
                            await stream.send_all(b"x" * 65536)

                nursery.start_soon(feed)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while await stream.receive_some(65536):
                        pass
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed.set()
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def slow_backend(**kwargs: int) -> AsyncIterator[tuple[_SlowBackend, int]]:
    backend = _SlowBackend(**kwargs)
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            partial(trio.serve_tcp, backend.serve, 0, host="127.0.0.1")
        )
        yield backend, listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("where", ["waiting for the head", "in the body"])
async def test_a_connector_stopping_mid_plain_exchange_closes_the_backend_connection(
    caplog: pytest.LogCaptureFixture, plain_calls: PlainCalls, where: str
) -> None:
    before = open_fds()
    sent_first = -1 if where == "waiting for the head" else 1000
    async with slow_backend(sent_first=sent_first) as (backend, port):
        async with connector(port) as (stream, _, done):
            await stream.send_all(origin_request(path=b"/public/slow"))
            await backend.started.wait()
            if sent_first > 0:
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 OK\r\n")
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
        # The handler was cancelled (the connector stopping): the backend hears of it.
        with trio.fail_after(5):
            await backend.closed.wait()
    assert plain_calls.connector == 1
    assert open_fds() <= before
    assert errors_logged(caplog) == []


async def test_the_tunnel_dropped_mid_plain_body_ends_the_exchange_and_the_backend_connection(
    caplog: pytest.LogCaptureFixture, plain_calls: PlainCalls
) -> None:
    before = open_fds()
    async with slow_backend() as (backend, port), connector(port) as (stream, _, done):
        await stream.send_all(origin_request(path=b"/public/slow"))
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 OK\r\n")
        await stream.reset(ResetCode.CANCELLED, "the client went away")
        backend.more.set()  # the connector's next write into the tunnel fails
        await done.wait()  # the handler ended by itself, not cancelled
        await backend.closed.wait()
    assert plain_calls.connector == 1
    assert open_fds() <= before
    assert errors_logged(caplog) == []


@asynccontextmanager
async def proxy_front_door(
    connector_side: Callable[[TunnelStream], Any],
) -> AsyncIterator[tuple[int, trio.CancelScope]]:
    """The HTTP proxy front door (serve_http) on 127.0.0.1 port 0, its streams handed to
    ``connector_side``: its port, and the cancel scope that stops it (the gateway stopping)."""
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:

        async def connector_loop() -> None:
            async with trio.open_nursery() as inner:
                async for stream in pair.accepted:
                    await stream.accept()
                    inner.start_soon(connector_side, stream)

        nursery.start_soon(connector_loop)
        services = FakeServices(pair, set(CONNECTED))
        scope = trio.CancelScope()

        async def gateway(task_status: trio.TaskStatus[Any]) -> None:
            with scope:
                await serve_http(
                    services,
                    HostPort("127.0.0.1", 0),
                    ProxyRouter(services),
                    HttpLimits(),
                    label="t",
                    task_status=task_status,
                )

        [address] = await nursery.start(gateway)
        with trio.fail_after(10):
            yield address.port, scope
        nursery.cancel_scope.cancel()


@dataclass
class ScriptedStream:
    """The connector's side of one stream: answers the request with ``answer``, then (once
    ``more`` is set) writes body bytes until the stream fails; ``ended`` once it is over."""

    answer: bytes
    more: trio.Event = field(default_factory=trio.Event)
    answered: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)
    streams: list[TunnelStream] = field(default_factory=list)
    written: int = 0

    async def __call__(self, stream: TunnelStream) -> None:
        self.streams.append(stream)
        try:
            while b"\r\n\r\n" not in await stream.receive_some(65536):
                pass
            await stream.send_all(self.answer)
            self.answered.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_more, stream)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while await stream.receive_some(65536):
                        pass
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.ended.set()
            await stream.aclose()

    async def _write_more(self, stream: TunnelStream) -> None:
        await self.more.wait()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await stream.send_all(b"x" * 65536)
                self.written += 65536


async def test_a_client_gone_mid_plain_response_releases_the_stream_and_its_socket(
    caplog: pytest.LogCaptureFixture, plain_calls: PlainCalls
) -> None:
    before = open_fds()
    side = ScriptedStream(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\nabc")
    async with proxy_front_door(side) as (port, _):
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(request(path=b"/big"))
        assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 200 OK\r\n")
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()  # a reset: the gateway's next write fails
        side.more.set()
        await side.ended.wait()  # the stream was ended with the client's connection
    assert plain_calls.gateway == 1
    assert side.streams[0].error is not None
    assert open_fds() <= before
    assert errors_logged(caplog) == []


@pytest.mark.parametrize("where", ["waiting for the head", "in the body"])
async def test_a_gateway_stopping_mid_plain_exchange_ends_the_stream_and_the_client_socket(
    caplog: pytest.LogCaptureFixture, plain_calls: PlainCalls, where: str
) -> None:
    before = open_fds()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nabc" if where == "in the body" else b""
    side = ScriptedStream(answer)
    async with proxy_front_door(side) as (port, stop):
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(request(path=b"/x"))
        await side.answered.wait()
        await trio.testing.wait_all_tasks_blocked()
        stop.cancel()  # the gateway stopping
        await side.ended.wait()  # the connector's stream heard of it
        rest = bytearray()
        while data := await client.receive_some(65536):
            rest += data  # the client's connection was closed: its end comes
        await client.aclose()
        assert rest == answer
    assert plain_calls.gateway == 1
    assert open_fds() <= before
    assert errors_logged(caplog) == []


# --------------------------------------------------------------------------- 5. memory


@pytest.fixture
def head_buffers(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The most bytes ``read_head`` ever held, per side."""
    peaks = {"connector": 0, "gateway": 0}
    for module, side in ((handler_module, "connector"), (front_door_module, "gateway")):
        original = module.read_head

        async def spy(
            stream: trio.abc.ReceiveStream,
            into: bytearray,
            *,
            limit: int,
            chunk: int,
            _original: Any = original,
            _side: str = side,
        ) -> tuple[int, bool]:
            try:
                result: tuple[int, bool] = await _original(stream, into, limit=limit, chunk=chunk)
                return result
            finally:
                peaks[_side] = max(peaks[_side], len(into))

        monkeypatch.setattr(module, "read_head", spy)
    return peaks


class _EndlessBackend(FakeBackend):
    """Takes every request and answers ``start`` and then ``filler`` for ever, counting what
    the connector took from it."""

    def __init__(self, start: bytes, filler: bytes = b"a") -> None:
        super().__init__([])
        self.start = start
        self.filler = filler
        self.given = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = max_bytes or 65536
        data = (self.start if self.given == 0 else b"") + self.filler * size
        self.given += size
        return data[:size]


async def test_a_backend_head_without_end_is_bounded_on_the_plain_path(
    monkeypatch: pytest.MonkeyPatch, head_buffers: dict[str, int], plain_calls: PlainCalls
) -> None:
    backend = _EndlessBackend(b"HTTP/1.1 200 OK\r\nX: ")
    fake_backends(monkeypatch, backend)
    async with connector(1) as (stream, _, _):
        status, _ = await exchange(stream, origin_request(path=b"/public/a"))
    assert plain_calls.connector == 1
    assert status == 502
    bound = handler_module.MAX_HEAD + handler_module.CHUNK
    assert 0 < head_buffers["connector"] <= bound
    assert backend.given <= bound


async def test_a_request_head_without_end_is_bounded_on_the_connector(
    head_buffers: dict[str, int],
) -> None:
    async with (
        slow_backend() as (_, port),
        connector(port) as (stream, _, done),
        trio.open_nursery() as nursery,
    ):

        async def endless() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(b"GET /public/a HTTP/1.1\r\nX: ")
                while True:
                    await stream.send_all(b"a" * 65536)

        nursery.start_soon(endless)
        raw = bytearray()
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                raw += data
        await done.wait()
        nursery.cancel_scope.cancel()
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert 0 < head_buffers["connector"] <= handler_module.MAX_HEAD + handler_module.CHUNK


async def test_a_response_head_without_end_is_bounded_on_the_gateway(
    head_buffers: dict[str, int], plain_calls: PlainCalls
) -> None:
    filler = b"HTTP/1.1 200 OK\r\nX: " + b"a" * (4 * 1024 * 1024)
    async with gateway(lambda i: filler) as (client, _, _, _):
        await client.send_all(request(path=b"/x"))
        _, answers, _ = await read_responses(client, [b"GET"])
    assert plain_calls.gateway == 1
    assert answers[0][0] == 502
    bound = front_door_module.MAX_RESPONSE_HEAD + front_door_module.TUNNEL_CHUNK
    assert 0 < head_buffers["gateway"] <= bound


async def test_a_slow_client_holds_a_plain_response_back_at_the_connector(
    plain_calls: PlainCalls,
) -> None:
    side = ScriptedStream(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
    async with proxy_front_door(side) as (port, _):
        client_socket = trio.socket.socket()
        client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        await client_socket.connect(("127.0.0.1", port))
        client = trio.SocketStream(client_socket)
        await client.send_all(request(path=b"/big"))
        assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 200 OK\r\n")
        side.more.set()
        await trio.testing.wait_all_tasks_blocked()
        held = side.written
        # The gateway reads from the stream no faster than the client takes: the connector is
        # held back after the stream's window and the sockets' buffers, far from the whole.
        assert 0 < held < 16 * 1024 * 1024
        taken = 0
        while taken < 4 * 1024 * 1024:
            taken += len(await client.receive_some(65536))
        await trio.testing.wait_all_tasks_blocked()
        assert side.written > held  # and goes on as the client reads
        await client.aclose()
    assert plain_calls.gateway == 1


async def test_a_slow_gateway_holds_a_plain_response_back_at_the_backend(
    monkeypatch: pytest.MonkeyPatch, plain_calls: PlainCalls
) -> None:
    backend = _EndlessBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n", b"x")
    fake_backends(monkeypatch, backend)
    async with connector(1) as (stream, _, _):
        await stream.send_all(origin_request(path=b"/public/big"))
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 OK\r\n")
        await trio.testing.wait_all_tasks_blocked()
        held = backend.given
        assert 0 < held < 2 * 1024 * 1024
        taken = 0
        while taken < 1024 * 1024:
            taken += len(await stream.receive_some(65536))
        await trio.testing.wait_all_tasks_blocked()
        assert backend.given > held
    assert plain_calls.connector == 1


# --------------------------------------------------------------------------- 6. audit


_CONNECTOR_REQUESTS = [
    origin_request(path=b"/private/x"),
    origin_request(path=b"/public/a?key=secret"),
    origin_request().replace(b"erp.virtual:8000", b"other.virtual:1"),
    origin_request(b"POST", b"/suspended/x", b"abc"),
    origin_request(path=b"/public/%2e%2e/private"),
    origin_request(path=b"/exact/more"),
    origin_request(b"POST", b"/public/b", b"xyz"),
]


async def _connector_decisions(h11_only: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    log = BackendLog()
    answers = []
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, partial(_scripted_backend, lambda i: ok(), log), 0)
        [listener] = await nursery.start(partial(serve, host="127.0.0.1"))
        with through_h11(monkeypatch, h11_only):
            async with connector(listener.socket.getsockname()[1]) as (stream, audit, _):
                for data in _CONNECTOR_REQUESTS:
                    answers.append(await exchange(stream, data, data.split(b" ")[0]))
        nursery.cancel_scope.cancel()
    return answers, audit.records, bytes(log.received)


async def test_the_connector_decides_and_audits_the_same_plain_or_through_h11(
    monkeypatch: pytest.MonkeyPatch, plain_calls: PlainCalls
) -> None:
    through = await _connector_decisions(True, monkeypatch)
    assert plain_calls.connector == 0
    plain = await _connector_decisions(False, monkeypatch)
    assert plain_calls.connector == 2
    assert plain == through
    answers, records, _ = plain
    assert [status for status, _ in answers] == [403, 200, 421, 403, 403, 403, 200]
    assert [r[0] for r in records] == ["deny", "allow", "deny", "deny", "deny", "deny", "allow"]
    assert all(r[-1]["path"].find("secret") < 0 for r in records)


_GATEWAY_REQUESTS = [
    request(path=b"/a").replace(AUTH.encode(), b"Basic eDp5"),
    request(path=b"/b"),
    request(b"POST", b"/c", b"body").replace(b"Proxy-Authorization: " + AUTH.encode(), b"X: y"),
    request(b"POST", b"/d", b"body"),
    request(path=b"/e", extra=b"Proxy-Authorization: Bearer token-acme-crm\r\n"),
]


async def _gateway_decisions(h11_only: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    results = []
    with through_h11(monkeypatch, h11_only):
        async with gateway(lambda i: ok(b"n%d" % i)) as (client, log, audit, _):
            for data in _GATEWAY_REQUESTS:
                await client.send_all(data)
                raw, _, closed = await read_responses(client, [data.split(b" ")[0]])
                results.append(raw)
                if closed:
                    break
    return results, audit.records, bytes(log.received)


async def test_the_gateway_decides_and_audits_the_same_plain_or_through_h11(
    monkeypatch: pytest.MonkeyPatch, plain_calls: PlainCalls
) -> None:
    through = await _gateway_decisions(True, monkeypatch)
    assert plain_calls.gateway == 0
    plain = await _gateway_decisions(False, monkeypatch)
    assert plain_calls.gateway == len(_GATEWAY_REQUESTS)
    assert plain == through
    raws, records, _ = plain
    assert [raw.split(b" ", 2)[1] for raw in raws] == [b"407", b"200", b"407", b"200", b"407"]
    assert [r[1] for r in records] == ["http_proxy_auth"] * 3
