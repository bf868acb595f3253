"""Gateway side: from a cloud application's request to a logged-on RFC stream through the tunnel.

Shared by the RFC front door (the pyrfc-compatible client) and the JSON endpoint. Every refusal
is a pyrfc exception with a message that says what to fix; the connector's internal host names
never appear (the gateway does not know them).

For principal propagation the cloud user's token travels with the stream (OPEN ``principal``,
``Bearer <JWT>``) to the connector, which validates it; the gateway only bounds its size and
refuses a destination with ``authentication = "PrincipalPropagation"`` that comes without one.
The token never appears in an answer, a log line or an audit line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
#: The longest user token forwarded to the connector, in characters: well above the largest JWT
#: the connector accepts (16 KiB), so that it, not the gateway, says what is wrong with one.
MAX_USER_TOKEN = 64 * 1024
#: The schemes a user token may name itself (as in ``SAP-Connectivity-Authentication``).
_TOKEN_SCHEMES = {"bearer": "Bearer", "saml2.0": "SAML2.0"}


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
    #: The cloud user's token for principal propagation (``Bearer <JWT>``), or None.
    principal: str | None = field(default=None, repr=False)


def gateway_logon_error(message: str) -> LogonError:
    """The gateway refused the application's own credentials (not the ABAP system's logon)."""
    return library_error(
        LogonError, f"gateway: {message}", RfcRc.RFC_LOGON_FAILURE, "RFC_LOGON_FAILURE"
    )


def user_principal(token: str | None) -> str | None:
    """The OPEN ``principal`` for the user token an RFC client passed: ``Bearer <JWT>`` for a bare
    JWT; a token that names its scheme (``Bearer ...``, ``SAML2.0 <base64 assertion>``) is kept
    as it is. None for none; LogonError if it is too large to forward."""
    token = (token or "").strip()
    if not token:
        return None
    if len(token) > MAX_USER_TOKEN:
        raise gateway_logon_error(
            f"the user token is {len(token)} characters long; at most {MAX_USER_TOKEN} are "
            "forwarded"
        )
    scheme, _, rest = token.partition(" ")
    known = _TOKEN_SCHEMES.get(scheme.lower())
    if known is not None and rest.strip():
        return f"{known} {rest.strip()}"
    return f"Bearer {token}"


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
    *,
    principal: str | None = None,
    missing_principal_hint: str = "pass token=<the user's JWT>",
) -> RfcRoute:
    """The virtual target for ``route``: a destination name (``dest``) or ``ashost`` with
    ``sysnr`` / ``gwserv`` and ``location_id``. ``principal`` is the user's token (see
    :func:`user_principal`); a principal propagation destination without one is refused with
    LogonError, whose message ends with ``missing_principal_hint`` (how the caller passes it)."""
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
        if destination.principal_propagation and principal is None:
            services.audit.denied(
                "rfc_destination",
                "principal propagation needs the user's token, and none was passed",
                subaccount=app.subaccount,
                app=app.app,
                destination=destination.name,
            )
            raise gateway_logon_error(
                f"destination {destination.name} uses principal propagation: "
                + missing_principal_hint
            )
        return RfcRoute(
            app,
            destination.target,
            destination.location,
            destination.logon(logon),
            destination.name,
            principal,
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
    return RfcRoute(app, HostPort(host, port), location, dict(logon), principal=principal)


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
            principal=route.principal,
            attributes=attributes,
        )
    except StreamError as exc:
        raise stream_refusal(exc, route) from exc
