"""Bulk transfer: 256 MiB through one SOCKS5 stream arrive intact (sha256 on both ends)."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.harness import running_pair, socks_connect

TOTAL = 256 * 1024 * 1024
CHUNK = 1024 * 1024


def seeded_chunks(seed: int, total: int = TOTAL, size: int = CHUNK) -> Iterator[bytes]:
    """Reproducible, distinct chunks without generating 256 MiB of randomness: one random
    block, rotated by a seeded offset and stamped with its index for each chunk (so a lost,
    repeated or reordered chunk changes the hash)."""
    generator = random.Random(seed)
    block = generator.randbytes(size)
    for index in range(total // size):
        offset = generator.randrange(size)
        rotated = block[offset:] + block[:offset]
        yield index.to_bytes(8, "big") + rotated[8:]


class HashingSink:
    """Backend: hashes everything until EOF, then answers with the count and the digest."""

    def __init__(self) -> None:
        self.received = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        digest = hashlib.sha256()
        async with stream:
            while data := await stream.receive_some(CHUNK):
                digest.update(data)
                self.received += len(data)
            await stream.send_all(f"{self.received} {digest.hexdigest()}\n".encode())


@pytest.mark.slow
async def test_256_mib_through_one_socks_stream(tmp_path: Path) -> None:
    sink = HashingSink()
    async with trio.open_nursery() as servers:
        listeners = await servers.start(partial(trio.serve_tcp, sink.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        mappings = [
            {"virtual": "sink.virtual:9", "internal": f"127.0.0.1:{port}", "protocol": "tcp"}
        ]
        async with running_pair(tmp_path, mappings) as pair:
            with trio.fail_after(120):
                stream = await socks_connect(pair.socks, "sink.virtual", 9)
                async with stream:
                    sent = hashlib.sha256()
                    started = time.perf_counter()
                    for chunk in seeded_chunks(seed=2026):
                        sent.update(chunk)
                        await stream.send_all(chunk)
                    await stream.send_eof()
                    answer = b""
                    while data := await stream.receive_some(1024):
                        answer += data
                    elapsed = time.perf_counter() - started
            assert answer == f"{TOTAL} {sent.hexdigest()}\n".encode()
            rate = TOTAL / elapsed / 1e6
            print(f"256 MiB through SOCKS5 + tunnel in {elapsed:.2f} s: {rate:.0f} MB/s")
        servers.cancel_scope.cancel()
