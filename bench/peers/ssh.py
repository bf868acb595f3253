"""OpenSSH remote forwarding (``ssh -R``) as a peer: a private sshd and an ``ssh -N -R`` client.

The harness generates a throwaway host key and client key in its own folder, starts
``/usr/sbin/sshd -D`` on a free 127.0.0.1 port with its own config (key authentication only,
for the user running the bench), and then ``ssh -N`` with one ``-R 127.0.0.1:<port>:127.0.0.1:
<backend>`` per target and the cipher given (``aes128-gcm@openssh.com`` or
``chacha20-poly1305@openssh.com``; compression off). sshd listens on the forwarded ports (the
cloud side), the ssh client connects to the backends (the on-premise side), as in backchannel.
Needs the Debian packages ``openssh-server`` and ``openssh-client``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ..procs import BenchError, WorkDir, free_ports, spawn, wait_listening
from . import Peer, PeerSkipped

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 15.0

_SSHD_CONFIG = """\
# written by python -m bench: a private sshd for the ssh -R peer
Port {port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
LogLevel ERROR
Ciphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com
"""


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def starter(cipher: str) -> Callable[[WorkDir, Mapping[str, int]], Peer]:
    """A starter for ``ssh -R`` with ``cipher``."""

    def start(work: WorkDir, targets: Mapping[str, int]) -> Peer:
        return start_ssh(work, targets, cipher)

    return start


def start_ssh(work: WorkDir, targets: Mapping[str, int], cipher: str) -> Peer:
    """Start sshd and ``ssh -N -R`` for every target; returns the running peer."""
    ssh = shutil.which("ssh")
    if not os.path.exists(SSHD) or ssh is None or shutil.which("ssh-keygen") is None:
        raise PeerSkipped(
            "OpenSSH is not installed (apt-get install openssh-server openssh-client)"
        )
    short = cipher.split("-")[0]
    folder = work.path / f"ssh-{short}"
    folder.mkdir()
    _keygen(folder / "host_key")
    _keygen(folder / "client_key")
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    port, *forward_ports = free_ports(1 + len(targets))
    config = folder / "sshd_config"
    config.write_text(_SSHD_CONFIG.format(port=port, folder=folder))
    deadline = time.monotonic() + START_TIMEOUT
    server = spawn(f"sshd ({short})", [SSHD, "-D", "-e", "-f", str(config)], folder / "sshd.log")
    try:
        wait_listening(server, port, deadline)
        forwards = dict(zip(targets, forward_ports, strict=True))
        argv = [
            ssh,
            "-N",
            "-T",
            "-F",
            "/dev/null",
            "-i",
            str(folder / "client_key"),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={folder}/known_hosts",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "Compression=no",
            "-o",
            "LogLevel=ERROR",
            "-c",
            cipher,
            "-p",
            str(port),
        ]
        for name, backend in targets.items():
            argv += ["-R", f"127.0.0.1:{forwards[name]}:127.0.0.1:{backend}"]
        argv.append(f"{getpass.getuser()}@127.0.0.1")
        client = spawn(f"ssh -R ({short})", argv, folder / "ssh.log")
        try:
            for forward in forwards.values():
                wait_listening(client, forward, deadline)
        except BaseException:
            client.stop()
            raise
    except BaseException:
        server.stop()
        raise
    if not server.alive():
        raise BenchError(f"sshd exited:\n{server.log_tail()}")
    return Peer(f"ssh-{short}", f"ssh -R ({cipher})", forwards, server, client)
