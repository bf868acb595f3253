"""The cost of principal propagation: each step in-process, and requests per second end to end.

``python -m bench.identity [--quick | --runs N]`` times, in this process, the steps the connector
takes for a cloud user (wall time per call, median and p99 over N calls after 3 unmeasured ones):
``validate_jwt`` with an ES256 and an RS256 token, the subject rules, issuing a user certificate
with an EC P-256 and an RSA 2048 key (``UserCertificateAuthority.issue``), a cache hit, a whole
``PrincipalResolver.resolve`` with the certificate cached and without, and what the HTTP handler
does per tunnel stream in ``certificate`` mode: a new client context (``verifying_client_context``
with the mapping's ``ca_file``) and ``UserCertificate.load_into`` it (``BackendTls.context_with``
is the two together). RSA key generation takes tens of milliseconds, so it gets fewer calls.

``python -m bench --only identity [--quick]`` does that, then runs gateway, connector and nginx
(the mTLS backend: ``ssl_verify_client on`` against the connector's CA, 1 KiB answer, the
verified subject in ``X-Client-DN``) as processes and measures closed-loop ``GET /small``
through the gateway's HTTP proxy with ``bench.http_load``, the same path three ways, alternating:

- *basic*: an https mapping with the connector's system certificate and no propagation; the
  client sends its user's password as ``Authorization: Basic`` (nginx does not check it);
- *certificate*: ``principal_propagation = "certificate"``; the client sends
  ``SAP-Connectivity-Authentication: Bearer <JWT>``, the same user and token on every request
  (so the certificate stays cached), and the connector presents the user's certificate to nginx;
- *header*: ``principal_propagation = "header"``: the system certificate on the TLS leg, the
  user's certificate in ``SSL_CLIENT_CERT``.

Each with kept-alive client connections and with a new connection per request
(``--new-connection``). The gateway keeps one tunnel stream per client connection while the
target and the token stay the same, and the connector resolves the user once per stream, so
kept-alive connections are the steady state of one user's session; a new connection means a
new stream, the token validated again, a new user context and a full TLS handshake with the
backend every time. Before measuring, one request per mode must come back 200 with the expected
``X-Client-DN`` (the user's subject in certificate mode), so a set-up that silently fell back to
the system certificate fails instead of measuring the wrong thing.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import math
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from backchannel import (
    AuditLog,
    BackendTls,
    CertificateAuthority,
    HostPort,
    Role,
    Session,
    SystemMapping,
    verifying_client_context,
)
from backchannel._identity import PrincipalPropagationConfig, PrincipalResolver
from backchannel._jwt_trust import TrustedIdp, TrustList, validate_jwt
from backchannel._subject_rules import SubjectRule, SubjectRules
from backchannel._user_ca import KeyType, UserCertificateAuthority, UserCertificateCache

from .closed_loop import ClosedLoop, latency_summary, median, spread
from .procs import (
    APP,
    SUBACCOUNT,
    BenchError,
    Pair,
    Proc,
    WorkDir,
    free_ports,
    spawn,
    start_pair,
    toml_value,
    wait_listening,
)
from .report import identity_micro_lines, machine_info
from .scenarios import CpuMeter

T = TypeVar("T")

ISSUER = "https://idp.bench.invalid"
AUDIENCE = "backchannel"
USER = "alice"
PATTERN = "CN=${name},O=Example"
SUBJECT = "CN=alice,O=Example"
SYSTEM_CN = "connector"
SMALL_PATH = "/small"
SMALL_BODY = "x" * 1023  # nginx adds nothing: with the newline, 1 KiB as in the HTTP scenario

MODES = ("basic", "certificate", "header")
CONNECTIONS = ("keep-alive", "new")
VIRTUAL_PORT = 443
VIRTUAL = {
    "basic": "basic.virtual",
    "certificate": "pp-cert.virtual",
    "header": "pp-header.virtual",
}
#: The client certificate nginx must have verified in each mode.
EXPECTED_DN = {"basic": f"CN={SYSTEM_CN}", "certificate": SUBJECT, "header": f"CN={SYSTEM_CN}"}


# --------------------------------------------------------------------------- in-process costs


@dataclass(frozen=True)
class Idp:
    """A throwaway identity provider: its signing key and a token minter."""

    issuer: str
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    algorithm: str
    kid: str = "k1"

    @classmethod
    def create(cls, algorithm: str, issuer: str = ISSUER) -> Idp:
        """ES256 (a P-256 key) or RS256 (RSA 2048)."""
        if algorithm == "ES256":
            return cls(issuer, ec.generate_private_key(ec.SECP256R1()), algorithm)
        return cls(issuer, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")

    def public_pem(self) -> bytes:
        """The public key, PEM (what the gateway's ``public_key_file`` holds)."""
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def trusted(self) -> TrustedIdp:
        """This IdP as the connector's trust list has it."""
        return TrustedIdp.from_pem(
            f"idp-{self.algorithm}", self.issuer, self.public_pem(), [AUDIENCE], self.kid
        )

    def token(self, lifetime: int = 7200) -> str:
        """A token for :data:`USER`, valid for ``lifetime`` seconds."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + lifetime,
            "user_name": USER,
            "email": f"{USER}@example.com",
        }
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers={"kid": self.kid})


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _nothing() -> None:
    return None


def timed(action: Callable[[T], object], runs: int, prepare: Callable[[], T]) -> dict[str, Any]:
    """Wall time of ``action(prepare())`` (``prepare`` untimed): median, p99 (nearest rank; the
    maximum below 100 runs) and minimum in µs over ``runs`` calls, after 3 unmeasured ones; and
    the median CPU time of this thread per call, which other programs on the machine disturb
    less (it includes about 0.5 µs of clock reading)."""
    for _ in range(min(3, runs)):
        action(prepare())
    samples: list[int] = []
    cpu: list[int] = []
    for _ in range(runs):
        argument = prepare()
        cpu_start = time.thread_time_ns()
        start = time.perf_counter_ns()
        action(argument)
        samples.append(time.perf_counter_ns() - start)
        cpu.append(time.thread_time_ns() - cpu_start)
    samples.sort()
    return {
        "runs": runs,
        "median_us": round(statistics.median(samples) / 1e3, 1),
        "p99_us": round(samples[max(0, math.ceil(0.99 * runs) - 1)] / 1e3, 1),
        "min_us": round(samples[0] / 1e3, 1),
        "cpu_median_us": round(statistics.median(cpu) / 1e3, 1),
    }


def measure_micro(
    runs: int, slow_runs: int, directory: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """The in-process costs; ``slow_runs`` calls for RSA key generation, ``runs`` for the rest."""
    es_idp, rs_idp = Idp.create("ES256"), Idp.create("RS256", ISSUER + "/rsa")
    trust = TrustList([es_idp.trusted(), rs_idp.trusted()])
    es_token, rs_token = es_idp.token(), rs_idp.token()
    rules = SubjectRules((SubjectRule(PATTERN),))
    claims = validate_jwt(es_token, trust, now=time.time())
    subject = rules.subject_for(claims).name
    authority = UserCertificateAuthority.create("bench principal propagation CA")
    ca_cert, ca_key = authority.save(directory / "pp-ca")
    validity = datetime.timedelta(seconds=600)
    cache = UserCertificateCache(authority, validity=validity)
    cache.get(subject)
    config = PrincipalPropagationConfig(ca_cert, ca_key, None, 600.0, 60.0, rules)
    resolver = PrincipalResolver.load(config, source="bench")
    resolver.update_trust(SUBACCOUNT, trust)
    virtual = VIRTUAL["certificate"]
    session = Session(
        protocol="http",
        subaccount=SUBACCOUNT,
        location="",
        app=APP,
        virtual=HostPort(virtual, VIRTUAL_PORT),
        internal=HostPort("127.0.0.1", VIRTUAL_PORT),
        mapping=SystemMapping(
            SUBACCOUNT, "https", virtual, range(VIRTUAL_PORT, VIRTUAL_PORT + 1), "127.0.0.1", 443
        ),
        audit=AuditLog(Role.CONNECTOR),  # allowed lines are not written, as deployed
        principal=f"Bearer {es_token}",
    )
    ec_user = authority.issue(subject, now=_utc_now(), validity=validity)
    rsa_user = authority.issue(
        subject, now=_utc_now(), validity=validity, key_type=KeyType.RSA_2048
    )
    backend_ca_file, _ = CertificateAuthority.create("bench backend CA").save(
        directory, name="backend-ca"
    )
    tls = BackendTls(verifying_client_context(backend_ca_file), None, backend_ca_file, False)

    def bare_context() -> ssl.SSLContext:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    def forget() -> None:
        resolver.cache.discard(subject)

    steps: list[tuple[str, str, Callable[[Any], object], Callable[[], Any], int]] = [
        (
            "validate_jwt_es256",
            "validate_jwt, ES256 token (P-256 IdP key)",
            lambda _: validate_jwt(es_token, trust, now=time.time()),
            _nothing,
            runs,
        ),
        (
            "validate_jwt_rs256",
            "validate_jwt, RS256 token (RSA 2048 IdP key)",
            lambda _: validate_jwt(rs_token, trust, now=time.time()),
            _nothing,
            runs,
        ),
        (
            "subject_rules",
            f"subject rules, one rule {PATTERN}",
            lambda _: rules.subject_for(claims),
            _nothing,
            runs,
        ),
        (
            "issue_ec_p256",
            "UserCertificateAuthority.issue, EC P-256 key",
            lambda _: authority.issue(subject, now=_utc_now(), validity=validity),
            _nothing,
            runs,
        ),
        (
            "issue_rsa_2048",
            "UserCertificateAuthority.issue, RSA 2048 key",
            lambda _: authority.issue(
                subject, now=_utc_now(), validity=validity, key_type=KeyType.RSA_2048
            ),
            _nothing,
            slow_runs,
        ),
        (
            "cache_hit",
            "UserCertificateCache.get, hit",
            lambda _: cache.get(subject),
            _nothing,
            runs,
        ),
        (
            "resolve_hit",
            "PrincipalResolver.resolve, certificate cached (ES256)",
            lambda _: resolver.resolve(session),
            _nothing,
            runs,
        ),
        (
            "resolve_miss",
            "PrincipalResolver.resolve, not cached: issues EC P-256",
            lambda _: resolver.resolve(session),
            forget,
            runs,
        ),
        (
            "client_context",
            "verifying_client_context(ca_file), per stream",
            lambda _: verifying_client_context(backend_ca_file),
            _nothing,
            runs,
        ),
        (
            "load_into_ec",
            "UserCertificate.load_into, EC P-256",
            ec_user.load_into,
            bare_context,
            runs,
        ),
        (
            "load_into_rsa",
            "UserCertificate.load_into, RSA 2048",
            rsa_user.load_into,
            bare_context,
            runs,
        ),
        (
            "context_with_ec",
            "BackendTls.context_with, EC P-256 (the two above)",
            lambda _: tls.context_with(ec_user),
            _nothing,
            runs,
        ),
        (
            "der_base64",
            "UserCertificate.der_base64, per request in header mode",
            lambda _: ec_user.der_base64(),
            _nothing,
            runs,
        ),
    ]
    results: dict[str, Any] = {}
    for key, label, action, prepare, count in steps:
        results[key] = {"label": label, **timed(action, count, prepare)}
        row = results[key]
        progress(
            f"  {label}: median {row['median_us']:.1f} µs, p99 {row['p99_us']:.1f} µs "
            f"(N={row['runs']})"
        )
    return {"runs": runs, "slow_runs": slow_runs, "clock": "time.perf_counter_ns", "steps": results}


# --------------------------------------------------------------------------- nginx


@dataclass(frozen=True)
class Pki:
    """nginx's server certificate (from ``backend_ca``); the connector's CA (``client_ca``),
    which issues both its system certificate and, for principal propagation, user certificates
    (so nginx trusts both through one ``ssl_client_certificate``)."""

    backend_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_ca_key: Path
    system_cert: Path
    system_key: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        """Write the CAs and certificates into ``directory``."""
        backend = CertificateAuthority.create("bench backend CA")
        client = CertificateAuthority.create("bench connector CA")
        backend_ca, _ = backend.save(directory, name="backend-ca")
        client_ca, client_ca_key = client.save(directory, name="client-ca")
        hosts = ["127.0.0.1", "localhost"]
        server_cert, server_key = backend.issue_server_certificate(hosts).save(directory, "nginx")
        system_cert, system_key = client.issue_client_certificate(SYSTEM_CN).save(
            directory, "connector"
        )
        return cls(
            backend_ca, server_cert, server_key, client_ca, client_ca_key, system_cert, system_key
        )


def _nginx_conf(folder: Path, port: int, pki: Pki) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# written by python -m bench (identity scenario)
daemon off;
master_process off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
{temp}
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki.server_cert};
        ssl_certificate_key {pki.server_key};
        ssl_client_certificate {pki.client_ca};
        ssl_verify_client on;
        location / {{
            default_type text/plain;
            add_header X-Client-DN $ssl_client_s_dn always;
            return 200 "{SMALL_BODY}\\n";
        }}
    }}
}}
"""


def start_nginx(work: WorkDir, pki: Pki, timeout: float = 15.0) -> tuple[Proc, int]:
    """nginx in the foreground, one process; returns it and its port (a second try with
    another port if something took the first one meanwhile)."""
    executable = shutil.which("nginx")
    if executable is None:
        raise BenchError("nginx is not installed; the identity scenario needs it as mTLS backend")
    folder = work.path / "nginx"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        (port,) = free_ports(1)
        conf = folder / "nginx.conf"
        conf.write_text(_nginx_conf(folder, port, pki))
        argv = [executable, "-p", f"{folder}/", "-c", str(conf), "-e", str(folder / "error.log")]
        proc = spawn("nginx", argv, work.path / "nginx.log")
        try:
            wait_listening(proc, port, time.monotonic() + timeout)
        except BenchError:
            proc.stop()
            if attempt:
                raise
            continue
        return proc, port
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- end to end


def _gateway_extra(idp_pem: Path) -> str:
    return (
        f"\n[[subaccounts.{SUBACCOUNT}.identity_providers]]\n"
        f'name = "bench-idp"\nissuer = {toml_value(ISSUER)}\naudiences = ["{AUDIENCE}"]\n'
        f'public_key_file = {toml_value(str(idp_pem))}\nkid = "k1"\n'
    )


def _connector_extra(pki: Pki, nginx_port: int) -> str:
    text = ""
    for mode in MODES:
        system = (
            f"client_cert = {toml_value(str(pki.system_cert))}\n"
            f"client_key = {toml_value(str(pki.system_key))}\n"
            if mode != "certificate"
            else ""
        )
        text += (
            f"\n[[subaccounts.{SUBACCOUNT}.mappings]]\n"
            f'virtual = "{VIRTUAL[mode]}:{VIRTUAL_PORT}"\ninternal = "127.0.0.1:{nginx_port}"\n'
            f'protocol = "https"\nca_file = {toml_value(str(pki.backend_ca))}\n{system}'
            f'principal_propagation = "{"none" if mode == "basic" else mode}"\n'
            f'\n[[subaccounts.{SUBACCOUNT}.mappings.resources]]\npath = "/"\nmatch = "prefix"\n'
        )
    return text + (
        f"\n[principal_propagation]\nca_cert = {toml_value(str(pki.client_ca))}\n"
        f"ca_key = {toml_value(str(pki.client_ca_key))}\ncertificate_validity = 600\n"
        f"\n[[principal_propagation.subject_rules]]\npattern = {toml_value(PATTERN)}\n"
    )


class IdentityRun:
    """The running set-up: gateway, connector, nginx, and the header file of each mode."""

    def __init__(
        self,
        work: WorkDir,
        pair: Pair,
        nginx: Proc,
        header_files: dict[str, Path],
        progress: Callable[[str], None],
    ) -> None:
        assert pair.addresses.http_proxy is not None, "the pair was started without the proxy"
        self.work = work
        self.pair = pair
        self.nginx = nginx
        self.proxy_port = pair.addresses.http_proxy
        self.header_files = header_files
        self.progress = progress
        meter = CpuMeter({"gateway": pair.gateway, "connector": pair.connector, "backend": nginx})
        self.loop = ClosedLoop("identity", work, pair, meter, self._load_argv)

    def _load_argv(self, path: str, connections: int, out: Path) -> list[str]:
        mode, _, connection = path.partition("/")
        argv = [
            sys.executable,
            "-m",
            "bench.http_load",
            "--connections",
            str(connections),
            "--path",
            SMALL_PATH,
            "--latencies-out",
            str(out),
            "--port",
            str(self.proxy_port),
            "--proxy-target",
            f"{VIRTUAL[mode]}:{VIRTUAL_PORT}",
            "--credentials-prefix",
            f"{SUBACCOUNT}/{APP}",
            "--secret-file",
            str(self.work.path / "app.secret"),
            "--header-file",
            str(self.header_files[mode]),
        ]
        return [*argv, "--new-connection"] if connection == "new" else argv

    def get(self, mode: str) -> tuple[int, str, str]:
        """One GET through the proxy: status, X-Client-DN and body."""
        headers = {"Host": f"{VIRTUAL[mode]}:{VIRTUAL_PORT}"}
        secret = (self.work.path / "app.secret").read_text().strip()
        credentials = base64.b64encode(f"{SUBACCOUNT}/{APP}:{secret}".encode()).decode()
        headers["Proxy-Authorization"] = f"Basic {credentials}"
        for line in self.header_files[mode].read_text().splitlines():
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy_port, timeout=10)
        try:
            connection.request("GET", f"http://{headers['Host']}{SMALL_PATH}", headers=headers)
            response = connection.getresponse()
            body = response.read().decode(errors="replace")
            return response.status, response.getheader("X-Client-DN") or "", body
        finally:
            connection.close()

    def check(self, timeout: float = 15.0) -> None:
        """Every mode answers 200 with the client certificate it should use (retried while the
        connector waits for the gateway's trust list)."""
        deadline = time.monotonic() + timeout
        for mode in MODES:
            while True:
                self.pair.check_alive(f"identity check ({mode})")
                try:
                    status, dn, body = self.get(mode)
                except OSError as exc:
                    status, dn, body = 0, "", str(exc)
                if status == 200 and dn == EXPECTED_DN[mode]:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"identity {mode}: expected 200 with X-Client-DN {EXPECTED_DN[mode]!r}, "
                        f"got {status} {dn!r}: {body[:300]}\nconnector log:\n"
                        f"{self.pair.connector.log_tail()}"
                    )
                time.sleep(0.2)

    def case(
        self,
        mode: str,
        connection: str,
        concurrency: int,
        *,
        processes: int,
        warm_up: float,
        seconds: float,
    ) -> dict[str, Any]:
        """One measured window of closed-loop GET /small."""
        self.pair.check_alive(f"identity {mode} {connection} c={concurrency}")
        self.nginx.check_alive(f"identity {mode} {connection} c={concurrency}")
        window = self.loop.measure(
            f"{mode}/{connection}",
            concurrency,
            processes=processes,
            warm_up=warm_up,
            seconds=seconds,
            ready_within=20,
            ready_what="that its connections are open",
        )
        requests = window.completed(
            failed="failed requests/connections", nothing="no response in the measured window"
        )
        counts = {
            "mode": mode,
            "connection": connection,
            "requests": requests,
            "warm_up_requests": window.warm_up_completed(),
            "req_per_s": round(requests / seconds, 1),
            "latency_ms": latency_summary(window.latencies),
        }
        return window.case_json(counts, "cpu_us_per_request", "backend")


def _summary(cases: list[dict[str, Any]], concurrencies: Sequence[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for connection in CONNECTIONS:
        for concurrency in concurrencies:
            row: dict[str, Any] = {}
            for mode in MODES:
                group = [
                    c
                    for c in cases
                    if (c["mode"], c["connection"], c["concurrency"])
                    == (mode, connection, concurrency)
                ]
                row[mode] = {
                    "req_per_s": spread(c["req_per_s"] for c in group),
                    "latency_ms_median": {
                        key: median(c["latency_ms"][key] for c in group)
                        for key in ("p50", "p99", "mean")
                    },
                    "cpu_us_per_request_median": {
                        key: median(c["cpu_us_per_request"][key] for c in group)
                        for key in ("gateway", "connector", "backend", "client")
                    },
                    "other_cpu_percent_median": median(c["cpu_percent"]["other"] for c in group),
                }
            basic = row["basic"]["req_per_s"]["median"]
            row["ratio_to_basic"] = {
                mode: round(row[mode]["req_per_s"]["median"] / basic, 3) for mode in MODES[1:]
            }
            summary[f"{connection} c={concurrency}"] = row
    return summary


def run_identity(
    work: WorkDir,
    tcp_ports: dict[str, int],
    *,
    tunnel: dict[str, Any],
    log_level: str,
    repeat: int,
    seconds: float,
    warm_up: float,
    concurrencies: Sequence[int],
    processes: int,
    micro_runs: int,
    slow_runs: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """In-process costs, then every mode x connection x concurrency, ``repeat`` times."""
    progress(f"bench: identity: in-process costs (N={micro_runs}, RSA key generation {slow_runs})")
    micro = measure_micro(micro_runs, slow_runs, work.path / "identity-micro", progress)
    pki = Pki.create(work.path / "identity-pki")
    idp = Idp.create("ES256")
    idp_pem = work.path / "idp.pem"
    idp_pem.write_bytes(idp.public_pem())
    header_files = {mode: work.path / f"identity-{mode}.headers" for mode in MODES}
    password = base64.b64encode(f"{USER}:not-checked-by-nginx".encode()).decode()
    header_files["basic"].write_text(f"Authorization: Basic {password}\n")
    bearer = f"SAP-Connectivity-Authentication: Bearer {idp.token()}\n"
    for mode in MODES[1:]:
        header_files[mode].write_text(bearer)
    progress("bench: identity: starting nginx, gateway and connector")
    nginx, nginx_port = start_nginx(work, pki)
    cases: list[dict[str, Any]] = []
    try:
        pair = start_pair(
            work,
            tcp_ports,
            label="identity",
            tunnel=tunnel,
            log_level=log_level,
            http_proxy=True,
            gateway_extra=_gateway_extra(idp_pem),
            connector_extra=_connector_extra(pki, nginx_port),
        )
        try:
            run = IdentityRun(work, pair, nginx, header_files, progress)
            run.check()
            for index in range(repeat):
                for connection in CONNECTIONS:
                    for concurrency in concurrencies:
                        for mode in MODES:
                            case = run.case(
                                mode,
                                connection,
                                concurrency,
                                processes=processes,
                                warm_up=warm_up,
                                seconds=seconds,
                            )
                            case["repeat"] = index + 1
                            cases.append(case)
                            latency, cost = case["latency_ms"], case["cpu_us_per_request"]
                            progress(
                                f"  identity {connection:10} c={concurrency:<2} {mode:11} run "
                                f"{index + 1}/{repeat}: {case['req_per_s']:7.0f} req/s  p50 "
                                f"{latency['p50']:.3f} p99 {latency['p99']:.3f} ms  CPU µs/req "
                                f"gw {cost['gateway']:.0f} conn {cost['connector']:.0f} "
                                f"nginx {cost['backend']:.0f}"
                            )
        finally:
            pair.stop()
    finally:
        nginx.stop()
    return {
        "micro": micro,
        "backend": "nginx, one process, mTLS (ssl_verify_client on), 1 KiB answer",
        "client": "bench.http_load (closed loop; --new-connection for 'new')",
        "request": f"GET {SMALL_PATH} (1 KiB body)",
        "modes": list(MODES),
        "connections": list(CONNECTIONS),
        "concurrencies": list(concurrencies),
        "client_processes": processes,
        "warm_up_seconds": warm_up,
        "seconds": seconds,
        "repeat": repeat,
        "summary": _summary(cases, concurrencies),
        "cases": cases,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the in-process costs (and optionally write them as JSON)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.identity",
        description="In-process cost of each principal propagation step (the end-to-end part "
        "runs with: python -m bench --only identity).",
    )
    parser.add_argument("--quick", action="store_true", help="200 calls per step, RSA 10")
    parser.add_argument("--runs", type=int, help="calls per step (default 1000; quick 200)")
    parser.add_argument(
        "--slow-runs", type=int, help="calls for RSA key generation (default 50; quick 10)"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    runs = args.runs or (200 if args.quick else 1000)
    slow_runs = args.slow_runs or (10 if args.quick else 50)
    if min(runs, slow_runs) < 1:
        parser.error("--runs and --slow-runs must be positive")
    machine = machine_info()
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), Python {machine['python']}")
    with tempfile.TemporaryDirectory(prefix="backchannel-bench-identity-") as folder:
        micro = measure_micro(runs, slow_runs, Path(folder), lambda line: None)
    print("\n".join(identity_micro_lines(micro)))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "micro": micro}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
