"""The TCP plugin's hooks (entry point ``tcp`` in the group ``backchannel.plugins``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backchannel import (
    ConnectionLimit,
    ConnectorContext,
    ConnectorHandler,
    FrontDoor,
    GatewayContext,
    PluginInfo,
    Role,
    TableReader,
    __version__,
    hookimpl,
    is_valid_location_id,
)

from ._front_doors import PortForward, Socks5FrontDoor
from ._handler import TcpHandler

NAME = "tcp"


@hookimpl
def backchannel_plugin_info() -> PluginInfo:
    """Describe the TCP plugin."""
    return PluginInfo(
        name=NAME,
        version=__version__,
        description="raw TCP: SOCKS5 and port-forward front doors; tcp/tcps backends",
        roles=frozenset({Role.GATEWAY, Role.CONNECTOR}),
        mapping_protocols=("tcp", "tcps"),
    )


@dataclass(frozen=True, slots=True)
class _Settings:
    handshake_timeout: float
    connect_timeout: float
    max_connections: int
    idle_timeout: float


def _read_common(table: TableReader) -> _Settings:
    return _Settings(
        handshake_timeout=table.number("handshake_timeout", 10.0, minimum=0.1, maximum=600),
        connect_timeout=table.number("connect_timeout", 10.0, minimum=0.1, maximum=600),
        max_connections=table.integer(
            "max_connections", ConnectionLimit.DEFAULT, minimum=1, maximum=1_000_000
        ),
        idle_timeout=table.number("idle_timeout", 0.0, minimum=0.0, maximum=7 * 86400),
    )


@hookimpl
def backchannel_connector_handlers(context: ConnectorContext) -> Sequence[ConnectorHandler]:
    """The tcp/tcps backend handler."""
    table = context.config_for(NAME)
    settings = _read_common(table)
    # Gateway-side keys may share the file in a combined set-up; they are checked there.
    table.optional_string("socks5_listen")
    list(table.tables("forwards"))
    table.finish()
    return [
        TcpHandler(connect_timeout=settings.connect_timeout, idle_timeout=settings.idle_timeout)
    ]


@hookimpl
def backchannel_gateway_front_doors(context: GatewayContext) -> Sequence[FrontDoor]:
    """SOCKS5 (if ``socks5_listen`` is set) and one listener per ``[[plugins.tcp.forwards]]``."""
    table = context.config_for(NAME)
    settings = _read_common(table)
    services = context.services
    doors: list[FrontDoor] = []
    if "socks5_listen" in table:
        doors.append(
            Socks5FrontDoor(
                services,
                table.host_port("socks5_listen"),
                handshake_timeout=settings.handshake_timeout,
                max_connections=settings.max_connections,
                idle_timeout=settings.idle_timeout,
            )
        )
    for forward in table.tables("forwards"):
        listen = forward.host_port("listen")
        subaccount = forward.string("subaccount", required=True)
        if not services.has_subaccount(subaccount):
            raise forward.error("subaccount", f"subaccount {subaccount!r} is not configured")
        location = forward.string("location", "")
        if not is_valid_location_id(location):
            raise forward.error(
                "location", f"location id {location!r}: up to 64 letters, digits, '.', '_' or '-'"
            )
        target = forward.host_port("target", allow_port_zero=False)
        forward.finish()
        doors.append(
            PortForward(
                services,
                listen,
                subaccount=subaccount,
                location=location,
                target=target,
                max_connections=settings.max_connections,
                idle_timeout=settings.idle_timeout,
            )
        )
    table.finish()
    return doors
