"""Sans-IO wire protocol: frame codec and multiplexer state machine.

Nothing in this package may import trio, socket, ssl or asyncio (tests/test_sans_io.py checks it).
"""
