"""Review of 176b40e: the TCP plugin's backend connect (``_open_tcp`` / ``_connect`` in
plugins/tcp/backchannel_tcp/_handler.py) now calls a stdlib socket's non-blocking ``connect`` and
skips trio's wait for writability when a zero-timeout ``poll`` says the handshake is done.

Checked against trio's ``SocketType.connect`` (trio/_socket.py):

* error types and texts: a refusal in the fast path (real ``poll``) and in the waited path
  (real ``wait_writable``), IPv4 and ``::1``, keeps ECONNREFUSED, trio's inner message and the
  outer "all attempts to connect to ..." text that ``is_connection_refused`` and
  ``TcpHandler._connect`` (reset code, log line) rely on; errors raised by ``connect`` itself
  (EINTR, EADDRNOTAVAIL, ENETUNREACH; monkeypatched, nothing leaves the host) are raised at once,
  wrapped the same way, with the socket closed and no wait;
* a connect really in progress (a listener whose accept queue is full drops the SYN) is waited
  for and completes once there is room; one that never completes times out under
  ``trio.fail_after`` (also through ``TcpHandler._connect``: BACKEND_TIMEOUT) and closes its
  socket; a cancellation pending before the call starts no connect; no descriptor leaks
  (``/proc/self/fd``) on any path, the ``poll`` object holds none;
* POLLOUT together with POLLERR/POLLHUP (a refusal seen by the fast path) is read through
  SO_ERROR and reported as the refusal, never as a connected socket;
* an IPv6 address with a zone (``fe80::1%lo``, accepted by ``ipaddress`` and by the mapping
  parser) must reach the stdlib connect with its scope id: trio resolved it with
  ``getaddrinfo`` into ``(host, port, 0, scope_id)``, the stdlib ignores the ``%zone`` of a
  2-tuple (scope id 0, EINVAL for a link-local address). DEFECT, fixed since (getaddrinfo,
  numeric only). The connect is monkeypatched: nothing is sent to the link-local address.

Only 127.0.0.1 and ::1 with port 0 are bound or contacted.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
import trio
import trio.testing

from backchannel import HostPort, ResetCode, StreamError, is_connection_refused
from backchannel_tcp import _handler

from .test_tcp_connect import NotReadyYet, writable_waits

__all__ = ["writable_waits"]  # the fixture, imported for the tests below

GUARD = 10.0
HANDLER = "backchannel_tcp._handler.socket.socket"


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1 on this machine")


def _closed_port(family: socket.AddressFamily, host: str) -> int:
    """A port on ``host`` nobody listens on (bound, then closed)."""
    with socket.socket(family, socket.SOCK_STREAM) as closed:
        closed.bind((host, 0))
        port: int = closed.getsockname()[1]
    return port


@pytest.fixture
def full_listener() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A listener on 127.0.0.1 whose accept queue is full (backlog 0 plus one connection not
    accepted): the kernel drops further SYNs, so a connect to it stays in progress."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    filler = socket.create_connection(server.getsockname())
    yield server, filler
    filler.close()
    server.close()


def _recording_socket(
    monkeypatch: pytest.MonkeyPatch, connect_error: OSError | None
) -> tuple[list[socket.socket], list[Any]]:
    """Replace ``socket.socket`` for ``_open_tcp``: records the sockets it makes and the
    addresses given to ``connect``; ``connect`` raises ``connect_error`` (sends nothing)."""
    created: list[socket.socket] = []
    addresses: list[Any] = []
    original = socket.socket

    class Recorded(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if len(args) == 2 and not kwargs:
                created.append(self)

        def connect(self, address: Any) -> None:
            addresses.append(address)
            if connect_error is not None:
                raise connect_error
            super().connect(address)

    monkeypatch.setattr(HANDLER, Recorded)
    return created, addresses


def _inner(exc: BaseException) -> OSError:
    group = exc.__cause__
    assert isinstance(group, ExceptionGroup)
    assert len(group.exceptions) == 1
    inner = group.exceptions[0]
    assert isinstance(inner, OSError)
    return inner


# ------------------------------------------------------------------------- equivalence


@needs_proc
@pytest.mark.parametrize("waited", [False, True])
@pytest.mark.parametrize(
    ("family", "host"),
    [(socket.AF_INET, "127.0.0.1"), pytest.param(socket.AF_INET6, "::1", marks=needs_ipv6)],
)
async def test_refusal_keeps_trio_errors_and_closes_the_socket(
    monkeypatch: pytest.MonkeyPatch,
    writable_waits: list[object],
    family: socket.AddressFamily,
    host: str,
    waited: bool,
) -> None:
    """Fast path: the real ``poll`` sees POLLOUT|POLLERR|POLLHUP and SO_ERROR gives the
    refusal. Waited path: the real ``wait_writable`` returns at once for the failed socket."""
    if waited:
        monkeypatch.setattr("backchannel_tcp._handler.select.poll", NotReadyYet)
    port = _closed_port(family, host)
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    before = _fd_count()
    with trio.fail_after(GUARD), pytest.raises(OSError, match="all attempts") as caught:
        await _handler._open_tcp(host, port)
    assert str(caught.value) == f"all attempts to connect to {where} failed"
    assert caught.value.errno is None
    assert is_connection_refused(caught.value)
    inner = _inner(caught.value)
    assert inner.errno == errno.ECONNREFUSED
    # trio's own text: the address as given (inet_pton accepts it, so trio does not resolve)
    assert inner.strerror == f"Error connecting to {(host, port)!r}: {os.strerror(inner.errno)}"
    assert len(writable_waits) == (1 if waited else 0)
    assert _fd_count() == before


@needs_ipv6
async def test_ipv6_loopback_connects_in_the_fast_path(writable_waits: list[object]) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as server:
        server.bind(("::1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        with trio.fail_after(GUARD):
            stream = await _handler._open_tcp("::1", port)
            async with stream:
                assert stream.socket.family == socket.AF_INET6
                assert stream.socket.getpeername()[:2] == ("::1", port)
                peer, _ = server.accept()
                with peer:
                    await stream.send_all(b"v6")
                    assert peer.recv(2) == b"v6"
    assert writable_waits == []


@needs_proc
@pytest.mark.parametrize(
    "error",
    [
        InterruptedError(errno.EINTR, os.strerror(errno.EINTR)),
        OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL)),
        OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH)),
    ],
    ids=["EINTR", "EADDRNOTAVAIL", "ENETUNREACH"],
)
async def test_an_error_from_connect_itself_is_raised_at_once(
    monkeypatch: pytest.MonkeyPatch, writable_waits: list[object], error: OSError
) -> None:
    """As trio (``_try_sync`` lets everything but BlockingIOError through): no poll, no wait,
    the same wrapping, not a refusal, the socket closed."""
    created, addresses = _recording_socket(monkeypatch, error)
    before = _fd_count()
    with trio.fail_after(GUARD), pytest.raises(OSError, match="all attempts") as caught:
        await _handler._open_tcp("127.0.0.1", 9)
    assert str(caught.value) == "all attempts to connect to 127.0.0.1:9 failed"
    assert _inner(caught.value) is error
    assert not is_connection_refused(caught.value)
    assert addresses == [("127.0.0.1", 9)]
    assert writable_waits == []
    assert [sock.fileno() for sock in created] == [-1]
    assert _fd_count() == before


async def test_handler_reports_a_refusal_with_its_reset_code_and_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = _closed_port(socket.AF_INET, "127.0.0.1")
    handler = _handler.TcpHandler(connect_timeout=GUARD)
    session = _FakeSession(HostPort("10.0.0.1", 80), HostPort("127.0.0.1", port), _Mapping())
    with (
        caplog.at_level(logging.WARNING, "backchannel.tcp"),
        trio.fail_after(GUARD),
        pytest.raises(StreamError) as caught,
    ):
        await handler._connect(cast(Any, session))
    assert caught.value.code == ResetCode.BACKEND_UNREACHABLE
    assert caught.value.reason == "backend of 10.0.0.1:80 refused the connection"
    assert caplog.messages == [
        f"backend of 10.0.0.1:80 (127.0.0.1:{port}) unreachable: "
        f"all attempts to connect to 127.0.0.1:{port} failed"
    ]


# ------------------------------------------------------------- in progress, timeouts


async def test_a_real_connect_in_progress_parks_in_wait_writable(
    full_listener: tuple[socket.socket, socket.socket], writable_waits: list[object]
) -> None:
    """The real ``poll`` says not yet (SYN dropped): the task waits; once the queue has room the
    retransmitted SYN is answered and the connect completes (about 1 s, the SYN's RTO)."""
    server, _ = full_listener
    host, port = server.getsockname()
    result: list[trio.SocketStream] = []

    async def connect() -> None:
        result.append(await _handler._open_tcp(host, port))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            await trio.testing.wait_all_tasks_blocked()
            assert len(writable_waits) == 1
            assert result == []
            first, _ = server.accept()  # room in the queue for the retransmitted SYN
            first.close()
        stream = result[0]
        async with stream:
            peer, _ = server.accept()
            with peer:
                await stream.send_all(b"late")
                assert peer.recv(4) == b"late"


@needs_proc
async def test_a_connect_that_never_completes_times_out_and_closes_its_socket(
    monkeypatch: pytest.MonkeyPatch, full_listener: tuple[socket.socket, socket.socket]
) -> None:
    server, _ = full_listener
    host, port = server.getsockname()
    created, _addresses = _recording_socket(monkeypatch, None)
    before = _fd_count()
    with pytest.raises(trio.TooSlowError), trio.fail_after(0.2):
        await _handler._open_tcp(host, port)
    assert [sock.fileno() for sock in created] == [-1]
    assert _fd_count() == before


@needs_proc
async def test_handler_turns_a_connect_that_never_completes_into_backend_timeout(
    full_listener: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = full_listener
    host, port = server.getsockname()
    handler = _handler.TcpHandler(connect_timeout=0.2)
    session = _FakeSession(HostPort("10.0.0.1", 80), HostPort(host, port), _Mapping())
    before = _fd_count()
    with trio.fail_after(GUARD), pytest.raises(StreamError) as caught:
        await handler._connect(cast(Any, session))
    assert caught.value.code == ResetCode.BACKEND_TIMEOUT
    assert _fd_count() == before


@needs_proc
async def test_a_pending_cancellation_starts_no_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``checkpoint_if_cancelled`` before ``connect``, as trio's ``_try_sync``: an expired
    deadline raises before any SYN, and the socket is closed."""
    created, addresses = _recording_socket(monkeypatch, None)
    before = _fd_count()
    with trio.CancelScope() as scope:
        scope.cancel()
        await _handler._open_tcp("127.0.0.1", 9)
    assert scope.cancelled_caught
    assert addresses == []
    assert [sock.fileno() for sock in created] == [-1]
    assert _fd_count() == before


@needs_proc
async def test_many_fast_path_connects_leak_no_descriptor() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        host, port = server.getsockname()
        before = _fd_count()
        with trio.fail_after(GUARD):
            for _ in range(50):
                stream = await _handler._open_tcp(host, port)
                await stream.aclose()
                peer, _ = server.accept()
                peer.close()
        assert _fd_count() == before


# ------------------------------------------------------------------------------ defects


@needs_ipv6
async def test_a_zoned_ipv6_address_keeps_its_scope_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = socket.if_nametoindex("lo")
    refused = ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
    created, addresses = _recording_socket(monkeypatch, refused)
    with trio.fail_after(GUARD), pytest.raises(OSError, match="all attempts"):
        await _handler._open_tcp("fe80::1%lo", 8080)
    assert [sock.fileno() for sock in created] == [-1]
    (address,) = addresses
    # the stdlib's sin6_scope_id is the tuple's 4th item (0 when absent), whatever the %zone
    scope_id = address[3] if len(address) >= 4 else 0
    assert scope_id == index


# ------------------------------------------------------------------------------ helpers


@dataclass
class _Mapping:
    options: object = None


@dataclass
class _FakeSession:
    virtual: HostPort
    internal: HostPort
    mapping: _Mapping
