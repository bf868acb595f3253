"""Registration tokens: short-lived, one-time permissions to register one connector.

A token is ``bcreg1.<payload>.<signature>`` (base64url, no padding). The payload is JSON
``{"sub": subaccount, "loc": location, "exp": unix seconds, "jti": random id}``; the signature
is ECDSA P-256/SHA-256 by the gateway's connector CA key, so minting needs the CA key and no
other secret exists to leak. The gateway checks signature and expiry here and remembers used
``jti`` values itself (see :mod:`backchannel._registration_state`).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ._connector_identity import ConnectorIdentity, when

PREFIX = "bcreg1"
#: Longest lifetime ``backchannel registration token`` hands out.
MAX_LIFETIME = datetime.timedelta(days=7)
_MAX_TOKEN_LENGTH = 2048


class RegistrationError(Exception):
    """A registration or renewal was refused; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a valid token allows."""

    identity: ConnectorIdentity
    expires: datetime.datetime
    token_id: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_token(
    key: ec.EllipticCurvePrivateKey,
    identity: ConnectorIdentity,
    lifetime: datetime.timedelta,
    *,
    now: datetime.datetime,
) -> str:
    """A token that lets one connector register as ``identity`` within ``lifetime``."""
    if not datetime.timedelta(0) < lifetime <= MAX_LIFETIME:
        raise ValueError(f"token lifetime must be above 0 and at most {MAX_LIFETIME.days} days")
    payload = {
        "sub": identity.subaccount,
        "loc": identity.location,
        "exp": int((now + lifetime).timestamp()),
        "jti": secrets.token_hex(16),
    }
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    signed = f"{PREFIX}.{body}".encode("ascii")
    signature = key.sign(signed, ec.ECDSA(hashes.SHA256()))
    return f"{PREFIX}.{body}.{_b64(signature)}"


def verify_token(
    token: str, key: ec.EllipticCurvePublicKey, *, now: datetime.datetime
) -> TokenClaims:
    """Check format, signature and expiry; raise :class:`RegistrationError` naming the fault.

    The token text itself never appears in a message.
    """
    token = token.strip()
    parts = token.split(".")
    if len(token) > _MAX_TOKEN_LENGTH or len(parts) != 3 or parts[0] != PREFIX:
        raise RegistrationError(
            "the registration token is malformed (expected bcreg1.<payload>.<signature>): "
            "copy it again from `backchannel registration token`"
        )
    try:
        body = _unb64(parts[1])
        signature = _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise RegistrationError("the registration token is not valid base64url") from None
    try:
        key.verify(signature, f"{PREFIX}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise RegistrationError(
            "the registration token's signature does not verify: it was not issued by this "
            "gateway's connector CA (or was altered)"
        ) from None
    try:
        payload = json.loads(body)
        identity = ConnectorIdentity(str(payload["sub"]), str(payload["loc"]))
        expires = datetime.datetime.fromtimestamp(int(payload["exp"]), datetime.UTC)
        token_id = str(payload["jti"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistrationError(f"the registration token's payload is unusable: {exc}") from None
    if now >= expires:
        raise RegistrationError(
            f"the registration token for {identity} expired at {when(expires)}: ask the gateway "
            "operator for a new one"
        )
    return TokenClaims(identity, expires, token_id)
