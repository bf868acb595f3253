"""Review: cleanup that runs while its task is cancelled from outside (the connector stopping,
the tunnel lost), at the await where a handler holds a backend connection.

In a cancelled task every checkpoint raises ``Cancelled`` again, so a cleanup path closes only
what it closes before its first checkpoint, and cleanup written for some exceptions only (an
``except (BrokenResourceError, TooSlowError)``) does not run at all. Each test here holds a
real connection from a real connector (gateway, connector, HTTP proxy and TCP forward on
127.0.0.1, port 0) to a backend at one await, cuts the handler short from outside, and checks
from the backend's side that the connector's socket was closed right then (the backend reads
EOF or a reset) and not later by the garbage collector (no ResourceWarning).

The tunnel is lost by resetting its TCP connection in tests/test_fault_leaks's CuttableRelay.
"""

from __future__ import annotations

import base64
import gc
import logging
import ssl
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from backchannel import (
    Connector,
    ConnectorConfig,
    Gateway,
    GatewayConfig,
    HostPort,
    open_connector,
    open_gateway,
)
from backchannel._pki import TlsMaterial
from tests.harness import APP_SECRET, connector_document, gateway_document, tls_material
from tests.test_fault_leaks import CuttableRelay, settled

#: The connector's two ways of cutting a handler short from outside.
ENDINGS = ["connector_stops", "tunnel_lost"]

HTTPS_VIRTUAL = "web.virtual:443"
TCPS_VIRTUAL = "tls.virtual:443"

# ------------------------------------------------------------------------------ observing


@contextmanager
def resource_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record ResourceWarnings (a socket closed by the garbage collector) instead of raising
    them from a finalizer; the caller runs ``gc.collect()`` inside the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield caught


def unclosed(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


# ------------------------------------------------------------------------------ backend


@dataclass
class Backend:
    """A backend on 127.0.0.1 that never answers: with ``context`` it completes the TLS
    handshake first. Counts the connections the connector ended (EOF or reset)."""

    context: ssl.SSLContext | None = None
    port: int = 0
    #: Bytes arrived from the connector (a ClientHello, or a request / data after TLS).
    greeted: trio.Event = field(default_factory=trio.Event)
    ended: int = 0

    async def handle(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        try:
            if self.context is not None:
                stream = trio.SSLStream(tcp, self.context, server_side=True)
                await stream.do_handshake()
            while await stream.receive_some(65536):
                self.greeted.set()
        except trio.BrokenResourceError:
            pass
        finally:
            tcp.socket.close()  # at once, no checkpoint (also when the test tears it down)
        self.ended += 1


@asynccontextmanager
async def backend(context: ssl.SSLContext | None = None) -> AsyncIterator[Backend]:
    result = Backend(context)
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            partial(trio.serve_tcp, result.handle, 0, host="127.0.0.1")
        )
        result.port = listener.socket.getsockname()[1]
        yield result
        nursery.cancel_scope.cancel()


def server_context(tls: TlsMaterial) -> ssl.SSLContext:
    """The backend's TLS: the throwaway certificate for 127.0.0.1 the gateway uses too."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


# ------------------------------------------------------------------------------ the stack


@dataclass
class Stack:
    """Gateway (HTTP proxy, a TCP forward to ``TCPS_VIRTUAL``), a relay, and a connector."""

    gateway: Gateway
    connector: Connector
    relay: CuttableRelay
    _connector_scope: trio.CancelScope
    _connector_gone: trio.Event

    @property
    def proxy(self) -> HostPort:
        return self.gateway.front_door_addresses["http.proxy"][0]

    @property
    def forward(self) -> HostPort:
        [door] = [v for k, v in self.gateway.front_door_addresses.items() if "forward" in k]
        return door[0]

    async def end(self, ending: str) -> None:
        """Cut every handler of the connector short: stop it, or lose its tunnel (it connects
        again)."""
        if ending == "connector_stops":
            self._connector_scope.cancel()
            await self._connector_gone.wait()
            return
        assert ending == "tunnel_lost"
        assert self.relay.cut() == 1
        with trio.fail_after(10):
            await self.connector.wait_status(lambda s: s.connected and s.connects == 2)


def mappings(
    tls: TlsMaterial, https_port: int, tcps_port: int, server_name: str | None
) -> list[dict[str, Any]]:
    common = {"ca_file": str(tls.ca_file)}
    if server_name is not None:
        common["server_name"] = server_name
    return [
        {
            "protocol": "https",
            "virtual": HTTPS_VIRTUAL,
            "internal": f"127.0.0.1:{https_port}",
            "resources": [{"path": "/"}],
            **common,
        },
        {
            "protocol": "tcps",
            "virtual": TCPS_VIRTUAL,
            "internal": f"127.0.0.1:{tcps_port}",
            **common,
        },
    ]


@asynccontextmanager
async def stack(
    tmp_path: Path, https_port: int = 9, tcps_port: int = 9, server_name: str | None = None
) -> AsyncIterator[Stack]:
    tls = tls_material(tmp_path / "tls")
    forward = {"listen": "127.0.0.1:0", "subaccount": "acme", "target": TCPS_VIRTUAL}
    document = gateway_document(tls, tmp_path / "gw.jsonl", forwards=[forward], socks=False)
    document["plugins"]["http"] = {"proxy_listen": "127.0.0.1:0"}
    gateway_config = GatewayConfig.from_mapping(document, source="gateway.toml")
    async with open_gateway(gateway_config) as gateway, trio.open_nursery() as nursery:
        assert gateway.tunnel_address is not None
        relay = CuttableRelay(gateway.tunnel_address.port)
        await nursery.start(relay.serve)
        connector_config = ConnectorConfig.from_mapping(
            connector_document(
                tls,
                relay.port,
                tmp_path / "conn.jsonl",
                mappings(tls, https_port, tcps_port, server_name),
            ),
            source="connector.toml",
        )
        scope = trio.CancelScope()
        gone = trio.Event()

        async def run_connector(*, task_status: trio.TaskStatus[Connector]) -> None:
            try:
                with scope:
                    async with open_connector(connector_config) as connector:
                        task_status.started(connector)
                        await trio.sleep_forever()
            finally:
                gone.set()

        connector: Connector = await nursery.start(run_connector)
        with trio.fail_after(10):
            await connector.wait_connected()
        yield Stack(gateway, connector, relay, scope, gone)
        nursery.cancel_scope.cancel()


def backend_ports(be: Backend, *, http: bool) -> tuple[int, int]:
    """(https_port, tcps_port) for ``stack``: ``be`` behind the https or the tcps mapping (the
    other one names the discard port, never reached)."""
    return (be.port, 9) if http else (9, be.port)


def proxy_get(virtual: str) -> bytes:
    auth = base64.b64encode(f"acme/crm:{APP_SECRET}".encode()).decode()
    return (
        f"GET http://{virtual}/ HTTP/1.1\r\nHost: {virtual}\r\n"
        f"Proxy-Authorization: Basic {auth}\r\n\r\n"
    ).encode()


async def cut_short_while_held(
    tmp_path: Path, ending: str, *, http: bool, backend_tls: bool
) -> tuple[int, list[str]]:
    """One connection from the connector to a silent backend (through the HTTP proxy to the
    https mapping, or through the TCP forward to the tcps mapping), cut short from outside
    once the backend got its first bytes. Returns how many backend connections had ended
    right after (before any garbage collection) and the ResourceWarnings of the run."""
    tls = tls_material(tmp_path / "tls")
    context = server_context(tls) if backend_tls else None
    with resource_warnings() as caught:
        async with backend(context) as be:
            async with stack(tmp_path, *backend_ports(be, http=http)) as running:
                door = running.proxy if http else running.forward
                client = await trio.open_tcp_stream(door.host, door.port)
                async with client:
                    await client.send_all(proxy_get(HTTPS_VIRTUAL) if http else b"hello backend")
                    with trio.fail_after(10):
                        await be.greeted.wait()
                    # The handler waits: in the TLS handshake (a silent backend), or for the
                    # answer / more data (a TLS backend).
                    await trio.testing.wait_all_tasks_blocked()
                    assert be.ended == 0
                    await running.end(ending)
                    await settled()
                    ended = be.ended
            gc.collect()
    return ended, unclosed(caught)


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("ending", ENDINGS)
async def test_https_backend_tls_handshake_cut_short_closes_the_backend_socket(
    tmp_path: Path, ending: str
) -> None:
    ended, leaked = await cut_short_while_held(tmp_path, ending, http=True, backend_tls=False)
    assert leaked == []
    assert ended == 1


@pytest.mark.parametrize("ending", ENDINGS)
async def test_tcps_backend_tls_handshake_cut_short_closes_the_backend_socket(
    tmp_path: Path, ending: str
) -> None:
    # The TCP plugin's _connect closes the TLS stream on every exception (except BaseException).
    ended, leaked = await cut_short_while_held(tmp_path, ending, http=False, backend_tls=False)
    assert leaked == []
    assert ended == 1


@pytest.mark.parametrize("ending", ENDINGS)
async def test_https_backend_waiting_for_its_answer_cut_short_closes_the_backend_socket(
    tmp_path: Path, ending: str
) -> None:
    # HttpHandler.handle's finally: close_backend (one close_forcefully: trio's aclose_forcefully
    # on the SSLStream closes the socket before its checkpoint raises Cancelled).
    ended, leaked = await cut_short_while_held(tmp_path, ending, http=True, backend_tls=True)
    assert leaked == []
    assert ended == 1


@pytest.mark.parametrize("ending", ENDINGS)
async def test_tcps_splice_cut_short_closes_the_backend_socket(tmp_path: Path, ending: str) -> None:
    # backchannel_tcp._splice.splice's finally: one close_forcefully of the TLS stream.
    ended, leaked = await cut_short_while_held(tmp_path, ending, http=False, backend_tls=True)
    assert leaked == []
    assert ended == 1


# ------------------------------------------------------------------------------ the tunnel's
# own connection, cut short in its handshake (dial_gateway's and accept_tunnel's cleanup)

DUMMY_MAPPING = {"protocol": "tcp", "virtual": "echo.virtual:9", "internal": "127.0.0.1:9"}


@pytest.mark.parametrize("tls_first", [False, True], ids=["in_tls", "in_upgrade"])
async def test_connector_stopping_mid_dial_closes_its_socket(
    tmp_path: Path, tls_first: bool
) -> None:
    # dial_gateway's except BaseException: one aclose_forcefully of the TLS channel, whose
    # aclose closes the socket in its finally.
    tls = tls_material(tmp_path / "tls")
    with resource_warnings() as caught:
        async with backend(server_context(tls) if tls_first else None) as fake_gateway:
            config = ConnectorConfig.from_mapping(
                connector_document(tls, fake_gateway.port, tmp_path / "c.jsonl", [DUMMY_MAPPING]),
                source="connector.toml",
            )
            async with open_connector(config):
                with trio.fail_after(10):
                    await fake_gateway.greeted.wait()  # the ClientHello / the upgrade request
                await trio.testing.wait_all_tasks_blocked()
                assert fake_gateway.ended == 0
            await settled()
            ended = fake_gateway.ended
        gc.collect()
    assert unclosed(caught) == []
    assert ended == 1


@pytest.mark.parametrize("tls_first", [False, True], ids=["in_tls", "in_upgrade"])
async def test_gateway_stopping_mid_handshake_closes_the_connection(
    tmp_path: Path, tls_first: bool
) -> None:
    # accept_tunnel's finally (one aclose_forcefully) and trio.serve_listeners' own close.
    tls = tls_material(tmp_path / "tls")
    gateway_config = GatewayConfig.from_mapping(
        gateway_document(tls, tmp_path / "gw.jsonl", socks=False), source="gateway.toml"
    )
    with resource_warnings() as caught:
        async with open_gateway(gateway_config) as gateway:
            assert gateway.tunnel_address is not None
            tcp = await trio.open_tcp_stream("127.0.0.1", gateway.tunnel_address.port)
            client: trio.abc.Stream = tcp
            if tls_first:
                context = ssl.create_default_context(cafile=str(tls.ca_file))
                client = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
                await client.do_handshake()
                await client.send_all(b"GET /tunnel HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half
            await trio.testing.wait_all_tasks_blocked()
        await settled()
        ending: bytes | bytearray | None = None
        try:
            with trio.move_on_after(5):  # a bound only: the EOF is there at once
                ending = await client.receive_some(100)
        except trio.BrokenResourceError:
            ending = b""
        tcp.socket.close()
        gc.collect()
    assert unclosed(caught) == []
    assert ending == b""


# ------------------------------------------------------------------------------ aside
# Not a cancellation, the same kind of leak: the backend TLS stream was built outside the try
# that closes the TCP connection, so anything ssl refuses there (before config checks caught
# it: a server_name with a leading dot) left the socket of every stream to the garbage
# collector, in both plugins.


@pytest.mark.parametrize("http", [True, False], ids=["https", "tcps"])
async def test_backend_tls_setup_failing_closes_the_backend_socket(
    tmp_path: Path, http: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tunnel logs the handler's exception: the log record's traceback would keep a
    # leaked socket alive past this test (then it warns in the next test's teardown).
    monkeypatch.setattr(logging.getLogger("backchannel.tunnel"), "disabled", True)

    def refused(*args: Any, **kwargs: Any) -> trio.SSLStream[trio.SocketStream]:
        raise ValueError("server_hostname cannot be an empty string or start with a leading dot.")

    with resource_warnings() as caught:
        async with backend() as be:
            ports = backend_ports(be, http=http)
            async with stack(tmp_path, *ports) as running:
                monkeypatch.setattr(trio, "SSLStream", refused)  # the backends' TLS only
                door = running.proxy if http else running.forward
                client = await trio.open_tcp_stream(door.host, door.port)
                async with client:
                    if http:
                        await client.send_all(proxy_get(HTTPS_VIRTUAL))
                    with trio.fail_after(10):
                        answer = await client.receive_some(65536)  # 5xx, or the forward's EOF
                    assert answer.startswith(b"HTTP/1.1 5") if http else answer == b""
                await settled()
                ended = be.ended
            gc.collect()
    assert unclosed(caught) == []
    assert ended == 1
