"""The RFC plugin's part of ``backchannel demo``: a stub ABAP system behind an ``rfc`` mapping,
the RFC front door and JSON endpoint with a destination, and three self-checks."""

from __future__ import annotations

import base64
import datetime
import json
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from backchannel import DemoContext, DemoStep, UserCertificateAuthority

from ._connection import Connection
from ._demo_data import demo_system
from ._errors import ExternalAuthorizationError
from ._front_door import RfcFrontDoor
from ._json_endpoint import RfcJsonEndpoint
from ._stub_server import serve_stub

DESTINATION = "ERP"
VIRTUAL = "erp.virtual:3300"
#: DEMO's password in the stub system's demo data.
DEMO_PASSWORD = "welcome"  # noqa: S105 (public demo data, like the stub system's users)

GATEWAY_TOML = """
# RFC: the front door for pyrfc-compatible clients, the JSON endpoint, one destination.
[plugins.rfc]
listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"

[[plugins.rfc.destinations]]
name = "{destination}"
subaccount = "demo"
ashost = "erp.virtual"
sysnr = "00"
client = "100"
authentication = "BasicAuthentication"
user = "DEMO"
password_file = "{work_dir}/erp.password"

# Principal propagation: the identity provider whose users' tokens the connector may act on.
[[subaccounts.demo.identity_providers]]
name = "demo-idp"
issuer = "{issuer}"
audiences = ["{audience}"]
public_key_file = "{work_dir}/idp.pem"
kid = "demo"
"""

CONNECTOR_TOML = """
[[subaccounts.demo.mappings]]
virtual = "{virtual}"
internal = "127.0.0.1:{abap_port}"
protocol = "rfc"
description = "the stub ABAP system; only these function modules are open"

[[subaccounts.demo.mappings.functions]]
name = "STFC_CONNECTION"

[[subaccounts.demo.mappings.functions]]
name = "RFC_PING"

[[subaccounts.demo.mappings.functions]]
name = "RFC_READ_TABLE"

# The same system for single sign-on: the connector logs the cloud user on with a short-lived
# certificate from its own CA (the stub system trusts that CA and maps CN=alice,O=Example to
# ALICE, as STRUST and VUSREXTID do on a real one).
[[subaccounts.demo.mappings]]
virtual = "{sso_virtual}"
internal = "127.0.0.1:{abap_port}"
protocol = "rfc"
principal_propagation = true
description = "the stub ABAP system, logging on as the cloud user"

[[subaccounts.demo.mappings.functions]]
name = "STFC_CONNECTION"

[principal_propagation]
ca_cert = "{work_dir}/pp-ca/ca.pem"
ca_key = "{work_dir}/pp-ca/ca.key"

[[principal_propagation.subject_rules]]
pattern = "CN=${{name}},O=Example"

[plugins.rfc]
backend = "auto"    # SAP's pyrfc if installed, else the stub client
"""
ISSUER = "https://idp.demo.invalid"
AUDIENCE = "backchannel-demo"
SSO_VIRTUAL = "erp-sso.virtual:3300"


class RfcDemoPart:
    """See the module docstring."""

    name = "stub ABAP system"

    def __init__(self) -> None:
        self.abap_port = 0
        #: The demo identity provider's signing key (it mints the demo user's token).
        self.idp_key = ec.generate_private_key(ec.SECP256R1())

    async def start(self, nursery: trio.Nursery, work_dir: Path) -> None:
        """Start the stub ABAP system (demo data, real clock); write the password file, the
        IdP's public key and the connector's principal propagation CA."""
        authority = UserCertificateAuthority.create("backchannel demo principal propagation CA")
        authority.save(work_dir / "pp-ca")
        system = demo_system(now=datetime.datetime.now)
        system.trust_certificate_authority(authority.certificate)
        self.abap_port = await nursery.start(serve_stub, system, "127.0.0.1", 0)
        password = work_dir / "erp.password"
        password.write_text(DEMO_PASSWORD)
        password.chmod(0o600)
        (work_dir / "idp.pem").write_bytes(
            self.idp_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def gateway_toml(self, work_dir: Path) -> str:
        """The RFC front door, JSON endpoint, destination ERP and the demo IdP."""
        return GATEWAY_TOML.format(
            destination=DESTINATION, work_dir=work_dir, issuer=ISSUER, audience=AUDIENCE
        )

    def connector_toml(self, work_dir: Path) -> str:
        """The rfc mappings to the stub system (password and single sign-on)."""
        port = str(self.abap_port) if self.abap_port else "<stub port>"
        return CONNECTOR_TOML.format(
            virtual=VIRTUAL, sso_virtual=SSO_VIRTUAL, abap_port=port, work_dir=work_dir
        )

    def user_token(self, user: str) -> str:
        """A token the demo IdP issues for ``user`` (five minutes)."""
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, "user_name": user}
        return jwt.encode(claims, self.idp_key, algorithm="ES256", headers={"kid": "demo"})

    def steps(self, demo: DemoContext) -> Sequence[DemoStep]:
        """pyrfc client, JSON endpoint, a denied function."""
        front_door = demo.front_door(RfcFrontDoor.name)
        endpoint = demo.front_door(RfcJsonEndpoint.name)
        params = {
            "gateway": str(front_door),
            "app": demo.app_user,
            "app_secret": demo.app_secret,
            "dest": DESTINATION,
        }

        async def pyrfc_call() -> str:
            def call() -> dict[str, object]:
                with Connection(None, **params) as connection:
                    result: dict[str, object] = connection.call("STFC_CONNECTION", REQUTEXT="hello")
                    return result

            result = await trio.to_thread.run_sync(call)
            if result["ECHOTEXT"] != "hello" or "/DEMO/" not in str(result["RESPTEXT"]):
                raise OSError(f"unexpected result {result}")
            system = str(result["RESPTEXT"]).split("   Logon_Data")[0].strip()
            return (
                f"STFC_CONNECTION via the RFC front door {front_door} (destination "
                f"{DESTINATION}) → {VIRTUAL}: {system}"
            )

        async def json_call() -> str:
            url = f"http://{endpoint}/rfc/{DESTINATION}/STFC_CONNECTION"
            credentials = base64.b64encode(f"{demo.app_user}:{demo.app_secret}".encode())
            request = urllib.request.Request(
                url,
                data=json.dumps({"REQUTEXT": "hello"}).encode(),
                headers={
                    "Content-Type": "application/json",
                    "Authorization": "Basic " + credentials.decode(),
                },
            )

            def post() -> dict[str, object]:
                try:
                    # An http:// URL built from the endpoint's bound address: no other scheme.
                    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                        answer: dict[str, object] = json.loads(response.read())
                        return answer
                except urllib.error.HTTPError as exc:
                    with exc:
                        body = exc.read().decode("utf-8", "replace")
                    raise OSError(f"{exc.code} {exc.reason}: {body[:300]}") from None

            result = await trio.to_thread.run_sync(post)
            if result.get("ECHOTEXT") != "hello":
                raise OSError(f"unexpected answer {result}")
            return f"POST {url} answered 200 with ECHOTEXT and RESPTEXT as JSON"

        async def denied() -> str:
            def call() -> str:
                with Connection(None, **params) as connection:
                    try:
                        connection.call("BAPI_USER_GET_DETAIL", USERNAME="DEMO")
                    except ExternalAuthorizationError as exc:
                        return str(exc.message)
                raise OSError("a function without a rule was callable")

            denials = demo.connector.audit.denials
            message = await trio.to_thread.run_sync(call)
            if demo.connector.audit.denials == denials:
                raise OSError("refused, but the connector wrote no audit line")
            return f"BAPI_USER_GET_DETAIL refused (ExternalAuthorizationError): {message}"

        async def single_sign_on() -> str:
            # The gateway sent the trust list before any stream frame on this tunnel, so the
            # earlier steps' answers mean the connector has it.
            host, _, port = SSO_VIRTUAL.partition(":")
            sso = {
                "gateway": str(front_door),
                "app": demo.app_user,
                "app_secret": demo.app_secret,
                "ashost": host,
                "sysnr": port[-2:],
                "client": "100",
                "token": self.user_token("alice"),
            }

            def call() -> str:
                with Connection(None, **sso) as connection:
                    result = connection.call("STFC_CONNECTION", REQUTEXT="who am I?")
                    return str(result["RESPTEXT"])

            resptext = await trio.to_thread.run_sync(call)
            if "/ALICE/" not in resptext:
                raise OSError(f"expected the backend to log on ALICE, got {resptext!r}")
            return (
                f"alice's token → certificate CN=alice,O=Example → {SSO_VIRTUAL} logged on "
                f"{resptext.split('Logon_Data: ')[-1]} (client/user/language), no password"
            )

        return [
            ("rfc via the pyrfc-compatible client", pyrfc_call),
            ("rfc via the JSON endpoint", json_call),
            ("rfc access control", denied),
            ("rfc with principal propagation", single_sign_on),
        ]

    def try_it(self, demo: DemoContext) -> Sequence[tuple[str, str]]:
        """A Python one-liner with the pyrfc API, and curl against the JSON endpoint."""
        front_door = demo.front_door(RfcFrontDoor.name)
        endpoint = demo.front_door(RfcJsonEndpoint.name)
        secret = shlex.quote(demo.app_secret)
        script = (
            "from backchannel_rfc import Connection; "
            f"c = Connection(gateway='{front_door}', app='{demo.app_user}', dest='{DESTINATION}'); "
            "print(c.call('STFC_CONNECTION', REQUTEXT='hi'))"
        )
        credentials = shlex.quote(f"{demo.app_user}:{demo.app_secret}")
        return [
            (
                f"BACKCHANNEL_RFC_APP_SECRET={secret} python -c {shlex.quote(script)}",
                "RFC with the pyrfc API",
            ),
            (
                f"curl --user {credentials} -H 'Content-Type: application/json' "
                f'-d \'{{"REQUTEXT": "hi"}}\' http://{endpoint}/rfc/{DESTINATION}/STFC_CONNECTION',
                "RFC via the JSON endpoint",
            ),
        ]
