"""The composition root of one halb node: builds the pieces and routes events between them.

How this works: the control process owns the authoritative backend state. Health checkers and agent
pollers (halb.health) write it into the control copy of each pool; a sync loop pushes every change to the
proxy workers (halb.workers), whose failed connects come back here and count toward `fall`. The admin API
(halb.admin) reads `status()`, which merges this state with the workers' traffic counters. Modules never
call each other sideways: every route between them is set up in this file.

VRRP (when the config has a `[vrrp]` table): after the workers are ready, the configured VIPs are released
(a crashed predecessor may have left them) and the `VrrpDriver` starts. Health reaches VRRP tracking only
through this file: every backend transition (and every sync tick) re-evaluates "each listener's pool has an
available backend" as the check `pool:<name>`, and a small loop connects to each listener locally
(`listener:<name>`, down after 2 failed connects in a row, up after 2 good ones); while any check fails
the driver advertises `priority - track.weight`.

Shutdown (SIGTERM/SIGINT): VRRP stops FIRST (a MASTER sends a priority-0 advert and drops its VIPs, so a
peer takes over after Skew_Time), then /healthz turns 503 "draining", workers stop accepting and finish
in-flight requests up to `node.drain_timeout`, and the node exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import time
from typing import Any

from halb import __version__
from halb.admin import AdminServer
from halb.config_model import AgentConfig, Config
from halb.health.agent import AgentPoller
from halb.health.checker import HealthChecker
from halb.health.probes import tcp_probe
from halb.health.tracker import HealthTracker, Transition
from halb.pools import backend_states, build_pools
from halb.vrrp.driver import VrrpDriver
from halb.vrrp.vip import NetlinkVipPort, VipError, release_stale
from halb.workers import WorkerStartError, WorkerSupervisor

log = logging.getLogger("halb.node")
SYNC_INTERVAL = 0.05
# VRRP tracking of the node's own listeners: a local TCP connect every interval; rise/fall as for backends.
LISTENER_CHECK_INTERVAL = 1.0
LISTENER_CHECK_TIMEOUT = 1.0
LISTENER_CHECK_RISE = 2
LISTENER_CHECK_FALL = 2


class Node:
    def __init__(self, config: Config, log_level: str = "WARNING") -> None:
        self.config = config
        self.started_at = time.time()
        self.state = "starting"
        self.pools = build_pools(config)
        rng = random.Random()
        self.checkers = {
            name: HealthChecker(pool, rng=rng, on_transition=self._on_backend_transition)
            for name, pool in self.pools.items()
        }
        self.agents: dict[str, AgentPoller] = {}
        for name, pool in self.pools.items():
            agent = pool.config.agent
            if agent is None and pool.config.algorithm == "custom_load":
                agent = AgentConfig()
            if agent is not None:
                self.agents[name] = AgentPoller(pool, agent, rng=rng)
        self.supervisor = WorkerSupervisor(config, self._on_connect_failed, log_level)
        self.admin = AdminServer(config.node.admin, self)
        self.stop_requested = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self.vrrp: VrrpDriver | None = None
        if config.vrrp is not None:
            self.vrrp = VrrpDriver(config.vrrp, NetlinkVipPort(config.vrrp.interface))
        self._listener_task: asyncio.Task[None] | None = None

    # --- event routes ------------------------------------------------------------------------------
    def _on_connect_failed(self, pool_name: str, backend_name: str) -> None:
        checker = self.checkers.get(pool_name)
        if checker is not None:
            checker.report_passive_failure(backend_name)

    def _on_backend_transition(self, pool_name: str, backend_name: str, transition: Transition) -> None:
        self._track_pools()

    def _track_pools(self) -> None:
        """VRRP tracking: each listener's pool must have an available backend (check `pool:<name>`)."""
        if self.vrrp is None or self.config.vrrp is None or not self.config.vrrp.track.pools:
            return
        for name in dict.fromkeys(lc.pool for lc in self.config.listeners):
            pool = self.pools.get(name)
            if pool is not None:
                self.vrrp.set_check(f"pool:{name}", pool.healthy_count > 0)

    async def _listener_check_loop(self) -> None:
        """VRRP tracking: a local TCP connect to each listener (check `listener:<name>`)."""
        assert self.vrrp is not None and self.config.vrrp is not None
        vips = set(self.config.vrrp.vip_addresses)
        targets = []
        for lc in self.config.listeners:
            host = lc.bind.host
            if host in vips:
                continue  # bound to a VIP: only reachable locally while MASTER, so not a health signal
            if host in ("", "*", "0.0.0.0"):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            targets.append(
                (lc.name, host, lc.bind.port, HealthTracker(LISTENER_CHECK_RISE, LISTENER_CHECK_FALL))
            )
        while True:
            for name, host, port, tracker in targets:
                result = await tcp_probe(host, port, LISTENER_CHECK_TIMEOUT)
                tracker.observe(result.ok, time.monotonic(), detail=result.detail)
                self.vrrp.set_check(f"listener:{name}", tracker.up)
            await asyncio.sleep(LISTENER_CHECK_INTERVAL)

    async def _sync_loop(self) -> None:
        while True:
            self.supervisor.push_states(backend_states(self.pools))
            self._track_pools()
            await asyncio.sleep(SYNC_INTERVAL)

    async def _start_vrrp(self) -> bool:
        """Release stale VIPs, then start VRRP tracking and the driver; False (logged) if it cannot run."""
        assert self.vrrp is not None and self.config.vrrp is not None
        settings = self.config.vrrp
        try:
            stale = await release_stale(settings.interface, settings.virtual_ips)
            if stale:
                log.warning("vrrp: released stale VIPs left on %s: %s", settings.interface, ", ".join(stale))
            self._track_pools()
            await self.vrrp.start()
        except (VipError, OSError) as exc:
            log.error("cannot start VRRP on %s: %s", settings.interface, exc)
            return False
        if settings.track.listeners and self.config.listeners:
            self._listener_task = asyncio.create_task(self._listener_check_loop(), name="halb-listener-check")
        return True

    # --- life cycle ----------------------------------------------------------------------------------
    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        try:
            await self.admin.start()
        except OSError as exc:
            log.error("cannot bind the admin API on %s: %s", self.config.node.admin, exc)
            return 1
        try:
            await self.supervisor.start()
        except WorkerStartError as exc:
            log.error("cannot start the proxy: %s", exc)
            await self.admin.close()
            return 1
        for checker in self.checkers.values():
            checker.start()
        for agent in self.agents.values():
            agent.start()
        self._sync_task = asyncio.create_task(self._sync_loop())
        if self.vrrp is not None and not await self._start_vrrp():
            await self.shutdown()
            return 1
        self.state = "serving"
        _notify_systemd("READY=1")
        log.warning(
            "node %s serving: %s; admin on %s",
            self.config.node.name,
            ", ".join(f"{lc.name} {lc.mode}://{lc.bind}" for lc in self.config.listeners),
            self.config.node.admin,
        )
        await self.stop_requested.wait()
        return await self.shutdown()

    async def shutdown(self) -> int:
        if self.vrrp is not None:
            # First: a MASTER resigns (priority-0 advert) and drops its VIPs, so a peer serves at once.
            if self._listener_task is not None:
                self._listener_task.cancel()
            try:
                await self.vrrp.stop()
            except Exception:
                log.exception("stopping VRRP failed")
        self.state = "draining"
        _notify_systemd("STOPPING=1")
        log.warning("draining (up to %.1fs)", self.config.node.drain_timeout)
        await self.supervisor.drain(self.config.node.drain_timeout)
        if self._sync_task is not None:
            self._sync_task.cancel()
        for checker in self.checkers.values():
            await checker.stop()
        for agent in self.agents.values():
            await agent.stop()
        await self.admin.close()
        self.state = "stopped"
        return 0

    # --- read by the admin API -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        totals = self.supervisor.backend_totals()
        listener_totals = self.supervisor.listener_totals()
        no_backend = self.supervisor.no_backend_totals()
        now = time.monotonic()
        pools = []
        for name, pool in self.pools.items():
            health = self.checkers[name].snapshot()
            agent = self.agents[name].snapshot() if name in self.agents else {}
            backends = []
            for b in pool.backends:
                t = totals.get((name, b.name), {})
                ewma = t.get("response_time_ewma", -1.0)
                backends.append(
                    {
                        "name": b.name,
                        "address": b.address,
                        "healthy": b.healthy,
                        "draining": b.draining,
                        "weight": b.weight,
                        "effective_weight": round(b.effective_weight, 3) if b.available else 0,
                        "slowstart_factor": round(b.slowstart_factor, 3),
                        "load": b.load,
                        "active_connections": int(t.get("active_connections", 0)),
                        "requests_total": int(t.get("requests_total", 0)),
                        "connect_failures_total": int(t.get("connect_failures_total", 0)),
                        "bytes": {
                            "to_backend": int(t.get("bytes_to_backend", 0)),
                            "from_backend": int(t.get("bytes_from_backend", 0)),
                        },
                        "bandwidth_bytes_per_second": round(t.get("bandwidth", 0.0), 1),
                        "response_time_ewma_ms": round(ewma * 1000, 3) if ewma >= 0 else None,
                        "health": health.get(b.name, {}),
                        "agent": agent.get(b.name) if agent else None,
                    }
                )
            pools.append(
                {
                    "name": name,
                    "algorithm": pool.config.algorithm,
                    "health_check": pool.config.health.kind,
                    "healthy_backends": pool.healthy_count,
                    "total_backends": len(pool.backends),
                    "no_backend_total": no_backend.get(name, 0),
                    "backends": backends,
                }
            )
        listeners = [
            {
                "name": lc.name,
                "bind": str(lc.bind),
                "mode": lc.mode,
                "pool": lc.pool,
                **{k: v for k, v in listener_totals.get(lc.name, {}).items()},
            }
            for lc in self.config.listeners
        ]
        doc: dict[str, Any] = {
            "node": {
                "name": self.config.node.name,
                "version": __version__,
                "state": self.state,
                "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "uptime_seconds": round(time.time() - self.started_at, 1),
                "config": self.config.source,
                "workers": self.supervisor.describe(),
                "worker_restarts_total": self.supervisor.restarts_total,
            },
            "listeners": listeners,
            "pools": pools,
            "generated_monotonic": now,
        }
        if self.vrrp is not None:
            doc["vrrp"] = {"instances": [self.vrrp.snapshot()]}
        return doc


def _notify_systemd(message: str) -> None:
    """sd_notify without a dependency: a datagram to $NOTIFY_SOCKET when systemd runs us (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
