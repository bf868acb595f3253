"""Destinations: named on-premise HTTP endpoints of a subaccount, reached by cloud applications
at ``/destinations/<name>/<path>`` with the gateway adding the backend credentials.

```toml
[[plugins.http.destinations]]
name = "erp"
subaccount = "acme"
url = "http://erp.virtual:8000/sap/opu"
location = ""                           # default
authentication = "BasicAuthentication"  # or "NoAuthentication" (default)
user = "RFC_USER"
password_file = "erp-password.txt"      # or password_env / password
```

A destination is visible only to apps of its own subaccount: any other app gets the same 404
as for a name that does not exist, so names cannot be probed across tenants.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from backchannel import (
    AuthenticationError,
    GatewayServices,
    HostPort,
    Secret,
    TableReader,
    is_valid_location_id,
)

from ._relay import (
    Client,
    Refusal,
    Request,
    Route,
    authenticate,
    forward_request_headers,
    host_header,
    principal_from,
)

PREFIX = b"/destinations/"
AUTHENTICATIONS = ("NoAuthentication", "BasicAuthentication")
WWW_CHALLENGE = (
    ("WWW-Authenticate", 'Basic realm="backchannel"'),
    ("WWW-Authenticate", 'Bearer realm="backchannel"'),
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Destination:
    """One ``[[plugins.http.destinations]]`` entry."""

    name: str
    subaccount: str
    target: HostPort
    #: The URL's path without a trailing slash ("" for the root).
    base_path: str
    location: str = ""
    authentication: str = "NoAuthentication"
    user: str | None = None
    password: Secret | None = None

    def authorization(self) -> bytes | None:
        """The ``Authorization`` value to inject, if any."""
        if self.authentication != "BasicAuthentication":
            return None
        assert self.user is not None
        assert self.password is not None
        pair = f"{self.user}:{self.password.reveal()}".encode()
        return b"Basic " + base64.b64encode(pair)

    def path_for(self, rest: bytes, query: bytes) -> bytes:
        """Base path + ``/rest`` (+ ``?query``), in origin form."""
        path = self.base_path.encode("ascii") + b"/" + rest
        if not rest and self.base_path:
            path = self.base_path.encode("ascii")
        return path + (b"?" + query if query else b"")


def parse_destination_url(text: str) -> tuple[HostPort, str]:
    """``http://virtualhost[:port]/base/path`` → (virtual host:port, base path); ValueError."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme == "https":
        raise ValueError(
            "use http:// with the virtual host: the connector speaks TLS to the backend when "
            "the system mapping's protocol is https"
        )
    if parts.scheme != "http":
        raise ValueError(f"{text!r} is not an http:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the URL: use user and password")
    if parts.query or parts.fragment:
        raise ValueError("the URL must not have a query or fragment")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    path = urllib.parse.quote(parts.path, safe="/%:@!$&'()*+,;=-._~")
    return HostPort(parts.hostname.lower(), port), path.rstrip("/")


def parse_destinations(table: TableReader, services: GatewayServices) -> list[Destination]:
    """Read and validate ``[[plugins.http.destinations]]``."""
    destinations: list[Destination] = []
    seen: set[tuple[str, str]] = set()
    for entry in table.tables("destinations"):
        name = entry.string("name", required=True)
        if not _NAME.fullmatch(name):
            raise entry.error("name", f"{name!r}: up to 64 letters, digits, '.', '_' or '-'")
        subaccount = entry.string("subaccount", required=True)
        if not services.has_subaccount(subaccount):
            raise entry.error("subaccount", f"subaccount {subaccount!r} is not configured")
        if (subaccount, name) in seen:
            raise entry.error("name", f"subaccount {subaccount!r} has two destinations {name!r}")
        seen.add((subaccount, name))
        try:
            target, base_path = parse_destination_url(entry.string("url", required=True))
        except ValueError as exc:
            raise entry.error("url", str(exc)) from None
        location = entry.string("location", "")
        if not is_valid_location_id(location):
            raise entry.error(
                "location", f"location id {location!r}: up to 64 letters, digits, '.', '_' or '-'"
            )
        authentication = entry.string("authentication", "NoAuthentication")
        user: str | None = None
        password: Secret | None = None
        if authentication == "BasicAuthentication":
            user = entry.string("user", required=True)
            if ":" in user:
                raise entry.error("user", "a Basic user name cannot contain ':'")
            password = entry.secret("password")
        elif authentication == "NoAuthentication":
            for key in ("user", "password", "password_file", "password_env"):
                if key in entry:
                    raise entry.error(key, "is only used with authentication = BasicAuthentication")
        else:
            raise entry.error("authentication", f"must be one of {', '.join(AUTHENTICATIONS)}")
        entry.finish()
        destinations.append(
            Destination(
                name, subaccount, target, base_path, location, authentication, user, password
            )
        )
    return destinations


def split_destination_target(target: bytes) -> tuple[str, bytes, bytes] | None:
    """``/destinations/<name>/<rest>?q`` → (name, rest, query), None for other paths."""
    if not target.startswith(PREFIX):
        return None
    path, _, query = target[len(PREFIX) :].partition(b"?")
    name, _, rest = path.partition(b"/")
    if not name:
        return None
    return name.decode("ascii", "replace"), rest, query


def has_dot_segment(rest: bytes) -> bool:
    """Whether a path has ``.`` or ``..`` segments (also percent-encoded), which could climb
    out of the destination's base path."""
    return any(urllib.parse.unquote_to_bytes(s) in (b".", b"..") for s in rest.split(b"/"))


class DestinationsRouter:
    """Routes ``/destinations/<name>/...`` for apps of the destination's subaccount."""

    def __init__(self, services: GatewayServices, destinations: Iterable[Destination]) -> None:
        self._services = services
        self._destinations = {(d.subaccount, d.name): d for d in destinations}

    def route(self, request: Request, client: Client) -> Route | Refusal:
        """See :class:`backchannel_http._relay.Router`."""
        if request.method == b"CONNECT":
            return Refusal(405, "CONNECT is not supported here", close=True)
        split = split_destination_target(request.target)
        if split is None:
            return Refusal(404, "not found: use /destinations/<name>/<path>")
        name, rest, query = split
        credentials = [value for key, value in request.headers if key == b"authorization"]
        try:
            if len(credentials) > 1:
                raise AuthenticationError("more than one Authorization header")
            app = authenticate(self._services, credentials[0] if credentials else None)
        except AuthenticationError as exc:
            self._services.audit.denied(
                "http_destination_auth", str(exc), client=str(client), destination=name
            )
            return Refusal(401, f"authentication required: {exc}", WWW_CHALLENGE)
        destination = self._destinations.get((app.subaccount, name))
        if destination is None:
            self._services.audit.denied(
                "http_destination",
                "no such destination in the app's subaccount",
                client=str(client),
                subaccount=app.subaccount,
                app=app.app,
                destination=name,
            )
            return Refusal(404, f"no destination named {name!r}")
        if has_dot_segment(rest):
            return Refusal(400, "'.' and '..' path segments are not allowed in destination paths")
        headers = forward_request_headers(
            request, host_header(destination.target), drop=(b"authorization",)
        )
        authorization = destination.authorization()
        if authorization is not None:
            headers.append((b"Authorization", authorization))
        principal = principal_from(request.headers)
        if isinstance(principal, Refusal):
            return principal
        return Route(
            app,
            destination.target,
            destination.location,
            destination.path_for(rest, query),
            headers,
            attributes=(("destination", destination.name),),
            principal=principal,
        )
