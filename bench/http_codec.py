"""CPU cost of the HTTP/1.1 codec work the proxy does per request on each side, in one process.

``python -m bench.http_codec [--cycles N]``

One "cycle" is what each side of the HTTP proxy does with h11 for a kept-alive 1 KiB GET: parse
the request (server role), build the forwarded ``h11.Request`` with the routed headers, send it
(client role), parse a 1 KiB response, build the ``h11.Response`` and send it back (server
role), start the next cycle on both connections. No I/O, no trio: the codec alone, timed step
by step with ``time.perf_counter``. If ``httptools`` (llhttp, C) is installed, the same parse
and a hand-joined serialisation are timed too, for comparison (it is not a dependency of
backchannel; docs/performance.md, "What the 2x-ssh target needs").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import h11

REQUEST = (
    b"GET http://web.virtual:80/small HTTP/1.1\r\nHost: web.virtual:80\r\n"
    b"Proxy-Authorization: Basic YmVuY2gvYXBwOnNlY3JldA==\r\nUser-Agent: wrk\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 28 Nov 2026 09:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Connection: keep-alive\r\n\r\n" + b"x" * 1024
)
STEPS = (
    "parse request",
    "build request",
    "send request",
    "parse response",
    "build response",
    "send response + next cycle",
)
_DROPPED = (b"proxy-authorization", b"host")


def h11_cycle_us(cycles: int) -> dict[str, float]:
    """Microseconds per cycle for each step of :data:`STEPS`, with h11."""
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)
    totals = [0.0] * len(STEPS)
    for _ in range(cycles):
        t0 = time.perf_counter()
        server.receive_data(REQUEST)
        request = server.next_event()
        end_of_request = server.next_event()
        t1 = time.perf_counter()
        assert isinstance(request, h11.Request), request
        assert isinstance(end_of_request, h11.EndOfMessage), end_of_request
        headers = [(b"host", b"web.virtual:80")]
        headers += [(k, v) for k, v in request.headers if k not in _DROPPED]
        forwarded = h11.Request(method=request.method, target=b"/small", headers=headers)
        t2 = time.perf_counter()
        client.send(forwarded)
        client.send(h11.EndOfMessage())
        t3 = time.perf_counter()
        client.receive_data(RESPONSE)
        response = client.next_event()
        body = client.next_event()
        end_of_response = client.next_event()
        t4 = time.perf_counter()
        assert isinstance(response, h11.Response), response
        assert isinstance(body, h11.Data), body
        answer = h11.Response(
            status_code=response.status_code, headers=response.headers, reason=response.reason
        )
        t5 = time.perf_counter()
        server.send(answer)
        server.send(body)
        server.send(end_of_response)  # type: ignore[arg-type]  # EndOfMessage
        server.start_next_cycle()
        client.start_next_cycle()
        t6 = time.perf_counter()
        for index, (start, stop) in enumerate(
            ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6))
        ):
            totals[index] += stop - start
    return {step: 1e6 * total / cycles for step, total in zip(STEPS, totals, strict=True)}


class _Collector:
    """httptools callbacks: headers, body, completion."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


def httptools_cycle_us(cycles: int) -> float | None:
    """Microseconds per cycle parsing with httptools and joining the bytes by hand (no
    connection state, no validation beyond llhttp's); None if httptools is not installed."""
    try:
        import httptools  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    request_side, response_side = _Collector(), _Collector()
    request_parser: Any = httptools.HttpRequestParser(request_side)
    response_parser: Any = httptools.HttpResponseParser(response_side)
    start = time.perf_counter()
    for _ in range(cycles):
        request_side.headers.clear()
        request_parser.feed_data(REQUEST)
        lines = b"".join(
            name + b": " + value + b"\r\n"
            for name, value in request_side.headers
            if name.lower() not in _DROPPED
        )
        forwarded = request_parser.get_method() + b" /small HTTP/1.1\r\nhost: web.virtual:80\r\n"
        forwarded += lines + b"\r\n"
        response_side.headers.clear()
        response_side.body.clear()
        response_parser.feed_data(RESPONSE)
        status = response_parser.get_status_code()
        head = b"".join(name + b": " + value + b"\r\n" for name, value in response_side.headers)
        answer = b"HTTP/1.1 %d OK\r\n" % status + head + b"\r\n" + b"".join(response_side.body)
        assert forwarded
        assert answer
    return 1e6 * (time.perf_counter() - start) / cycles


def run(cycles: int) -> dict[str, Any]:
    """Both measurements as one JSON-able document."""
    steps = h11_cycle_us(cycles)
    return {
        "cycles": cycles,
        "h11_us_per_step": steps,
        "h11_us_per_cycle": sum(steps.values()),
        "httptools_us_per_cycle": httptools_cycle_us(cycles),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the table (and the JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m bench.http_codec", description=__doc__)
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="print the document as JSON")
    options = parser.parse_args(argv)
    document = run(options.cycles)
    for step, value in document["h11_us_per_step"].items():
        print(f"  h11 {step:28s} {value:7.1f} µs")
    print(f"  h11 whole cycle                  {document['h11_us_per_cycle']:7.1f} µs")
    other = document["httptools_us_per_cycle"]
    print(
        "  httptools (parse + join by hand) "
        + (f"{other:7.1f} µs" if other is not None else "  skipped: httptools not installed")
    )
    if options.json:
        json.dump(document, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
