"""The RFC plugin's hooks (entry point ``rfc`` in the group ``backchannel.plugins``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backchannel import (
    ConnectionLimit,
    ConnectorContext,
    ConnectorHandler,
    DemoPart,
    FrontDoor,
    GatewayContext,
    PluginInfo,
    Role,
    TableReader,
    __version__,
    hookimpl,
)

from ._backend import BACKENDS, BackendPool, PoolSettings, connector_for, load_client_module
from ._demo_part import RfcDemoPart
from ._destinations import read_destinations
from ._front_door import RfcFrontDoor
from ._handler import HandlerSettings, RfcHandler
from ._json_endpoint import RfcJsonEndpoint
from ._json_http import MAX_BODY
from ._stub_protocol import MAX_MESSAGE_SIZE

NAME = "rfc"
_GATEWAY_KEYS = (
    "listen",
    "http_listen",
    "handshake_timeout",
    "http_max_body",
    "http_request_timeout",
    "max_client_connections",
    "http_idle_timeout",
)


@hookimpl
def backchannel_plugin_info() -> PluginInfo:
    """Describe the RFC plugin."""
    return PluginInfo(
        name=NAME,
        version=__version__,
        description="RFC: pyrfc-compatible client front door and JSON endpoint; ABAP backends "
        "through pyrfc or the stub",
        roles=frozenset({Role.GATEWAY, Role.CONNECTOR}),
        mapping_protocols=("rfc",),
    )


def _handler_settings(table: TableReader) -> HandlerSettings:
    return HandlerSettings(
        call_timeout=table.number("call_timeout", 60.0, minimum=0.01, maximum=86400),
        idle_timeout=table.number("idle_timeout", 3600.0, minimum=1, maximum=7 * 86400),
        max_message_size=table.integer(
            "max_message_size", MAX_MESSAGE_SIZE, minimum=64 * 1024, maximum=MAX_MESSAGE_SIZE
        ),
    )


def _pool_settings(table: TableReader) -> PoolSettings:
    return PoolSettings(
        max_connections=table.integer("max_connections", 20, minimum=1, maximum=10_000),
        max_idle=table.integer("max_idle", 5, minimum=0, maximum=10_000),
        idle_timeout=table.number("pool_idle_timeout", 300.0, minimum=0, maximum=86400),
        wait_timeout=table.number("pool_wait_timeout", 30.0, minimum=0.01, maximum=3600),
        max_threads=table.integer("max_threads", 32, minimum=1, maximum=1024),
    )


def _backend_choice(table: TableReader) -> str:
    choice = table.string("backend", "auto")
    if choice not in BACKENDS:
        raise table.error("backend", f"must be one of {', '.join(BACKENDS)}")
    return choice


@dataclass(frozen=True, slots=True)
class _GatewaySettings:
    handshake_timeout: float
    max_body: int
    request_timeout: float
    max_connections: int
    idle_timeout: float


def _gateway_settings(table: TableReader) -> _GatewaySettings:
    return _GatewaySettings(
        handshake_timeout=table.number("handshake_timeout", 10.0, minimum=0.1, maximum=600),
        max_body=table.integer("http_max_body", MAX_BODY, minimum=1024, maximum=64 * 1024 * 1024),
        request_timeout=table.number("http_request_timeout", 30.0, minimum=0.1, maximum=3600),
        idle_timeout=table.number("http_idle_timeout", 60.0, minimum=0.1, maximum=3600),
        # ``max_connections`` is the connector's pool size in the same table.
        max_connections=table.integer(
            "max_client_connections", ConnectionLimit.DEFAULT, minimum=1, maximum=1_000_000
        ),
    )


@hookimpl
def backchannel_connector_handlers(context: ConnectorContext) -> Sequence[ConnectorHandler]:
    """The rfc backend handler."""
    table = context.config_for(NAME)
    choice = _backend_choice(table)
    settings = _handler_settings(table)
    pool_settings = _pool_settings(table)
    # Gateway-side keys may share the file in a combined set-up; they are checked there.
    _gateway_settings(table)
    for key in ("listen", "http_listen"):
        table.optional_string(key)
    list(table.tables("destinations"))
    table.finish()
    try:
        kind, module = load_client_module(choice)
    except ImportError as exc:
        raise table.error("backend", str(exc)) from None
    pool = BackendPool(connector_for(kind, module), pool_settings)
    return [RfcHandler(pool, settings, backend_kind=kind)]


@hookimpl
def backchannel_gateway_front_doors(context: GatewayContext) -> Sequence[FrontDoor]:
    """The RFC front door (``listen``) and the JSON endpoint (``http_listen``)."""
    table = context.config_for(NAME)
    services = context.services
    _backend_choice(table)  # connector keys, accepted in a shared file
    _handler_settings(table)
    _pool_settings(table)
    destinations = read_destinations(table, services)
    settings = _gateway_settings(table)
    doors: list[FrontDoor] = []
    if "listen" in table:
        doors.append(
            RfcFrontDoor(
                services,
                table.host_port("listen"),
                destinations,
                handshake_timeout=settings.handshake_timeout,
                max_connections=settings.max_connections,
            )
        )
    if "http_listen" in table:
        doors.append(
            RfcJsonEndpoint(
                services,
                table.host_port("http_listen"),
                destinations,
                max_body=settings.max_body,
                request_timeout=settings.request_timeout,
                max_connections=settings.max_connections,
                idle_timeout=settings.idle_timeout,
            )
        )
    table.finish()
    return doors


@hookimpl
def backchannel_demo_parts() -> Sequence[DemoPart]:
    """The stub ABAP system and the RFC self-checks of ``backchannel demo``."""
    return [RfcDemoPart()]
