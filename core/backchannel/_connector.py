"""The connector: keeps a tunnel to each configured gateway and serves the streams it opens."""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import pluggy
import trio
from trio_websocket import ConnectionClosed

from ._access import AccessControl, Denied
from ._audit import AuditLog
from ._config import ConnectorConfig, ConnectorSubaccount
from ._configutil import HostPort, TableReader
from ._connector_certificate import CredentialError
from ._connector_identity import ConnectorIdentity
from ._connector_renewal import DEFAULT_CHECK_INTERVAL, CertificateKeeper
from ._dial import ProxySettings, proxy_from_environment
from ._exceptions import ConfigError, StreamError, TunnelError
from ._identity import PrincipalResolver
from ._jwt_trust import TrustList
from ._plugin_api import ConnectorContext, ConnectorHandler, Role, Session
from ._plugins import collect_hook_results, get_plugin_manager, plugin_infos
from ._proto._errors import ResetCode
from ._registration import Clock, utc_now
from ._stream import TunnelStream
from ._transport import client_ssl_context, closed_reason, dial_gateway
from ._tunnel import Tunnel
from ._version import __version__
from ._wslink import WebSocketClosed

#: How long a handler's ``aclose()`` may take when the connector stops.
HANDLER_CLOSE_TIMEOUT = 5.0

log = logging.getLogger("backchannel.connector")


@dataclass(slots=True)
class TunnelStatus:
    """What the connector knows about one subaccount's tunnel."""

    subaccount: str
    connected: bool = False
    attempts: int = 0
    connects: int = 0
    last_error: str = ""
    tunnel: Tunnel | None = None
    #: The connector certificate of a registered connector (None: shared token).
    certificate: CertificateKeeper | None = None


class Connector:
    """A connector instance. Use :func:`open_connector`, or ``await nursery.start(c.serve)``."""

    def __init__(
        self,
        config: ConnectorConfig,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        clock: Clock | None = None,
        certificate_check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> None:
        """``clock`` (UTC wall clock) and ``certificate_check_interval`` (seconds between
        looks at a registered connector's certificate) are for tests."""
        self.config = config
        self._plugins = plugin_manager or get_plugin_manager(config.plugins, source=config.source)
        self.handlers = self._build_handlers()
        entries = [entry for sub in config.subaccounts.values() for entry in sub.mappings]
        self.access = AccessControl.build(entries, self.handlers)
        self.audit = AuditLog(Role.CONNECTOR, config.audit)
        self.status = {name: TunnelStatus(name) for name in config.subaccounts}
        self._proxies = {name: _proxy_for(sub) for name, sub in config.subaccounts.items()}
        self._stopping = False
        #: Principal propagation (user tokens -> certificates), if configured.
        self.principal_resolver: PrincipalResolver | None = None
        if config.principal_propagation is not None:
            self.principal_resolver = PrincipalResolver.load(
                config.principal_propagation,
                source=config.source,
                untrusted={
                    name: sub.untrusted_identity_providers
                    for name, sub in config.subaccounts.items()
                },
            )
        self._changed = trio.lowlevel.ParkingLot()
        for name, sub in config.subaccounts.items():
            if sub.certificate_file is not None:
                self.status[name].certificate = CertificateKeeper(
                    ConnectorIdentity(sub.name, sub.location),
                    sub.certificate_file,
                    renew_before=sub.renew_before,
                    clock=clock or utc_now,
                    audit=self.audit,
                    check_interval=certificate_check_interval,
                    on_change=self._notify,
                )

    def _notify(self) -> None:
        """Something in ``status`` changed: wake ``wait_status`` callers."""
        self._changed.unpark_all()

    def _build_handlers(self) -> dict[str, ConnectorHandler]:
        """Mapping protocol → handler; config errors surface here, before any dialling."""
        infos = plugin_infos(self._plugins)
        for name in self.config.plugin_tables:
            if name not in infos:
                raise ConfigError(
                    self.config.source, f"plugins.{name}", "no such plugin is enabled"
                )
        readers = {
            name: TableReader(
                self.config.source,
                f"plugins.{name}",
                self.config.plugin_tables.get(name, {}),
                self.config.base_dir,
            )
            for name in infos
        }
        handlers: dict[str, ConnectorHandler] = {}
        for plugin, result in collect_hook_results(
            self._plugins, "backchannel_connector_handlers", context=ConnectorContext(readers)
        ):
            for candidate in result:
                if not callable(getattr(candidate, "handle", None)) or not isinstance(
                    getattr(candidate, "mapping_protocols", None), tuple
                ):
                    raise TypeError(
                        f"plugin {plugin!r} returned {candidate!r}, not a ConnectorHandler"
                    )
                handler = cast(ConnectorHandler, candidate)
                for protocol in handler.mapping_protocols:
                    if protocol in handlers:
                        raise ConfigError(
                            self.config.source,
                            "plugins",
                            f"mapping protocol {protocol!r} is claimed by two plugins: "
                            f"{handlers[protocol].name} and {handler.name}",
                        )
                    handlers[protocol] = handler
        return handlers

    # ---------------------------------------------------------------- running

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every tunnel up until cancelled (reconnecting with back-off and jitter)."""
        self.audit.open()
        try:
            async with trio.open_nursery() as nursery:
                for sub in self.config.subaccounts.values():
                    nursery.start_soon(self._keep_tunnel, sub)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._close_handlers()
            self.audit.close()

    async def _close_handlers(self) -> None:
        """Let handlers with an optional ``aclose()`` release what they keep (pooled backend
        connections, for one), each for at most HANDLER_CLOSE_TIMEOUT seconds."""
        for handler in {id(h): h for h in self.handlers.values()}.values():
            close = getattr(handler, "aclose", None)
            if close is None:
                continue
            with trio.move_on_after(HANDLER_CLOSE_TIMEOUT):
                try:
                    await close()
                except Exception:
                    log.exception("handler %s failed to close", handler.name)

    async def wait_connected(self, subaccount: str | None = None) -> Tunnel:
        """Wait until the tunnel of ``subaccount`` (default: the only one) is up."""
        name = subaccount or next(iter(self.status))
        while True:
            status = self.status[name]
            if status.connected and status.tunnel is not None:
                return status.tunnel
            await self._changed.park()

    async def wait_status(
        self, condition: Callable[[TunnelStatus], bool], subaccount: str | None = None
    ) -> TunnelStatus:
        """Wait until ``condition(status)`` holds for ``subaccount`` (default: the only one);
        re-checked after every attempt, connect and disconnect."""
        name = subaccount or next(iter(self.status))
        while not condition(self.status[name]):
            await self._changed.park()
        return self.status[name]

    async def wait_disconnected(self, subaccount: str | None = None) -> None:
        """Wait until the tunnel of ``subaccount`` is down."""
        name = subaccount or next(iter(self.status))
        while self.status[name].connected:
            await self._changed.park()

    async def _keep_tunnel(self, sub: ConnectorSubaccount) -> None:
        status = self.status[sub.name]
        proxy = self._proxies[sub.name]
        hello = {
            "role": "connector",
            "subaccount": sub.name,
            "location": sub.location,
            "software": f"backchannel {__version__}",
        }
        if sub.token is not None:
            hello["token"] = sub.token.reveal()
        delay = self.config.reconnect_min_delay
        label = f"{sub.name}/{sub.location or '-'} → {sub.gateway}"
        while not self._stopping:
            status.attempts += 1
            try:
                ssl_context = self._ssl_context(sub, status)
                if await self._connect_once(sub, status, label, ssl_context, proxy, hello):
                    delay = self.config.reconnect_min_delay
            except* CredentialError as group:
                # No usable certificate: say what to do, and keep looking at the file (a new
                # registration while the connector runs is picked up).
                status.last_error = str(_leaf_exceptions(group)[0])
                log.error("tunnel %s cannot start: %s", label, status.last_error)
                delay = self.config.reconnect_max_delay
            except* (ConnectionClosed, WebSocketClosed) as group:
                # The gateway closed the WebSocket while the tunnel was winding down (a GO_AWAY
                # racing the close handshake): the tunnel is lost, nothing failed here.
                closed = _leaf_exceptions(group)[0]
                status.last_error = f"the gateway closed the WebSocket ({closed_reason(closed)})"
                log.warning("tunnel %s lost: %s", label, status.last_error)
            except* Exception as group:
                # Whatever broke this attempt (the WebSocket library's reader task included),
                # the connector's job is to try again, not to stop.
                status.last_error = "; ".join(
                    f"{type(e).__name__}: {e}" for e in _leaf_exceptions(group)
                )
                log.warning("tunnel %s failed: %s", label, status.last_error)
            self._changed.unpark_all()  # an attempt ended: wait_status callers re-check
            # Full jitter between half and all of the delay: many connectors restarting at
            # once (after a gateway restart) must not reconnect in lock-step.
            await trio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311  (not for security)
            delay = min(delay * 2, self.config.reconnect_max_delay)

    def _ssl_context(self, sub: ConnectorSubaccount, status: TunnelStatus) -> ssl.SSLContext:
        """TLS for the next dial: the registered connector presents its certificate."""
        if status.certificate is None:
            return client_ssl_context(sub.ca_file)
        return status.certificate.context_for_dial(sub.ca_file)

    async def _connect_once(
        self,
        sub: ConnectorSubaccount,
        status: TunnelStatus,
        label: str,
        ssl_context: ssl.SSLContext,
        proxy: ProxySettings | None,
        hello: dict[str, Any],
    ) -> bool:
        """Dial, run the tunnel until it ends; True if it was up. Never raises TunnelError."""
        async with trio.open_nursery() as nursery:
            # The nursery hosts the WebSocket's reader task; errors are caught inside it so
            # they do not arrive wrapped in an ExceptionGroup.
            try:
                ws, mux, info = await dial_gateway(
                    nursery,
                    sub.gateway,
                    ssl_context=ssl_context,
                    proxy=proxy,
                    hello=hello,
                    settings=self.config.tunnel,
                )
            except TunnelError as exc:
                status.last_error = str(exc)
                log.warning("tunnel %s: %s", label, exc)
                nursery.cancel_scope.cancel()
                return False
            tunnel = Tunnel(
                ws,
                mux,
                settings=self.config.tunnel,
                peer_info=info,
                label=label,
                stream_handler=partial(self._serve_stream, sub),
                closed_translator=closed_reason,
                control_handler=partial(self._on_control, sub),
            )
            self._set_connected(status, tunnel)
            if status.certificate is not None:
                nursery.start_soon(status.certificate.keep, tunnel)
            via = f" via proxy {proxy.redacted()}" if proxy else ""
            log.info("tunnel %s up%s", label, via)
            try:
                await tunnel.run()
            finally:
                self._set_disconnected(status, tunnel.close_reason)
                nursery.cancel_scope.cancel()
        log.warning("tunnel %s lost: %s", label, tunnel.close_reason)
        return True

    def _on_control(self, sub: ConnectorSubaccount, payload: dict[str, Any]) -> None:
        keeper = self.status[sub.name].certificate
        if "renewed" in payload and keeper is not None:
            keeper.on_control(payload)
            return
        _on_control_document(self.principal_resolver, sub, payload)
        self._notify()  # a new trust list: wait_status callers may be waiting for it

    async def drain(self, grace: float) -> int:
        """Graceful stop: GO_AWAY on every tunnel (the gateway routes no new streams here),
        wait up to ``grace`` seconds for open streams to finish, and do not reconnect.
        Returns how many streams were still open at the deadline."""
        self._stopping = True
        tunnels = [s.tunnel for s in self.status.values() if s.tunnel is not None]
        for tunnel in tunnels:
            tunnel.go_away(ResetCode.NO_ERROR, "connector is shutting down")
        with trio.move_on_after(grace):
            for tunnel in tunnels:
                await tunnel.wait_closed()
        return sum(t.stream_count for t in tunnels if not t.closed)

    def _set_connected(self, status: TunnelStatus, tunnel: Tunnel) -> None:
        status.connected = True
        status.connects += 1
        status.tunnel = tunnel
        status.last_error = ""
        self._changed.unpark_all()

    def _set_disconnected(self, status: TunnelStatus, reason: str) -> None:
        status.connected = False
        status.tunnel = None
        status.last_error = reason
        self._changed.unpark_all()

    # ---------------------------------------------------------------- streams

    async def _serve_stream(self, sub: ConnectorSubaccount, stream: TunnelStream) -> None:
        # The checks run in a plain function: this frame stays alive as long as the stream,
        # and keeps only what the handler needs (memory per idle stream, docs/performance.md).
        served = self._session_for(sub, stream.metadata)
        if isinstance(served, StreamError):
            await stream.reset(served.code, served.reason)
            return
        session, handler = served
        try:
            await handler.handle(session, stream)
        except StreamError as exc:
            log.info("stream to %s (%s) refused: %s", session.virtual, sub.name, exc)
            await stream.reset(exc.code, exc.reason)

    def _session_for(
        self, sub: ConnectorSubaccount, meta: dict[str, Any]
    ) -> tuple[Session, ConnectorHandler] | StreamError:
        """The session and handler for a stream the gateway opened, or why it is refused
        (audited either way)."""
        protocol, host, port = meta.get("protocol"), meta.get("host"), meta.get("port")
        app = str(meta["app"]) if isinstance(meta.get("app"), str) else "?"
        location = sub.location
        fields: dict[str, Any] = {"subaccount": sub.name, "location": location, "app": app}
        if (
            not isinstance(protocol, str)
            or not isinstance(host, str)
            or not isinstance(port, int)
            or isinstance(port, bool)
            or not 1 <= port <= 65535
        ):
            reason = "OPEN must carry protocol, host and port"
            self.audit.denied("stream", reason, **fields)
            return StreamError(ResetCode.PROTOCOL_ERROR, reason)
        target = HostPort(host, port)
        fields.update(protocol=protocol, target=str(target))
        if protocol not in {handler.name for handler in self.handlers.values()}:
            reason = f"this connector has no plugin for protocol {protocol!r}"
            self.audit.denied("stream", reason, **fields)
            return StreamError(ResetCode.UNSUPPORTED_PROTOCOL, reason)
        decision = self.access.resolve(sub.name, protocol, host, port, self.handlers)
        if isinstance(decision, Denied):
            self.audit.denied("stream", decision.reason, **fields)
            return StreamError(ResetCode.ACCESS_DENIED, decision.reason)
        self.audit.allowed("stream", **fields, mapping=decision.virtual_text)
        principal = meta.get("principal")
        attributes = meta.get("attributes")
        session = Session(
            protocol=protocol,
            subaccount=sub.name,
            location=location,
            app=app,
            virtual=target,
            internal=decision.internal_for(port),
            mapping=decision,
            audit=self.audit,
            principal=principal if isinstance(principal, str) else None,
            attributes=attributes if isinstance(attributes, dict) else {},
            principal_resolver=self.principal_resolver,
        )
        return session, self.handlers[decision.protocol]


def _leaf_exceptions(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    """The exceptions inside ``group`` and its nested groups, for a message that says what
    actually broke (not "Exceptions from Trio nursery")."""
    leaves: list[Exception] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaf_exceptions(exc))
        else:
            leaves.append(exc)
    return leaves


def _on_control_document(
    resolver: PrincipalResolver | None, sub: ConnectorSubaccount, payload: dict[str, Any]
) -> None:
    """Apply a CONTROL document from the gateway: today the trusted identity providers."""
    if "trust" not in payload:
        return
    try:
        trust = TrustList.from_wire(payload["trust"])
    except ValueError as exc:
        # Fail closed: an IdP the gateway meant to withdraw must not stay trusted.
        log.warning(
            "tunnel %s: the gateway sent an unusable trust list (%s); no identity provider is "
            "trusted until it sends a valid one",
            sub.name,
            exc,
        )
        if resolver is not None:
            resolver.update_trust(sub.name, TrustList())
        return
    names = ", ".join(idp.name for idp in trust) or "none"
    if resolver is None:
        log.info("tunnel %s: identity providers %s (principal propagation is off)", sub.name, names)
        return
    resolver.update_trust(sub.name, trust)
    log.info("tunnel %s: trusted identity providers from the gateway: %s", sub.name, names)


def _proxy_for(sub: ConnectorSubaccount) -> ProxySettings | None:
    """The configured proxy, else the environment's (checked now: a bad value must stop the
    start with a clear message, not fail at the first dial)."""
    if sub.proxy is not None or not sub.use_environment_proxy:
        return sub.proxy
    try:
        return proxy_from_environment(sub.gateway.host)
    except ValueError as exc:
        raise ConfigError(
            "environment", "https_proxy", f"{exc} (or set use_environment_proxy = false)"
        ) from None


@asynccontextmanager
async def open_connector(
    config: ConnectorConfig | Path | str,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    extra_plugins: Mapping[str, object] | None = None,
) -> AsyncIterator[Connector]:
    """Run a connector inside your own trio program; it stops when the block exits.

    ``config`` is a :class:`ConnectorConfig` or the path of a connector.toml.
    """
    if not isinstance(config, ConnectorConfig):
        config = ConnectorConfig.from_file(Path(config))
    if plugin_manager is None and extra_plugins:
        plugin_manager = get_plugin_manager(
            config.plugins, extra_plugins=extra_plugins, source=config.source
        )
    connector = Connector(config, plugin_manager=plugin_manager)
    async with trio.open_nursery() as nursery:
        await nursery.start(connector.serve)
        yield connector
        nursery.cancel_scope.cancel()
