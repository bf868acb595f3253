"""App tokens: short-lived JWTs (HS256) that a cloud app presents instead of its secret.

The signing key is derived from the app's secret (HMAC-SHA256 with a fixed label), so the
secret itself never travels and a token for one purpose cannot be replayed as another MAC.
Used by SOCKS5 method 0x80 and ``Proxy-Authorization: Bearer``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

import jwt

from ._configutil import Secret
from ._exceptions import AuthenticationError
from ._plugin_api import AppIdentity

AUDIENCE = "backchannel-gateway"
_KEY_LABEL = b"backchannel app token v1"
_DUMMY_KEY = b"\x00" * 32


def _signing_key(secret: Secret) -> bytes:
    return hmac.new(secret.reveal().encode("utf-8"), _KEY_LABEL, hashlib.sha256).digest()


def issue_app_token(
    app: AppIdentity, secret: Secret, *, ttl: float = 3600, now: float | None = None
) -> str:
    """A token for ``app`` valid ``ttl`` seconds."""
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": f"{app.subaccount}/{app.app}",
        "aud": AUDIENCE,
        "iat": issued,
        "exp": issued + int(ttl),
    }
    return jwt.encode(claims, _signing_key(secret), algorithm="HS256")


def verify_app_token(
    token: str, secret_for: Callable[[str, str], Secret | None], *, leeway: float = 30
) -> AppIdentity:
    """Check signature, audience and lifetime; return the app. Raises AuthenticationError."""
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"app token is not a JWT: {exc}") from None
    subject = unverified.get("sub")
    if not isinstance(subject, str) or subject.count("/") != 1:
        raise AuthenticationError("app token has no 'sub' claim of the form subaccount/app")
    subaccount, app = subject.split("/")
    secret = secret_for(subaccount, app)
    key = _signing_key(secret) if secret is not None else _DUMMY_KEY
    try:
        # The algorithm is fixed here, never taken from the token's header.
        jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            audience=AUDIENCE,
            leeway=leeway,
            options={"require": ["exp", "iat", "sub", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthenticationError(f"app token for {subject!r} has expired") from None
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"app token for {subject!r} rejected: {exc}") from None
    if secret is None:
        raise AuthenticationError(
            f"app token for {subject!r} rejected: Signature verification failed"
        )
    return AppIdentity(subaccount, app)
