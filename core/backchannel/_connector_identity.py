"""Who a connector certificate says it is: (subaccount, location), written by the gateway.

A registered connector's client certificate carries its identity in one URI subject
alternative name, ``urn:backchannel:connector:<subaccount>/<location>`` (the location may be
empty: the default location). The gateway writes it when it signs the certificate; whatever a
certificate request asked for is ignored. Both sides read it with :func:`identity_of`.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from cryptography import x509

URI_PREFIX = "urn:backchannel:connector:"
#: Subaccount (and app) names: 1-64 letters, digits, ".", "_", "-", not starting with a sign.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Location ids: up to 64 letters, digits, ".", "_", "-"; "" is the default location.
LOCATION = re.compile(r"[A-Za-z0-9._-]{0,64}")


@dataclass(frozen=True, slots=True)
class ConnectorIdentity:
    """A connector's place: subaccount and location id ("" = the default location)."""

    subaccount: str
    location: str

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.subaccount):
            raise ValueError(f"invalid subaccount name {self.subaccount[:80]!r}")
        if not LOCATION.fullmatch(self.location):
            raise ValueError(f"invalid location id {self.location[:80]!r}")

    @property
    def uri(self) -> str:
        """The URI subject alternative name that carries this identity."""
        return f"{URI_PREFIX}{self.subaccount}/{self.location}"

    def __str__(self) -> str:
        return f"{self.subaccount}/{self.location or '-'}"


def identity_of(certificate: x509.Certificate) -> ConnectorIdentity | None:
    """The identity in ``certificate``, or None if it is not a connector certificate
    (no, or more than one, backchannel URI, or one that does not parse)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = [
        uri
        for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(URI_PREFIX)
    ]
    if len(uris) != 1:
        return None
    subaccount, slash, location = uris[0][len(URI_PREFIX) :].partition("/")
    if not slash:
        return None
    try:
        return ConnectorIdentity(subaccount, location)
    except ValueError:
        return None


def serial_text(certificate: x509.Certificate) -> str:
    """The serial number as operators see it in ``backchannel registration list``."""
    return f"{certificate.serial_number:x}"


def when(moment: datetime.datetime) -> str:
    """A UTC time for messages: ``2026-12-27 10:00:00 UTC``."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(certificate: x509.Certificate) -> str:
    """``serial 1a2b... (sub/loc, valid until ...)``, for log lines and refusals."""
    identity = identity_of(certificate)
    who = str(identity) if identity is not None else certificate.subject.rfc4514_string()
    return (
        f"serial {serial_text(certificate)} ({who}, valid until "
        f"{when(certificate.not_valid_after_utc)})"
    )


def registration_path(tunnel_path: str) -> str:
    """Where the gateway takes registrations: the tunnel path plus ``/register``."""
    path = tunnel_path.partition("?")[0]
    return path.rstrip("/") + "/register"
