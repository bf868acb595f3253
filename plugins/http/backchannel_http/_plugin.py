"""The HTTP plugin's hooks (entry point ``http`` in the group ``backchannel.plugins``)."""

from __future__ import annotations

from collections.abc import Sequence

from backchannel import (
    ConnectorContext,
    ConnectorHandler,
    FrontDoor,
    GatewayContext,
    PluginInfo,
    Role,
    TableReader,
    __version__,
    hookimpl,
)

from ._front_door import front_doors, skip_gateway_keys
from ._handler import HttpHandler

NAME = "http"


@hookimpl
def backchannel_plugin_info() -> PluginInfo:
    """Describe the HTTP plugin."""
    return PluginInfo(
        name=NAME,
        version=__version__,
        description="HTTP: forward proxy and destinations on the gateway; http/https backends",
        roles=frozenset({Role.GATEWAY, Role.CONNECTOR}),
        mapping_protocols=("http", "https"),
    )


def _connect_timeout(table: TableReader) -> float:
    return table.number("connect_timeout", 10.0, minimum=0.1, maximum=600)


@hookimpl
def backchannel_connector_handlers(context: ConnectorContext) -> Sequence[ConnectorHandler]:
    """The http/https backend handler."""
    table = context.config_for(NAME)
    connect_timeout = _connect_timeout(table)
    skip_gateway_keys(table)
    table.finish()
    return [HttpHandler(connect_timeout=connect_timeout)]


@hookimpl
def backchannel_gateway_front_doors(context: GatewayContext) -> Sequence[FrontDoor]:
    """The HTTP proxy (``proxy_listen``) and the destinations endpoint (``destinations_listen``)."""
    _connect_timeout(context.config_for(NAME))  # a connector key, accepted in a shared file
    return front_doors(context)
