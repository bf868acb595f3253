"""The RFC plugin's part of ``backchannel demo``: a stub ABAP system behind an ``rfc`` mapping,
the RFC front door and JSON endpoint with a destination, and three self-checks."""

from __future__ import annotations

import base64
import datetime
import json
import shlex
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import trio

from backchannel import DemoContext, DemoStep

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

[plugins.rfc]
backend = "auto"    # SAP's pyrfc if installed, else the stub client
"""


class RfcDemoPart:
    """See the module docstring."""

    name = "stub ABAP system"

    def __init__(self) -> None:
        self.abap_port = 0

    async def start(self, nursery: trio.Nursery, work_dir: Path) -> None:
        """Start the stub ABAP system (demo data, real clock) and write the password file."""
        system = demo_system(now=datetime.datetime.now)
        self.abap_port = await nursery.start(serve_stub, system, "127.0.0.1", 0)
        password = work_dir / "erp.password"
        password.write_text(DEMO_PASSWORD)
        password.chmod(0o600)

    def gateway_toml(self, work_dir: Path) -> str:
        """The RFC front door, JSON endpoint and destination ERP."""
        return GATEWAY_TOML.format(destination=DESTINATION, work_dir=work_dir)

    def connector_toml(self, work_dir: Path) -> str:
        """The rfc mapping to the stub system, with three function rules."""
        port = str(self.abap_port) if self.abap_port else "<stub port>"
        return CONNECTOR_TOML.format(virtual=VIRTUAL, abap_port=port)

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

        return [
            ("rfc via the pyrfc-compatible client", pyrfc_call),
            ("rfc via the JSON endpoint", json_call),
            ("rfc access control", denied),
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
