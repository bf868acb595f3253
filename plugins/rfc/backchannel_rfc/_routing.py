"""Gateway side: from a cloud application's request to a logged-on RFC stream through the tunnel.

Shared by the RFC front door (the pyrfc-compatible client) and the JSON endpoint. Every refusal
is a pyrfc exception with a message that says what to fix; the connector's internal host names
never appear (the gateway does not know them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from backchannel import (
    AppIdentity,
    AuthenticationError,
    GatewayServices,
    HostPort,
    NotConnectedError,
    ResetCode,
    StreamError,
    TunnelStream,
    is_valid_location_id,
)

from ._destinations import RfcDestinations, gateway_port
from ._errors import (
    CommunicationError,
    ExternalAuthorizationError,
    LogonError,
    RFCLibError,
    RfcRc,
    communication_failure,
    library_error,
)

PROTOCOL = "rfc"
#: How much of a caller's name (app, destination, host) answers and audit lines repeat: more
#: than any valid one has (``subaccount/app`` is two names of up to 64 characters), while a
#: logon may carry megabytes.
_SHOWN = 160
#: The longest host name DNS allows.
_MAX_HOST = 253


def _shown(text: str, limit: int = _SHOWN) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True, slots=True)
class RfcRoute:
    """Where a logon goes: the virtual system, the connector location and the logon itself."""

    app: AppIdentity
    target: HostPort
    location: str
    logon: dict[str, str]
    destination: str = ""


def gateway_logon_error(message: str) -> LogonError:
    """The gateway refused the application's own credentials (not the ABAP system's logon)."""
    return library_error(
        LogonError, f"gateway: {message}", RfcRc.RFC_LOGON_FAILURE, "RFC_LOGON_FAILURE"
    )


def authenticate_app(
    services: GatewayServices, *, app: str, secret: str | None, token: str | None
) -> AppIdentity:
    """The application, by ``subaccount/app`` and secret or by app token; LogonError if not."""
    try:
        if token:
            return services.authenticate_bearer(token)
        if not app or secret is None:
            raise AuthenticationError(
                "no application credentials: pass app='subaccount/app' with app_secret, or "
                "app_token"
            )
        return services.authenticate_basic(app, secret)
    except AuthenticationError as exc:
        reason = _shown(str(exc), 2 * _SHOWN)
        services.audit.denied("rfc_app_auth", reason, app=_shown(app))
        raise gateway_logon_error(f"application credentials refused: {reason}") from None


def resolve_route(
    services: GatewayServices,
    destinations: RfcDestinations,
    app: AppIdentity,
    route: Mapping[str, str],
    logon: Mapping[str, str],
) -> RfcRoute:
    """The virtual target for ``route``: a destination name (``dest``) or ``ashost`` with
    ``sysnr`` / ``gwserv`` and ``location_id``."""
    dest = route.get("dest", "")
    if dest:
        destination = destinations.find(app.subaccount, dest)
        if destination is None:
            services.audit.denied(
                "rfc_destination",
                "no such destination in the app's subaccount",
                subaccount=app.subaccount,
                app=app.app,
                destination=_shown(dest),
            )
            raise library_error(
                ExternalAuthorizationError,
                f"gateway: no RFC destination named {_shown(dest)!r} for subaccount "
                f"{app.subaccount!r}",
                RfcRc.RFC_NOT_FOUND,
                "RFC_NOT_FOUND",
            )
        return RfcRoute(
            app,
            destination.target,
            destination.location,
            destination.logon(logon),
            destination.name,
        )
    host = route.get("ashost", "").lower()
    if not host or len(host) > _MAX_HOST:
        raise library_error(
            CommunicationError,
            "gateway: pass ashost (the virtual host of the connector's rfc mapping) or dest"
            + (f", not {_shown(host)!r}" if host else ""),
            RfcRc.RFC_INVALID_PARAMETER,
            "RFC_INVALID_PARAMETER",
        )
    try:
        port = gateway_port(sysnr=route.get("sysnr"), gwserv=route.get("gwserv"))
    except ValueError as exc:
        raise library_error(
            CommunicationError,
            f"gateway: {_shown(str(exc))}",
            RfcRc.RFC_INVALID_PARAMETER,
            "RFC_INVALID_PARAMETER",
        ) from None
    location = route.get("location_id", "")
    if not is_valid_location_id(location):
        raise library_error(
            CommunicationError,
            f"gateway: location id {_shown(location)!r}: up to 64 letters, digits, '.', '_' or '-'",
            RfcRc.RFC_INVALID_PARAMETER,
            "RFC_INVALID_PARAMETER",
        )
    return RfcRoute(app, HostPort(host, port), location, dict(logon))


def stream_refusal(error: StreamError, route: RfcRoute) -> RFCLibError:
    """The pyrfc exception for a tunnel stream the gateway or connector refused."""
    partner = f"partner '{route.target}'"
    if isinstance(error, NotConnectedError):
        return communication_failure(f"{partner} not reached: {error.reason}")
    if error.code is ResetCode.ACCESS_DENIED:
        return library_error(
            ExternalAuthorizationError,
            f"{partner}: {error.reason}",
            RfcRc.RFC_AUTHORIZATION_FAILURE,
            "RFC_AUTHORIZATION_FAILURE",
        )
    return communication_failure(f"{partner} not reached: {error.code.name}: {error.reason}")


async def open_route(services: GatewayServices, route: RfcRoute) -> TunnelStream:
    """Open the RFC stream for ``route``; a refusal raises the matching pyrfc exception."""
    attributes = {"destination": route.destination} if route.destination else {}
    try:
        return await services.open_stream(
            route.app,
            protocol=PROTOCOL,
            target=route.target,
            location=route.location,
            attributes=attributes,
        )
    except StreamError as exc:
        raise stream_refusal(exc, route) from exc
