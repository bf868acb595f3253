"""One tenant's flood does not starve another tenant: while acme's app pushes data through 16
streams as fast as it can, globex's app (its own tunnel, same gateway and connector process)
still gets every round trip answered, and acme's flood is still running when globex is done."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.harness import echo_server, receive_exactly, socks_connect
from tests.test_security_claims import GLOBEX_SECRET, two_tenants

FLOOD_STREAMS = 16
CHUNK = b"f" * 65536
ROUND_TRIPS = 20


async def test_a_flooding_tenant_does_not_starve_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with echo_server() as port, two_tenants(tmp_path, port, monkeypatch) as tenants:
        flooded = [0]
        under_way = trio.Event()
        stop = trio.Event()

        async def flood() -> None:
            stream = await socks_connect(tenants.socks, "acme-db.virtual", 7)
            async with stream, trio.open_nursery() as nursery:

                async def drain() -> None:
                    while await stream.receive_some(65536):
                        pass

                nursery.start_soon(drain)
                while not stop.is_set():
                    await stream.send_all(CHUNK)
                    flooded[0] += len(CHUNK)
                    if flooded[0] >= FLOOD_STREAMS * len(CHUNK):
                        under_way.set()
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for _ in range(FLOOD_STREAMS):
                nursery.start_soon(flood)
            with trio.fail_after(30):
                await under_way.wait()
                before = flooded[0]
                globex = await socks_connect(
                    tenants.socks,
                    "globex-db.virtual",
                    7,
                    user="globex/erp/plant-2",
                    password=GLOBEX_SECRET,
                )
                async with globex:
                    for index in range(ROUND_TRIPS):
                        message = f"round trip {index:02d}".encode()
                        await globex.send_all(message)
                        assert await receive_exactly(globex, len(message)) == message
            # acme kept flooding all along (globex was not served by stopping it).
            assert flooded[0] > before
            stop.set()
