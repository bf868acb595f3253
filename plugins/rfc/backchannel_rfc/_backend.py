"""The connector's way to ABAP systems: SAP's pyrfc where it is installed, else the stub client.

Both offer the same blocking ``Connection`` API, so everything above this module is written
once. Blocking calls run in worker threads under one capacity limit, and connections are kept in
a pool per backend and logon, so a session does not pay a logon (a network round trip and, on a
real system, a security-audit entry) each time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import math
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any, Protocol, TypeVar

import trio

from backchannel import HostPort

from ._errors import communication_failure

log = logging.getLogger("backchannel.rfc")

BACKENDS = ("auto", "pyrfc", "stub")
_T = TypeVar("_T")


class BackendConnection(Protocol):
    """The part of ``pyrfc.Connection`` the connector uses."""

    @property
    def alive(self) -> bool: ...

    def call(self, func_name: str, options: dict[str, Any] | None = None, **params: Any) -> Any: ...

    def get_function_description(self, func_name: str) -> Any: ...

    def get_connection_attributes(self) -> dict[str, Any]: ...

    def ping(self) -> None: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


def load_client_module(choice: str) -> tuple[str, ModuleType]:
    """(``"pyrfc"`` or ``"stub"``, the module whose ``Connection`` to use) for ``backend``.

    ``auto`` prefers SAP's pyrfc; ``pyrfc`` requires it (ImportError with what to install);
    ``stub`` always uses backchannel's simulated-system client.
    """
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
    if choice in ("auto", "pyrfc"):
        try:
            return "pyrfc", importlib.import_module("pyrfc")
        except ImportError:
            if choice == "pyrfc":
                raise ImportError(
                    "backend = 'pyrfc' but SAP's pyrfc is not importable: install the SAP NW RFC "
                    "SDK and `pip install pyrfc`, or use backend = 'stub'"
                ) from None
    return "stub", importlib.import_module("backchannel_rfc._connection")


def connection_parameters(kind: str, address: HostPort, logon: Mapping[str, str]) -> dict[str, str]:
    """pyrfc ``Connection`` parameters for the internal address and a logon.

    A real system is addressed by ``ashost`` + ``sysnr`` when the port follows the 33NN
    convention and by ``gwserv`` otherwise; the stub client takes the port itself.
    """
    params = {"ashost": address.host, **logon}
    if kind == "stub":
        params["port"] = str(address.port)
    elif 3300 <= address.port <= 3399:
        params["sysnr"] = f"{address.port - 3300:02d}"
    else:
        params["gwserv"] = str(address.port)
    return params


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Which pooled connections a logon may reuse: same backend, same logon."""

    address: HostPort
    client: str
    user: str
    lang: str
    #: Salted digest of password and certificate: the key never holds the secret itself.
    credential_digest: str


@dataclass
class _Idle:
    connection: BackendConnection
    since: float


@dataclass
class _Backend:
    """Open connections to one backend address: the slots, and the idle ones by logon."""

    slots: trio.Semaphore
    idle: dict[PoolKey, list[_Idle]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Limits of the connection pool and the worker threads."""

    #: Open connections (busy + idle) per backend address.
    max_connections: int = 20
    #: Idle connections kept per backend address and logon.
    max_idle: int = 5
    #: An idle connection older than this is closed instead of reused.
    idle_timeout: float = 300.0
    #: How long a session waits for a free connection slot before failing.
    wait_timeout: float = 30.0
    #: Blocking RFC calls in flight at once (worker threads), over all backends.
    max_threads: int = 32


class Lease:
    """One connection, lent to one session; give it back with :meth:`BackendPool.release`."""

    def __init__(self, key: PoolKey, connection: BackendConnection) -> None:
        self.key = key
        self.connection = connection
        #: Set when the connection must not be reused (cancelled, broken, closed).
        self.broken = False


class BackendPool:
    """Connections to ABAP backends, opened and used in worker threads."""

    def __init__(
        self,
        connect: Callable[[HostPort, Mapping[str, str]], BackendConnection],
        settings: PoolSettings = PoolSettings(),
    ) -> None:
        self._connect = connect
        self.settings = settings
        self.threads = trio.CapacityLimiter(settings.max_threads)
        self._backends: dict[HostPort, _Backend] = {}
        self._salt = secrets.token_bytes(16)

    def key(self, address: HostPort, logon: Mapping[str, str]) -> PoolKey:
        """The pool key of a logon (password and certificate only as a salted digest)."""
        secret = f"{logon.get('passwd', '')}\0{logon.get('x509cert', '')}".encode()
        return PoolKey(
            address,
            logon.get("client", ""),
            logon.get("user", "").upper(),
            logon.get("lang", "").upper(),
            hashlib.sha256(self._salt + secret).hexdigest(),
        )

    def idle_count(self, address: HostPort) -> int:
        """Idle connections to ``address`` (for tests and status)."""
        backend = self._backends.get(address)
        return 0 if backend is None else sum(len(v) for v in backend.idle.values())

    async def run(self, function: Callable[[], _T]) -> _T:
        """Run a blocking backend call in a worker thread under the thread limit.

        If the caller is cancelled the thread is abandoned (it ends on its own once the
        backend answers or its timeout fires); the caller must treat the connection as broken.
        """
        return await trio.to_thread.run_sync(function, limiter=self.threads, abandon_on_cancel=True)

    async def lease(
        self,
        address: HostPort,
        logon: Mapping[str, str],
        *,
        connect_timeout: float = math.inf,
    ) -> Lease:
        """An idle connection with this logon, or a new one (logged on in a worker thread).

        Raises the backend's pyrfc exception if the logon fails, CommunicationError if every
        connection slot of the backend stays busy for ``wait_timeout``, trio.TooSlowError if
        the backend does not complete the logon within ``connect_timeout``.
        """
        key = self.key(address, logon)
        backend = self._backends.setdefault(
            address, _Backend(trio.Semaphore(self.settings.max_connections))
        )
        reused = self._take_idle(backend, key)
        if reused is not None:
            return Lease(key, reused)
        if backend.slots.value == 0:
            # Idle connections of other logons hold slots too: give the oldest one up rather
            # than wait for a slot that nobody would free.
            self._close_oldest_idle(backend)
        with trio.move_on_after(self.settings.wait_timeout) as waiting:
            await backend.slots.acquire()
        if waiting.cancelled_caught:
            raise communication_failure(
                f"all {self.settings.max_connections} connections to the backend are busy "
                f"(waited {self.settings.wait_timeout:g} s); raise max_connections or retry later"
            )
        try:
            with trio.fail_after(connect_timeout):
                connection = await self._open(address, logon)
        except BaseException:
            backend.slots.release()
            raise
        return Lease(key, connection)

    async def _open(self, address: HostPort, logon: Mapping[str, str]) -> BackendConnection:
        """A new connection, logged on in a worker thread.

        If the caller is cancelled first, the thread is abandoned; the connection it still
        makes is closed, by the thread itself, or here if it was made but not yet collected.
        """
        lock = threading.Lock()
        abandoned = False
        made: list[BackendConnection] = []

        def connect() -> BackendConnection:
            connection = self._connect(address, logon)
            with lock:
                if not abandoned:
                    made.append(connection)
                    return connection
            close_quietly(connection)
            return connection

        try:
            return await self.run(connect)
        except BaseException:
            with lock:
                abandoned = True
                late = list(made)
            for connection in late:
                _close_in_background(connection)
            raise

    async def release(self, lease: Lease) -> None:
        """Give a connection back: kept idle if healthy, if there is room and if no logon
        waits for a slot; closed otherwise."""
        backend = self._backends[lease.key.address]
        connection = lease.connection
        idle = backend.idle.setdefault(lease.key, [])
        if (
            not lease.broken
            and is_alive(connection)
            and len(idle) < self.settings.max_idle
            and not backend.slots.statistics().tasks_waiting
        ):
            idle.append(_Idle(connection, trio.current_time()))
            return
        await self._close(backend, connection)

    def _close_oldest_idle(self, backend: _Backend) -> None:
        idle = [(key, entry) for key, entries in backend.idle.items() for entry in entries]
        if idle:
            key, entry = min(idle, key=lambda item: item[1].since)
            backend.idle[key].remove(entry)
            _close_in_background(entry.connection)
            backend.slots.release()

    def _take_idle(self, backend: _Backend, key: PoolKey) -> BackendConnection | None:
        now = trio.current_time()
        for entries in backend.idle.values():
            expired = [e for e in entries if now - e.since > self.settings.idle_timeout]
            for entry in expired:
                entries.remove(entry)
                _close_in_background(entry.connection)
                backend.slots.release()
        entries = backend.idle.get(key, [])
        while entries:
            entry = entries.pop()
            if is_alive(entry.connection):
                return entry.connection
            _close_in_background(entry.connection)
            backend.slots.release()
        return None

    async def _close(self, backend: _Backend, connection: BackendConnection) -> None:
        backend.slots.release()
        _close_in_background(connection)

    async def aclose(self) -> None:
        """Close every idle connection (logging off), each in a worker thread, and wait.

        Every close is started before the first wait, so a connector cancelled while it stops
        still logs off each connection (the threads finish on their own) instead of leaving
        the sockets to the garbage collector."""
        idle: list[BackendConnection] = []
        for backend in self._backends.values():
            for entries in backend.idle.values():
                idle.extend(entry.connection for entry in entries)
                for _ in entries:
                    backend.slots.release()
                entries.clear()
        if not idle:
            await trio.lowlevel.checkpoint()  # a checkpoint either way, as trio's own
            return
        token = trio.lowlevel.current_trio_token()
        all_closed = trio.Event()
        pending = len(idle)

        def count_one() -> None:
            nonlocal pending
            pending -= 1
            if pending == 0:
                all_closed.set()

        def closed(_result: object) -> None:  # in the worker thread
            with contextlib.suppress(trio.RunFinishedError):  # nobody waits any more
                token.run_sync_soon(count_one)

        for connection in idle:
            trio.lowlevel.start_thread_soon(partial(close_quietly, connection), closed)
        await all_closed.wait()


def is_alive(connection: BackendConnection) -> bool:
    try:
        return bool(connection.alive)
    except Exception:
        return False


def close_quietly(connection: BackendConnection) -> None:
    """Close, logging rather than raising a failure."""
    try:
        connection.close()
    except Exception as exc:  # a connection that cannot even close is gone anyway
        log.debug("closing a backend connection failed: %s", exc)


def _close_in_background(connection: BackendConnection) -> None:
    """Close without waiting: a close may block on a dead peer, and nobody needs its result."""
    trio.lowlevel.start_thread_soon(partial(close_quietly, connection), lambda _result: None)


def connector_for(
    kind: str, module: Any, *, config: Mapping[str, Any] | None = None
) -> Callable[[HostPort, Mapping[str, str]], BackendConnection]:
    """A connect function for BackendPool: ``module.Connection`` with values unstripped, so
    results keep their canonical form on the way to the cloud client."""

    def connect(address: HostPort, logon: Mapping[str, str]) -> BackendConnection:
        params = connection_parameters(kind, address, logon)
        connection: BackendConnection = module.Connection(
            config={"rstrip": False, "dtime": False, **(config or {})}, **params
        )
        return connection

    return connect
