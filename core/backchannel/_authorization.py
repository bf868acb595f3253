"""Application credentials in an HTTP ``Authorization`` or ``Proxy-Authorization`` value.

Shared by every front door that speaks HTTP (the HTTP plugin's proxy and destinations, the RFC
plugin's JSON endpoint): ``Basic`` with ``subaccount/app:secret`` or ``Bearer`` with an app
token. Messages never repeat a secret.
"""

from __future__ import annotations

import base64
import binascii

from ._exceptions import AuthenticationError
from ._plugin_api import AppIdentity, GatewayServices


def parse_authorization(value: bytes | None) -> tuple[str, str] | str:
    """``(subaccount/app, secret)`` from ``Basic``, or the app token from ``Bearer``;
    raises AuthenticationError for anything else."""
    if value is None:
        raise AuthenticationError(
            "no credentials: send Basic (subaccount/app:secret) or Bearer (app token)"
        )
    scheme, _, credentials = value.strip().partition(b" ")
    credentials = credentials.strip()
    if scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthenticationError("malformed Basic credentials") from None
        username, colon, secret = decoded.partition(":")
        if not colon:
            raise AuthenticationError("malformed Basic credentials (no ':')")
        return username, secret
    if scheme.lower() == b"bearer":
        if not credentials or not credentials.isascii():
            raise AuthenticationError("malformed Bearer token")
        return credentials.decode("ascii")
    raise AuthenticationError(
        f"unsupported scheme {scheme.decode('ascii', 'replace')[:32]!r}: use Basic or Bearer"
    )


def authenticate_authorization(services: GatewayServices, value: bytes | None) -> AppIdentity:
    """The application named by an ``Authorization`` / ``Proxy-Authorization`` value, checked
    by ``services``; raises AuthenticationError."""
    credentials = parse_authorization(value)
    if isinstance(credentials, str):
        return services.authenticate_bearer(credentials)
    return services.authenticate_basic(*credentials)
