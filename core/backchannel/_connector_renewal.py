"""Keeps a registered connector's certificate: loaded for every dial, renewed before expiry.

Renewal runs over the live, certificate-authenticated tunnel (CONTROL ``renew`` / ``renewed``,
see docs/protocol.md): a new key every time, the file replaced atomically; the running tunnel
keeps going and the next dial uses the new certificate.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ._audit import AuditLog
from ._connector_certificate import (
    Credential,
    CredentialError,
    accept_issued,
    expiry_problem,
    load_credential,
    new_key_and_request,
    store_credential,
    tunnel_ssl_context,
)
from ._connector_identity import ConnectorIdentity, serial_text, when
from ._tunnel import Tunnel

log = logging.getLogger("backchannel.connector")

#: How long the gateway may take to answer a renewal request.
RENEWAL_ANSWER_TIMEOUT = 30.0
#: How often a connector looks at its certificate while the tunnel is up (seconds).
DEFAULT_CHECK_INTERVAL = 3600.0

Clock = Callable[[], datetime.datetime]


class CertificateKeeper:
    """One subaccount's connector certificate."""

    def __init__(
        self,
        identity: ConnectorIdentity,
        path: Path,
        *,
        renew_before: datetime.timedelta | None,
        clock: Clock,
        audit: AuditLog,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.identity = identity
        self.path = path
        self.renew_before = renew_before
        self.check_interval = check_interval
        self._clock = clock
        self._audit = audit
        self._on_change = on_change
        #: The certificate last loaded (for status output).
        self.credential: Credential | None = None
        #: Checks done while a tunnel was up, and renewals that succeeded.
        self.checks = 0
        self.renewals = 0
        #: Why the last renewal failed ("" if it did not).
        self.renewal_error = ""
        self._answer: dict[str, Any] | None = None
        self._answered: trio.Event | None = None
        self._request_id = ""

    def context_for_dial(self, ca_file: Path | None) -> ssl.SSLContext:
        """Load the certificate file again (it may have been renewed or re-registered) and
        build the TLS context; raise :class:`CredentialError` if it cannot authenticate."""
        credential = load_credential(self.path, self.identity)
        self.credential = credential
        problem = expiry_problem(credential, self._clock())
        if problem is not None:
            raise CredentialError(problem)
        due = credential.renewal_due(self.renew_before)
        if self._clock() >= due:
            log.warning(
                "connector certificate %s expires at %s; it is renewed once the tunnel is up",
                credential.describe(),
                when(credential.certificate.not_valid_after_utc),
            )
        return tunnel_ssl_context(ca_file, credential)

    async def keep(self, tunnel: Tunnel) -> None:
        """While ``tunnel`` is up: check now and every ``check_interval``; renew when due."""
        while True:
            await self._check(tunnel)
            self.checks += 1
            self._on_change()
            await trio.sleep(self.check_interval)

    async def _check(self, tunnel: Tunnel) -> None:
        try:
            credential = load_credential(self.path, self.identity)
        except CredentialError as exc:
            log.error("%s", exc)
            return
        self.credential = credential
        if self._clock() < credential.renewal_due(self.renew_before):
            return
        try:
            await self._renew(tunnel, credential)
        except CredentialError as exc:
            self.renewal_error = str(exc)
            certificate = credential.certificate
            left = certificate.not_valid_after_utc - self._clock()
            log.warning(
                "renewing connector certificate %s failed: %s; it expires at %s (in %s); "
                "the connector retries every %g s",
                credential.describe(),
                exc,
                when(certificate.not_valid_after_utc),
                _span(left),
                self.check_interval,
            )
            self._audit.denied(
                "certificate_renewal",
                str(exc),
                subaccount=self.identity.subaccount,
                location=self.identity.location,
                serial=serial_text(certificate),
            )

    async def _renew(self, tunnel: Tunnel, credential: Credential) -> None:
        key, request = new_key_and_request(self.identity)
        answer = await self._ask(tunnel, request)
        if "error" in answer:
            raise CredentialError(f"the gateway refused: {answer['error']}")
        certificate = accept_issued(str(answer.get("certificate", "")), key, self.identity)
        self._store(key, certificate)
        self.renewals += 1
        self.renewal_error = ""
        log.info(
            "renewed connector certificate %s: new serial %s, valid until %s",
            credential.describe(),
            serial_text(certificate),
            when(certificate.not_valid_after_utc),
        )
        self._audit.allowed(
            "certificate_renewal",
            subaccount=self.identity.subaccount,
            location=self.identity.location,
            serial=serial_text(certificate),
            previous=serial_text(credential.certificate),
        )

    async def _ask(self, tunnel: Tunnel, request: str) -> dict[str, Any]:
        self._answer = None
        self._answered = trio.Event()
        self._request_id = secrets.token_hex(8)
        tunnel.send_control({"renew": {"csr": request, "id": self._request_id}})
        with trio.move_on_after(RENEWAL_ANSWER_TIMEOUT):
            await self._answered.wait()
        self._answered = None
        answer = self._take_answer()
        if answer is None:
            raise CredentialError(f"the gateway did not answer within {RENEWAL_ANSWER_TIMEOUT:g} s")
        return answer

    def _take_answer(self) -> dict[str, Any] | None:
        answer, self._answer = self._answer, None
        return answer

    def _store(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        try:
            store_credential(self.path, key, certificate)
        except OSError as exc:
            raise CredentialError(f"cannot write {self.path}: {exc.strerror}") from None

    def on_control(self, payload: dict[str, Any]) -> None:
        """Take the gateway's ``renewed`` answer."""
        answer = payload.get("renewed")
        if (
            self._answered is None
            or not isinstance(answer, dict)
            or answer.get("id") != self._request_id
        ):
            log.info("ignored a renewal answer nobody waits for")
            return
        self._answer = answer
        self._answered.set()


def _span(delta: datetime.timedelta) -> str:
    if delta.total_seconds() <= 0:
        return "no time"
    if delta >= datetime.timedelta(days=2):
        return f"{delta.days} days"
    return f"{delta.total_seconds() / 3600:.1f} hours"
