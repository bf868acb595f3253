"""The gateway: accepts connector tunnels, authenticates them, and serves cloud front doors."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import pluggy
import trio
from cryptography import x509

from ._apptoken import verify_app_token
from ._audit import AuditLog
from ._config import LOCATION_ID, GatewayConfig
from ._configutil import HostPort, Secret, TableReader
from ._connector_identity import registration_path, serial_text
from ._exceptions import (
    AuthenticationError,
    ConfigError,
    NotConnectedError,
    StreamError,
    TunnelError,
)
from ._gateway_registration import handle_renewal, serve_registration, watch_certificates
from ._jwt_trust import TrustList
from ._plugin_api import AppIdentity, FrontDoor, GatewayContext, Role
from ._plugins import collect_hook_results, get_plugin_manager, plugin_infos
from ._proto._errors import ProtocolError, ResetCode
from ._registration import Clock, ConnectorAuthority
from ._registry import InMemoryTunnelRegistry, TunnelEntry, TunnelRegistry
from ._stream import TunnelStream
from ._transport import PathHandler, accept_tunnel, closed_reason, server_ssl_context
from ._tunnel import Tunnel
from ._version import __version__

log = logging.getLogger("backchannel.gateway")

#: Compared against when the user name is unknown, so that a wrong name costs as much as a
#: wrong secret (no timing oracle for which subaccounts and apps exist).
_DUMMY_SECRET = b"\x00" * 32


class Gateway:
    """A gateway instance. Use :func:`open_gateway`, or ``await nursery.start(gw.serve)``."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        registry: TunnelRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        #: Signs and checks connector certificates (None without ``[registration]``).
        self.authority: ConnectorAuthority | None = None
        if config.registration is not None:
            self.authority = ConnectorAuthority(
                config.registration, source=config.source, clock=clock
            )
        self.registry: TunnelRegistry = registry or InMemoryTunnelRegistry()
        self._plugins = plugin_manager or get_plugin_manager(config.plugins, source=config.source)
        self.audit = AuditLog(Role.GATEWAY, config.audit)
        self.tunnel_address: HostPort | None = None
        self.front_door_addresses: dict[str, list[HostPort]] = {}
        self._front_doors = self._build_front_doors()
        #: Streams each app (subaccount, app) has open, and opens in flight, for
        #: ``max_streams_per_app`` (weak: a closed stream does not stay referenced).
        self._app_streams: dict[tuple[str, str], weakref.WeakSet[TunnelStream]] = {}
        self._app_opening: dict[tuple[str, str], int] = {}

    # ---------------------------------------------------------------- set-up

    def _build_front_doors(self) -> list[FrontDoor]:
        """Ask plugins for front doors; all config errors surface here, before listening."""
        infos = plugin_infos(self._plugins)
        readers = {
            name: TableReader(
                self.config.source,
                f"plugins.{name}",
                self.config.plugin_tables.get(name, {}),
                self.config.base_dir,
            )
            for name in infos
        }
        for name in self.config.plugin_tables:
            if name not in infos:
                raise ConfigError(
                    self.config.source, f"plugins.{name}", "no such plugin is enabled"
                )
        context = GatewayContext(self, readers)
        doors: list[FrontDoor] = []
        for plugin, result in collect_hook_results(
            self._plugins, "backchannel_gateway_front_doors", context=context
        ):
            for door in result:
                if not callable(getattr(door, "serve", None)) or not isinstance(
                    getattr(door, "name", None), str
                ):
                    raise TypeError(f"plugin {plugin!r} returned {door!r}, not a FrontDoor")
                doors.append(cast(FrontDoor, door))
        return doors

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for tunnels and run the front doors until cancelled."""
        ssl_context = server_ssl_context(self.config.tls_cert, self.config.tls_key)
        if self.authority is not None:
            self.authority.configure_server_context(ssl_context)
        listen = self.config.listen
        self.audit.open()
        try:
            async with trio.open_nursery() as nursery:
                listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
                sockname = listeners[0].socket.getsockname()
                self.tunnel_address = HostPort(listen.host, sockname[1])
                nursery.start_soon(
                    trio.serve_listeners, self._tunnel_connection(ssl_context), listeners
                )
                log.info("tunnel endpoint on wss://%s%s", self.tunnel_address, self.config.path)
                if self.authority is not None:
                    nursery.start_soon(
                        watch_certificates,
                        self.authority,
                        self.registry,
                        self.audit,
                        self.authority.config.revocation_check_interval,
                    )
                    log.info(
                        "connector registration on wss://%s%s",
                        self.tunnel_address,
                        registration_path(self.config.path),
                    )
                for door in self._front_doors:
                    addresses = await nursery.start(door.serve)
                    self.front_door_addresses[door.name] = list(addresses)
                    log.info("front door %s on %s", door.name, ", ".join(map(str, addresses)))
                task_status.started()
        finally:
            self.audit.close()

    def _tunnel_connection(
        self, ssl_context: ssl.SSLContext
    ) -> Callable[[trio.SocketStream], Awaitable[None]]:
        async def handle(tcp: trio.SocketStream) -> None:
            try:
                await self._serve_tunnel_connection(tcp, ssl_context)
            except* Exception as group:
                # One broken connection must never take the gateway's listener down: errors
                # also come out of the WebSocket library's reader task, as a group.
                log.warning(
                    "tunnel connection ended with an error: %s",
                    "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions),
                )

        return handle

    async def _serve_tunnel_connection(
        self, tcp: trio.SocketStream, ssl_context: ssl.SSLContext
    ) -> None:
        entry_holder: list[TunnelEntry] = []

        async def authenticate(
            hello: dict[str, Any], peer: str, certificate: bytes | None
        ) -> dict[str, Any]:
            entry = self._authenticate_connector(hello, peer, certificate)
            entry_holder.append(entry)
            return {"role": "gateway", "software": f"backchannel {__version__}"}

        other_paths: dict[str, PathHandler] = {}
        if self.authority is not None:
            other_paths[registration_path(self.config.path)] = partial(
                serve_registration, self.authority, self.audit
            )

        try:
            async with trio.open_nursery() as nursery:
                try:
                    result = await accept_tunnel(
                        nursery,
                        tcp,
                        ssl_context=ssl_context,
                        path=self.config.path,
                        settings=self.config.tunnel,
                        authenticate=authenticate,
                        other_paths=other_paths,
                    )
                    if result is None:
                        return
                    ws, mux, hello = result
                    hello = {key: value for key, value in hello.items() if key != "token"}
                    entry = entry_holder[0]
                    label = f"{entry.subaccount}/{entry.location or '-'}@{entry.peer}"
                    tunnel = Tunnel(
                        ws,
                        mux,
                        settings=self.config.tunnel,
                        peer_info=hello,
                        label=label,
                        closed_translator=closed_reason,
                        control_handler=partial(self._on_control, entry),
                    )
                    entry.tunnel = tunnel
                    log.info("connector %s connected (%s)", label, entry.software)
                    self._send_trust(tunnel, entry.subaccount)
                    await tunnel.run()
                    log.info("connector %s disconnected: %s", label, tunnel.close_reason)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            for entry in entry_holder:
                self.registry.release(entry)

    def reload_identity_providers(self) -> list[str]:
        """Read the identity providers of every subaccount again from the config file (and
        the key files it names); send the changed trust lists to connected connectors at once.

        Only identity providers are taken over; other changes need a restart (logged). Raises
        :class:`ConfigError` (the old lists stay) if the file is not valid. Returns the
        subaccounts whose list changed. ``backchannel gateway`` calls it on SIGHUP.
        """
        fresh = GatewayConfig.from_file(Path(self.config.source))
        ignored = _restart_only_changes(self.config, fresh)
        if ignored:
            log.warning(
                "reload: these changes take effect only at the next restart: %s",
                "; ".join(ignored),
            )
        changed = {
            name: fresh.subaccounts[name].identity_providers
            for name, sub in self.config.subaccounts.items()
            if name in fresh.subaccounts
            and fresh.subaccounts[name].identity_providers.to_wire()
            != sub.identity_providers.to_wire()
        }
        for name, trust in changed.items():
            self.update_identity_providers(name, trust)
        log.info("reload: identity providers changed for %s", ", ".join(changed) or "no subaccount")
        return list(changed)

    def update_identity_providers(self, subaccount: str, trust: TrustList) -> None:
        """Replace ``subaccount``'s trusted identity providers and send the new list to its
        connected connectors (for embedders; see also :meth:`reload_identity_providers`)."""
        subaccounts = dict(self.config.subaccounts)
        subaccounts[subaccount] = dataclasses.replace(
            subaccounts[subaccount], identity_providers=trust
        )
        self.config = dataclasses.replace(self.config, subaccounts=subaccounts)
        for entry in self.registry.entries():
            tunnel = entry.tunnel
            if entry.subaccount != subaccount or tunnel is None:
                continue
            if tunnel.closed or tunnel.going_away:
                continue  # it takes no more requests; its successor gets the new list
            try:
                self._send_trust(tunnel, subaccount)
            except ProtocolError as exc:  # closed meanwhile
                log.info("trust list not sent to %s: %s", entry.peer, exc)

    def _send_trust(self, tunnel: Tunnel, subaccount: str) -> None:
        """Tell the connector which identity providers its subaccount trusts (principal
        propagation); sent as soon as the tunnel is up, and again whenever the list changes."""
        trust = self.config.subaccounts[subaccount].identity_providers
        tunnel.send_control({"trust": trust.to_wire()})

    def _on_control(self, entry: TunnelEntry, payload: dict[str, Any]) -> None:
        """A CONTROL document from a connector: today only certificate renewal."""
        if "renew" in payload and self.authority is not None and entry.tunnel is not None:
            handle_renewal(self.authority, self.audit, entry, entry.tunnel, payload)

    def _authenticate_connector(
        self, hello: Mapping[str, Any], peer: str, certificate_der: bytes | None = None
    ) -> TunnelEntry:
        subaccount = hello.get("subaccount")
        location = hello.get("location", "")
        if not isinstance(subaccount, str) or not isinstance(location, str):
            raise TunnelError(
                "HELLO must carry subaccount and location as strings", ResetCode.UNAUTHENTICATED
            )
        if not LOCATION_ID.fullmatch(location):
            raise TunnelError(
                f"location id {location[:80]!r} is invalid: "
                "use up to 64 letters, digits, '.', '_' or '-'",
                ResetCode.REFUSED,
            )
        certificate = None
        if certificate_der is not None and self.authority is not None:
            certificate = self._check_certificate(certificate_der, subaccount, location, peer)
        else:
            self._check_token(hello.get("token"), subaccount, location, peer)
        software = hello.get("software")
        entry = TunnelEntry(
            subaccount,
            location,
            peer,
            software if isinstance(software, str) else "?",
            certificate=certificate,
        )
        try:
            self.registry.reserve(entry)
        except TunnelError as exc:
            self.audit.denied(
                "connector_register",
                "already connected",
                subaccount=subaccount,
                location=location,
                peer=peer,
            )
            log.warning("refused connector from %s: %s", peer, exc)
            raise
        return entry

    def _check_token(self, token: object, subaccount: str, location: str, peer: str) -> None:
        """Shared-token authentication, in constant time."""
        sub = self.config.subaccounts.get(subaccount)
        if sub is not None and sub.connector_token is None:
            problem = "certificate required"
            self.audit.denied(
                "connector_register", problem, subaccount=subaccount, location=location, peer=peer
            )
            raise TunnelError(
                f"subaccount {subaccount!r} accepts registered connectors only (no shared "
                "token): register this connector with `backchannel register` and set "
                "certificate_file in connector.toml",
                ResetCode.UNAUTHENTICATED,
            )
        if not isinstance(token, str):
            raise TunnelError(
                "HELLO must carry a token (or the connector must present its certificate)",
                ResetCode.UNAUTHENTICATED,
            )
        expected = (
            sub.connector_token.reveal().encode()
            if sub is not None and sub.connector_token is not None
            else _DUMMY_SECRET
        )
        token_ok = hmac.compare_digest(expected, token.encode())
        if sub is None or not token_ok:
            problem = "unknown subaccount" if sub is None else "wrong connector token"
            self.audit.denied(
                "connector_register", problem, subaccount=subaccount, location=location, peer=peer
            )
            raise TunnelError(
                f"authentication failed for subaccount {subaccount!r}: unknown subaccount or wrong "
                "token (check subaccount and token_file in connector.toml)",
                ResetCode.UNAUTHENTICATED,
            )

    def _check_certificate(
        self, certificate_der: bytes, subaccount: str, location: str, peer: str
    ) -> x509.Certificate:
        """Certificate authentication: valid, not revoked, and naming this place."""
        assert self.authority is not None
        fields = {"subaccount": subaccount, "location": location, "peer": peer}
        try:
            identity, certificate = self.authority.authenticate(certificate_der)
        except TunnelError as exc:
            self.audit.denied("connector_register", str(exc), **fields)
            log.warning("refused connector from %s: %s", peer, exc)
            raise
        if (identity.subaccount, identity.location) != (subaccount, location):
            problem = (
                f"the connector certificate (serial {serial_text(certificate)}) is for "
                f"{identity}, but the connector asked for {subaccount}/{location or '-'}"
            )
        elif subaccount not in self.config.subaccounts:
            problem = f"subaccount {subaccount!r} is not configured on this gateway"
        else:
            return certificate
        self.audit.denied("connector_register", problem, **fields)
        raise TunnelError(problem, ResetCode.UNAUTHENTICATED)

    # ---------------------------------------------------------------- GatewayServices

    def has_subaccount(self, subaccount: str) -> bool:
        """Whether ``subaccount`` is configured."""
        return subaccount in self.config.subaccounts

    def authenticate_basic(self, username: str, password: str) -> AppIdentity:
        """Check ``subaccount/app`` and its secret in constant time."""
        subaccount, _, app = username.partition("/")
        sub = self.config.subaccounts.get(subaccount)
        app_config = sub.apps.get(app) if sub is not None else None
        expected = app_config.secret.reveal().encode() if app_config is not None else _DUMMY_SECRET
        ok = hmac.compare_digest(expected, password.encode())
        if app_config is None or not ok:
            raise AuthenticationError(
                f"invalid app credentials for {username!r} (user names are subaccount/app)"
            )
        return AppIdentity(subaccount, app)

    def authenticate_bearer(self, token: str) -> AppIdentity:
        """Check an app token (see ``backchannel app-token``)."""

        def secret_for(subaccount: str, app: str) -> Secret | None:
            sub = self.config.subaccounts.get(subaccount)
            app_config = sub.apps.get(app) if sub is not None else None
            return app_config.secret if app_config is not None else None

        return verify_app_token(token, secret_for)

    def app_for_forward(self, subaccount: str, name: str) -> AppIdentity:
        """Identity of a static port forward (configured by the operator, so trusted)."""
        return AppIdentity(subaccount, f"forward:{name}")

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
        """See :class:`backchannel.GatewayServices`."""
        entry = self.registry.lookup(app.subaccount, location)
        fields = {
            "subaccount": app.subaccount,
            "location": location,
            "app": app.app,
            "protocol": protocol,
            "target": str(target),
        }
        if entry is None or entry.tunnel is None:
            error = NotConnectedError(app.subaccount, location)
            self.audit.denied("open_stream", error.reason, **fields)
            raise error
        key = (app.subaccount, app.app)
        mine = self._open_streams_of(app)
        opening = self._app_opening.get(key, 0)
        if len(mine) + opening >= self.config.max_streams_per_app:
            reason = (
                f"app {app.subaccount}/{app.app} has {len(mine) + opening} streams open, the "
                "most allowed ([gateway] max_streams_per_app): close some first"
            )
            self.audit.denied("open_stream", reason, **fields)
            raise StreamError(ResetCode.REFUSED, reason)
        metadata: dict[str, Any] = {
            "protocol": protocol,
            "host": target.host,
            "port": target.port,
            "subaccount": app.subaccount,
            "location": location,
            "app": app.app,
            "attributes": dict(attributes or {}),
        }
        if principal is not None:
            metadata["principal"] = principal
        self._app_opening[key] = opening + 1  # the slot is taken while the open is in flight
        try:
            stream = await entry.tunnel.open_stream(
                metadata, wait_accepted=wait_accepted, first_data=first_data
            )
        except StreamError as exc:
            self.audit.denied("open_stream", f"{exc.code.name}: {exc.reason}", **fields)
            raise
        finally:
            left = self._app_opening[key] - 1
            if left:
                self._app_opening[key] = left
            else:
                del self._app_opening[key]
        mine.add(stream)
        self.audit.allowed("open_stream", **fields)
        return stream

    def _open_streams_of(self, app: AppIdentity) -> weakref.WeakSet[TunnelStream]:
        """The app's streams; closed ones are dropped when the count reaches the limit (not on
        every open: that would make opening n streams cost n squared)."""
        streams = self._app_streams.setdefault((app.subaccount, app.app), weakref.WeakSet())
        if len(streams) >= self.config.max_streams_per_app:
            for stream in [s for s in streams if s._closed or s.error is not None]:
                streams.discard(stream)
        return streams

    async def drain(self, grace: float) -> int:
        """Graceful stop: GO_AWAY to every connector, wait up to ``grace`` seconds for their
        open streams to finish. Returns how many streams were still open at the deadline."""
        tunnels = [e.tunnel for e in self.registry.entries() if e.tunnel is not None]
        for tunnel in tunnels:
            tunnel.go_away(ResetCode.NO_ERROR, "gateway is shutting down")
        with trio.move_on_after(grace):
            for tunnel in tunnels:
                await tunnel.wait_closed()
        return sum(t.stream_count for t in tunnels if not t.closed)

    def connected(self) -> list[TunnelEntry]:
        """Registered connectors (for status output)."""
        return self.registry.entries()


def _restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """What differs between two configurations apart from identity providers (a reload
    does not apply it)."""
    changes = [
        name
        for name in (
            "listen",
            "path",
            "tls_cert",
            "tls_key",
            "tunnel",
            "audit",
            "registration",
            "max_streams_per_app",
        )
        if getattr(old, name) != getattr(new, name)
    ]
    if (old.plugins, old.plugin_tables) != (new.plugins, new.plugin_tables):
        changes.append("plugins")
    for name in sorted(set(old.subaccounts) ^ set(new.subaccounts)):
        changes.append(f"subaccount {name} {'added' if name in new.subaccounts else 'removed'}")
    for name in sorted(set(old.subaccounts) & set(new.subaccounts)):
        before, after = old.subaccounts[name], new.subaccounts[name]
        if _revealed(before.connector_token) != _revealed(after.connector_token):
            changes.append(f"subaccounts.{name}.connector_token")
        apps_before = {app: config.secret.reveal() for app, config in before.apps.items()}
        apps_after = {app: config.secret.reveal() for app, config in after.apps.items()}
        if apps_before != apps_after:
            changes.append(f"subaccounts.{name}.apps")
    return changes


def _revealed(secret: Secret | None) -> str | None:
    return secret.reveal() if secret is not None else None


@asynccontextmanager
async def open_gateway(
    config: GatewayConfig | Path | str,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    extra_plugins: Mapping[str, object] | None = None,
) -> AsyncIterator[Gateway]:
    """Run a gateway inside your own trio program; it stops when the block exits.

    ``config`` is a :class:`GatewayConfig` or the path of a gateway.toml.
    """
    if not isinstance(config, GatewayConfig):
        config = GatewayConfig.from_file(Path(config))
    if plugin_manager is None and extra_plugins:
        plugin_manager = get_plugin_manager(
            config.plugins, extra_plugins=extra_plugins, source=config.source
        )
    gateway = Gateway(config, plugin_manager=plugin_manager)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        yield gateway
        nursery.cancel_scope.cancel()


__all__: Sequence[str] = ["Gateway", "open_gateway"]
