"""What registered connectors cost: registration, tunnel set-up with a certificate vs the
shared token, renewal, and the gateway's per-tunnel certificate check.

``python -m bench.registration [--runs N]`` runs a gateway (with ``[registration]``) in this
process on 127.0.0.1 and times, as wall time per operation (median and p90 over N runs after
2 unmeasured ones):

- ``register``: a whole ``backchannel register`` exchange: new P-256 key and request, TCP, TLS,
  WebSocket upgrade on ``/tunnel/register``, token check, signing, records written, answer;
- ``tunnel up (token)`` and ``tunnel up (certificate)``: ``dial_gateway`` to the gateway's HELLO
  for the same subaccount, once with the shared token and once with mutual TLS (the gateway's
  handshake then also verifies the client certificate and checks expiry and revocation);
- ``renewal``: a ``renew`` CONTROL round trip over a live tunnel (key, request, signing, answer);
- ``refusal check``: ``ConnectorAuthority.refusal`` for one certificate (what the revocation
  watcher does per tunnel and round) with 1000 revoked serials on the list.

Client and gateway share one process and one core, so the set-up figures include both sides'
CPU. Nothing here is compared against a peer: these are the costs that the registration
feature adds, reported next to the token path they replace.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from backchannel import GatewayConfig, open_gateway
from backchannel._connector_certificate import (
    load_credential,
    register,
    store_credential,
    tunnel_ssl_context,
)
from backchannel._connector_identity import ConnectorIdentity
from backchannel._connector_renewal import CertificateKeeper
from backchannel._pki import CertificateAuthority, write_throwaway_tls_material
from backchannel._registration import ConnectorAuthority, utc_now
from backchannel._transport import GatewayAddress, client_ssl_context, dial_gateway
from backchannel._tunnel import Tunnel, TunnelSettings
from backchannel._version import __version__

TOKEN = "bench-connector-token-0123456789"  # noqa: S105  (a throwaway for the bench)
ACME = ConnectorIdentity("acme", "")


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "runs": len(ordered),
    }


async def _timed(action: Callable[[], Awaitable[object]], runs: int) -> dict[str, float]:
    for _ in range(2):
        await action()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - started)
    return _summary(samples)


def _gateway_document(folder: Path) -> dict[str, Any]:
    tls = write_throwaway_tls_material(folder / "tls")
    CertificateAuthority.create("bench connector CA").save(folder / "ca", name="connector-ca")
    return {
        "gateway": {
            "listen": "127.0.0.1:0",
            "tls_cert": str(tls.cert_file),
            "tls_key": str(tls.key_file),
        },
        "registration": {
            "ca_cert": str(folder / "ca" / "connector-ca.pem"),
            "ca_key": str(folder / "ca" / "connector-ca.key"),
            "state_dir": str(folder / "state"),
        },
        "subaccounts": {"acme": {"connector_token": TOKEN}},
    }


async def run(runs: int) -> dict[str, dict[str, float]]:
    """Every measurement, by name."""
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-registration-") as temporary:
        folder = Path(temporary)
        config = GatewayConfig.from_mapping(_gateway_document(folder), base_dir=folder)
        async with open_gateway(config) as gateway:
            authority = gateway.authority
            assert authority is not None
            assert gateway.tunnel_address is not None
            address = GatewayAddress("127.0.0.1", gateway.tunnel_address.port, "/tunnel")
            ca_file = folder / "tls" / "ca.pem"
            plain = client_ssl_context(ca_file)
            credential_file = folder / "connector.pem"

            async def registration() -> None:
                token = authority.mint_token(ACME, datetime.timedelta(minutes=5))
                key, certificate = await register(
                    address, ACME, token, ssl_context=plain, proxy=None, answer_within=30
                )
                store_credential(credential_file, key, certificate)

            results["register"] = await _timed(registration, runs)
            mutual = tunnel_ssl_context(ca_file, load_credential(credential_file, ACME))
            hello: dict[str, Any] = {"role": "connector", "subaccount": "acme", "location": ""}
            hello["software"] = f"backchannel {__version__}"

            async def tunnel_up(context: Any, with_token: bool) -> None:
                async with trio.open_nursery() as nursery:
                    message = {**hello, "token": TOKEN} if with_token else hello
                    transport, _mux, _info = await dial_gateway(
                        nursery,
                        address,
                        ssl_context=context,
                        proxy=None,
                        hello=dict(message),
                        settings=TunnelSettings(),
                    )
                    await transport.aclose()
                    nursery.cancel_scope.cancel()

            samples: dict[str, list[float]] = {"token": [], "certificate": []}
            for _ in range(2):  # warm-up
                await tunnel_up(plain, True)
                await tunnel_up(mutual, False)
            for _ in range(runs):  # alternating, so that drift hits both alike
                for name, context, with_token in (
                    ("token", plain, True),
                    ("certificate", mutual, False),
                ):
                    started = time.perf_counter()
                    await tunnel_up(context, with_token)
                    samples[name].append(time.perf_counter() - started)
            for name, values in samples.items():
                results[f"tunnel up ({name})"] = _summary(values)
            results["renewal"] = await _renewal(
                authority, address, mutual, hello, credential_file, runs
            )
            authority.state.revoke(
                [f"{n:x}" for n in range(1, 1001)], reason="bench", now=utc_now()
            )
            certificate = load_credential(credential_file, ACME).certificate
            checks = []
            for _ in range(runs * 10):
                started = time.perf_counter()
                assert authority.refusal(certificate) is None
                checks.append(time.perf_counter() - started)
            results["refusal check"] = _summary(checks)
    return results


async def _renewal(
    authority: ConnectorAuthority,
    address: GatewayAddress,
    context: Any,
    hello: dict[str, Any],
    credential_file: Path,
    runs: int,
) -> dict[str, float]:
    """Renew over one live tunnel; before each renewal both clocks move 25 days on (into the
    renewal window of the certificate in force)."""
    offset = [datetime.timedelta(0)]

    def clock() -> datetime.datetime:
        return utc_now() + offset[0]

    authority._clock = clock

    from backchannel import AuditLog, Role

    keeper = CertificateKeeper(
        ACME, credential_file, renew_before=None, clock=clock, audit=AuditLog(Role.CONNECTOR)
    )
    async with trio.open_nursery() as nursery:
        transport, mux, info = await dial_gateway(
            nursery, address, ssl_context=context, proxy=None, hello=dict(hello),
            settings=TunnelSettings(),
        )  # fmt: skip
        tunnel = Tunnel(
            transport, mux, settings=TunnelSettings(), peer_info=info, label="bench",
            control_handler=keeper.on_control,
        )  # fmt: skip
        nursery.start_soon(tunnel.run)
        samples = []
        for _ in range(runs):
            offset[0] += datetime.timedelta(days=25)
            credential = load_credential(credential_file, ACME)
            started = time.perf_counter()
            await keeper._renew(tunnel, credential)
            samples.append(time.perf_counter() - started)
        nursery.cancel_scope.cancel()
    return _summary(samples)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.registration")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    results = trio.run(run, args.runs)
    print(f"backchannel {__version__}, {args.runs} runs per measurement, one process")
    for name, figures in results.items():
        shown = ", ".join(f"{key} {value:.2f}" for key, value in figures.items())
        print(f"  {name:<26} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
