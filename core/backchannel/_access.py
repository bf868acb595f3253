"""Connector access control, core part: which virtual targets map to which internal ones.

Default deny: a stream is allowed only if a system mapping of its subaccount covers the virtual
host and port with a protocol served by the plugin the stream asks for. Plugins check their own
resources (paths, function names) after this.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ._config import MappingEntry
from ._configutil import TableReader
from ._plugin_api import ConnectorHandler, SystemMapping

_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$"
)


@dataclass(frozen=True, slots=True)
class Denied:
    """Why a stream was refused (sent to the gateway; names only virtual targets)."""

    reason: str


def normalise_host(host: str) -> str:
    """Host names compare case-insensitively and without a trailing dot."""
    return host.lower().rstrip(".")


class AccessControl:
    """The mappings of all subaccounts, indexed by (subaccount, virtual host)."""

    def __init__(self, mappings: Iterable[SystemMapping]) -> None:
        self._by_host: dict[tuple[str, str], list[SystemMapping]] = {}
        for mapping in mappings:
            key = (mapping.subaccount, normalise_host(mapping.virtual_host))
            self._by_host.setdefault(key, []).append(mapping)

    @property
    def mappings(self) -> list[SystemMapping]:
        """All mappings, in no particular order."""
        return [m for group in self._by_host.values() for m in group]

    def resolve(
        self,
        subaccount: str,
        stream_protocol: str,
        host: str,
        port: int,
        handlers: Mapping[str, ConnectorHandler],
    ) -> SystemMapping | Denied:
        """The mapping that allows this stream, or why there is none."""
        target = f"{host}:{port}"
        candidates = self._by_host.get((subaccount, normalise_host(host)), [])
        covering = [m for m in candidates if port in m.virtual_ports]
        if not covering:
            return Denied(f"no system mapping for virtual host {target}")
        for mapping in covering:
            handler = handlers.get(mapping.protocol)
            if handler is not None and handler.name == stream_protocol:
                return mapping
        protocols = ", ".join(sorted({m.protocol for m in covering}))
        return Denied(f"virtual host {target} is mapped for {protocols}, not for {stream_protocol}")

    @classmethod
    def build(
        cls, entries: Iterable[MappingEntry], handlers: Mapping[str, ConnectorHandler]
    ) -> AccessControl:
        """Validate mapping tables; ``handlers`` maps each mapping protocol to its handler."""
        seen: dict[tuple[str, str], list[SystemMapping]] = {}
        for entry in entries:
            mapping = _read_mapping(entry.subaccount, entry.reader, handlers)
            key = (mapping.subaccount, normalise_host(mapping.virtual_host))
            for other in seen.get(key, []):
                if set(other.virtual_ports) & set(mapping.virtual_ports):
                    raise entry.reader.error(
                        "virtual",
                        f"{mapping.virtual_text} overlaps {other.virtual_text}: "
                        "a virtual port may be mapped only once",
                    )
            seen.setdefault(key, []).append(mapping)
        return cls(m for group in seen.values() for m in group)


def _read_mapping(
    subaccount: str, reader: TableReader, handlers: Mapping[str, ConnectorHandler]
) -> SystemMapping:
    protocol = reader.string("protocol", required=True)
    handler = handlers.get(protocol)
    if handler is None:
        served = ", ".join(sorted(handlers)) or "none (no plugin enabled)"
        raise reader.error(
            "protocol", f"{protocol!r} is not served by an enabled plugin (served: {served})"
        )
    virtual_host, virtual_ports = _parse_target(
        reader, "virtual", reader.string("virtual", required=True)
    )
    assert virtual_ports is not None
    internal_text = reader.string("internal", required=True)
    internal_host, internal_ports = _parse_target(
        reader, "internal", internal_text, port_optional=True
    )
    if internal_ports is None:
        internal_ports = virtual_ports
    if len(internal_ports) != len(virtual_ports):
        raise reader.error(
            "internal",
            f"port range has {len(internal_ports)} ports, the virtual one {len(virtual_ports)}",
        )
    description = reader.string("description", "")
    options = handler.parse_mapping_options(reader)
    return SystemMapping(
        subaccount,
        protocol,
        virtual_host,
        virtual_ports,
        internal_host,
        internal_ports.start,
        description,
        options,
    )


def _parse_target(
    reader: TableReader, key: str, text: str, *, port_optional: bool = False
) -> tuple[str, range | None]:
    host, sep, ports = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise reader.error(key, f"{text!r}: brackets are for IPv6 addresses only") from None
    elif not sep or (":" in host):
        if port_optional and ":" not in text:
            _check_host(reader, key, text)
            return text, None  # the caller substitutes the virtual range
        raise reader.error(key, f"{text!r} must be host:port or host:first-last")
    else:
        _check_host(reader, key, host)
    first, dash, last = ports.partition("-")
    if not first.isdigit() or (dash and not last.isdigit()):
        raise reader.error(key, f"{text!r}: ports must be a number or a range first-last")
    low, high = int(first), int(last) if dash else int(first)
    if not 1 <= low <= high <= 65535:
        raise reader.error(key, f"{text!r}: ports must be within 1-65535 and first <= last")
    return host, range(low, high + 1)


def _check_host(reader: TableReader, key: str, host: str) -> None:
    if not _HOST.match(host) and not _is_ip(host):
        raise reader.error(key, f"{host!r} is not a valid host name or IP address")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
