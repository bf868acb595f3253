"""RFC destinations on the gateway: named ABAP systems of a subaccount, with the logon to use.

```toml
[[plugins.rfc.destinations]]
name = "ERP"
subaccount = "acme"
ashost = "erp.virtual"        # the virtual host of the connector's rfc mapping
sysnr = "00"                  # gateway port 33NN; or gwserv = "3300" / "sapgw00"
client = "100"
location = ""                 # the connector's location id (default location)
authentication = "BasicAuthentication"   # or "NoAuthentication": the app passes user/passwd
user = "RFC_USER"
password_file = "erp-password.txt"       # or password_env / password
lang = "EN"
```

``authentication = "PrincipalPropagation"`` logs the cloud user on as themselves: the app
passes the user's token (``token=<JWT>``, or the ``SAP-Connectivity-Authentication`` header
of the JSON endpoint), the connector turns it into a short-lived certificate (the ``rfc``
mapping needs ``principal_propagation = true``), and the logon carries no user or password;
any the app passes are dropped. Without a token the gateway refuses before opening a stream.

A destination is visible only to apps of its own subaccount; any other app gets the same
"no destination" error as for a name that does not exist, so names cannot be probed across
tenants.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from backchannel import GatewayServices, HostPort, Secret, TableReader, is_valid_location_id

BASIC = "BasicAuthentication"
NO_AUTHENTICATION = "NoAuthentication"
PRINCIPAL_PROPAGATION = "PrincipalPropagation"
AUTHENTICATIONS = (BASIC, NO_AUTHENTICATION, PRINCIPAL_PROPAGATION)
_CREDENTIAL_KEYS = ("user", "password", "password_file", "password_env")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SYSNR = re.compile(r"[0-9]{2}")
_CLIENT = re.compile(r"[0-9]{3}")


def gateway_port(*, sysnr: str | None = None, gwserv: str | None = None) -> int:
    """The SAP gateway port: ``gwserv`` as a number or ``sapgwNN``, else 33NN for ``sysnr``."""
    if gwserv:
        # ASCII digits only: str.isdigit() also takes other scripts' digits and superscripts.
        if gwserv.isascii() and gwserv.isdigit() and len(gwserv) <= 5 and 0 < int(gwserv) < 65536:
            return int(gwserv)
        if gwserv.lower().startswith("sapgw") and _SYSNR.fullmatch(gwserv[5:]):
            return 3300 + int(gwserv[5:])
        raise ValueError(f"gwserv {gwserv[:16]!r} is neither a port number nor sapgwNN")
    sysnr = sysnr or "00"
    if not _SYSNR.fullmatch(sysnr):
        raise ValueError(f"sysnr {sysnr[:16]!r} is not a two-digit system number")
    return 3300 + int(sysnr)


@dataclass(frozen=True, slots=True)
class RfcDestination:
    """One ``[[plugins.rfc.destinations]]`` entry."""

    name: str
    subaccount: str
    target: HostPort
    client: str
    location: str = ""
    authentication: str = NO_AUTHENTICATION
    user: str | None = None
    password: Secret | None = None
    lang: str = ""

    @property
    def principal_propagation(self) -> bool:
        """Whether the cloud user's token logs on (``authentication = "PrincipalPropagation"``)."""
        return self.authentication == PRINCIPAL_PROPAGATION

    def logon(self, given: Mapping[str, str]) -> dict[str, str]:
        """The logon parameters: the destination's client and language unless the application
        passed its own, and either the application's own credentials (any of ``user``,
        ``passwd``, ``x509cert`` given) or, only when it passed none, the destination's user and
        password. The destination's password is never tried for another user. With principal
        propagation there are no credentials at all: the connector logs the user on."""
        logon = {"client": self.client}
        if self.lang:
            logon["lang"] = self.lang
        own = {key: given[key] for key in ("user", "passwd", "x509cert") if key in given}
        if self.principal_propagation:
            pass  # the connector logs the user on with their certificate
        elif own:
            logon.update(own)
        elif self.user is not None and self.password is not None:
            logon["user"] = self.user
            logon["passwd"] = self.password.reveal()
        for key in ("client", "lang"):
            if key in given:
                logon[key] = given[key]
        return logon


class RfcDestinations:
    """The destinations by (subaccount, name)."""

    def __init__(self, destinations: Iterable[RfcDestination] = ()) -> None:
        self._by_key = {(d.subaccount, d.name.upper()): d for d in destinations}

    def __len__(self) -> int:
        return len(self._by_key)

    def find(self, subaccount: str, name: str) -> RfcDestination | None:
        """The app's subaccount's destination of that name (case-insensitive, as pyrfc's
        ``dest``), or None."""
        return self._by_key.get((subaccount, name.upper()))


def read_destinations(table: TableReader, services: GatewayServices) -> RfcDestinations:
    """Read and validate ``[[plugins.rfc.destinations]]``."""
    destinations: list[RfcDestination] = []
    seen: set[tuple[str, str]] = set()
    for entry in table.tables("destinations"):
        name = entry.string("name", required=True)
        if not _NAME.fullmatch(name):
            raise entry.error("name", f"{name!r}: up to 64 letters, digits, '.', '_' or '-'")
        subaccount = entry.string("subaccount", required=True)
        if not services.has_subaccount(subaccount):
            raise entry.error("subaccount", f"subaccount {subaccount!r} is not configured")
        if (subaccount, name.upper()) in seen:
            raise entry.error("name", f"subaccount {subaccount!r} has two destinations {name!r}")
        seen.add((subaccount, name.upper()))
        ashost = entry.string("ashost", required=True).lower()
        if not ashost or any(c.isspace() or c in "/:@" for c in ashost):
            raise entry.error("ashost", f"{ashost!r} is not a host name")
        try:
            port = gateway_port(
                sysnr=entry.optional_string("sysnr"), gwserv=entry.optional_string("gwserv")
            )
        except ValueError as exc:
            raise entry.error("sysnr" if "sysnr" in str(exc) else "gwserv", str(exc)) from None
        client = entry.string("client", required=True)
        if not _CLIENT.fullmatch(client):
            raise entry.error("client", f"{client!r} is not a three-digit client")
        location = entry.string("location", "")
        if not is_valid_location_id(location):
            raise entry.error(
                "location", f"location id {location!r}: up to 64 letters, digits, '.', '_' or '-'"
            )
        lang = entry.string("lang", "")
        authentication = entry.string("authentication", NO_AUTHENTICATION)
        user: str | None = None
        password: Secret | None = None
        if authentication == BASIC:
            user = entry.string("user", required=True)
            password = entry.secret("password")
        elif authentication in (NO_AUTHENTICATION, PRINCIPAL_PROPAGATION):
            for key in _CREDENTIAL_KEYS:
                if key in entry:
                    raise entry.error(key, f"is only used with authentication = {BASIC}")
        else:
            raise entry.error("authentication", f"must be one of {', '.join(AUTHENTICATIONS)}")
        entry.finish()
        destinations.append(
            RfcDestination(
                name,
                subaccount,
                HostPort(ashost, port),
                client,
                location,
                authentication,
                user,
                password,
                lang,
            )
        )
    return RfcDestinations(destinations)
