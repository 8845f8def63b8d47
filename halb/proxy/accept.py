"""Accepting from a listening socket in batches: the accept step of the raw TCP relay and the TLS acceptor.

How this works: the caller watches its non-blocking listening socket for readability (an epoll set, or
`loop.add_reader`) and calls `accept_ready` when it is readable. It accepts up to `ACCEPT_BATCH`
connections, stopping at EAGAIN, and hands each to `serve(sock, address)`; the accepted socket is in
blocking mode (the caller makes it non-blocking or passes MSG_DONTWAIT). A client gone before its accept
(ECONNABORTED, EPROTO) is skipped. Any other error (mostly lack of resources: EMFILE, ENFILE, ENOBUFS,
ENOMEM) is logged and `pause()` called: the caller stops watching the socket for `ACCEPT_PAUSE` seconds,
as asyncio's own servers do, instead of spinning on a readable socket it cannot accept from. An exception
from `serve` is logged and that connection closed; accepting goes on.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("halb.proxy")

ACCEPT_BATCH = 64  # connections accepted per readiness of the listening socket
ACCEPT_PAUSE = 0.5  # seconds without accepting after running out of resources
_GONE = (errno.ECONNABORTED, errno.EPROTO)


def accept_ready(
    sock: socket.socket,
    name: str,
    serve: Callable[[socket.socket, Any], None],
    pause: Callable[[], None],
) -> None:
    """Accept what is waiting on `sock` (listener `name`) and `serve` each connection."""
    for _ in range(ACCEPT_BATCH):
        try:
            conn, address = sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in _GONE:
                continue
            log.error("listener %s: cannot accept (%s): pausing %.1f s", name, exc.strerror, ACCEPT_PAUSE)
            pause()
            return
        try:
            serve(conn, address)
        except Exception:  # a bug must not stop the listener: drop this connection, keep accepting
            log.exception("listener %s: serving a new connection failed", name)
            conn.close()
