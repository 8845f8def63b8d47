"""Start, watch and stop the proxy worker processes of one node (control-process side).

How this works: each worker is `python -m halb.worker` with one end of a socketpair. The supervisor sends it
the configuration, waits for `ready` (or its bind error), relays backend state (and `reconfigure`d pool
definitions) to every worker, collects
their statistics and restarts a worker that dies unexpectedly (like HAProxy's master-worker mode). Counters
of a dead worker are kept in `retired` so totals never go backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from halb import ipc, state_report
from halb.config_model import Config, PoolConfig

log = logging.getLogger("halb.workers")
COUNTER_KEYS = ("requests_total", "connect_failures_total", "bytes_to_backend", "bytes_from_backend")


@dataclass
class WorkerHandle:
    index: int
    process: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    stats: dict[str, Any] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


class WorkerStartError(Exception):
    pass


class WorkerSupervisor:
    def __init__(
        self,
        config: Config,
        on_connect_failed: Callable[[str, str], None],
        log_level: str = "WARNING",
    ) -> None:
        self.config = config
        self.on_connect_failed = on_connect_failed
        self.log_level = log_level
        self.workers: dict[int, WorkerHandle] = {}
        self.retired: dict[tuple[str, str], dict[str, float]] = {}
        self.retired_listeners: dict[str, dict[str, Any]] = {}
        self.retired_access_log: dict[str, int] = {}
        self.retired_no_backend: dict[str, int] = {}  # pool -> 503s without a backend, of dead workers
        self.retired_state: dict[str, Any] = {}  # [state] counters of dead workers (halb.state_report)
        self.stopping = False
        self.restarts_total = 0
        self._last_states: dict[tuple[str, str], tuple[Any, ...]] = {}

    async def start(self) -> None:
        """Start every worker; raise WorkerStartError (e.g. a bind error) if one fails."""
        try:
            for index in range(self.config.node.workers):
                await self._spawn(index)
        except WorkerStartError:
            await self.stop(0)
            raise

    async def _spawn(self, index: int) -> WorkerHandle:
        parent, child = socket.socketpair()
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "halb.worker",
                    "--fd",
                    str(child.fileno()),
                    "--index",
                    str(index),
                    "--log-level",
                    self.log_level,
                ],
                pass_fds=[child.fileno()],
            )
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        ipc.send(writer, {"type": "config", "config": self.config})
        if self._last_states:
            ipc.send(writer, {"type": "state", "states": self._last_states})
        try:
            first = await asyncio.wait_for(ipc.receive(reader), timeout=30)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError) as exc:
            process.kill()
            process.wait()
            raise WorkerStartError(f"worker {index} did not start (exit code {process.poll()})") from exc
        if first["type"] != "ready":
            process.wait()
            writer.close()
            raise WorkerStartError(first.get("message", f"worker {index} failed to start"))
        handle = WorkerHandle(index, process, reader, writer)
        handle.task = asyncio.create_task(self._receive_loop(handle))
        self.workers[index] = handle
        log.info("worker %d started, pid %d", index, process.pid)
        return handle

    async def _receive_loop(self, handle: WorkerHandle) -> None:
        try:
            while True:
                message = await ipc.receive(handle.reader)
                kind = message["type"]
                if kind == "stats":
                    handle.stats = message
                elif kind == "connect_failed":
                    self.on_connect_failed(message["pool"], message["backend"])
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        await asyncio.get_running_loop().run_in_executor(None, handle.process.wait)
        self._retire(handle)
        if self.workers.get(handle.index) is handle:
            del self.workers[handle.index]
        if not self.stopping:
            log.error(
                "worker %d (pid %d) died with code %s; restarting",
                handle.index,
                handle.process.pid,
                handle.process.returncode,
            )
            self.restarts_total += 1
            await asyncio.sleep(0.5)
            if not self.stopping:
                try:
                    await self._spawn(handle.index)
                except WorkerStartError as exc:
                    log.error("worker %d restart failed: %s", handle.index, exc)

    def _retire(self, handle: WorkerHandle) -> None:
        for key, counters in handle.stats.get("backends", {}).items():
            slot = self.retired.setdefault(key, dict.fromkeys(COUNTER_KEYS, 0))
            for name in COUNTER_KEYS:
                slot[name] += counters.get(name, 0)
        for name, counters in handle.stats.get("listeners", {}).items():
            slot = self.retired_listeners.setdefault(name, {})
            for key, value in counters.items():
                if isinstance(value, int | float) and key.endswith("_total"):
                    slot[key] = slot.get(key, 0) + value
                elif isinstance(value, dict):  # counters by label (responses, bad_requests, rejected)
                    state_report.add_counts(slot.setdefault(key, {}), value)
        for name, counters in handle.stats.get("pools", {}).items():
            self.retired_no_backend[name] = self.retired_no_backend.get(name, 0) + counters.get(
                "no_backend_total", 0
            )
        state_report.add_counts(self.retired_access_log, handle.stats.get("access_log", {}))
        state_report.retire(self.retired_state, handle.stats.get("state"))
        handle.stats = {}

    def state_reports(self) -> list[tuple[int, dict[str, Any]]]:
        """Each live worker's last [state] report (store status, sticky and rate-limit counters)."""
        return [(h.index, h.stats["state"]) for h in self.workers.values() if h.stats.get("state")]

    def reconfigure(self, pools: dict[str, PoolConfig]) -> None:
        """Changed pool definitions: to every live worker now, and in the config of workers started later.

        The next `push_states` sends every backend's state again (new backends start from defaults).
        """
        self.config = dataclasses.replace(self.config, pools={**self.config.pools, **pools})
        for handle in self.workers.values():
            ipc.send(handle.writer, {"type": "reconfigure", "pools": pools})
        self._last_states = {}

    def reload_tls(self) -> None:
        """SIGHUP: every worker re-reads its listeners' TLS certificates (connections stay up)."""
        for handle in self.workers.values():
            ipc.send(handle.writer, {"type": "reload_tls"})

    def push_states(self, states: dict[tuple[str, str], tuple[Any, ...]]) -> None:
        """Send backend state to every worker when it changed since the last push."""
        if states == self._last_states:
            return
        changed = {k: v for k, v in states.items() if self._last_states.get(k) != v}
        self._last_states = dict(states)
        for handle in self.workers.values():
            ipc.send(handle.writer, {"type": "state", "states": changed})

    def backend_totals(self) -> dict[tuple[str, str], dict[str, float]]:
        """Sum of every worker's counters (live ones plus retired), EWMA averaged by request count."""
        totals: dict[tuple[str, str], dict[str, float]] = {}
        ewma_weight: dict[tuple[str, str], float] = {}
        for key, retired in self.retired.items():
            totals[key] = {**retired, "active_connections": 0, "bandwidth": 0.0, "response_time_ewma": -1.0}
        for handle in self.workers.values():
            for key, counters in handle.stats.get("backends", {}).items():
                slot = totals.setdefault(
                    key,
                    {
                        **dict.fromkeys(COUNTER_KEYS, 0),
                        "active_connections": 0,
                        "bandwidth": 0.0,
                        "response_time_ewma": -1.0,
                    },
                )
                for name in (*COUNTER_KEYS, "active_connections", "bandwidth"):
                    slot[name] += counters.get(name, 0)
                ewma = counters.get("response_time_ewma", -1.0)
                if ewma >= 0:
                    weight = max(counters.get("requests_total", 0), 1)
                    previous = ewma_weight.get(key, 0.0)
                    current = slot["response_time_ewma"] if previous else 0.0
                    slot["response_time_ewma"] = (current * previous + ewma * weight) / (previous + weight)
                    ewma_weight[key] = previous + weight
        return totals

    def listener_totals(self) -> dict[str, dict[str, Any]]:
        totals: dict[str, dict[str, Any]] = {
            name: {k: dict(v) if isinstance(v, dict) else v for k, v in counters.items()}
            for name, counters in self.retired_listeners.items()
        }
        for handle in self.workers.values():
            for name, counters in handle.stats.get("listeners", {}).items():
                slot = totals.setdefault(name, {})
                for key, value in counters.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        slot[key] = slot.get(key, 0) + value
                    elif isinstance(value, dict):  # counters by label (responses, bad_requests, rejected)
                        state_report.add_counts(slot.setdefault(key, {}), value)
        return totals

    def access_log_totals(self) -> dict[str, int]:
        """Access log lines written and dropped by every worker (live ones plus retired)."""
        totals = dict(self.retired_access_log)
        for handle in self.workers.values():
            state_report.add_counts(totals, handle.stats.get("access_log", {}))
        return totals

    def no_backend_totals(self) -> dict[str, int]:
        totals = dict(self.retired_no_backend)
        for handle in self.workers.values():
            for name, counters in handle.stats.get("pools", {}).items():
                totals[name] = totals.get(name, 0) + counters.get("no_backend_total", 0)
        return totals

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"index": h.index, "pid": h.process.pid, "alive": h.process.poll() is None}
            for h in sorted(self.workers.values(), key=lambda h: h.index)
        ]

    async def drain(self, timeout: float) -> None:
        """Ask every worker to drain; wait for them to exit (kill after timeout + grace)."""
        self.stopping = True
        for handle in self.workers.values():
            ipc.send(handle.writer, {"type": "drain"})
        await self._wait_exit(timeout + 2.0)

    async def stop(self, timeout: float = 2.0) -> None:
        self.stopping = True
        for handle in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                handle.process.terminate()
        await self._wait_exit(timeout)

    async def _wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        handles = list(self.workers.values())
        while any(h.process.poll() is None for h in handles) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for handle in handles:
            if handle.process.poll() is None:
                log.warning("worker %d did not exit in time; killing it", handle.index)
                handle.process.kill()
        for handle in handles:
            if handle.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(handle.task, timeout=2)
            handle.writer.close()
