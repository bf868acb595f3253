"""``AbapSystem``: clients, users, logon, a function registry and pyrfc-shaped calls.

Certificate logon (``x509cert``, base64 DER) works as on a real system: the certificate must be
signed by a certificate authority the system trusts (STRUST's list,
:meth:`AbapSystem.trust_certificate_authority`), be valid at the system's ``now``, and, if it
names its uses, allow client authentication; its subject (RFC 4514 text) is then mapped to a
user (:meth:`AbapSystem.map_certificate`, as VUSREXTID does). Every failure is the same
LogonError as a wrong password: a real system does not say why.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from ._abap_types import LENIENT
from ._descriptions import FunctionDescription, fill, initial
from ._errors import function_not_found, invalid_parameter, logon_failure

Implementation = Callable[["Session", dict[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    password: str
    first_name: str = ""
    last_name: str = ""
    language: str = "E"


@dataclasses.dataclass(frozen=True)
class Session:
    """One logged-on connection: what RFC's ``Logon_Data`` and ``SY-`` fields report."""

    system: AbapSystem
    client: str
    user: str
    language: str


@dataclasses.dataclass
class _Registered:
    description: FunctionDescription
    implementation: Implementation


class AbapSystem:
    """A simulated ABAP system, pure: no sockets, no clock unless ``now`` is given."""

    def __init__(
        self,
        sysid: str = "BCH",
        release: str = "758",
        *,
        now: Callable[[], datetime.datetime] = datetime.datetime.now,
    ) -> None:
        self.sysid = sysid
        self.release = release
        self.now = now
        self.users: dict[str, dict[str, User]] = {}
        self.certificates: dict[str, dict[str, str]] = {}
        #: The certificate authorities whose certificates log users on (STRUST).
        self.trusted_cas: list[x509.Certificate] = []
        self.tables: dict[str, tuple[list[tuple[str, str, int, str]], list[dict[str, str]]]] = {}
        self._functions: dict[str, _Registered] = {}

    def add_client(self, client: str) -> None:
        self.users.setdefault(client, {})
        self.certificates.setdefault(client, {})

    def add_user(self, client: str, user: User) -> None:
        self.add_client(client)
        self.users[client][user.name.upper()] = user

    def map_certificate(self, client: str, subject: str, user: str) -> None:
        """Map an X.509 subject to a user, as transaction SM30 / VUSREXTID (type DN) does."""
        self.add_client(client)
        self.certificates[client][subject] = user.upper()

    def trust_certificate_authority(self, ca: x509.Certificate | str | bytes) -> None:
        """Trust a CA for certificate logon, as importing it in STRUST does: a certificate, or
        PEM text holding one or more."""
        if isinstance(ca, x509.Certificate):
            self.trusted_cas.append(ca)
            return
        pem = ca.encode("ascii") if isinstance(ca, str) else ca
        self.trusted_cas.extend(x509.load_pem_x509_certificates(pem))

    def add_table(
        self, name: str, fields: list[tuple[str, str, int, str]], rows: list[dict[str, str]]
    ) -> None:
        """A transparent table for RFC_READ_TABLE: fields: (name, type letter, length, text)."""
        self.tables[name.upper()] = (fields, rows)

    def logon(
        self,
        client: str,
        *,
        user: str | None = None,
        passwd: str | None = None,
        x509cert: str | None = None,
        lang: str = "E",
    ) -> Session:
        """Password or certificate logon; any mismatch is the same LogonError as a real system's."""
        users = self.users.get(client)
        if users is None:
            raise logon_failure()
        if x509cert is not None:
            subject = self._verified_subject(x509cert)
            mapped = None if subject is None else self.certificates[client].get(subject)
            if mapped is None or mapped not in users:
                raise logon_failure()
            return Session(self, client, mapped, lang)
        found = users.get((user or "").upper())
        if found is None or passwd is None or found.password != passwd:
            raise logon_failure()
        return Session(self, client, found.name.upper(), lang)

    def _verified_subject(self, x509cert: str) -> str | None:
        """The RFC 4514 subject of a base64 DER certificate that a trusted CA issued, valid now
        and fit for client authentication; None otherwise."""
        certificate = _certificate_of(x509cert)
        if certificate is None:
            return None
        now = _aware(self.now())
        for ca in self.trusted_cas:
            if _issued_by(certificate, ca) and _valid_at(ca, now):
                break
        else:
            return None
        if not _valid_at(certificate, now) or not _allows_client_auth(certificate):
            return None
        return certificate.subject.rfc4514_string()

    def register(self, description: FunctionDescription, implementation: Implementation) -> None:
        self._functions[description.name.upper()] = _Registered(description, implementation)

    def describe(self, name: str) -> FunctionDescription:
        """The description of a function module, or FU_NOT_FOUND as a real system reports it."""
        entry = self._functions.get(name.upper())
        if entry is None:
            raise function_not_found(name)
        return entry.description

    def call(
        self,
        session: Session,
        name: str,
        params: dict[str, Any],
        *,
        return_import_params: bool = False,
    ) -> dict[str, Any]:
        """Call a function module with pyrfc-style Python values; the result holds canonical
        values of EXPORT, CHANGING and TABLES (and IMPORT on request)."""
        entry = self._functions.get(name.upper())
        if entry is None:
            raise function_not_found(name)
        fd = entry.description
        inputs: dict[str, Any] = {}
        for key, value in params.items():
            p = fd.parameter(key)
            if p is None:
                raise invalid_parameter(key)
            if p["direction"] == "RFC_EXPORT":
                continue  # pyrfc sends no export values; a real system ignores them
            inputs[key] = fill(
                p["parameter_type"],
                value,
                length=p["nuc_length"],
                decimals=p["decimals"],
                td=p["type_description"],
                name=key,
                checks=LENIENT,  # an ABAP system takes any characters into DATS and TIMS
            )
        for p in fd.parameters:
            if p["direction"] != "RFC_EXPORT" and p["name"] not in inputs:
                inputs[p["name"]] = _default(
                    p["parameter_type"], p["nuc_length"], p["default_value"], p["type_description"]
                )
        outputs = entry.implementation(session, inputs)
        result: dict[str, Any] = {}
        for p in fd.parameters:
            direction = p["direction"]
            if direction == "RFC_IMPORT" and not return_import_params:
                continue
            source = inputs if direction == "RFC_IMPORT" else outputs
            if p["name"] in source:
                value = source[p["name"]]
            elif direction in ("RFC_CHANGING", "RFC_TABLES"):
                value = inputs[p["name"]]
            else:
                value = None
            if value is None:
                result[p["name"]] = initial(
                    p["parameter_type"], p["nuc_length"], p["type_description"]
                )
            else:
                # The implementation's values are checked as the caller's: types and lengths,
                # and DATS/TIMS as ABAP holds them (any characters).
                result[p["name"]] = fill(
                    p["parameter_type"],
                    value,
                    length=p["nuc_length"],
                    decimals=p["decimals"],
                    td=p["type_description"],
                    name=p["name"],
                    checks=LENIENT,
                )
        return result


def _default(field_type: str, length: int, default: str, td: Any) -> Any:
    if default == "SPACE":
        return ""
    if default and field_type in ("RFCTYPE_CHAR", "RFCTYPE_STRING"):
        return default.strip("'")
    if default and field_type in ("RFCTYPE_INT", "RFCTYPE_INT1", "RFCTYPE_INT2", "RFCTYPE_INT8"):
        return int(default)
    return initial(field_type, length, td)


def _certificate_of(x509cert: str) -> x509.Certificate | None:
    """The certificate in base64 DER, or None if it does not parse."""
    try:
        return x509.load_der_x509_certificate(base64.b64decode(x509cert, validate=True))
    except (ValueError, binascii.Error):
        return None


def _aware(moment: datetime.datetime) -> datetime.datetime:
    """``moment`` in UTC; a naive one is the system's local time (``datetime.now()``)."""
    return moment.astimezone(datetime.UTC)


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``certificate`` (issuer name and signature)."""
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _valid_at(certificate: x509.Certificate, now: datetime.datetime) -> bool:
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def _allows_client_auth(certificate: x509.Certificate) -> bool:
    """No extended key usage (any use), or one that includes clientAuth (or any use)."""
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except ValueError:  # extensions that do not parse: refused, as by a real system
        return False
    allowed = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
    return any(oid in usage for oid in allowed)
