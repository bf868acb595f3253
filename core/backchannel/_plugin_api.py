"""Types that plugins implement or receive: the contract between the core and plugins."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import trio

from ._configutil import HostPort, TableReader
from ._identity import PrincipalResolver, PropagatedUser
from ._principal_errors import PrincipalError, PrincipalReason

if TYPE_CHECKING:
    from ._audit import AuditLog
    from ._connector import Connector
    from ._gateway import Gateway
    from ._stream import TunnelStream


class Role(enum.Enum):
    """Which side a process plays."""

    GATEWAY = "gateway"
    CONNECTOR = "connector"


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What a plugin says about itself (shown by ``backchannel plugins``)."""

    name: str
    version: str
    description: str
    roles: frozenset[Role]
    #: Mapping protocols on the connector this plugin serves, e.g. ("tcp", "tcps").
    mapping_protocols: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AppIdentity:
    """An authenticated cloud application (or a static port forward) of one subaccount."""

    subaccount: str
    app: str


@dataclass(frozen=True, slots=True)
class SystemMapping:
    """One connector access-control entry: virtual host:port(s) → internal host:port(s)."""

    subaccount: str
    protocol: str
    virtual_host: str
    virtual_ports: range
    internal_host: str
    internal_first_port: int
    description: str = ""
    #: What the serving plugin parsed from the mapping's extra keys (TLS settings, resources).
    options: object = None

    def internal_for(self, virtual_port: int) -> HostPort:
        """The internal address a virtual port maps to (ranges map offset by offset)."""
        return HostPort(
            self.internal_host, self.internal_first_port + virtual_port - self.virtual_ports.start
        )

    @property
    def virtual_text(self) -> str:
        """``host:port`` or ``host:first-last`` as configured."""
        ports = self.virtual_ports
        if len(ports) == 1:
            return f"{self.virtual_host}:{ports.start}"
        return f"{self.virtual_host}:{ports.start}-{ports.stop - 1}"


@dataclass(frozen=True, slots=True)
class Session:
    """Everything a connector-side handler knows about one stream, after the access check."""

    protocol: str
    subaccount: str
    location: str
    app: str
    virtual: HostPort
    internal: HostPort
    mapping: SystemMapping
    audit: AuditLog
    principal: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    #: The connector's principal propagation (None when ``[principal_propagation]`` is unset).
    principal_resolver: PrincipalResolver | None = field(default=None, repr=False)

    def propagated_user(self) -> PropagatedUser:
        """The cloud user behind this stream, with a short-lived certificate for them.

        Validates the stream's token against the subaccount's trusted identity providers,
        maps it to a subject with the connector's subject rules and issues (or reuses) the
        certificate. Raises :class:`backchannel.PrincipalError` with the precise reason; every
        outcome is audited as ``principal_propagation``.
        """
        if self.principal_resolver is None:
            error = PrincipalError(
                PrincipalReason.CA_UNUSABLE,
                f"{self.virtual} asks for principal propagation, but this connector has no "
                "[principal_propagation] table (ca_cert, ca_key, subject_rules)",
            )
            self.audit.denied("principal_propagation", error.code, system=str(self.virtual))
            raise error
        return self.principal_resolver.resolve(self)

    @property
    def mapping_protocol(self) -> str:
        """The mapping's protocol (``tcp`` or ``tcps`` for the TCP plugin, for instance)."""
        return self.mapping.protocol


class ConnectorHandler(Protocol):
    """Connector side of a plugin: takes accepted-for-routing streams to the backend.

    A handler that keeps resources between streams (a pool of backend connections, say) may
    also define ``async def aclose(self) -> None``: the connector awaits it once when it stops,
    shielded from cancellation, for at most 5 seconds.
    """

    #: The stream protocol it handles (the plugin name; the ``protocol`` field of OPEN).
    name: str
    #: Mapping protocols whose streams it handles.
    mapping_protocols: tuple[str, ...]

    def parse_mapping_options(self, mapping: TableReader) -> object:
        """Read the plugin's own keys of a ``[[...mappings]]`` entry (call ``mapping.finish()``)."""
        ...

    async def handle(self, session: Session, stream: TunnelStream) -> None:
        """Serve one stream: accept it (``stream.accept()``) once the backend is reached, or
        raise :class:`backchannel.StreamError` with the reset code for the gateway.

        The core resets the stream with INTERNAL if this returns without answering.
        """
        ...


class GatewayServices(Protocol):
    """What the gateway offers its front doors."""

    audit: AuditLog

    def authenticate_basic(self, username: str, password: str) -> AppIdentity:
        """Check app credentials (``subaccount/app`` + secret); raises AuthenticationError."""
        ...

    def authenticate_bearer(self, token: str) -> AppIdentity:
        """Check an app token (JWT); raises AuthenticationError."""
        ...

    def app_for_forward(self, subaccount: str, name: str) -> AppIdentity:
        """The identity under which a static forward opens streams."""
        ...

    def has_subaccount(self, subaccount: str) -> bool:
        """Whether the subaccount is configured."""
        ...

    async def open_stream(
        self,
        app: AppIdentity,
        *,
        protocol: str,
        target: HostPort,
        location: str = "",
        principal: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        wait_accepted: bool = True,
        first_data: bytes = b"",
    ) -> TunnelStream:
        """Open a stream to ``target`` (a virtual host:port) through the app's subaccount's
        connector at ``location``. Raises NotConnectedError or StreamError.

        ``first_data``: bytes the stream starts with (what a client sent before the stream
        was open). They leave with the OPEN, without waiting for the connector's answer (as
        far as its initial window and the tunnel's output queue take them; the rest after the
        answer, which is then waited for even with ``wait_accepted=False``), which saves a
        tunnel round trip for a client that speaks first. The connector holds them until its
        access check accepted the stream, and drops them if it refuses: nothing reaches a
        backend before that. All of them are sent when this returns; a stream that breaks
        after it was accepted is returned with the error on it, not raised."""
        ...


class FrontDoor(Protocol):
    """Gateway side of a plugin: a listener for cloud applications."""

    name: str

    async def serve(self, *, task_status: trio.TaskStatus[Sequence[HostPort]]) -> None:
        """Bind, report the bound addresses through ``task_status.started``, serve until
        cancelled."""
        ...


@dataclass(frozen=True, slots=True)
class GatewayContext:
    """Passed to ``backchannel_gateway_front_doors``."""

    services: GatewayServices
    #: Each enabled plugin's ``[plugins.<name>]`` table reader by plugin name; read yours with
    #: :meth:`config_for` (and call ``finish()`` when done).
    plugin_config: Mapping[str, TableReader]

    def config_for(self, plugin_name: str) -> TableReader:
        """This plugin's config table (empty if absent)."""
        return _config_for(self.plugin_config, plugin_name)


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """Passed to ``backchannel_connector_handlers``."""

    plugin_config: Mapping[str, TableReader]

    def config_for(self, plugin_name: str) -> TableReader:
        """This plugin's config table (empty if absent)."""
        return _config_for(self.plugin_config, plugin_name)


def _config_for(tables: Mapping[str, TableReader], plugin_name: str) -> TableReader:
    try:
        return tables[plugin_name]
    except KeyError:
        # A plugin bug, not a configuration error: say what to check.
        known = ", ".join(sorted(tables)) or "none"
        raise LookupError(
            f"no configuration table for plugin {plugin_name!r} (plugins: {known}); ask for the "
            "name the plugin is registered under (its entry-point name), and make sure it "
            "implements backchannel_plugin_info"
        ) from None


#: One self-check step of ``backchannel demo``: its name, and a coroutine function that returns
#: what it showed (one line) or raises with what went wrong.
DemoStep: TypeAlias = tuple[str, Callable[[], Awaitable[str]]]


@dataclass(frozen=True, slots=True)
class DemoContext:
    """What a plugin's demo steps can use once the demo's gateway and connector run."""

    gateway: Gateway
    connector: Connector
    #: The demo app's user name (``subaccount/app``) and secret.
    app_user: str
    app_secret: str
    #: The demo's temporary folder (configuration, secrets, audit logs).
    work_dir: Path
    #: The demo's subaccount.
    subaccount: str = "demo"

    def front_door(self, name: str) -> HostPort:
        """The first address a front door (by its ``name``) listens on."""
        return self.gateway.front_door_addresses[name][0]


class DemoPart(Protocol):
    """A plugin's share of ``backchannel demo``: sample backends, configuration, self-checks.

    The demo calls ``start`` (start backends, write secret files), then appends
    ``gateway_toml()`` and ``connector_toml()`` to its own configuration (subaccount ``demo``,
    app ``app``), starts gateway and connector, runs ``steps`` in order after its own, and
    shows ``try_it`` while it runs.
    """

    #: The plugin name, for messages.
    name: str

    async def start(self, nursery: trio.Nursery, work_dir: Path) -> None:
        """Start the part's sample backends in ``nursery``; write its secret files."""
        ...

    def gateway_toml(self, work_dir: Path) -> str:
        """TOML appended to the demo gateway's configuration."""
        ...

    def connector_toml(self, work_dir: Path) -> str:
        """TOML appended to the demo connector's configuration (mappings of ``demo``)."""
        ...

    def steps(self, demo: DemoContext) -> Sequence[DemoStep]:
        """The self-check steps."""
        ...

    def try_it(self, demo: DemoContext) -> Sequence[tuple[str, str]]:
        """(shell command, comment) pairs for a user to try while the demo runs."""
        ...
