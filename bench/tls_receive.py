"""Receiver CPU per MiB of TLS over loopback: memory BIOs (as ``TlsChannel`` does it) against
OpenSSL reading the socket itself (``ssl.SSLSocket.recv_into``).

``python -m bench.tls_receive [--mib N] [--rounds N]``

A sender thread writes N MiB with a blocking ``SSLSocket`` (TLS 1.3); the receiver, in the main
thread, decrypts into one 256 KiB buffer either through ``ssl.MemoryBIO`` (socket → bytes →
BIO → ``SSLObject.read(n, buffer)``: two copies more per byte) or with
``SSLSocket.recv_into``. ``time.thread_time`` of the receiving thread per MiB, alternating the
two ways. It answers whether replacing the tunnel's memory BIOs with a socket-owning TLS
object is worth doing (docs/performance.md, "Large frames decrypted into their own buffer").
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path

from backchannel._pki import write_throwaway_tls_material

MIB = 1 << 20
CHUNK = 256 * 1024
WAYS = ("memory BIO", "SSLSocket")


def _contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    material = write_throwaway_tls_material(directory)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(material.cert_file), str(material.key_file))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(str(material.ca_file))
    for context in (server, client):
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    return server, client


def _send(context: ssl.SSLContext, sock: socket.socket, mib: int, done: threading.Event) -> None:
    with context.wrap_socket(sock, server_hostname="localhost") as tls:
        chunk = os.urandom(CHUNK)
        for _ in range(mib * MIB // CHUNK):
            tls.sendall(chunk)
        done.wait()  # closing with the server's session tickets unread would reset the socket


def _receive_with_bios(context: ssl.SSLContext, sock: socket.socket, total: int) -> int:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    if outgoing.pending:
        sock.sendall(outgoing.read())
    view = memoryview(bytearray(CHUNK))
    received = 0
    while received < total:
        try:
            received += tls.read(CHUNK, view)  # type: ignore[operator]  # a count with a buffer
        except ssl.SSLWantReadError:
            data = sock.recv(CHUNK)
            if not data:
                break
            incoming.write(data)
    return received


def _receive_with_socket(context: ssl.SSLContext, sock: socket.socket, total: int) -> int:
    with context.wrap_socket(sock, server_side=True) as tls:  # takes over the socket
        view = memoryview(bytearray(CHUNK))
        received = 0
        while received < total:
            count = tls.recv_into(view)
            if not count:
                break
            received += count
    return received


def measure(way: str, mib: int, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> float:
    """Receiver CPU milliseconds per MiB for ``way`` (one of :data:`WAYS`)."""
    server_context, client_context = contexts
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    listener.close()
    done = threading.Event()
    sender = threading.Thread(target=_send, args=(client_context, client, mib, done))
    sender.start()
    try:
        receive = _receive_with_bios if way == WAYS[0] else _receive_with_socket
        started = time.thread_time()
        received = receive(server_context, server, mib * MIB)
        cpu = time.thread_time() - started
    finally:
        done.set()
        sender.join()
        server.close()
    assert received == mib * MIB, received
    return 1000 * cpu / mib


def run(mib: int, rounds: int) -> dict[str, list[float]]:
    """Receiver ms of CPU per MiB, each way ``rounds`` times, alternating."""
    results: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as directory:
        contexts = _contexts(Path(directory))
        for _ in range(rounds):
            for way in WAYS:
                results[way].append(measure(way, mib, contexts))
    return results


def main(argv: list[str] | None = None) -> int:
    """Print each way's figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.tls_receive", description=__doc__)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args(argv)
    for way, values in run(options.mib, options.rounds).items():
        figures = ", ".join(f"{value:.3f}" for value in values)
        print(f"  {way:10s} receiver CPU per MiB: {figures} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
