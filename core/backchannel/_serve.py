"""Accepting connections for a front door whose handler owns each connection it is given.

``trio.serve_listeners`` runs every handler under a wrapper coroutine that closes the stream
again once the handler returns (``trio.aclose_forcefully``: a cancelled scope and a scheduler
pass, also when the handler closed it already). A handler that closes its connection itself on
every path does not need it, and the wrapper's frame lives as long as the connection: about
0.4 KiB per idle connection and some 5% of the gateway's CPU per new TCP connection
(docs/performance.md, "Per-stream cost"). :func:`serve_connections` runs the handler itself as
the connection's task; otherwise it behaves like ``trio.serve_listeners``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

import trio

log = logging.getLogger("backchannel.serve")

#: ``accept`` failures that mean "out of resources for now": retried after :data:`RETRY_AFTER`.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Seconds to wait before accepting again after such a failure.
RETRY_AFTER = 0.1
_FILES_ADVICE = "raise the open-files limit (ulimit -n / LimitNOFILE) or lower max_connections"
_MEMORY_ADVICE = (
    "the system is short of memory (or socket buffers): free some or lower max_connections"
)
_ADVICE = {errno.EMFILE: _FILES_ADVICE, errno.ENFILE: _FILES_ADVICE}

#: An async function (a coroutine function) taking the accepted stream.
OwningHandler = Callable[[trio.SocketStream], Coroutine[Any, Any, object]]


async def serve_connections(
    handler: OwningHandler,
    listeners: Sequence[trio.SocketListener],
    *,
    task_name: str,
    task_status: trio.TaskStatus[Sequence[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept on every listener until cancelled, each connection in a task of its own that
    runs ``handler(stream)``, named ``task_name`` (a keyword of its own: ``name`` is
    ``nursery.start``'s).

    The handler, an async function, owns the stream: it must close it on every path, the first
    thing it does inside a ``try`` / ``finally`` (:func:`backchannel.close_forcefully` closes a
    socket at once). A handler that cannot even be started (it raises when called) has its
    stream closed here, and the error ends the serving.
    When the process runs out of descriptors or memory, ``accept`` is retried every
    :data:`RETRY_AFTER` seconds and an error is logged each time; other errors end the serving.
    The listeners are closed when it ends.
    """
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_forever, listener, nursery, handler, task_name)
        task_status.started(listeners)
    raise AssertionError("the accept loops never end without an exception")  # pragma: no cover


async def _accept_forever(
    listener: trio.SocketListener, nursery: trio.Nursery, handler: OwningHandler, name: str
) -> NoReturn:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error(
                    "%s: accept failed with %s (%s), retrying in %g s: %s",
                    name,
                    errno.errorcode[exc.errno],
                    os.strerror(exc.errno),
                    RETRY_AFTER,
                    _ADVICE.get(exc.errno, _MEMORY_ADVICE),
                )
                await trio.sleep(RETRY_AFTER)
            else:
                try:
                    nursery.start_soon(handler, stream, name=name)
                except BaseException:
                    # The handler could not even start (not an async function, or it failed
                    # when called): nobody owns the connection, so close it here.
                    stream.socket.close()
                    raise
