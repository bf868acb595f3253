"""The gateway's registration endpoints: sign-up over WebSocket, renewal over the tunnel,
and cutting tunnels whose certificate was revoked or ran out.

Registration: ``wss://gateway/<tunnel path>/register`` takes one JSON text message
``{"token", "csr", "subaccount", "location"}`` and answers ``{"certificate": PEM}`` or
``{"error": text}``. Renewal: a certificate-authenticated connector sends the CONTROL document
``{"renew": {"csr": PEM}}`` and gets ``{"renewed": {"certificate": PEM}}`` or
``{"renewed": {"error": text}}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import trio
import trio_websocket
from cryptography.hazmat.primitives import serialization

from ._audit import AuditLog
from ._connector_identity import ConnectorIdentity, serial_text
from ._proto._errors import ResetCode
from ._registration import ConnectorAuthority
from ._registration_state import RevocationListError
from ._registration_token import RegistrationError
from ._registry import TunnelEntry, TunnelRegistry
from ._transport import closed_reason
from ._tunnel import Tunnel

log = logging.getLogger("backchannel.gateway")

#: A registration request is a token and a certificate request: a few KiB.
MAX_REGISTRATION_MESSAGE = 32 * 1024


async def serve_registration(
    authority: ConnectorAuthority,
    audit: AuditLog,
    request: trio_websocket.WebSocketRequest,
    peer: str,
) -> None:
    """Answer one registration on an accepted WebSocket, then close it."""
    ws = await request.accept()
    try:
        message = await ws.get_message()
        answer = _register(authority, audit, message, peer)
        await ws.send_message(json.dumps(answer))
        with trio.move_on_after(1):
            await ws.aclose()
    except trio_websocket.ConnectionClosed as exc:
        log.info("registration from %s: closed early: %s", peer, closed_reason(exc))


def _register(
    authority: ConnectorAuthority, audit: AuditLog, message: str | bytes, peer: str
) -> dict[str, str]:
    fields: dict[str, Any] = {"peer": peer}
    try:
        document = _registration_request(message)
        # Unauthenticated input: at most 80 characters of it reach the audit trail.
        fields.update(subaccount=document["subaccount"][:80], location=document["location"][:80])
        wanted = ConnectorIdentity(document["subaccount"], document["location"])
        certificate = authority.register(document["token"], document["csr"], wanted=wanted)
    except (RegistrationError, ValueError) as exc:
        audit.denied("connector_register", str(exc), **fields)
        log.warning("registration from %s refused: %s", peer, exc)
        return {"error": str(exc)}
    serial = serial_text(certificate)
    audit.allowed("connector_register", serial=serial, **fields)
    log.info(
        "registered connector %s/%s from %s: certificate serial %s",
        fields["subaccount"],
        fields["location"] or "-",
        peer,
        serial,
    )
    return {"certificate": certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")}


def _registration_request(message: str | bytes) -> dict[str, str]:
    if not isinstance(message, str) or len(message) > MAX_REGISTRATION_MESSAGE:
        raise RegistrationError(
            f"a registration is one JSON text message of at most {MAX_REGISTRATION_MESSAGE} bytes"
        )
    try:
        document = json.loads(message)
    except ValueError:
        raise RegistrationError("the registration message is not JSON") from None
    keys = ("token", "csr", "subaccount", "location")
    if not isinstance(document, dict) or not all(
        isinstance(document.get(key), str) for key in keys
    ):
        raise RegistrationError(
            "the registration message must be a JSON object with the strings "
            "token, csr, subaccount and location"
        )
    return {key: document[key] for key in keys}


def handle_renewal(
    authority: ConnectorAuthority,
    audit: AuditLog,
    entry: TunnelEntry,
    tunnel: Tunnel,
    payload: dict[str, Any],
) -> None:
    """Answer a CONTROL ``renew`` request on a certificate-authenticated tunnel."""
    request = payload.get("renew")
    fields = {"subaccount": entry.subaccount, "location": entry.location, "peer": entry.peer}
    request_id = request.get("id") if isinstance(request, dict) else None
    echo = {"id": request_id} if isinstance(request_id, str) and len(request_id) <= 64 else {}
    if entry.certificate is None:
        error = (
            "renewal needs a certificate-authenticated tunnel; this connector uses the shared "
            "token (register it with `backchannel register`)"
        )
    elif not isinstance(request, dict) or not isinstance(request.get("csr"), str):
        error = "a renew request is {'renew': {'csr': PEM}}"
    else:
        identity = ConnectorIdentity(entry.subaccount, entry.location)
        previous = entry.certificate
        try:
            certificate = authority.renew(identity, request["csr"], previous)
        except RegistrationError as exc:
            error = str(exc)
            # A revoked or expired certificate's tunnel is cut by the watcher at its next
            # round (cutting it here could lose this answer on the way out).
        except Exception as exc:  # a bug must not end the tunnel's reader
            log.exception("renewal for connector %s failed", identity)
            error = f"the gateway could not sign the certificate ({type(exc).__name__})"
        else:
            # The tunnel now stands for the newest certificate (its lineage includes the old
            # one): revoking either cuts it, and the old one's expiry does not.
            entry.certificate = certificate
            serial = serial_text(certificate)
            audit.allowed(
                "connector_renew", serial=serial, previous=serial_text(previous), **fields
            )
            log.info("renewed the certificate of connector %s: serial %s", identity, serial)
            pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
            tunnel.send_control({"renewed": {"certificate": pem, **echo}})
            return
    audit.denied("connector_renew", error, **fields)
    log.warning("renewal for connector %s/%s refused: %s", entry.subaccount, entry.location, error)
    tunnel.send_control({"renewed": {"error": error, **echo}})


async def watch_certificates(
    authority: ConnectorAuthority, registry: TunnelRegistry, audit: AuditLog, interval: float
) -> None:
    """Every ``interval`` seconds, cut tunnels whose certificate was revoked or expired."""
    cut: set[int] = set()  # entries already told to go (by id)
    reported = ""
    async with trio.open_nursery() as nursery:
        while True:
            await trio.sleep(interval)
            try:
                reported = _report_revocation_list(authority, reported)
                entries = registry.entries()
                cut &= {id(entry) for entry in entries}
                for entry in entries:
                    if entry.certificate is None or entry.tunnel is None or id(entry) in cut:
                        continue
                    problem = authority.refusal(entry.certificate)
                    if problem is None:
                        continue
                    audit.denied(
                        "connector_tunnel",
                        problem,
                        subaccount=entry.subaccount,
                        location=entry.location,
                        peer=entry.peer,
                    )
                    log.warning("closing the tunnel of %s: %s", entry.peer, problem)
                    cut.add(id(entry))
                    nursery.start_soon(_cut_soon, entry.tunnel, problem)
            except Exception:  # the watcher must keep watching, and the gateway keep serving
                log.exception("checking connector certificates failed")


def _report_revocation_list(authority: ConnectorAuthority, reported: str) -> str:
    """Log (once per new problem) that the revocation list on disk is unusable."""
    with contextlib.suppress(RevocationListError):
        authority.state.revoked()
    error = authority.state.revocation_error
    if error and error != reported:
        log.error(
            "%s; the last good revocation list stays in force (none: certificate "
            "authentication is refused)",
            error,
        )
    return error


def _cut(tunnel: Tunnel, reason: str) -> None:
    """GO_AWAY naming ``reason``: no new streams now; the watcher closes the tunnel with its
    open streams at its next round."""
    if not tunnel.closed and not tunnel.going_away:
        tunnel.go_away(ResetCode.UNAUTHENTICATED, reason)


async def _cut_soon(tunnel: Tunnel, reason: str) -> None:
    """Give the GO_AWAY a moment to leave, then close the tunnel with its streams."""
    if not tunnel.closed and not tunnel.going_away:
        tunnel.go_away(ResetCode.UNAUTHENTICATED, reason)
    with trio.move_on_after(1):
        await tunnel.wait_closed()
    tunnel.abort(reason)
