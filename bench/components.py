"""CPU cost per MB of each layer a tunnel byte crosses, measured in one process.

``python -m bench.components [--mib N]``

CPU time (``time.process_time``), not wall time, so a busy machine disturbs it little. A bulk byte
crosses, on the sending side: the mux (DATA frames, batched into one message), the tunnel's
WebSocket framing (``backchannel._wslink``; masking when the connector sends), TLS encryption
(``TlsChannel``'s ``SSLObject``); on the receiving side: TLS decryption and WebSocket parsing
together (every record a 256 KiB socket read made decryptable, as the link takes it: a frame's
header into its read buffer, a large payload straight into a buffer of its own), mux decoding
and credit. The layers run on memory BIOs, no
socket. The last measurement moves the same messages end to end over loopback TCP with the
tunnel's own link on both ends (``TlsChannel`` + ``WebSocketLink``, trio, both in this process),
and, for reference, with trio-websocket over trio's ``SSLStream`` (what the tunnel used before
its own link, docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from backchannel import TunnelSettings
from backchannel._pki import write_throwaway_tls_material
from backchannel._proto._events import DataReceived, StreamOpened
from backchannel._proto._frames import MAX_WINDOW
from backchannel._proto._mux import Mux, MuxSettings
from backchannel._tlschannel import SOCKET_READ, TlsChannel
from backchannel._wslink import OP_BINARY, SEPARATE_HEADER, WebSocketLink, frame_parts

MIB = 1 << 20
SPLICE_CHUNK = 256 * 1024  # what the splice reads from a socket and hands to the stream


def _tls_pair(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    tls = write_throwaway_tls_material(folder)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tls.cert_file, tls.key_file)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    client.load_verify_locations(tls.ca_file)
    return server, client


class _NoTransport(trio.abc.Stream):
    """The transport of a TlsChannel driven by hand through its memory BIOs (never used)."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("memory only")

    async def wait_send_all_might_not_block(self) -> None:
        raise AssertionError("memory only")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("memory only")

    async def aclose(self) -> None:
        pass


def _memory_channels(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[TlsChannel, TlsChannel]:
    """Two TLS channels, handshaken by moving their BIOs' bytes by hand."""
    client = TlsChannel(_NoTransport(), client_ctx, server_hostname="127.0.0.1")
    server = TlsChannel(_NoTransport(), server_ctx, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side._ssl.do_handshake()
        server._incoming.write(client._outgoing.read())
        client._incoming.write(server._outgoing.read())
    return client, server


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

    client, server = _memory_channels(*tls)
    tls_send, tls_recv = (client, server) if sender_is_client else (server, client)
    # The receiving link parses what tls_recv decrypts into its buffer (no socket involved).
    link = WebSocketLink(tls_recv, client=not sender_is_client, max_message_size=16 * MIB)
    link.allow_direct_payloads()  # as the tunnel's links once the peer authenticated

    # bytes, as the splice's socket reads give them (the mux queues views of bytes)
    payload = bytes(range(256)) * (SPLICE_CHUNK // 256)
    clock = _Clock()
    total = mib * MIB
    moved = 0
    while moved < total:
        # sending side: the splice hands 256 KiB chunks to the stream until a message fills
        for _ in range(settings.max_message_size // SPLICE_CHUNK):
            clock.run("send: mux frames", partial(sender.send_data, stream_id, payload))
        message = clock.run(
            "send: mux frames", partial(sender.data_to_send, settings.max_message_size)
        )
        header, body = clock.run(
            "send: websocket frame" + (" (masked)" if sender_is_client else ""),
            partial(frame_parts, OP_BINARY, message, client=sender_is_client),
        )

        def encrypt(header: bytes = header, body: Any = body) -> bytes:
            if len(body) >= SEPARATE_HEADER:
                tls_send._ssl.write(header)
                tls_send._ssl.write(body)
            else:
                tls_send._ssl.write(header + body)
            return tls_send._outgoing.read()

        sealed = clock.run("send: TLS encrypt", encrypt)

        # receiving side: 256 KiB socket reads, decrypted as the link does it (a frame's header
        # into its buffer, a large payload straight into a buffer of its own) and parsed
        received: list[bytes | bytearray | str] = []

        def decrypt_and_parse(
            sealed: bytes = sealed, received: list[bytes | bytearray | str] = received
        ) -> None:
            for start in range(0, len(sealed), SOCKET_READ):
                tls_recv._incoming.write(sealed[start : start + SOCKET_READ])
                while True:
                    while (next_message := link._next_message()) is not None:
                        received.append(next_message)
                    if not link._decrypt_step():
                        break
            while (next_message := link._next_message()) is not None:
                received.append(next_message)

        clock.run(
            "recv: TLS decrypt + websocket parse" + (" (unmask)" if sender_is_client else ""),
            decrypt_and_parse,
        )

        def demux(received: list[bytes | bytearray | str] = received) -> None:
            for msg in received:
                assert not isinstance(msg, str)
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

#: One connection's ends: send(message), receive() -> message, and what to close afterwards.
Ends = tuple[
    Callable[[bytes], Awaitable[None]],
    Callable[[], Awaitable[Any]],
    list[trio.abc.AsyncResource],
]


async def _tunnel_link_ends(
    nursery: trio.Nursery,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
    client_sends: bool,
) -> Ends:
    """The tunnel's own link on both ends of a loopback TCP connection."""
    server_ctx, client_ctx = tls
    tcp, accepted = await _tcp_pair()
    client = TlsChannel(tcp, client_ctx, server_hostname="127.0.0.1")
    server = TlsChannel(accepted, server_ctx, server_side=True)
    async with trio.open_nursery() as handshakes:
        handshakes.start_soon(client.do_handshake)
        handshakes.start_soon(server.do_handshake)
    client_link = WebSocketLink(client, client=True, max_message_size=16 * MIB)
    server_link = WebSocketLink(server, client=False, max_message_size=16 * MIB)
    for link in (client_link, server_link):  # as the tunnel's, once the peer authenticated
        link.allow_direct_payloads()
    sending, receiving = (client_link, server_link) if client_sends else (server_link, client_link)
    return sending.send_message, receiving.get_message, [client, server, tcp, accepted]


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A loopback TCP connection: (connecting side, accepted side)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def accept_one() -> None:
        stream = await listeners[0].accept()
        assert isinstance(stream, trio.SocketStream)
        accepted.append(stream)

    try:
        async with trio.open_nursery() as connecting:
            connecting.start_soon(accept_one)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
    finally:
        await listeners[0].aclose()
    return tcp, accepted[0]


async def _trio_websocket_ends(
    nursery: trio.Nursery,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
    client_sends: bool,
) -> Ends:
    """Reference: trio-websocket over trio's SSLStream on both ends."""
    server_ctx, client_ctx = tls
    tcp, accepted = await _tcp_pair()
    client = trio.SSLStream(tcp, client_ctx, server_hostname="127.0.0.1", https_compatible=True)
    server = trio.SSLStream(accepted, server_ctx, server_side=True, https_compatible=True)
    server_ws: list[trio_websocket.WebSocketConnection] = []

    async def serve() -> None:
        request = await trio_websocket.wrap_server_stream(
            nursery, server, receive_buffer_size=SOCKET_READ, max_message_size=16 * MIB
        )
        server_ws.append(await request.accept())

    async with trio.open_nursery() as connecting:
        connecting.start_soon(server.do_handshake)
        await client.do_handshake()
    async with trio.open_nursery() as upgrading:
        upgrading.start_soon(serve)
        client_ws = await trio_websocket.wrap_client_stream(
            nursery,
            client,
            "127.0.0.1",
            "/",
            receive_buffer_size=SOCKET_READ,
            max_message_size=16 * MIB,
        )
    sending, receiving = (client_ws, server_ws[0]) if client_sends else (server_ws[0], client_ws)
    return sending.send_message, receiving.get_message, [client, server, tcp, accepted]


async def _transfer(
    mib: int,
    client_sends: bool,
    variant: str,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> dict[str, float]:
    message = bytes(range(256)) * (TunnelSettings().max_message_size // 256)
    count = mib * MIB // len(message)
    make = _tunnel_link_ends if variant == "tunnel link" else _trio_websocket_ends
    results: dict[str, float] = {}
    with trio.fail_after(60 + mib):
        async with trio.open_nursery() as nursery:
            send, receive, resources = await make(nursery, tls, client_sends)
            try:

                async def sender() -> None:
                    for _ in range(count):
                        await send(message)

                nursery.start_soon(sender)
                started_cpu, started = time.process_time(), time.perf_counter()
                for _ in range(count):
                    await receive()
                wall = time.perf_counter() - started
                megabytes = count * len(message) / 1e6
                results["cpu_ms_per_mb_both_ends"] = round(
                    1000 * (time.process_time() - started_cpu) / megabytes, 3
                )
                results["mb_per_s_one_core"] = round(megabytes / wall, 1)
                nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):  # the nursery is cancelled by now
                    for resource in resources:
                        await trio.aclose_forcefully(resource)
    return results


VARIANTS = ("tunnel link", "trio-websocket + SSLStream")


def run(mib: int, rounds: int, print_line: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every layer and the end-to-end variants; returns a JSON-ready dict."""
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
                print_line(f"  {value:7.3f}  {name}")
            total = sum(costs.values())
            print_line(f"  {total:7.3f}  sum of the layers (both ends)")
            runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
            for _ in range(rounds):  # alternate the variants so drift hits both alike
                for variant in runs:
                    runs[variant].append(trio.run(_transfer, mib, client_sends, variant, tls))
            e2e = {
                variant: min(results, key=lambda r: r["cpu_ms_per_mb_both_ends"])
                for variant, results in runs.items()
            }
            for variant, numbers in e2e.items():
                print_line(
                    f"  over TLS over loopback TCP, {variant:26}: "
                    f"{numbers['cpu_ms_per_mb_both_ends']:7.3f} ms/MB both ends, "
                    f"{numbers['mb_per_s_one_core']:7.1f} MB/s on one core"
                )
            document[label] = {
                "layers": costs,
                "layers_sum": round(total, 3),
                "end_to_end": e2e,
                "end_to_end_all_rounds": runs,
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
