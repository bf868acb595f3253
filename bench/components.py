"""CPU cost per MB of each layer a tunnel byte crosses, measured in one process.

``python -m bench.components [--mib N]``

CPU time (``time.process_time``), not wall time, so a busy machine disturbs it little. A bulk byte
crosses, on the sending side: mux (DATA frames, batching into one message), WebSocket framing
(wsproto; masking when the connector sends), TLS encryption; on the receiving side: TLS
decryption (one 16 KiB TLS record per ``SSLObject.read``), WebSocket parsing (fed one record at
a time, as trio-websocket does over an ``SSLStream``), mux decoding and credit. The last section
runs trio-websocket over TLS over loopback TCP (both ends in this process) to show what the trio
plumbing adds, once as trio-websocket does it and once with a receive adapter that drains every
already-buffered TLS record per call (an experiment, not the project's code).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio_websocket
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

from backchannel import TunnelSettings
from backchannel._pki import write_throwaway_tls_material
from backchannel._proto._events import DataReceived, StreamOpened
from backchannel._proto._frames import MAX_WINDOW
from backchannel._proto._mux import Mux, MuxSettings

MIB = 1 << 20
SPLICE_CHUNK = 256 * 1024  # what the TCP plugin reads from a socket and hands to the stream
RECORD_READ = 256 * 1024  # trio-websocket's receive_buffer_size in backchannel
COALESCED = "(for comparison: websocket parse fed 256 KiB at a time)"


def _tls_pair(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    tls = write_throwaway_tls_material(folder)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tls.cert_file, tls.key_file)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    client.load_verify_locations(tls.ca_file)
    return server, client


def _memory_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[
    ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO
]:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return client, c_in, c_out, server, s_in, s_out


class _Clock:
    """Accumulates CPU seconds per named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, step: Callable[[], Any]) -> Any:
        started = time.process_time()
        result = step()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - started
        return result


def layers(
    mib: int, sender_is_client: bool, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> dict[str, float]:
    """ms of CPU per MB for each layer, one direction."""
    settings = TunnelSettings()
    big = MuxSettings(initial_window=MAX_WINDOW)
    sender, receiver = Mux(initiator=True, settings=big), Mux(initiator=False, settings=big)
    sender.send_hello({})
    receiver.receive_data(sender.data_to_send())
    receiver.send_hello({})
    sender.receive_data(receiver.data_to_send())
    stream_id = sender.open_stream({"protocol": "tcp"})
    (opened,) = receiver.receive_data(sender.data_to_send())
    assert isinstance(opened, StreamOpened)
    receiver.accept_stream(stream_id)
    sender.receive_data(receiver.data_to_send())

    ws_sender = Connection(ConnectionType.CLIENT if sender_is_client else ConnectionType.SERVER)
    ws_receiver = Connection(ConnectionType.SERVER if sender_is_client else ConnectionType.CLIENT)
    ws_coalesced = Connection(ConnectionType.SERVER if sender_is_client else ConnectionType.CLIENT)
    coalesced_parts: list[bytes | bytearray] = []
    c_obj, c_in, c_out, s_obj, s_in, s_out = _memory_tls(*tls)
    if sender_is_client:
        tls_send, tls_send_out, tls_recv, tls_recv_in = c_obj, c_out, s_obj, s_in
    else:
        tls_send, tls_send_out, tls_recv, tls_recv_in = s_obj, s_out, c_obj, c_in

    payload = memoryview(bytes(range(256)) * (SPLICE_CHUNK // 256))
    clock = _Clock()
    total = mib * MIB
    moved = 0
    parts: list[bytes | bytearray] = []
    while moved < total:
        # sending side: the splice hands 256 KiB chunks to the stream until a message fills
        for _ in range(settings.max_message_size // SPLICE_CHUNK):
            clock.run("send: mux frames", partial(sender.send_data, stream_id, payload))
        message = clock.run(
            "send: mux frames", partial(sender.data_to_send, settings.max_message_size)
        )
        wire = clock.run(
            "send: websocket frame" + (" (masked)" if sender_is_client else ""),
            partial(ws_sender.send, BytesMessage(data=message)),
        )

        def encrypt(wire: bytes = wire) -> bytes:
            tls_send.write(wire)
            return tls_send_out.read()

        sealed = clock.run("send: TLS encrypt", encrypt)

        # receiving side
        def decrypt(sealed: bytes = sealed) -> list[bytes]:
            tls_recv_in.write(sealed)
            records = []
            while True:
                try:
                    records.append(tls_recv.read(RECORD_READ))
                except ssl.SSLWantReadError:
                    return records

        records = clock.run("recv: TLS decrypt (16 KiB records)", decrypt)
        received: list[bytes] = []

        def parse(records: list[bytes] = records, received: list[bytes] = received) -> None:
            for record in records:
                ws_receiver.receive_data(record)
                for event in ws_receiver.events():
                    assert isinstance(event, BytesMessage)
                    parts.append(event.data)
                    if event.message_finished:
                        received.append(b"".join(parts))
                        parts.clear()

        clock.run(
            "recv: websocket parse" + (" (unmask)" if sender_is_client else "") + ", per record",
            parse,
        )

        def parse_coalesced(records: list[bytes] = records) -> None:
            joined = b"".join(records)
            for start in range(0, len(joined), RECORD_READ):
                ws_coalesced.receive_data(joined[start : start + RECORD_READ])
                for event in ws_coalesced.events():
                    assert isinstance(event, BytesMessage)
                    coalesced_parts.append(event.data)
                    if event.message_finished:
                        b"".join(coalesced_parts)
                        coalesced_parts.clear()

        clock.run(COALESCED, parse_coalesced)

        def demux(received: list[bytes] = received) -> None:
            for msg in received:
                for event in receiver.receive_data(msg):
                    if isinstance(event, DataReceived):
                        receiver.acknowledge(stream_id, len(event.data))

        clock.run("recv: mux decode + credit", demux)
        sender.receive_data(receiver.data_to_send())
        moved += len(message)
    megabytes = moved / 1e6
    return {name: 1000 * seconds / megabytes for name, seconds in clock.seconds.items()}


def best_layers(
    mib: int, sender_is_client: bool, tls: tuple[ssl.SSLContext, ssl.SSLContext], rounds: int
) -> dict[str, float]:
    """Per layer, the lowest of ``rounds`` measurements (the least disturbed one)."""
    results = [layers(mib, sender_is_client, tls) for _ in range(rounds)]
    return {name: round(min(r[name] for r in results), 3) for name in results[0]}


# ----------------------------------------------------------------------------- trio, end to end


class _DrainingReceive(trio.abc.Stream):
    """Experiment: ``receive_some`` returns every TLS record that is already decryptable."""

    def __init__(self, inner: trio.SSLStream[trio.SocketStream]) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        first = await self.inner.receive_some(max_bytes)
        if not first or max_bytes is None:
            return first
        parts, size = [first], len(first)
        ssl_object = self.inner._ssl_object  # private: experiment only
        while size < max_bytes:
            try:
                more = ssl_object.read(max_bytes - size)
            except ssl.SSLError:
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts) if len(parts) > 1 else first

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _trio_transfer(
    mib: int, client_sends: bool, drain: bool, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> dict[str, float]:
    message = bytes(range(256)) * (TunnelSettings().max_message_size // 256)
    count = mib * MIB // len(message)
    done = trio.Event()
    results: dict[str, float] = {}

    with trio.fail_after(60 + mib):
        return await _transfer_in(mib, client_sends, drain, tls, message, count, done, results)


async def _transfer_in(
    mib: int,
    client_sends: bool,
    drain: bool,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
    message: bytes,
    count: int,
    done: trio.Event,
    results: dict[str, float],
) -> dict[str, float]:
    server_ctx, client_ctx = tls
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def wrap(stream: trio.SSLStream[trio.SocketStream]) -> Any:
            # trio-websocket's hint names SocketStream | SSLStream; any trio stream works
            return _DrainingReceive(stream) if drain else stream

        async def pump(ws: trio_websocket.WebSocketConnection, sending: bool) -> None:
            if sending:
                for _ in range(count):
                    await ws.send_message(message)
            else:
                started_cpu, started = time.process_time(), time.perf_counter()
                for _ in range(count):
                    await ws.get_message()
                wall = time.perf_counter() - started
                megabytes = count * len(message) / 1e6
                results["cpu_ms_per_mb_both_ends"] = round(
                    1000 * (time.process_time() - started_cpu) / megabytes, 3
                )
                results["mb_per_s_one_core"] = round(megabytes / wall, 1)
                done.set()

        async def server(tcp: trio.SocketStream) -> None:
            stream = trio.SSLStream(tcp, server_ctx, server_side=True, https_compatible=True)
            await stream.do_handshake()
            async with trio.open_nursery() as inner:
                request = await trio_websocket.wrap_server_stream(
                    inner,
                    await wrap(stream),
                    receive_buffer_size=RECORD_READ,
                    max_message_size=16 * MIB,
                    message_queue_size=4,
                )
                ws = await request.accept()
                await pump(ws, sending=not client_sends)
                await done.wait()
                inner.cancel_scope.cancel()

        nursery.start_soon(partial(trio.serve_listeners, server, listeners))
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, client_ctx, server_hostname="127.0.0.1", https_compatible=True)
        await stream.do_handshake()
        async with trio.open_nursery() as inner:
            ws = await trio_websocket.wrap_client_stream(
                inner,
                await wrap(stream),
                "127.0.0.1",
                "/",
                receive_buffer_size=RECORD_READ,
                max_message_size=16 * MIB,
                message_queue_size=4,
            )
            await pump(ws, sending=client_sends)
            await done.wait()
            inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    return results


def run(mib: int, rounds: int, print_line: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every layer and the trio end-to-end variants; returns a JSON-ready dict."""
    document: dict[str, Any] = {
        "mib": mib,
        "rounds": rounds,
        "unit": "ms of CPU per MB (10^6 bytes); lowest of the rounds",
    }
    with tempfile.TemporaryDirectory(prefix="backchannel-components-") as folder:
        tls = _tls_pair(Path(folder) / "tls")
        for label, client_sends in (
            ("download (connector sends, masked)", True),
            ("upload (gateway sends)", False),
        ):
            costs = best_layers(mib, client_sends, tls, rounds)
            print_line(f"{label}: layers, ms CPU per MB (lowest of {rounds})")
            for name, value in costs.items():
                if name != COALESCED:
                    print_line(f"  {value:7.3f}  {name}")
            total = sum(v for k, v in costs.items() if k != COALESCED)
            print_line(f"  {total:7.3f}  sum of the layers (both ends)")
            print_line(f"  {costs[COALESCED]:7.3f}  {COALESCED}")
            runs: dict[str, list[dict[str, float]]] = {"as is": [], "draining": []}
            for _ in range(rounds):  # alternate the variants so drift hits both alike
                for variant in runs:
                    runs[variant].append(
                        trio.run(_trio_transfer, mib, client_sends, variant == "draining", tls)
                    )
            e2e = {
                variant: min(results, key=lambda r: r["cpu_ms_per_mb_both_ends"])
                for variant, results in runs.items()
            }
            for variant, numbers in e2e.items():
                print_line(
                    f"  trio-websocket over TLS over TCP, {variant:9}: "
                    f"{numbers['cpu_ms_per_mb_both_ends']:7.3f} ms/MB both ends, "
                    f"{numbers['mb_per_s_one_core']:7.1f} MB/s on one core"
                )
            document[label] = {
                "layers": costs,
                "layers_sum": round(total, 3),
                "trio_websocket_tls_tcp": e2e,
                "trio_websocket_tls_tcp_all_rounds": runs,
            }
    return document


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally write) the per-layer costs."""
    parser = argparse.ArgumentParser(prog="python -m bench.components", description=__doc__)
    parser.add_argument("--mib", type=int, default=128, help="MiB pushed through each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="repeat each; report the lowest")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    document = run(args.mib, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
