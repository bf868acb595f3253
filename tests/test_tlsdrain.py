"""DrainingReceive hands over every decryptable TLS record at once, bytes intact, EOF kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio
import trio.testing

from backchannel._pki import write_throwaway_tls_material
from backchannel._tlsdrain import DrainingReceive
from backchannel._transport import client_ssl_context, server_ssl_context

Pair = tuple[
    trio.SSLStream[trio.StapledStream[Any, Any]], trio.SSLStream[trio.StapledStream[Any, Any]]
]


async def _tls_pair(folder: Path) -> Pair:
    material = write_throwaway_tls_material(folder)
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(
        client_raw, client_ssl_context(material.ca_file), server_hostname="localhost"
    )
    server = trio.SSLStream(
        server_raw,
        server_ssl_context(material.cert_file, material.key_file),
        server_side=True,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def test_reads_span_records_and_keep_the_bytes(tmp_path: Path) -> None:
    client, server = await _tls_pair(tmp_path / "tls")
    payload = os.urandom(300_000)
    received = bytearray()
    sizes: list[int] = []
    draining = DrainingReceive(server)

    async def read_all() -> None:
        while len(received) < len(payload):
            chunk = await draining.receive_some(256 * 1024)
            assert chunk
            sizes.append(len(chunk))
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await client.send_all(payload)
    assert bytes(received) == payload
    assert max(sizes) > 16 * 1024  # more than one record per call
    assert all(size <= 256 * 1024 for size in sizes)


async def test_eof_after_data_and_pass_through_sends(tmp_path: Path) -> None:
    client, server = await _tls_pair(tmp_path / "tls")
    draining = DrainingReceive(server)
    await draining.send_all(b"ping")
    assert await client.receive_some(10) == b"ping"
    await client.send_all(b"x" * 40_000)
    await client.aclose()  # close_notify right behind the data
    received = b""
    while chunk := await draining.receive_some(65536):
        received += chunk
    assert received == b"x" * 40_000
    await draining.aclose()
