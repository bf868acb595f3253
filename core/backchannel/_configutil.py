"""Reading TOML tables into validated values, with errors that name file, key and problem."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._exceptions import ConfigError


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret read from a file, an environment variable or the config; never printed."""

    _value: str
    origin: str

    def reveal(self) -> str:
        """The secret itself: pass it only to the comparison or the peer that needs it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret(from {self.origin})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host name or address and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, *, allow_port_zero: bool = False) -> HostPort:
    """Parse ``host:port`` or ``[v6]:port``; raises ValueError with the problem."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"{text!r}: write IPv6 addresses in brackets, like [::1]:8443")
    port = _parse_port(port_text, text, allow_zero=allow_port_zero)
    return HostPort(host, port)


def _parse_port(port_text: str, whole: str, *, allow_zero: bool = False) -> int:
    if not port_text.isdigit():
        raise ValueError(f"{whole!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{whole!r}: port {port} out of range")
    return port


class TableReader:
    """Typed access to one TOML table; :meth:`finish` rejects keys nobody asked for."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any], base_dir: Path) -> None:
        self.source = source
        self.prefix = prefix
        self._table = table
        self._seen: set[str] = set()
        self.base_dir = base_dir

    def key_path(self, key: str) -> str:
        """Dotted path of ``key`` for messages."""
        if not key:
            return self.prefix
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, problem: str) -> ConfigError:
        """A ConfigError naming this file and ``key``."""
        return ConfigError(self.source, self.key_path(key), problem)

    def __contains__(self, key: str) -> bool:
        return key in self._table

    def _get(self, key: str, expected: type | tuple[type, ...], what: str) -> Any:
        self._seen.add(key)
        value = self._table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in (
            expected if isinstance(expected, tuple) else (expected,)
        ):
            raise self.error(key, f"must be {what}, not a boolean")
        if not isinstance(value, expected):
            raise self.error(key, f"must be {what}, not {type(value).__name__}")
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        """A string value (required, or ``default`` when absent)."""
        value = self._get(key, str, "a string")
        if value is None:
            if required or default is None:
                raise self.error(key, "is required")
            return default
        return str(value)

    def optional_string(self, key: str) -> str | None:
        """A string value or None when absent."""
        value = self._get(key, str, "a string")
        return None if value is None else str(value)

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        """An integer within bounds."""
        value = self._get(key, int, "an integer")
        if value is None:
            return default
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be between {minimum} and {maximum}, got {value}")
        return int(value)

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        """A float (or integer) within bounds."""
        value = self._get(key, (int, float), "a number")
        if value is None:
            return default
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be between {minimum:g} and {maximum:g}, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        """true or false."""
        value = self._get(key, bool, "true or false")
        return default if value is None else bool(value)

    def string_list(self, key: str) -> list[str]:
        """An array of strings (empty when absent)."""
        value = self._get(key, list, "an array of strings")
        if value is None:
            return []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{index}]", "must be a string")
        return [str(item) for item in value]

    def host_port(
        self, key: str, *, required: bool = True, allow_port_zero: bool = True
    ) -> HostPort:
        """A ``host:port`` address."""
        text = self.string(key, required=required)
        try:
            return parse_host_port(text, allow_port_zero=allow_port_zero)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def path(self, key: str, *, required: bool = False, must_exist: bool = True) -> Path | None:
        """A file path, relative paths taken from the config file's folder."""
        text = self.string(key, required=True) if required else self.optional_string(key)
        if text is None:
            return None
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        if must_exist and not path.is_file():
            raise self.error(key, f"file {str(path)!r} does not exist or is not a file")
        return path

    def secret(self, key: str, *, required: bool = True) -> Secret | None:
        """A secret from exactly one of ``key``, ``key_file`` or ``key_env``."""
        given = [name for name in (key, f"{key}_file", f"{key}_env") if name in self._table]
        self._seen.update((key, f"{key}_file", f"{key}_env"))
        if not given:
            if required:
                raise self.error(key, f"is required: set {key}_file (recommended) or {key}_env")
            return None
        if len(given) > 1:
            raise self.error(key, f"set only one of {', '.join(given)}")
        name = given[0]
        value = self._table[name]
        if not isinstance(value, str) or not value:
            raise self.error(name, "must be a non-empty string")
        if name.endswith("_file"):
            path = Path(value).expanduser()
            path = path if path.is_absolute() else self.base_dir / path
            try:
                secret = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise self.error(name, f"cannot read {str(path)!r}: {exc.strerror}") from None
            origin = f"file {path}"
        elif name.endswith("_env"):
            if value not in os.environ:
                raise self.error(name, f"environment variable {value} is not set")
            secret = os.environ[value]
            origin = f"environment variable {value}"
        else:
            secret = value
            origin = f"{self.source}: {self.key_path(name)}"
        if not secret:
            raise self.error(name, f"the secret from {origin} is empty")
        return Secret(secret, origin)

    def table(self, key: str) -> TableReader:
        """A sub-table (empty when absent)."""
        value = self._get(key, dict, "a table")
        return TableReader(self.source, self.key_path(key), value or {}, self.base_dir)

    def raw_table(self, key: str) -> dict[str, Any]:
        """A sub-table as a plain dict, for a plugin to read itself."""
        value = self._get(key, dict, "a table")
        return dict(value or {})

    def tables(self, key: str) -> Iterator[TableReader]:
        """An array of tables (``[[key]]``)."""
        value = self._get(key, list, "an array of tables")
        for index, item in enumerate(value or []):
            if not isinstance(item, dict):
                raise self.error(f"{key}[{index}]", "must be a table")
            yield TableReader(self.source, f"{self.key_path(key)}[{index}]", item, self.base_dir)

    def named_tables(self, key: str) -> Iterator[tuple[str, TableReader]]:
        """A table of tables (``[key.NAME]``), in file order."""
        value = self._get(key, dict, "a table")
        for name, item in (value or {}).items():
            if not isinstance(item, dict):
                raise self.error(f"{key}.{name}", "must be a table")
            yield (
                name,
                TableReader(self.source, f"{self.key_path(key)}.{name}", item, self.base_dir),
            )

    def finish(self) -> None:
        """Reject unknown keys (most often a typo that would otherwise be silently ignored)."""
        unknown = sorted(set(self._table) - self._seen)
        if unknown:
            raise self.error(
                unknown[0], "unknown key (check the spelling; see docs/configuration.md)"
            )
