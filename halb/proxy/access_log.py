"""The access log: one line per HTTP request and per TCP connection (HAProxy's `httplog` / `tcplog`).

How this works: `AccessLog(path)` opens `path` for appending with O_APPEND, so every worker process of a
node can write whole lines to the same file and each write lands at its end ("-" writes to standard
output instead). A line is formatted when its request ends and kept in memory; the lines go out in one
`os.write` once 64 KiB have gathered, or `FLUSH_SECONDS` after the first line still waiting (one timer),
or on `flush()` (at shutdown): logging costs one string format per request, not a system call. `reopen()`
(SIGHUP, after logrotate moved the file away) writes what is waiting and opens the path again. When the
file cannot be opened (no permission) or a write fails (disk full) the lines are dropped and counted in
`dropped_lines`, with an error logged at most once a minute: the proxy never stops serving for its log.
`stats()` (lines written, lines dropped) goes to the supervisor with each worker's stats: `/status` and
`/metrics` show the node's totals.

Lines (times in milliseconds, `-1` when that stage was not reached):

    HTTP <client>:<port> [<date>] <listener> <pool>/<backend> <Tr>/<Ta> <status> <bytes> "<request>" <id>
    TCP  <client>:<port> [<date>] <listener> <pool>/<backend> <Tc>/<Tt> <bytes up>/<bytes down> <end>

`Tr` is the time from the request head to the backend's response head, `Ta` to the end of the response;
`Tc` is the backend connect time, `Tt` the connection's whole life. `<status>` is -1 for a request the
client abandoned, `<backend>` `-` when none was reached, the request line `<BADREQ>` when it could not
be parsed (a `"` in it is written `%22`), `<id>` the request's X-Request-ID. `<end>` says how a TCP
connection ended: `-` (both sides closed), `client_reset`, `backend_reset`, `idle_timeout`, `no_backend`,
`connect_failed`, `queue_full`, `queue_timeout`, `shutdown`, `proxy_error` (an unexpected error in the
proxy, logged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

log = logging.getLogger("halb.proxy.access_log")

FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 1.0
ERROR_LOG_INTERVAL = 60.0


class AccessLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self.lines_total = 0  # lines written
        self.dropped_lines = 0  # lines lost (the file could not be opened or written)
        self._fd = -1
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._last_error = -ERROR_LOG_INTERVAL
        try:
            self._open()
        except OSError as exc:  # (e.g. no permission): serve anyway; SIGHUP tries again
            log.error("access log %s: cannot open (%s); lines are dropped until a reopen works", path, exc)

    def _open(self) -> None:
        if self.path == "-":
            self._fd = sys.stdout.fileno()
            return
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _date(self) -> str:
        """`30/Nov/2026:21:50:01.123` (local time, as HAProxy), the seconds part formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}"

    def http(
        self,
        client: str,
        port: int,
        listener: str,
        pool: str,
        backend: str,
        tr: float,
        ta: float,
        status: int,
        nbytes: int,
        request_line: bytes | None,
        request_id: bytes,
    ) -> None:
        line = request_line.decode("latin-1").replace('"', "%22") if request_line is not None else "<BADREQ>"
        self._add(
            f"{self._head(client, port, listener, pool, backend)} {_ms(tr)}/{_ms(ta)} {status} "
            f'{nbytes} "{line}" {request_id.decode("latin-1") or "-"}\n'
        )

    def tcp(
        self,
        client: str,
        port: int,
        listener: str,
        pool: str,
        backend: str,
        tc: float,
        tt: float,
        bytes_up: int,
        bytes_down: int,
        end: str,
    ) -> None:
        self._add(
            f"{self._head(client, port, listener, pool, backend)} {_ms(tc)}/{_ms(tt)} "
            f"{bytes_up}/{bytes_down} {end}\n"
        )

    def _head(self, client: str, port: int, listener: str, pool: str, backend: str) -> str:
        """What both kinds of line start with: who, when, where."""
        return f"{client}:{port} [{self._date()}] {listener} {pool}/{backend}"

    def _add(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write out every waiting line (one system call)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "replace")
        count = len(self._lines)
        self._lines = []
        self._size = 0
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
            self.lines_total += count
        except OSError as exc:
            self.dropped_lines += count
            now = time.monotonic()
            if now - self._last_error >= ERROR_LOG_INTERVAL:
                self._last_error = now
                log.error("access log %s: cannot write (%s); lines are dropped", self.path, exc)

    def stats(self) -> dict[str, int]:
        return {"lines_total": self.lines_total, "dropped_lines_total": self.dropped_lines}

    def reopen(self) -> None:
        """SIGHUP: write what waits, then open the path again (logrotate moved the old file away)."""
        self.flush()
        if self.path == "-":
            return
        old = self._fd
        try:
            self._open()
        except OSError as exc:
            log.error("access log %s: cannot reopen (%s); still writing where it was", self.path, exc)
            return
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        self.flush()
        if self.path != "-" and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


def _ms(seconds: float) -> int:
    return -1 if seconds < 0 else int(seconds * 1000)
