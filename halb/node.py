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
the driver advertises `priority - track.weight`. The VRRP interface's link is read every advert interval
(`interface:<name>`, halb.vrrp.link): while it is down or has no carrier the instance is in FAULT.

Cluster (when the config has a `[cluster]` table, halb.cluster): the Raft member starts right after the
admin API; the node gives it up to CLUSTER_SYNC_WAIT to catch up, then registers itself and seeds the
pools the cluster does not know yet from its TOML file. Every committed configuration change is merged
into this node's pools (`halb.cluster.sync`): weights and drain flags in place, added/removed backends
or a new algorithm by rebuilding that pool (unchanged backends keep their health) and sending
`reconfigure` to the workers. `/api/...` on the admin port is the cluster's configuration API. A
witness (`role = "witness"`) runs only the Raft member and the admin API: no workers, no VRRP. The
VIP lease keeper (`self.lease`) runs on every member. On a balancer with `cluster.vip_lease` (the
default) the VRRP driver's VIP port is a `LeasedVipPort` (add/GARP only while the lease allows it), a
`LeaseGuard` routes driver transitions and lease events between the two (halb.vrrp.lease_gate), and the
kernel fence (`NftFence`, nftables) is installed before VRRP starts and deleted after it stops. On
SIGTERM the lease is released (committed, bounded by 1 s) right after VRRP has dropped the VIPs.

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
from dataclasses import asdict
from typing import Any

from halb import __version__, state_report
from halb.admin import AdminServer
from halb.cluster.api import ClusterApi
from halb.cluster.keeper import LeaseKeeper
from halb.cluster.lease import LeaseTiming, lease_clock
from halb.cluster.raft import Applied, ClusterError, RaftMember, raft_id
from halb.cluster.state import seed_command
from halb.cluster.sync import change_kind, merge_pools
from halb.config_model import AgentConfig, Config, PoolConfig
from halb.health.agent import AgentPoller
from halb.health.checker import HealthChecker
from halb.health.probes import tcp_probe
from halb.health.tracker import HealthTracker, Transition
from halb.pool import Pool
from halb.pools import backend_states, build_pools
from halb.vrrp.driver import VrrpDriver
from halb.vrrp.fence import FenceError, NftFence
from halb.vrrp.lease_gate import LeasedVipPort, LeaseGuard, holddown_for
from halb.vrrp.link import LinkWatch, read_link
from halb.vrrp.vip import NetlinkVipPort, VipError, VipPort, release_stale
from halb.workers import WorkerStartError, WorkerSupervisor

log = logging.getLogger("halb.node")
SYNC_INTERVAL = 0.05
# VRRP tracking of the node's own listeners: a local TCP connect every interval; rise/fall as for backends.
LISTENER_CHECK_INTERVAL = 1.0
LISTENER_CHECK_TIMEOUT = 1.0
LISTENER_CHECK_RISE = 2
LISTENER_CHECK_FALL = 2
# VRRP: the interface's link is read every advert interval, within these bounds (seconds).
LINK_CHECK_MIN, LINK_CHECK_MAX = 0.1, 1.0
# [cluster]: at start, wait up to this long for the Raft member to catch up before starting the proxy
CLUSTER_SYNC_WAIT = 3.0


class Node:
    def __init__(self, config: Config, log_level: str = "WARNING") -> None:
        self.config = config
        self.started_at = time.time()
        self.state = "starting"
        self.pools = build_pools(config)
        # Every pool a listener sends to (its own, its routes'): what VRRP's `track.pools` watches.
        self._served_pools = tuple(dict.fromkeys(name for lc in config.listeners for name in lc.pools))
        rng = random.Random()
        self.checkers = {
            name: HealthChecker(pool, rng=rng, on_transition=self._on_backend_transition)
            for name, pool in self.pools.items()
        }
        self._rng = rng
        self.agents: dict[str, AgentPoller] = {}
        for name, pool in self.pools.items():
            poller = self._make_agent(pool)
            if poller is not None:
                self.agents[name] = poller
        self.supervisor = WorkerSupervisor(config, self._on_connect_failed, log_level)
        self._init_cluster()
        self.admin = AdminServer(
            config.node.admin,
            self,
            api=self.cluster_api,
            token=config.cluster.token if config.cluster is not None else None,
        )
        self.stop_requested = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self.vrrp: VrrpDriver | None = None
        self.fence: NftFence | None = None
        self.lease_guard: LeaseGuard | None = None
        if config.vrrp is not None:
            port: VipPort = NetlinkVipPort(config.vrrp.interface)
            if self._vip_lease_on():
                port = self._leased_port(port)
            self.vrrp = VrrpDriver(config.vrrp, port)
            if self._vip_lease_on():
                self._init_vip_lease(self.vrrp)
        self._listener_task: asyncio.Task[None] | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._link = LinkWatch()  # the VRRP interface's link, last read

    def _make_agent(self, pool: Pool) -> AgentPoller | None:
        agent = pool.config.agent
        if agent is None and pool.config.algorithm == "custom_load":
            agent = AgentConfig()
        return AgentPoller(pool, agent, rng=self._rng) if agent is not None else None

    # --- event routes ------------------------------------------------------------------------------
    def _on_connect_failed(self, pool_name: str, backend_name: str) -> None:
        checker = self.checkers.get(pool_name)
        if checker is not None:
            checker.report_passive_failure(backend_name)

    def _on_backend_transition(self, pool_name: str, backend_name: str, transition: Transition) -> None:
        self._track_pools()

    def _track_pools(self) -> None:
        """VRRP tracking: each pool a listener sends to (its own, its routes') must have an available
        backend (check `pool:<name>`)."""
        if self.vrrp is None or self.config.vrrp is None or not self.config.vrrp.track.pools:
            return
        for name in self._served_pools:
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

    async def _check_link(self) -> None:
        """VRRP: report the interface's link (check `interface:<name>`: FAULT while it is down)."""
        assert self.vrrp is not None and self.config.vrrp is not None
        interface = self.config.vrrp.interface
        message, up = self._link.update(*await read_link(interface))
        if message is not None:
            log.warning("vrrp: interface %s: %s", interface, message)
        if up is not None:  # (None: netlink did not answer; the last report stands)
            self.vrrp.set_check(f"interface:{interface}", up, fault=True)

    async def _link_check_loop(self) -> None:
        assert self.config.vrrp is not None
        interval = min(max(self.config.vrrp.advert_interval, LINK_CHECK_MIN), LINK_CHECK_MAX)
        while True:
            await asyncio.sleep(interval)
            await self._check_link()

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
            if self.fence is not None:
                await self.fence.install()  # empty: the VIP is dead here until a lease is granted
            stale = await release_stale(settings.interface, settings.virtual_ips)
            if stale:
                log.warning("vrrp: released stale VIPs left on %s: %s", settings.interface, ", ".join(stale))
            self._track_pools()
            if settings.track.interface:
                await self._check_link()  # a node whose link is down starts in FAULT
            await self.vrrp.start()
        except FenceError as exc:
            log.error("cannot install the VIP lease fence (nftables): %s", exc)
            return False
        except (VipError, OSError) as exc:
            log.error("cannot start VRRP on %s: %s", settings.interface, exc)
            return False
        if self.lease_guard is not None:
            self.lease_guard.start()
        if settings.track.listeners and self.config.listeners:
            self._listener_task = asyncio.create_task(self._listener_check_loop(), name="halb-listener-check")
        if settings.track.interface:
            self._link_task = asyncio.create_task(self._link_check_loop(), name="halb-link-check")
        return True

    # --- life cycle ----------------------------------------------------------------------------------
    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        # SIGHUP: the workers re-read their TLS certificates; no connection is dropped.
        loop.add_signal_handler(signal.SIGHUP, self.supervisor.reload_tls)
        try:
            await self.admin.start()
        except OSError as exc:
            log.error("cannot bind the admin API on %s: %s", self.config.node.admin, exc)
            return 1
        if self.cluster is not None and not await self._start_cluster():
            await self.admin.close()
            return 1
        try:
            if not self.witness:
                await self.supervisor.start()
        except WorkerStartError as exc:
            log.error("cannot start the proxy: %s", exc)
            await self._stop_cluster()
            await self.admin.close()
            return 1
        for checker in self.checkers.values():
            checker.start()
        for agent in self.agents.values():
            agent.start()
        self._checks_started = True
        self._sync_task = asyncio.create_task(self._sync_loop())
        if self.vrrp is not None and not await self._start_vrrp():
            await self.shutdown()
            return 1
        self.state = "serving"
        _notify_systemd("READY=1")
        log.warning(
            "node %s serving: %s; admin on %s",
            self.config.node.name,
            ", ".join(f"{lc.name} {lc.mode}://{lc.bind}" for lc in self.config.listeners)
            or "no listeners (witness)",
            self.config.node.admin,
        )
        await self.stop_requested.wait()
        return await self.shutdown()

    async def shutdown(self) -> int:
        if self.vrrp is not None:
            # First: a MASTER resigns (priority-0 advert) and drops its VIPs, so a peer serves at once.
            for task in (self._listener_task, self._link_task):
                if task is not None:
                    task.cancel()
            try:
                await self.vrrp.stop()
            except Exception:
                log.exception("stopping VRRP failed")
            await self._stop_vip_lease()
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
        await self._stop_cluster()
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
                        "backup": b.backup,
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
                **({"routes": [asdict(route) for route in lc.routes]} if lc.routes else {}),
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
        if self.config.node.access_log:
            doc["access_log"] = {
                "path": self.config.node.access_log,
                **{"lines_total": 0, "dropped_lines_total": 0, **self.supervisor.access_log_totals()},
            }
        if self.vrrp is not None:
            doc["vrrp"] = {"instances": [self.vrrp.snapshot()]}
            if self.lease_guard is not None:
                doc["vrrp"]["lease_gate"] = {
                    **self.lease_guard.snapshot(),
                    "fence": self.fence.snapshot() if self.fence is not None else None,
                }
        if self.cluster is not None:
            doc["cluster"] = self._cluster_status()
        # [state]/[ratelimits]: the store's health as the workers see it, sticky and 429 counters
        state = state_report.aggregate(
            self.config, self.supervisor.state_reports(), self.supervisor.retired_state
        )
        if state is not None:
            doc["state"] = state
        return doc

    # --- cluster: Raft member, shared configuration, VIP lease (halb.cluster) ----------------------
    # Kept apart from the VRRP code above. The lease's wiring into the VRRP driver goes through
    # `self.lease` (LeaseKeeper): want(), may_act(), add_listener() -- see docs/quorum.md.
    def _init_cluster(self) -> None:
        settings = self.config.cluster
        self.witness = settings is not None and settings.is_witness
        self.cluster: RaftMember | None = None
        self.cluster_api: ClusterApi | None = None
        self.lease: LeaseKeeper | None = None
        self.toml_pools = dict(self.config.pools)
        self.shared_version: int | None = None
        self._checks_started = False
        self._pending_shared: dict[str, Any] | None = None
        self._bootstrap_task: asyncio.Task[None] | None = None
        if settings is None:
            return
        self.cluster = RaftMember(settings, self.config.node.name)
        self.cluster_api = ClusterApi(self.cluster, self.config.node.name)
        self.lease = LeaseKeeper(
            self.cluster, self.config.node.name, LeaseTiming.for_duration(settings.lease_duration)
        )
        self.cluster.add_listener(self._on_cluster_applied)
        self.cluster.add_listener(self.lease.on_applied)

    async def _start_cluster(self) -> bool:
        """Start the Raft member; give it a moment to catch up so the proxy starts with the shared pools."""
        assert self.cluster is not None and self.lease is not None
        try:
            await self.cluster.start()
        except ClusterError as exc:
            log.error("cannot start the cluster member: %s", exc)
            return False
        deadline = time.monotonic() + CLUSTER_SYNC_WAIT
        while not self.witness and time.monotonic() < deadline:
            if self.cluster.status().get("ready"):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)  # let queued applied-command events land
        self.lease.start()
        self._bootstrap_task = asyncio.create_task(self._cluster_bootstrap(), name="halb-cluster-bootstrap")
        return True

    async def _stop_cluster(self) -> None:
        if self._bootstrap_task is not None:
            self._bootstrap_task.cancel()
        if self.lease is not None:
            await self.lease.stop()
        if self.cluster is not None:
            await self.cluster.stop()

    async def _cluster_bootstrap(self) -> None:
        """Register this member and seed the pools the cluster does not know yet; retried until done."""
        assert self.cluster is not None and self.config.cluster is not None
        settings = self.config.cluster
        member = {
            "op": "register",
            "node": self.config.node.name,
            "address": raft_id(settings.address),
            "admin": str(self.config.node.admin),
            "role": settings.role,
        }
        while True:
            state = self.cluster.state()
            mine = state["members"].get(self.config.node.name)
            expected = {k: member[k] for k in ("address", "admin", "role")}
            todo = []
            if mine != expected:
                todo.append(member)
            missing = {n: p for n, p in self.toml_pools.items() if n not in state["pools"]}
            if missing:
                todo.append(seed_command(missing))
            if not todo:
                return
            for command in todo:
                try:
                    result = await self.cluster.submit(command, timeout=2.0)
                except ClusterError as exc:
                    log.info("cluster bootstrap (%s) not committed yet: %s", command["op"], exc)
                    break
                if not result.get("ok"):
                    log.error("cluster rejected %s: %s", command["op"], result.get("error"))
                    return
                if command["op"] == "seed" and result.get("added"):
                    log.warning("seeded the cluster configuration with pools %s", ", ".join(result["added"]))
            await asyncio.sleep(0.5)

    def _on_cluster_applied(self, event: Applied) -> None:
        """Every applied command (on the loop): coalesce configuration changes into one apply."""
        if event.config is None:
            return
        first = self._pending_shared is None
        self._pending_shared = event.config
        if first:
            asyncio.get_running_loop().call_soon(self._apply_shared_config)

    def _apply_shared_config(self) -> None:
        view, self._pending_shared = self._pending_shared, None
        if view is None:
            return
        if self.witness:  # no pools to run; keep the version for status
            self.shared_version = view["version"]
            return
        merged = merge_pools(self.toml_pools, view["pools"])
        changed: dict[str, PoolConfig] = {}
        for name, new in merged.items():
            pool = self.pools[name]
            kind = change_kind(pool.config, new)
            if kind == "none":
                continue
            changed[name] = new
            if kind == "state":
                pool.reconfigure(new)
            else:
                self._rebuild_pool(name, new)
        self.shared_version = view["version"]
        if changed:
            self.supervisor.reconfigure(changed)
            self._track_pools()
            log.warning(
                "applied cluster configuration version %d: pools %s", view["version"], ", ".join(changed)
            )

    def _rebuild_pool(self, name: str, new: PoolConfig) -> None:
        """Backends added/removed/moved, or a new algorithm: new checker/agent; unchanged backends keep
        their health state."""
        pool = self.pools[name]
        kept = pool.reconfigure(new)
        old_checker = self.checkers[name]
        checker = HealthChecker(pool, rng=self._rng, on_transition=self._on_backend_transition)
        checker.adopt(old_checker, kept)
        self.checkers[name] = checker
        old_agent = self.agents.pop(name, None)
        agent = self._make_agent(pool)
        if agent is not None:
            self.agents[name] = agent
        if self._checks_started:
            asyncio.get_running_loop().create_task(old_checker.stop())
            if old_agent is not None:
                asyncio.get_running_loop().create_task(old_agent.stop())
            checker.start()
            if agent is not None:
                agent.start()

    # --- the VIP lease wired into VRRP (halb.vrrp.lease_gate; docs/quorum.md) ------------------------
    def _vip_lease_on(self) -> bool:
        settings = self.config.cluster
        return settings is not None and not settings.is_witness and settings.vip_lease

    def _leased_port(self, port: VipPort) -> VipPort:
        """The VIP port gated by the lease, with the kernel fence opened before every add."""
        assert self.lease is not None and self.config.vrrp is not None
        self.fence = NftFence(self.config.vrrp.virtual_ips, clock=lease_clock)
        return LeasedVipPort(port, self.lease, self.fence)

    def _init_vip_lease(self, driver: VrrpDriver) -> None:
        settings = self.config.cluster
        assert settings is not None and self.lease is not None
        self.lease_guard = LeaseGuard(
            driver,
            self.lease,
            self.fence,
            holddown=holddown_for(settings.lease_duration),
            quorum=self._raft_quorum,
        )
        driver.advert_gate = self.lease_guard.advert_allowed
        if len(settings.peers) == 1:
            log.warning(
                "cluster: two members and vip_lease = true: with either one down there is no majority "
                "and no node may hold the VIP; add a witness (or set vip_lease = false)"
            )

    def _raft_quorum(self) -> bool:
        """This node's Raft member reaches a majority (by a fresh status snapshot)."""
        if self.cluster is None:
            return False
        status = self.cluster.status()
        return bool(status.get("quorum")) and float(status.get("status_age_seconds", 99.0)) < 1.0

    async def _stop_vip_lease(self) -> None:
        """After VRRP stopped (VIPs removed): commit the lease's release, then delete the fence."""
        if self.lease_guard is not None:
            try:
                await self.lease_guard.stop(release_timeout=1.0)
            except Exception:
                log.exception("releasing the VIP lease failed")
        if self.fence is not None:
            try:
                await self.fence.remove()
            except FenceError as exc:
                log.error("removing the VIP lease fence failed: %s", exc)

    def _cluster_status(self) -> dict[str, Any]:
        assert self.cluster is not None and self.lease is not None
        doc = self.cluster.status()
        doc["config_version"] = self.shared_version
        doc["lease"] = self.lease.status()
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
