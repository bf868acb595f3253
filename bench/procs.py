"""Processes under test: the backend, a gateway and a connector, each its own OS process.

Everything listens on 127.0.0.1 only. Configuration, throwaway TLS material and secrets are written
into a temporary work folder; secrets reach the processes through ``*_file`` keys.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backchannel._pki import write_throwaway_tls_material

SUBACCOUNT = "bench"
APP = "app"

#: Virtual targets the connector maps to the backend's three servers.
VIRTUAL = {
    "sink": ("sink.virtual", 9),
    "source": ("source.virtual", 19),
    "hold": ("hold.virtual", 7),
    # the HTTP backend as plain TCP (``protocol = "tcp"``): HTTP through a port forward
    "web": ("webtcp.virtual", 8080),
}
#: The virtual host the connector maps to the HTTP backend (``protocol = "http"``).
HTTP_VIRTUAL = ("web.virtual", 80)
#: The virtual ABAP system the connector maps to the stub system (``protocol = "rfc"``, sysnr 00).
RFC_VIRTUAL = ("erp.virtual", 3300)
#: The function modules the ``rfc`` mapping allows.
RFC_FUNCTIONS = ("STFC_CONNECTION", "RFC_PING")

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A set-up or measurement step failed; the message says which and why."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Children get SIGTERM if the bench process dies, so nothing outlives a killed run."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def backchannel_command() -> list[str]:
    """The ``backchannel`` console script next to this interpreter (else ``-c`` into its CLI)."""
    script = Path(sys.executable).parent / "backchannel"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from backchannel._cli import main; sys.exit(main())"]


@dataclass
class Proc:
    """One child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id (the Python interpreter: console scripts exec it directly)."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def check_alive(self, during: str) -> None:
        """Raise :class:`BenchError` with the log tail if the process has exited."""
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with code {self.popen.returncode} during {during}; "
                f"last log lines:\n{self.log_tail()}"
            )

    def rss_kib(self) -> int:
        """Resident set size in KiB (VmRSS in /proc/<pid>/status)."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError as exc:
            raise BenchError(f"cannot read the RSS of {self.name} (pid {self.pid}): {exc}") from exc
        raise BenchError(f"no VmRSS line for {self.name} (pid {self.pid}); has it exited?")

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds consumed so far (/proc/<pid>/stat)."""
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError as exc:
            raise BenchError(f"cannot read the CPU time of {self.name}: {exc}") from exc
        return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS

    def cpu_seconds(self) -> float:
        """User + system CPU seconds consumed so far."""
        return sum(self.cpu_times())

    def nofile_limit(self) -> tuple[int, int]:
        """(soft, hard) RLIMIT_NOFILE of the running process, from /proc/<pid>/limits."""
        with open(f"/proc/{self.pid}/limits", encoding="ascii") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return _limit(soft), _limit(hard)
        raise BenchError(f"no 'Max open files' line in /proc/{self.pid}/limits")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the process's combined stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaps the process."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(timeout)
        for pipe in (self.popen.stdout, self.popen.stdin):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _limit(text: str) -> int:
    return -1 if text == "unlimited" else int(text)


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    stdout_pipe: bool = False,
    stdin_pipe: bool = False,
) -> Proc:
    """Start ``argv`` with stderr (and stdout unless piped) going to ``log_path``."""
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return Proc(name, popen, log_path)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_listening(proc: Proc, port: int, deadline: float) -> None:
    """Poll until ``port`` accepts TCP connections (and ``proc`` still runs)."""
    while True:
        proc.check_alive(f"start-up (waiting for port {port})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name} did not listen on 127.0.0.1:{port} in time; last log lines:\n"
                f"{proc.log_tail()}"
            )
        time.sleep(0.05)


def toml_value(value: Any) -> str:
    """A TOML literal for a str / int / float / bool."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _tunnel_table(settings: Mapping[str, Any]) -> str:
    if not settings:
        return ""
    lines = ["[tunnel]"] + [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n\n"


@dataclass
class Addresses:
    """Where the front doors of a running pair listen."""

    tunnel: int
    socks: int
    forwards: dict[str, int] = field(default_factory=dict)
    #: The HTTP plugin's forward proxy (``[plugins.http] proxy_listen``), if the pair has one.
    http_proxy: int | None = None
    #: The RFC plugin's front door (``[plugins.rfc] listen``), if the pair has one.
    rfc_front_door: int | None = None


class WorkDir:
    """Config, TLS material and secrets in one folder; renders gateway.toml and connector.toml."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tls = write_throwaway_tls_material(path / "tls")
        self.app_secret = secrets.token_urlsafe(24)
        for name, value in (
            ("connector.token", secrets.token_urlsafe(32)),
            ("app.secret", self.app_secret),
        ):
            secret_path = path / name
            secret_path.write_text(value)
            secret_path.chmod(0o600)

    def gateway_toml(self, addresses: Addresses, tunnel: Mapping[str, Any]) -> str:
        """The gateway: tunnel endpoint, SOCKS5 and one port forward per backend server."""
        forwards = "".join(
            f'\n[[plugins.tcp.forwards]]\nlisten = "127.0.0.1:{port}"\n'
            f'subaccount = "{SUBACCOUNT}"\n'
            f'target = "{VIRTUAL[name][0]}:{VIRTUAL[name][1]}"\n'
            for name, port in addresses.forwards.items()
        )
        return (
            "# written by python -m bench\n"
            f'[gateway]\nlisten = "127.0.0.1:{addresses.tunnel}"\npath = "/tunnel"\n'
            f'tls_cert = "{self.tls.cert_file}"\ntls_key = "{self.tls.key_file}"\n\n'
            + _tunnel_table(tunnel)
            + f'[audit]\nfile = "{self.path}/gateway-audit.jsonl"\n\n'
            f'[subaccounts.{SUBACCOUNT}]\nconnector_token_file = "{self.path}/connector.token"\n\n'
            f'[subaccounts.{SUBACCOUNT}.apps.{APP}]\nsecret_file = "{self.path}/app.secret"\n\n'
            f'[plugins.tcp]\nsocks5_listen = "127.0.0.1:{addresses.socks}"\n'
            + forwards
            + (
                f'\n[plugins.http]\nproxy_listen = "127.0.0.1:{addresses.http_proxy}"\n'
                if addresses.http_proxy is not None
                else ""
            )
            + (
                f'\n[plugins.rfc]\nlisten = "127.0.0.1:{addresses.rfc_front_door}"\n'
                if addresses.rfc_front_door is not None
                else ""
            )
        )

    def connector_toml(
        self,
        tunnel_port: int,
        backend_ports: Mapping[str, int],
        tunnel: Mapping[str, Any],
        http_backend: int | None = None,
        rfc_backend: int | None = None,
    ) -> str:
        """The connector: one subaccount, one mapping per backend server (and an ``http``
        mapping of :data:`HTTP_VIRTUAL` with one prefix resource ``/`` if ``http_backend``; an
        ``rfc`` mapping of :data:`RFC_VIRTUAL` allowing :data:`RFC_FUNCTIONS` to the stub ABAP
        system on port ``rfc_backend``, with the stub client as backend, if that is given)."""
        mappings = "".join(
            f"\n[[subaccounts.{SUBACCOUNT}.mappings]]\n"
            f'virtual = "{VIRTUAL[name][0]}:{VIRTUAL[name][1]}"\n'
            f'internal = "127.0.0.1:{port}"\nprotocol = "tcp"\n'
            for name, port in backend_ports.items()
        )
        if http_backend is not None:
            mappings += (
                f"\n[[subaccounts.{SUBACCOUNT}.mappings]]\n"
                f'virtual = "{HTTP_VIRTUAL[0]}:{HTTP_VIRTUAL[1]}"\n'
                f'internal = "127.0.0.1:{http_backend}"\nprotocol = "http"\n'
                f"\n[[subaccounts.{SUBACCOUNT}.mappings.resources]]\n"
                'path = "/"\nmatch = "prefix"\n'
            )
        plugins = ""
        if rfc_backend is not None:
            mappings += (
                f"\n[[subaccounts.{SUBACCOUNT}.mappings]]\n"
                f'virtual = "{RFC_VIRTUAL[0]}:{RFC_VIRTUAL[1]}"\n'
                f'internal = "127.0.0.1:{rfc_backend}"\nprotocol = "rfc"\n'
            ) + "".join(
                f'\n[[subaccounts.{SUBACCOUNT}.mappings.functions]]\nname = "{name}"\n'
                for name in RFC_FUNCTIONS
            )
            plugins = '[plugins.rfc]\nbackend = "stub"\n\n'
        return (
            "# written by python -m bench\n"
            + _tunnel_table(tunnel)
            + plugins
            + f'[audit]\nfile = "{self.path}/connector-audit.jsonl"\n\n'
            f'[subaccounts.{SUBACCOUNT}]\ngateway = "wss://127.0.0.1:{tunnel_port}/tunnel"\n'
            f'token_file = "{self.path}/connector.token"\nca_file = "{self.tls.ca_file}"\n'
            "use_environment_proxy = false\n" + mappings
        )


def start_backend(
    work: WorkDir,
    timeout: float = 15.0,
    *,
    module: str = "bench.backend",
    name: str = "backend",
    args: Sequence[str] = (),
) -> tuple[Proc, dict[str, int]]:
    """Start ``python -m <module>``; returns the process and the ports it announced."""
    proc = spawn(
        name,
        [sys.executable, "-m", module, *args],
        work.path / f"{name}.log",
        stdout_pipe=True,
    )
    assert proc.popen.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.popen.stdout, selectors.EVENT_READ)
    try:
        if not selector.select(timeout):
            proc.stop()
            raise BenchError(f"the {name} did not start within {timeout:g} s:\n{proc.log_tail()}")
        line = proc.popen.stdout.readline()
    finally:
        selector.close()
    try:
        ports = json.loads(line)["ports"]
    except (ValueError, KeyError) as exc:
        proc.stop()
        raise BenchError(
            f"the {name} did not announce its ports ({line!r}):\n{proc.log_tail()}"
        ) from exc
    return proc, {str(k): int(v) for k, v in ports.items()}


@dataclass
class Pair:
    """A running gateway and connector (separate processes) with their addresses."""

    gateway: Proc
    connector: Proc
    addresses: Addresses

    def procs(self) -> tuple[Proc, Proc]:
        """(gateway, connector)."""
        return self.gateway, self.connector

    def check_alive(self, during: str) -> None:
        """Raise if either side has exited."""
        self.gateway.check_alive(during)
        self.connector.check_alive(during)

    def stop(self) -> None:
        """Terminate both (connector first, so the gateway sees a clean tunnel close)."""
        try:
            self.connector.stop()
        finally:
            self.gateway.stop()


def start_pair(
    work: WorkDir,
    backend_ports: Mapping[str, int],
    *,
    label: str,
    tunnel: Mapping[str, Any],
    log_level: str,
    timeout: float = 30.0,
    http_backend: int | None = None,
    rfc_backend: int | None = None,
    http_proxy: bool = False,
    gateway_extra: str = "",
    connector_extra: str = "",
) -> Pair:
    """Write the configs, start gateway then connector, wait until a stream reaches the backend.

    Ports are picked free a moment before the gateway binds them; if another program takes one
    in between, the gateway exits at start-up and we try once more with fresh ports. With
    ``http_backend`` the gateway also runs the HTTP proxy and the connector maps
    :data:`HTTP_VIRTUAL` to that port; with ``rfc_backend`` (a stub ABAP system's port) the
    gateway also runs the RFC front door and the connector maps :data:`RFC_VIRTUAL` to it.
    ``http_proxy`` runs the HTTP proxy without that mapping; ``gateway_extra`` and
    ``connector_extra`` are TOML appended to the two configs (more mappings, identity
    providers, ``[principal_propagation]``).
    """
    options: dict[str, Any] = {
        "label": label,
        "tunnel": tunnel,
        "log_level": log_level,
        "timeout": timeout,
        "http_backend": http_backend,
        "rfc_backend": rfc_backend,
        "http_proxy": http_proxy,
        "gateway_extra": gateway_extra,
        "connector_extra": connector_extra,
    }
    try:
        return _start_pair(work, backend_ports, **options)
    except BenchError as exc:
        if "gateway exited" not in str(exc):
            raise
    return _start_pair(work, backend_ports, **options)


def _start_pair(
    work: WorkDir,
    backend_ports: Mapping[str, int],
    *,
    label: str,
    tunnel: Mapping[str, Any],
    log_level: str,
    timeout: float,
    http_backend: int | None,
    rfc_backend: int | None,
    http_proxy: bool,
    gateway_extra: str,
    connector_extra: str,
) -> Pair:
    deadline = time.monotonic() + timeout
    tunnel_port, socks_port, proxy_port, rfc_front_door, *forward_ports = free_ports(
        4 + len(backend_ports)
    )
    addresses = Addresses(
        tunnel_port,
        socks_port,
        dict(zip(backend_ports, forward_ports, strict=True)),
        proxy_port if http_backend is not None or http_proxy else None,
        rfc_front_door if rfc_backend is not None else None,
    )
    gateway_toml = work.path / f"gateway-{label}.toml"
    connector_toml = work.path / f"connector-{label}.toml"
    gateway_toml.write_text(work.gateway_toml(addresses, tunnel) + gateway_extra)
    connector_toml.write_text(
        work.connector_toml(tunnel_port, backend_ports, tunnel, http_backend, rfc_backend)
        + connector_extra
    )
    command = backchannel_command()
    gateway = spawn(
        "gateway",
        [*command, "gateway", "-c", str(gateway_toml), "--log-level", log_level],
        work.path / f"gateway-{label}.log",
    )
    connector: Proc | None = None
    try:
        wait_listening(gateway, tunnel_port, deadline)
        for port in addresses.forwards.values():
            wait_listening(gateway, port, deadline)
        for door in (addresses.http_proxy, addresses.rfc_front_door):
            if door is not None:
                wait_listening(gateway, door, deadline)
        connector = spawn(
            "connector",
            [*command, "connector", "-c", str(connector_toml), "--log-level", log_level],
            work.path / f"connector-{label}.log",
        )
        pair = Pair(gateway, connector, addresses)
        wait_end_to_end(pair, deadline)
        return pair
    except BaseException:
        if connector is not None:
            connector.stop()
        gateway.stop()
        raise


def wait_end_to_end(pair: Pair, deadline: float) -> None:
    """Retry a stream through the ``hold`` forward until the backend's greeting comes back."""
    port = pair.addresses.forwards["hold"]
    last = "no attempt"
    while time.monotonic() < deadline:
        pair.check_alive("start-up (waiting for the tunnel)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(2)
                greeting = sock.recv(1)
                if greeting == b"R":
                    return
                last = f"stream closed without greeting ({greeting!r})"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(
        f"no stream reached the backend through the tunnel in time (last: {last}); gateway log:\n"
        f"{pair.gateway.log_tail()}\nconnector log:\n{pair.connector.log_tail()}"
    )
