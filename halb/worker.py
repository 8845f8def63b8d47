"""A proxy worker process (the data plane), started by the control process as `python -m halb.worker`.

How this works: the worker reads its configuration from the control socket, builds its own pools, binds
every listener with SO_REUSEPORT (N workers share each port; the kernel spreads connections), and reports
`ready` or `error`. It then applies backend state pushed by the control process (and `reconfigure`: new
pool definitions from the cluster's shared configuration, applied in place with `Pool.reconfigure`),
reports failed connects at once and traffic statistics every `STATS_INTERVAL`. It never touches
netlink, Raft or health probes. On `drain` or SIGTERM/SIGINT it stops accepting, lets in-flight requests
finish up to the drain timeout and exits 0. It dies with its parent (PR_SET_PDEATHSIG, and EOF on the
control socket).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from halb import ipc
from halb.backend import Backend
from halb.config_model import Config
from halb.pools import apply_backend_states, backend_counters, build_pools

STATS_INTERVAL = 0.25
log = logging.getLogger("halb.worker")


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except OSError:  # not Linux/glibc: the EOF on the control socket still stops us
        pass


class Worker:
    def __init__(self, index: int, config: Config, writer: asyncio.StreamWriter) -> None:
        from halb.proxy.access_log import AccessLog
        from halb.proxy.server import ProxyServer
        from halb.proxy.sessions_hook import StateRuntime

        self.index = index
        self.config = config
        self.writer = writer
        self.pools = build_pools(config)
        for pool in self.pools.values():
            pool.on_connect_failure = self._make_failure_reporter(pool.name)
        # [state]/[ratelimits]: this worker's one store (Redis) and its rate limiters / sticky pools.
        self.state = StateRuntime(config)
        # One line per request / connection; every worker appends to the same file (O_APPEND).
        self.access_log = AccessLog(config.node.access_log) if config.node.access_log else None
        self.server = ProxyServer(
            list(config.listeners),
            self.pools,
            maxconn=config.node.maxconn,
            workers=config.node.workers,
            state=self.state if self.state.active else None,
            access_log=self.access_log,
        )
        self.draining = asyncio.Event()

    def _make_failure_reporter(self, pool_name: str):  # type: ignore[no-untyped-def]
        def report(backend: Backend) -> None:
            ipc.send(self.writer, {"type": "connect_failed", "pool": pool_name, "backend": backend.name})

        return report

    def stats_message(self) -> dict[str, Any]:
        message = {
            "type": "stats",
            "index": self.index,
            "pid": os.getpid(),
            "backends": backend_counters(self.pools, time.monotonic()),
            "pools": {name: {"no_backend_total": p.no_backend_total} for name, p in self.pools.items()},
            "listeners": self.server.stats()["listeners"],
        }
        if self.access_log is not None:
            message["access_log"] = self.access_log.stats()
        state = self.state.stats()
        if state is not None:
            message["state"] = state  # store status and sticky/rate-limit counters (halb.state_report)
        return message

    def reload_tls(self) -> None:
        """SIGHUP (relayed by the control process): new TLS certificates for new connections, and the
        access log opened again (logrotate moved it away)."""
        if self.access_log is not None:
            self.access_log.reopen()
        for name, ok in self.server.reload_tls().items():
            log.warning(
                "worker %d: listener %s: TLS certificate %s",
                self.index,
                name,
                "reloaded" if ok else "reload FAILED (previous one kept)",
            )

    async def report_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            ipc.send(self.writer, self.stats_message())

    def handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "state":
            apply_backend_states(self.pools, message["states"])
        elif kind == "reconfigure":
            for name, pool_config in message["pools"].items():
                pool = self.pools.get(name)
                if pool is not None:
                    pool.reconfigure(pool_config)
            self.server.pools_changed(message["pools"])  # (a maxconn that is new to a pool: its queue)
        elif kind == "reload_tls":
            self.reload_tls()
        elif kind == "drain":
            self.draining.set()
        else:
            log.warning("worker %d: unknown control message %r", self.index, kind)


async def _serve(fd: int, index: int) -> int:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    first = await ipc.receive(reader)
    config: Config = first["config"]
    worker = Worker(index, config, writer)
    try:
        await worker.server.start()
    except OSError as exc:
        ipc.send(writer, {"type": "error", "message": str(exc)})
        await writer.drain()
        await worker.state.aclose()
        return 1
    worker.state.start()  # pings the store every state.ping_interval
    ipc.send(writer, {"type": "ready", "index": index, "pid": os.getpid()})
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.draining.set)
    loop.add_signal_handler(signal.SIGHUP, worker.reload_tls)

    async def control_loop() -> None:
        try:
            while True:
                worker.handle(await ipc.receive(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("worker %d: control process went away; draining", index)
            worker.draining.set()

    tasks = [asyncio.create_task(control_loop()), asyncio.create_task(worker.report_stats())]
    await worker.draining.wait()
    worker.server.stop_accepting()
    await worker.server.drain(config.node.drain_timeout)
    await worker.server.close()
    if worker.access_log is not None:
        worker.access_log.close()  # (the lines still waiting go out)
    await worker.state.aclose()  # the store is closed after the last request drained
    with contextlib.suppress(Exception):
        ipc.send(writer, worker.stats_message())
        await writer.drain()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="halb.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s worker[{args.index}] %(levelname)s %(name)s: %(message)s",
    )
    _die_with_parent()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a SIGHUP before the loop's handler must not kill us
    if os.environ.get("HALB_UVLOOP", "1") != "0":
        try:
            import uvloop

            return uvloop.run(_serve(args.fd, args.index))
        except ImportError:
            pass
    return asyncio.run(_serve(args.fd, args.index))


if __name__ == "__main__":
    sys.exit(main())
