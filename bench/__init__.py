"""Benchmarks for backchannel: ``python -m bench`` (see ``python -m bench --help``).

Gateway, connector and a sink/source/hold backend run as separate processes on 127.0.0.1; the
bench process drives the client side, samples RSS from /proc and writes bench/results/<stamp>.json.
The HTTP scenario adds an HTTP backend (``bench.http_backend``) and load-generating processes
(``bench.http_load``); its driver is ``bench.http_scenario``.
"""
