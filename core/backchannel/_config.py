"""gateway.toml and connector.toml, validated into frozen objects before anything listens."""

from __future__ import annotations

import datetime
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._configutil import HostPort, Secret, TableReader
from ._connector_identity import LOCATION, NAME
from ._dial import ProxySettings
from ._exceptions import ConfigError
from ._identity import PrincipalPropagationConfig, read_identity_providers
from ._jwt_trust import TrustList
from ._plugins import PluginSelection, plugin_table_names
from ._proto._mux import MuxSettings
from ._registration import RegistrationConfig
from ._transport import GatewayAddress, verifying_client_context
from ._tunnel import TunnelSettings

_NAME = NAME
#: Location ids: up to 64 letters, digits, ".", "_", "-"; "" is the default location.
LOCATION_ID = LOCATION


def is_valid_location_id(value: str) -> bool:
    """Whether ``value`` is a valid location id (up to 64 of A-Z a-z 0-9 . _ -; "" = default)."""
    return LOCATION_ID.fullmatch(value) is not None


def check_name(reader: TableReader, key: str, value: str, what: str) -> str:
    """Subaccount and app names: 1-64 of letters, digits, '.', '_', '-'."""
    if not _NAME.fullmatch(value):
        raise reader.error(key, f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def check_location(reader: TableReader, key: str, value: str) -> str:
    """Location ids: up to 64 letters, digits, '.', '_', '-' ('' is the default location)."""
    if not LOCATION_ID.fullmatch(value):
        raise reader.error(
            key, f"location id {value!r} must be up to 64 letters, digits, '.', '_' or '-'"
        )
    return value


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Where audit lines go."""

    file: Path | None = None
    include_allowed: bool = False

    @classmethod
    def read(cls, reader: TableReader) -> AuditConfig:
        """Parse an ``[audit]`` table."""
        file = reader.path("file", must_exist=False)
        config = cls(file, reader.boolean("include_allowed", False))
        reader.finish()
        return config


def read_tunnel_settings(reader: TableReader) -> TunnelSettings:
    """Parse a ``[tunnel]`` table (timing, windows, limits)."""
    defaults = TunnelSettings()
    mux_defaults = MuxSettings()
    interval = reader.number(
        "heartbeat_interval", defaults.heartbeat_interval, minimum=0.05, maximum=3600
    )
    timeout = reader.number(
        "heartbeat_timeout", defaults.heartbeat_timeout, minimum=0.1, maximum=7200
    )
    if timeout <= interval:
        raise reader.error("heartbeat_timeout", "must be longer than heartbeat_interval")
    return TunnelSettings(
        mux=MuxSettings(
            initial_window=reader.integer(
                "initial_window", mux_defaults.initial_window, minimum=16 * 1024, maximum=2**31 - 1
            ),
            max_window=reader.integer(
                "max_window", mux_defaults.max_window, minimum=16 * 1024, maximum=2**31 - 1
            ),
            max_frame_size=reader.integer(
                "max_frame_size",
                mux_defaults.max_frame_size,
                minimum=16 * 1024,
                maximum=16 * 1024 * 1024,
            ),
            max_concurrent_streams=reader.integer(
                "max_concurrent_streams",
                mux_defaults.max_concurrent_streams,
                minimum=1,
                maximum=1_000_000,
            ),
            max_pings_per_second=reader.integer(
                "max_pings_per_second", mux_defaults.max_pings_per_second, minimum=1, maximum=10**6
            ),
            max_resets_per_second=reader.integer(
                "max_resets_per_second",
                mux_defaults.max_resets_per_second,
                minimum=1,
                maximum=10**7,
            ),
            max_stream_opens_per_second=reader.integer(
                "max_stream_opens_per_second",
                mux_defaults.max_stream_opens_per_second,
                minimum=1,
                maximum=10**7,
            ),
        ),
        heartbeat_interval=interval,
        heartbeat_timeout=timeout,
        handshake_timeout=reader.number(
            "handshake_timeout", defaults.handshake_timeout, minimum=0.1, maximum=600
        ),
        max_message_size=reader.integer(
            "max_message_size",
            defaults.max_message_size,
            minimum=16 * 1024,
            maximum=8 * 1024 * 1024,
        ),
        stream_open_timeout=reader.number(
            "stream_open_timeout", defaults.stream_open_timeout, minimum=0.1, maximum=3600
        ),
        output_high_water=reader.integer(
            "output_high_water",
            defaults.output_high_water,
            minimum=16 * 1024,
            maximum=256 * 1024 * 1024,
        ),
    )


def _read_plugins(reader: TableReader) -> tuple[PluginSelection, dict[str, dict[str, Any]]]:
    plugins = reader.table("plugins")
    enable = plugins.string_list("enable") if "enable" in plugins else None
    disable = plugins.string_list("disable")
    tables: dict[str, dict[str, Any]] = {}
    for name in plugin_table_names(plugins._table):
        tables[name] = plugins.raw_table(name)
    plugins.finish()
    return PluginSelection(tuple(enable) if enable is not None else None, tuple(disable)), tables


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None


# ----------------------------------------------------------------------------- gateway


@dataclass(frozen=True, slots=True)
class AppConfig:
    """A cloud application's credentials for the front doors."""

    name: str
    secret: Secret


@dataclass(frozen=True, slots=True)
class GatewaySubaccount:
    """A tenant on the gateway."""

    name: str
    #: The shared connector token; None: only registered connectors (certificates) may connect.
    connector_token: Secret | None
    apps: Mapping[str, AppConfig]
    #: The identity providers whose users' tokens the connectors may accept.
    identity_providers: TrustList = field(default_factory=TrustList)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything the gateway needs; build with :meth:`from_file` or :meth:`from_mapping`."""

    source: str
    base_dir: Path
    listen: HostPort
    path: str
    tls_cert: Path
    tls_key: Path
    tunnel: TunnelSettings
    audit: AuditConfig
    subaccounts: Mapping[str, GatewaySubaccount]
    plugins: PluginSelection = field(default_factory=PluginSelection)
    plugin_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: ``[registration]``: connector CA and records (None: token authentication only).
    registration: RegistrationConfig | None = None
    #: Streams one cloud app may have open at once, over all its front doors.
    max_streams_per_app: int = 10_000

    @classmethod
    def from_file(cls, path: Path) -> GatewayConfig:
        """Load and validate a gateway.toml."""
        return cls.from_mapping(_load_toml(path), source=str(path), base_dir=path.parent)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None
    ) -> GatewayConfig:
        """Validate an already-parsed TOML document."""
        root = TableReader(source, "", data, base_dir or Path.cwd())
        gateway = root.table("gateway")
        listen = gateway.host_port("listen")
        path = gateway.string("path", "/tunnel")
        if not path.startswith("/"):
            raise gateway.error("path", "must start with '/'")
        tls_cert = gateway.path("tls_cert", required=True)
        tls_key = gateway.path("tls_key", required=True)
        assert tls_cert is not None
        assert tls_key is not None
        max_streams_per_app = gateway.integer(
            "max_streams_per_app", 10_000, minimum=1, maximum=1_000_000
        )
        gateway.finish()
        tunnel_table = root.table("tunnel")
        tunnel = read_tunnel_settings(tunnel_table)
        tunnel_table.finish()
        audit = AuditConfig.read(root.table("audit"))
        registration = None
        if "registration" in root:
            registration = RegistrationConfig.read(root.table("registration"))
        subaccounts: dict[str, GatewaySubaccount] = {}
        for name, sub in root.named_tables("subaccounts"):
            check_name(sub, "", name, "subaccount")
            token = sub.secret("connector_token", required=False)
            if token is None and registration is None:
                raise sub.error(
                    "connector_token",
                    "is required: set connector_token_file (recommended) or "
                    "connector_token_env, or configure [registration] so that connectors "
                    "authenticate with certificates",
                )
            apps: dict[str, AppConfig] = {}
            for app_name, app in sub.named_tables("apps"):
                check_name(app, "", app_name, "app")
                secret = app.secret("secret")
                assert secret is not None
                app.finish()
                apps[app_name] = AppConfig(app_name, secret)
            idps = read_identity_providers(sub)
            sub.finish()
            subaccounts[name] = GatewaySubaccount(name, token, apps, idps)
        if not subaccounts:
            raise root.error("subaccounts", "at least one [subaccounts.<name>] table is required")
        selection, tables = _read_plugins(root)
        root.finish()
        return cls(
            source,
            root.base_dir,
            listen,
            path,
            tls_cert,
            tls_key,
            tunnel,
            audit,
            subaccounts,
            selection,
            tables,
            registration,
            max_streams_per_app,
        )


# ----------------------------------------------------------------------------- connector


@dataclass(frozen=True, slots=True)
class MappingEntry:
    """A ``[[subaccounts.<name>.mappings]]`` table, checked by the access-control builder."""

    subaccount: str
    reader: TableReader


@dataclass(frozen=True, slots=True)
class ConnectorSubaccount:
    """One tunnel the connector keeps: gateway, identity, trust and proxy."""

    name: str
    gateway: GatewayAddress
    location: str
    #: The shared connector token, or None when the connector has a certificate instead.
    token: Secret | None
    ca_file: Path | None
    proxy: ProxySettings | None
    use_environment_proxy: bool
    mappings: tuple[MappingEntry, ...]
    #: Names of the gateway's identity providers whose tokens this connector refuses.
    untrusted_identity_providers: frozenset[str] = frozenset()
    #: Registered connectors: the file with certificate and key (see ``backchannel register``).
    certificate_file: Path | None = None
    #: Renew this long before expiry (None: when a third of the lifetime is left).
    renew_before: datetime.timedelta | None = None


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """Everything the connector needs; build with :meth:`from_file` or :meth:`from_mapping`."""

    source: str
    base_dir: Path
    tunnel: TunnelSettings
    reconnect_min_delay: float
    reconnect_max_delay: float
    audit: AuditConfig
    subaccounts: Mapping[str, ConnectorSubaccount]
    plugins: PluginSelection = field(default_factory=PluginSelection)
    plugin_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: ``[principal_propagation]``: the user CA and subject rules (None: not configured).
    principal_propagation: PrincipalPropagationConfig | None = None

    @classmethod
    def from_file(cls, path: Path) -> ConnectorConfig:
        """Load and validate a connector.toml."""
        return cls.from_mapping(_load_toml(path), source=str(path), base_dir=path.parent)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None
    ) -> ConnectorConfig:
        """Validate an already-parsed TOML document."""
        root = TableReader(source, "", data, base_dir or Path.cwd())
        tunnel_table = root.table("tunnel")
        reconnect_min = tunnel_table.number("reconnect_min_delay", 0.1, minimum=0.01, maximum=60)
        reconnect_max = tunnel_table.number("reconnect_max_delay", 2.0, minimum=0.01, maximum=3600)
        if reconnect_max < reconnect_min:
            raise tunnel_table.error("reconnect_max_delay", "must not be below reconnect_min_delay")
        tunnel = read_tunnel_settings(tunnel_table)
        tunnel_table.finish()
        audit = AuditConfig.read(root.table("audit"))
        subaccounts: dict[str, ConnectorSubaccount] = {}
        for name, sub in root.named_tables("subaccounts"):
            subaccounts[name] = _read_connector_subaccount(name, sub)
        if not subaccounts:
            raise root.error("subaccounts", "at least one [subaccounts.<name>] table is required")
        propagation = None
        if "principal_propagation" in root:
            propagation = PrincipalPropagationConfig.read(root.table("principal_propagation"))
        selection, tables = _read_plugins(root)
        root.finish()
        return cls(
            source,
            root.base_dir,
            tunnel,
            reconnect_min,
            reconnect_max,
            audit,
            subaccounts,
            selection,
            tables,
            propagation,
        )


def _read_connector_subaccount(name: str, sub: TableReader) -> ConnectorSubaccount:
    check_name(sub, "", name, "subaccount")
    url = sub.string("gateway", required=True)
    try:
        gateway = GatewayAddress.parse(url)
    except ValueError as exc:
        raise sub.error("gateway", str(exc)) from None
    location = check_location(sub, "location", sub.string("location", ""))
    token = sub.secret("token", required=False)
    certificate_file = sub.path("certificate_file", must_exist=False)
    if (token is None) == (certificate_file is None):
        raise sub.error(
            "token",
            "set either token_file/token_env (shared token) or certificate_file (a registered "
            "connector, see `backchannel register`), not both"
            if token is not None
            else "is required: set certificate_file (recommended: a registered connector, see "
            "`backchannel register`) or token_file/token_env",
        )
    renew_before = None
    if "renew_before_days" in sub:
        if certificate_file is None:
            raise sub.error("renew_before_days", "needs certificate_file")
        renew_before = datetime.timedelta(
            days=sub.number("renew_before_days", 10, minimum=0.001, maximum=824)
        )
    ca_file = sub.path("ca_file")
    if ca_file is not None:
        try:
            verifying_client_context(ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise sub.error(
                "ca_file", f"not a readable PEM file of CA certificates: {exc}"
            ) from None
    proxy_url = sub.optional_string("https_proxy")
    proxy: ProxySettings | None = None
    if proxy_url:
        try:
            proxy = ProxySettings.parse(proxy_url)
        except ValueError as exc:
            raise sub.error("https_proxy", str(exc)) from None
    use_env = sub.boolean("use_environment_proxy", True)
    mappings = tuple(MappingEntry(name, m) for m in sub.tables("mappings"))
    untrusted = frozenset(sub.string_list("untrusted_identity_providers"))
    sub.finish()
    return ConnectorSubaccount(
        name,
        gateway,
        location,
        token,
        ca_file,
        proxy,
        use_env,
        mappings,
        untrusted,
        certificate_file,
        renew_before,
    )
