"""TLS towards a backend, as configured on a system mapping (shared by protocol plugins)."""

from __future__ import annotations

import ssl
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._configutil import TableReader
from ._transport import verifying_client_context
from ._user_ca import UserCertificate

if TYPE_CHECKING:
    from ._identity import PropagatedUser


@dataclass(frozen=True, slots=True)
class BackendTls:
    """How the connector speaks TLS to one mapping's backend."""

    context: ssl.SSLContext
    #: Name to verify and send as SNI; None means the mapping's internal host.
    server_name: str | None
    #: The CA file the backend's certificate is verified against (None: the system store).
    ca_file: Path | None = None
    #: Whether ``context`` presents the connector's system certificate (mutual TLS).
    has_client_certificate: bool = False

    def context_with(self, certificate: UserCertificate) -> ssl.SSLContext:
        """A context verifying the backend as ``context`` does, presenting ``certificate``
        (a propagated user's) instead of the system certificate."""
        context = verifying_client_context(self.ca_file)
        certificate.load_into(context)
        return context


class UserTlsContexts:
    """TLS settings presenting a propagated user's certificate, kept while that certificate
    is the cached one: building a context costs milliseconds (loading the key), on the event
    loop. Bounded (least recently used first out)."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._contexts: OrderedDict[tuple[int, int], tuple[BackendTls, BackendTls]] = OrderedDict()

    def get(self, tls: BackendTls, user: PropagatedUser) -> BackendTls:
        """The mapping's TLS settings with ``user``'s certificate as the client certificate."""
        key = (id(tls), user.certificate.certificate.serial_number)
        found = self._contexts.get(key)
        if found is not None and found[0] is tls:
            self._contexts.move_to_end(key)
            return found[1]
        made = BackendTls(tls.context_with(user.certificate), tls.server_name, tls.ca_file, True)
        self._contexts[key] = (tls, made)  # holding ``tls`` keeps its id from being reused
        while len(self._contexts) > self._size:
            self._contexts.popitem(last=False)
        return made


def read_backend_tls(mapping: TableReader) -> BackendTls:
    """Read ``ca_file``, ``server_name``, ``client_cert`` and ``client_key`` of a mapping.

    The backend's certificate is always verified (against ``ca_file`` alone when set, else
    the system store); ``client_cert``/``client_key`` are the connector's system certificate
    for mutual TLS. Errors name the key. Does not call ``mapping.finish()``.
    """
    ca_file = mapping.path("ca_file")
    server_name = mapping.optional_string("server_name")
    client_cert = mapping.path("client_cert")
    client_key = mapping.path("client_key")
    if (client_cert is None) != (client_key is None):
        raise mapping.error("client_cert", "client_cert and client_key go together")
    try:
        context = verifying_client_context(ca_file)
    except (ssl.SSLError, OSError) as exc:
        problem = f"not a readable PEM file of CA certificates: {exc}"
        raise mapping.error("ca_file", problem) from None
    if client_cert is not None and client_key is not None:
        try:
            context.load_cert_chain(str(client_cert), str(client_key))
        except (ssl.SSLError, OSError) as exc:
            problem = f"cannot load the client certificate: {exc}"
            raise mapping.error("client_key", problem) from None
    if server_name is not None:
        try:  # what ssl would refuse at every connection (a leading dot, an empty label)
            context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=server_name)
        except ValueError as exc:  # UnicodeError included
            problem = f"not a host name TLS can verify: {exc}"
            raise mapping.error("server_name", problem) from None
    return BackendTls(context, server_name, ca_file, client_cert is not None)
