"""``backchannel demo``: gateway, connector and sample backends in one process, self-checked.

The configuration is embedded below (``GATEWAY_TOML`` / ``CONNECTOR_TOML``); only ports,
throwaway certificate paths and a random app secret are filled in at start.
"""

from __future__ import annotations

import base64
import logging
import secrets
import socket
import struct
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import h11
import trio

from ._config import ConnectorConfig, GatewayConfig
from ._configutil import HostPort
from ._connector import Connector, open_connector
from ._gateway import Gateway, open_gateway
from ._pki import write_throwaway_tls_material
from ._plugin_api import DemoContext, DemoPart
from ._plugins import collect_hook_results, get_plugin_manager

log = logging.getLogger("backchannel.demo")

GATEWAY_TOML = """\
# The demo gateway (cloud side). Secrets come from files, as they should.
[gateway]
listen = "127.0.0.1:{tunnel_port}"
path = "/tunnel"
tls_cert = "{tls_dir}/server.pem"
tls_key = "{tls_dir}/server.key"

[audit]
file = "{work_dir}/gateway-audit.jsonl"

[subaccounts.demo]
connector_token_file = "{work_dir}/connector.token"

[subaccounts.demo.apps.app]
secret_file = "{work_dir}/app.secret"

[plugins.tcp]
socks5_listen = "127.0.0.1:{socks_port}"

[[plugins.tcp.forwards]]
listen = "127.0.0.1:{forward_port}"
subaccount = "demo"
target = "echo.virtual:7"

# The HTTP forward proxy (curl -x) and the destinations endpoint (/destinations/<name>/...).
[plugins.http]
proxy_listen = "127.0.0.1:{http_proxy_port}"
destinations_listen = "127.0.0.1:{destinations_port}"

[[plugins.http.destinations]]
name = "HELLO"
subaccount = "demo"
url = "http://hello.virtual:80"
authentication = "NoAuthentication"

"""

CONNECTOR_TOML = """\
# The demo connector (on-premise side): dials out, maps virtual names to real backends.
[audit]
file = "{work_dir}/connector-audit.jsonl"

[subaccounts.demo]
gateway = "wss://127.0.0.1:{tunnel_port}/tunnel"
token_file = "{work_dir}/connector.token"
ca_file = "{tls_dir}/ca.pem"
use_environment_proxy = false

[[subaccounts.demo.mappings]]
virtual = "echo.virtual:7"
internal = "127.0.0.1:{echo_port}"
protocol = "tcp"
description = "TCP echo service"

[[subaccounts.demo.mappings]]
virtual = "hello.virtual:80"
internal = "127.0.0.1:{http_port}"
protocol = "http"
description = "a small web server, reached through the HTTP proxy: only / and /hello/... are open"

[[subaccounts.demo.mappings.resources]]
path = "/"
match = "exact"

[[subaccounts.demo.mappings.resources]]
path = "/hello"
match = "prefix"

[[subaccounts.demo.mappings]]
virtual = "hello-tcp.virtual:80"
internal = "127.0.0.1:{http_port}"
protocol = "tcp"
description = "the same web server, reached as raw TCP through SOCKS5"

"""

HELLO_BODY = b"Hello from the on-premise backend, through backchannel.\n"
#: A path of hello.virtual that no resource rule covers.
DENIED_PATH = "/admin"


@dataclass(frozen=True, slots=True)
class StepResult:
    """One self-check step."""

    name: str
    ok: bool
    detail: str
    seconds: float


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def _hello_http(seen: list[str], stream: trio.SocketStream) -> None:
    """The sample web server: 200 and ``HELLO_BODY`` for every request; targets go to ``seen``."""
    connection = h11.Connection(h11.SERVER)
    async with stream:
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    seen.append(event.target.decode("ascii", "replace"))
                    headers = [
                        ("content-type", "text/plain"),
                        ("content-length", str(len(HELLO_BODY))),
                    ]
                    await stream.send_all(
                        connection.send(
                            h11.Response(status_code=200, headers=headers, reason=b"OK")
                        )
                    )
                    await stream.send_all(connection.send(h11.Data(data=HELLO_BODY)))
                    await stream.send_all(connection.send(h11.EndOfMessage()))
                elif (
                    isinstance(event, h11.ConnectionClosed)
                    or connection.our_state is h11.MUST_CLOSE
                ):
                    return
                elif isinstance(event, h11.EndOfMessage):
                    connection.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            return


async def socks5_connect(
    proxy: HostPort, user: str, password: str, host: str, port: int
) -> trio.SocketStream:
    """A minimal SOCKS5 client (RFC 1928/1929) for the self-check; raises OSError on refusal."""
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    try:
        await stream.send_all(b"\x05\x01\x02")
        if await _read(stream, 2) != b"\x05\x02":
            raise OSError("SOCKS5 proxy refused username/password authentication")
        raw_user, raw_password = user.encode(), password.encode()
        await stream.send_all(
            bytes([1, len(raw_user)]) + raw_user + bytes([len(raw_password)]) + raw_password
        )
        if (await _read(stream, 2))[1] != 0:
            raise OSError("SOCKS5 proxy rejected the credentials")
        raw_host = host.encode()
        await stream.send_all(
            b"\x05\x01\x00\x03" + bytes([len(raw_host)]) + raw_host + struct.pack(">H", port)
        )
        reply = await _read(stream, 10)
        if reply[1] != 0:
            raise OSError(f"SOCKS5 reply code {reply[1]:#04x}")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def http_get(
    server: HostPort, requests: Sequence[tuple[str, Sequence[tuple[str, str]]]]
) -> list[tuple[int, bytes]]:
    """A minimal HTTP/1.1 client for the self-check: GET each (target, headers) in turn, on one
    kept-alive connection while the server keeps it; (status, body) of each."""
    answers: list[tuple[int, bytes]] = []
    stream: trio.SocketStream | None = None
    connection = h11.Connection(h11.CLIENT)
    try:
        for target, headers in requests:
            if stream is None:
                stream = await trio.open_tcp_stream(server.host, server.port)
                connection = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target=target, headers=list(headers))
            await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
            status, body = 0, b""
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise OSError(f"{server} closed the connection before answering {target}")
            answers.append((status, body))
            if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
                connection.start_next_cycle()
            else:  # the server closes this connection: the next request gets a new one
                await stream.aclose()
                stream = None
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
    return answers


async def _read(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise OSError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def _free_port(preferred: int) -> int:
    """``preferred`` if it can be bound on 127.0.0.1 now, else 0 (let the OS choose)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _short(body: bytes) -> str:
    return repr(body[:80])


@dataclass(frozen=True, slots=True)
class _Doors:
    """Where the demo gateway's front doors listen."""

    socks: HostPort
    forward: HostPort
    proxy: HostPort
    destinations: HostPort

    @classmethod
    def of(cls, gateway: Gateway) -> _Doors:
        addresses = gateway.front_door_addresses
        forward = next(v for k, v in addresses.items() if k.startswith("tcp.forward"))
        return cls(
            socks=addresses["tcp.socks5"][0],
            forward=forward[0],
            proxy=addresses["http.proxy"][0],
            destinations=addresses["http.destinations"][0],
        )


class Demo:
    """The demo set-up: writes its config and secrets into a temporary folder."""

    user = "demo/app"

    def __init__(self, work_dir: Path, parts: Sequence[DemoPart] = ()) -> None:
        self.work_dir = work_dir
        #: The installed plugins' parts of the demo (backends, config, steps).
        self.parts = list(parts)
        self.tls = write_throwaway_tls_material(work_dir / "tls")
        self.app_secret = secrets.token_urlsafe(24)
        #: Request targets the sample web server answered, in order.
        self.served: list[str] = []
        for name, value in (
            ("connector.token", secrets.token_urlsafe(32)),
            ("app.secret", self.app_secret),
        ):
            path = work_dir / name
            path.write_text(value)
            path.chmod(0o600)

    def _render(self, template: str, **ports: int) -> str:
        return template.format(work_dir=self.work_dir, tls_dir=self.tls.ca_file.parent, **ports)

    async def run(self, *, once: bool, print_line: Callable[[str], None]) -> list[StepResult]:
        """Start everything; self-check; then wait (or return with ``once``)."""
        results: list[StepResult] = []
        async with trio.open_nursery() as nursery:
            echo = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
            hello = partial(_hello_http, self.served)
            http = await nursery.start(partial(trio.serve_tcp, hello, 0, host="127.0.0.1"))
            for part in self.parts:
                await part.start(nursery, self.work_dir)
            gateway_text = self._render(
                GATEWAY_TOML,
                tunnel_port=0,
                socks_port=_free_port(20004),
                forward_port=_free_port(20007),
                http_proxy_port=_free_port(20003),
                destinations_port=_free_port(20005),
            ) + "".join(part.gateway_toml(self.work_dir) for part in self.parts)
            (self.work_dir / "gateway.toml").write_text(gateway_text)
            gateway_config = GatewayConfig.from_mapping(
                tomllib.loads(gateway_text), source=str(self.work_dir / "gateway.toml")
            )
            started = time.perf_counter()
            async with open_gateway(gateway_config) as gateway:
                assert gateway.tunnel_address is not None
                connector_text = self._render(
                    CONNECTOR_TOML,
                    tunnel_port=gateway.tunnel_address.port,
                    echo_port=echo[0].socket.getsockname()[1],
                    http_port=http[0].socket.getsockname()[1],
                ) + "".join(part.connector_toml(self.work_dir) for part in self.parts)
                (self.work_dir / "connector.toml").write_text(connector_text)
                connector_config = ConnectorConfig.from_mapping(
                    tomllib.loads(connector_text), source=str(self.work_dir / "connector.toml")
                )
                async with open_connector(connector_config) as connector:
                    results = await self._self_check(gateway, connector, started)
                    for result in results:
                        mark = "ok  " if result.ok else "FAIL"
                        milliseconds = result.seconds * 1000
                        print_line(
                            f"  [{mark}] {result.name}: {result.detail} ({milliseconds:.1f} ms)"
                        )
                    if once:
                        nursery.cancel_scope.cancel()
                    else:
                        self._print_try_it(gateway, connector, print_line)
                        await trio.sleep_forever()
        return results

    async def _self_check(
        self, gateway: Gateway, connector: Connector, started: float
    ) -> list[StepResult]:
        doors = _Doors.of(gateway)
        user, secret = self.user, self.app_secret
        proxy_auth = [("Proxy-Authorization", _basic(user, secret))]

        async def tunnel_up() -> str:
            await connector.wait_connected()
            return (
                f"connector dialled wss://{gateway.tunnel_address}/tunnel; "
                "the only connection between the two"
            )

        async def socks_echo() -> str:
            payload = secrets.token_bytes(64 * 1024)
            stream = await socks5_connect(doors.socks, user, secret, "echo.virtual", 7)
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                echoed = await _read(stream, len(payload))
            if echoed != payload:
                raise OSError("echoed bytes differ from the bytes sent")
            return f"64 KiB echoed intact via SOCKS5 {doors.socks} → echo.virtual:7"

        async def forward_echo() -> str:
            stream = await trio.open_tcp_stream(doors.forward.host, doors.forward.port)
            async with stream:
                await stream.send_all(b"ping through the port forward")
                if await _read(stream, 29) != b"ping through the port forward":
                    raise OSError("echo mismatch")
            return f"round trip via port forward {doors.forward} → echo.virtual:7"

        async def socks_http() -> str:
            stream = await socks5_connect(doors.socks, user, secret, "hello-tcp.virtual", 80)
            async with stream:
                await stream.send_all(
                    b"GET / HTTP/1.1\r\nHost: hello-tcp.virtual\r\nConnection: close\r\n\r\n"
                )
                response = b""
                while chunk := await stream.receive_some(65536):
                    response += chunk
            if not response.startswith(b"HTTP/1.1 200") or HELLO_BODY not in response:
                raise OSError(f"unexpected response {response[:60]!r}")
            return "GET http://hello-tcp.virtual/ answered 200 via SOCKS5 (a tcp mapping)"

        async def denied() -> str:
            denials = connector.audit.denials
            try:
                stream = await socks5_connect(doors.socks, user, secret, "secret.virtual", 22)
            except OSError as exc:
                if "0x02" not in str(exc):
                    raise
                if connector.audit.denials == denials:
                    raise OSError("refused, but the connector wrote no audit line") from None
                return "unmapped secret.virtual:22 refused with SOCKS5 reply 0x02 and an audit line"
            await stream.aclose()
            raise OSError("an unmapped target was reachable")

        async def proxy_http() -> str:
            headers = [("Host", "hello.virtual"), *proxy_auth]
            [(status, body)] = await http_get(doors.proxy, [("http://hello.virtual/", headers)])
            if status != 200 or body != HELLO_BODY:
                raise OSError(f"expected 200 and the greeting, got {status} {_short(body)}")
            return f"GET http://hello.virtual/ answered 200 via the HTTP proxy {doors.proxy}"

        async def proxy_denied() -> str:
            headers = [("Host", "hello.virtual"), *proxy_auth]
            allowed, refused = (
                "http://hello.virtual/hello/demo",
                f"http://hello.virtual{DENIED_PATH}",
            )
            denials, served = connector.audit.denials, len(self.served)
            answers = await http_get(doors.proxy, [(allowed, headers), (refused, headers)])
            (status, body), (denied_status, denied_body) = answers
            if status != 200 or body != HELLO_BODY:
                raise OSError(f"{allowed} (rule /hello, prefix): got {status} {_short(body)}")
            expected = (
                f"Access denied to resource http://hello.virtual:80{DENIED_PATH} "
                "on system hello.virtual:80"
            ).encode()
            if denied_status != 403 or not denied_body.startswith(expected):
                raise OSError(f"{refused}: expected 403, got {denied_status} {_short(denied_body)}")
            if self.served[served:] != ["/hello/demo"]:
                raise OSError(f"the backend saw {self.served[served:]}, not just /hello/demo")
            if connector.audit.denials == denials:
                raise OSError("refused, but the connector wrote no audit line")
            return (
                f"/hello/demo answered 200; {DENIED_PATH} refused 403 by the connector's resource "
                "rules before the backend, with an audit line"
            )

        async def destination() -> str:
            target = "/destinations/HELLO/"
            headers = [("Host", str(doors.destinations)), ("Authorization", _basic(user, secret))]
            [(status, body)] = await http_get(doors.destinations, [(target, headers)])
            if status != 200 or body != HELLO_BODY:
                raise OSError(f"expected 200 and the greeting, got {status} {_short(body)}")
            return f"GET http://{doors.destinations}{target} answered 200 → http://hello.virtual/"

        steps: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("tunnel", tunnel_up),
            ("tcp via SOCKS5", socks_echo),
            ("tcp via port forward", forward_echo),
            ("http over tcp via SOCKS5", socks_http),
            ("access control", denied),
            ("http via the HTTP proxy", proxy_http),
            ("http access control", proxy_denied),
            ("http via a destination", destination),
        ]
        context = self._context(gateway, connector)
        for part in self.parts:
            steps.extend(part.steps(context))
        results = []
        for name, step in steps:
            begin = time.perf_counter() if name != "tunnel" else started
            try:
                with trio.fail_after(10):
                    detail = await step()
                results.append(StepResult(name, True, detail, time.perf_counter() - begin))
            except Exception as exc:  # any failure of a step is that step's result
                detail = f"{type(exc).__name__}: {exc}"
                results.append(StepResult(name, False, detail, time.perf_counter() - begin))
        return results

    def _context(self, gateway: Gateway, connector: Connector) -> DemoContext:
        return DemoContext(gateway, connector, self.user, self.app_secret, self.work_dir)

    def _print_try_it(
        self, gateway: Gateway, connector: Connector, print_line: Callable[[str], None]
    ) -> None:
        doors = _Doors.of(gateway)
        credentials = f"'{self.user}:{self.app_secret}'"
        proxy = f"curl -x http://{doors.proxy} --proxy-user {credentials}"
        socks = f"curl --socks5-hostname {doors.socks} --proxy-user {credentials}"
        lines = [
            (f"{proxy} http://hello.virtual/", "HTTP proxy"),
            (f"{proxy} http://hello.virtual{DENIED_PATH}", "403: no resource rule"),
            (
                f"curl --user {credentials} http://{doors.destinations}/destinations/HELLO/",
                "destination",
            ),
            (f"{socks} http://hello-tcp.virtual/", "raw TCP via SOCKS5"),
            (
                f"printf 'hello\\n' | nc -q1 {doors.forward.host} {doors.forward.port}",
                "echo via the port forward",
            ),
            (f"{socks} http://secret.virtual:22/", "refused: not mapped"),
        ]
        context = self._context(gateway, connector)
        for part in self.parts:
            lines.extend(part.try_it(context))
        print_line("")
        print_line("Try it from another terminal (demo credentials, valid while this runs):")
        for command, comment in lines:
            print_line(f"  {command}   # {comment}")
        print_line(f"Configuration and audit logs: {self.work_dir}")
        print_line("Press Ctrl-C to stop.")


def demo_parts() -> list[DemoPart]:
    """The parts of the demo that installed plugins contribute (``backchannel_demo_parts``)."""
    manager = get_plugin_manager()
    parts: list[DemoPart] = []
    for _plugin, returned in collect_hook_results(manager, "backchannel_demo_parts"):
        parts.extend(cast(DemoPart, part) for part in returned)
    return parts


async def run_demo(*, once: bool, print_line: Callable[[str], None] = print) -> int:
    """Entry point of ``backchannel demo``; returns the exit code."""
    with tempfile.TemporaryDirectory(prefix="backchannel-demo-") as tmp:
        parts = demo_parts()
        demo = Demo(Path(tmp), parts)
        extra = "".join(f", {part.name}" for part in parts)
        print_line(
            "backchannel demo: gateway, connector and sample backends (TCP echo, web server"
            f"{extra}) on 127.0.0.1"
        )
        results = await demo.run(once=once, print_line=print_line)
    failed = [r for r in results if not r.ok]
    if once:
        if failed:
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            print_line(f"demo FAILED at step {failed[0].name!r}: {failed[0].detail}{more}")
            return 1
        print_line(f"demo OK: {len(results)} steps passed")
    return 0
