"""Why a cloud user's identity could not be propagated: one reason per failure, with a stable code.

Principal propagation validates a user's token (a JWT or a SAML 2.0 assertion), maps its
claims to an X.509 subject and has the connector issue a short-lived certificate for the backend.
Each step fails with a :class:`PrincipalError` whose :attr:`~PrincipalError.reason` says which
check refused, and whose message says what to fix. Messages name issuers, key ids, audiences and
times, never the token, its signature or its claim values: they end up in logs and audit lines.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import NoReturn

from ._exceptions import BackchannelError


class PrincipalReason(enum.Enum):
    """Why principal propagation refused; :attr:`code` is the stable text for audit lines."""

    # The token itself.
    MISSING_TOKEN = "missing_token"  # noqa: S105 (a reason code, not a secret)
    MALFORMED_TOKEN = "malformed_token"  # noqa: S105 (a reason code, not a secret)
    UNSIGNED_TOKEN = "unsigned_token"  # noqa: S105 (a reason code, not a secret)
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    # Who signed it.
    UNTRUSTED_ISSUER = "untrusted_issuer"
    IDP_NOT_TRUSTED = "idp_not_trusted"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    # What it says.
    WRONG_AUDIENCE = "wrong_audience"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    NO_SUBJECT = "no_subject"
    # SAML assertions.
    SAML_SIGNATURE_WRAPPING = "saml_signature_wrapping"
    SAML_BAD_SIGNATURE = "saml_bad_signature"
    SAML_CONDITIONS = "saml_conditions"
    SAML_AUDIENCE = "saml_audience"
    SAML_SUBJECT_CONFIRMATION = "saml_subject_confirmation"
    # Issuing the user certificate and presenting it to the backend.
    CA_UNUSABLE = "ca_unusable"
    BACKEND_NOT_MUTUAL = "backend_not_mutual"
    BACKEND_REJECTED_CERTIFICATE = "backend_rejected_certificate"

    @property
    def code(self) -> str:
        """The snake_case code written to audit lines; never changes once released."""
        return self.value


class PrincipalError(BackchannelError):
    """A user's identity could not be propagated.

    ``str(error)`` says what was refused and what to fix; ``reason`` is the machine-readable
    cause and ``details`` holds short, token-free fields (issuer, kid, alg, IdP name...) for
    audit lines.
    """

    def __init__(
        self,
        reason: PrincipalReason,
        message: str,
        details: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.details: dict[str, str] = dict(details or {})

    @property
    def code(self) -> str:
        """Shorthand for ``reason.code``."""
        return self.reason.code


# Shared by the token validators (JWT, SAML): how they refuse and how their messages show
# values the token supplied (quoted, cut short, so no message can carry the token itself).


def refuse(reason: PrincipalReason, message: str, **details: str) -> NoReturn:
    """Raise PrincipalError with ``reason``, ``message`` and short audit ``details``."""
    raise PrincipalError(reason, message, details)


def shown(value: object, limit: int = 64) -> str:
    """A token-supplied value for a message: quoted and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def when(timestamp: float) -> str:
    """A time for a message, ISO 8601 UTC (or the raw number if it is out of range)."""
    try:
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{timestamp!r} (out of range)"
