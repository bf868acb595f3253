"""A throwaway nginx on 127.0.0.1 for the HTTP plugin's end-to-end tests, and its certificates.

nginx runs in the foreground as a single process (``daemon off; master_process off;``) with its
prefix, configuration, pid, temp folders and logs in a test folder. It cannot be told to bind
port 0, so free ports are picked first; if another process takes one in the meantime nginx
exits and the next attempt uses other ports. Three servers:

* ``http_port``: plain HTTP. ``/public/``, ``/admin/`` (a secret that the resource rules must
  keep out of reach) and ``/files/`` (an extra folder) are static; ``/api/...`` answers a text
  description of the request (method, URI, Host, Authorization, X-Forwarded-For) with the
  nginx connection number and its request count in ``X-Connection``/``X-Connection-Requests``.
* ``mtls_port``: HTTPS with ``ssl_verify_client on`` against the client CA; every answer carries
  the verified client subject in ``X-Client-DN``.
* ``rogue_port``: HTTPS with a certificate from a CA nobody trusts.

Every request that reaches nginx is written to ``access_log`` as one JSON object per line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from backchannel import CertificateAuthority
from tests.procs import Process, free_port, port_accepts, require_tool, running, wait_until

PUBLIC_BODY = b"hello from nginx, public area\n"
SECRET_BODY = b"nginx admin secret: must never leave the premises\n"
CLIENT_COMMON_NAME = "connector"


@dataclass(frozen=True, slots=True)
class Pki:
    """Certificates for the HTTPS backends: nginx's server certificate from ``backend_ca``, the
    connector's client certificate from ``client_ca``, and a rogue server certificate."""

    backend_ca: Path
    client_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def make_pki(directory: Path) -> Pki:
    """Create three CAs and the certificates they issue in ``directory``."""
    backend_ca = CertificateAuthority.create("backend CA")
    client_ca = CertificateAuthority.create("connector client CA")
    rogue_ca = CertificateAuthority.create("rogue CA")
    backend_ca_pem, _ = backend_ca.save(directory, name="backend-ca")
    client_ca_pem, _ = client_ca.save(directory, name="client-ca")
    hosts = ["127.0.0.1", "localhost"]
    server_cert, server_key = backend_ca.issue_server_certificate(hosts).save(directory, "nginx")
    client_cert, client_key = client_ca.issue_client_certificate(CLIENT_COMMON_NAME).save(
        directory, "connector"
    )
    rogue_cert, rogue_key = rogue_ca.issue_server_certificate(hosts).save(directory, "rogue")
    return Pki(
        backend_ca_pem,
        client_ca_pem,
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
    )


@dataclass
class Nginx:
    """A running nginx: its ports, document root and access log."""

    process: Process
    http_port: int
    mtls_port: int
    rogue_port: int
    root: Path
    access_log: Path

    def log_entries(self) -> list[dict[str, Any]]:
        """Every request nginx has logged so far."""
        if not self.access_log.exists():
            return []
        text = self.access_log.read_text()
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def wait_for_entry(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> None:
        """Wait until a logged request matches ``predicate`` (nginx logs after answering)."""
        wait_until(lambda: any(predicate(e) for e in self.log_entries()), what)


_LOG_FORMAT = (
    '{"port":"$server_port","connection":"$connection","requests":"$connection_requests",'
    '"method":"$request_method","uri":"$request_uri","status":"$status",'
    '"bytes":"$body_bytes_sent","authorization":"$http_authorization",'
    '"client_dn":"$ssl_client_s_dn"}'
)

_API_BODY = (
    "method=$request_method\\nuri=$request_uri\\nhost=$http_host\\n"
    "authorization=$http_authorization\\nforwarded-for=$http_x_forwarded_for\\n"
)


def _config(folder: Path, root: Path, files: Path, pki: Pki, ports: tuple[int, int, int]) -> str:
    http_port, mtls_port, rogue_port = ports
    temp = "\n".join(
        f"    {kind}_temp_path {folder / 'temp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} info;
events {{ worker_connections 256; }}
http {{
{temp}
    log_format e2e escape=json '{_LOG_FORMAT}';
    access_log {folder / "access.log"} e2e;
    default_type application/octet-stream;
    types {{ text/plain txt; text/html html; }}
    sendfile on;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{http_port};
        server_name _;
        root {root};
        add_header X-Served-By nginx always;
        location /api/ {{
            default_type text/plain;
            add_header X-Served-By nginx always;
            add_header X-Connection $connection always;
            add_header X-Connection-Requests $connection_requests always;
            return 200 "{_API_BODY}";
        }}
        location /files/ {{
            alias {files}/;
        }}
    }}
    server {{
        listen 127.0.0.1:{mtls_port} ssl;
        server_name _;
        ssl_certificate {pki.server_cert};
        ssl_certificate_key {pki.server_key};
        ssl_client_certificate {pki.client_ca};
        ssl_verify_client on;
        location / {{
            default_type text/plain;
            add_header X-Served-By nginx always;
            add_header X-Client-DN $ssl_client_s_dn always;
            return 200 "mutual TLS ok: $ssl_client_verify\\n";
        }}
    }}
    server {{
        listen 127.0.0.1:{rogue_port} ssl;
        server_name _;
        ssl_certificate {pki.rogue_cert};
        ssl_certificate_key {pki.rogue_key};
        location / {{
            default_type text/plain;
            return 200 "rogue\\n";
        }}
    }}
}}
"""


def _site(root: Path) -> None:
    (root / "public").mkdir(parents=True, exist_ok=True)
    (root / "admin").mkdir(exist_ok=True)
    (root / "public" / "index.html").write_bytes(PUBLIC_BODY)
    (root / "public" / "hello.txt").write_bytes(PUBLIC_BODY)
    (root / "admin" / "secret.txt").write_bytes(SECRET_BODY)
    (root / "suspended").mkdir(exist_ok=True)
    (root / "suspended" / "file.txt").write_bytes(SECRET_BODY)


def _started(process: Process, ports: tuple[int, ...]) -> bool:
    return process.popen.poll() is not None or all(port_accepts(p) for p in ports)


@contextmanager
def nginx_server(folder: Path, pki: Pki, *, files: Path | None = None) -> Iterator[Nginx]:
    """Run nginx with its files under ``folder``; ``files`` is served at ``/files/``."""
    executable = require_tool("nginx")
    root = folder / "www"
    _site(root)
    files = files or root / "files"
    files.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / "temp" / kind).mkdir(parents=True, exist_ok=True)
    output = ""
    for _attempt in range(3):
        ports = (free_port(), free_port(), free_port())
        if len(set(ports)) < 3:
            continue
        conf = folder / "nginx.conf"
        conf.write_text(_config(folder, root, files, pki, ports))
        argv: list[str | Path] = [executable, "-p", f"{folder}/", "-c", conf]
        argv += ["-e", folder / "error.log"]
        with running(argv) as process:
            wait_until(partial(_started, process, ports), f"nginx on ports {ports}")
            if process.popen.poll() is None:
                yield Nginx(process, *ports, root, folder / "access.log")
                return
            output = process.output
    error_log = folder / "error.log"
    errors = error_log.read_text() if error_log.exists() else ""
    raise AssertionError(f"nginx did not start; output:\n{output}\nerror.log:\n{errors}")
