"""Active health checking of one pool: a probe loop per backend feeding a `HealthTracker`.

How this works: `start()` spawns one asyncio task per backend. Each task first waits a random offset within
one interval (so the probes of a pool are spread out rather than fired together), then loops: run the
configured probe (`kind` "tcp" or "http"), feed the result to the backend's tracker, sleep `interval`
randomised by +-`jitter*interval`. When the tracker reports a transition, the checker applies it with
`pool.set_state(name, healthy=...)`, logs it and calls the optional `on_transition(pool_name,
backend_name, transition)` callback. With `kind = "none"` nothing is probed and every backend stays up.

Passive checks: the composition root routes the proxy's failed connects to `report_passive_failure(name)`;
they count toward `fall` like failed probes (see `halb.health.tracker`). With `kind = "none"` they are only
counted, since without probes nothing could ever bring the backend back.

Slow start: when a backend comes back UP and the pool has `slowstart > 0`, one refresh task pushes
`pool.set_state(name, slowstart_factor=...)` every `min(0.25 s, slowstart / 20)` until every ramp is over
(the last push is 1.0), then exits; the next recovery starts it again.

Times given to the trackers come from the injected `clock` (monotonic seconds); sleeping uses the event
loop. No exception escapes a background task: unexpected errors are logged at warning on the
"halb.health" logger, counted in `errors_total` and the loop continues.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any

from halb.health.probes import ProbeResult, format_host_port, http_probe, tcp_probe
from halb.health.tracker import HealthTracker, Transition
from halb.pool import Pool

log = logging.getLogger("halb.health")

TransitionCallback = Callable[[str, str, Transition], None]

# Slow-start refresh period: at most this long, and at least 20 steps over the ramp.
SLOWSTART_REFRESH = 0.25
SLOWSTART_MIN_STEPS = 20


@dataclass
class _BackendHealth:
    name: str
    tracker: HealthTracker
    last_detail: str = "not checked yet"
    last_check_at: float | None = None
    last_duration: float | None = None
    checks_total: int = 0
    check_failures_total: int = 0
    passive_failures_total: int = 0


class HealthChecker:
    def __init__(
        self,
        pool: Pool,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        self.pool = pool
        self.config = pool.config.health
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.on_transition = on_transition
        self.errors_total = 0  # unexpected exceptions caught in background work
        initial_up = self.config.initial == "up" or self.config.kind == "none"
        self._states: dict[str, _BackendHealth] = {
            b.name: _BackendHealth(
                b.name,
                HealthTracker(self.config.rise, self.config.fall, pool.config.slowstart, initial_up),
            )
            for b in pool.backends
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._ramp_task: asyncio.Task[None] | None = None
        self._running = False

    def adopt(self, previous: HealthChecker, names: Collection[str]) -> None:
        """Before `start()`: carry the health records of `names` over from the checker this one replaces
        (the pool was reconfigured and those backends are unchanged), so they keep their state."""
        for name in names:
            st = previous._states.get(name)
            if st is not None and name in self._states:
                self._states[name] = st

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the probe tasks (needs a running event loop). Idempotent."""
        if self._running:
            return
        self._running = True
        for name, st in self._states.items():
            backend = self.pool.get(name)
            if backend is not None and backend.healthy != st.tracker.up:
                self.pool.set_state(name, healthy=st.tracker.up)
            if self.config.kind != "none":
                self._spawn(self._probe_loop(name), f"halb-health:{self.pool.name}:{name}")
        if self.config.kind == "none":
            for st in self._states.values():
                st.last_detail = "no health check configured"

    async def stop(self) -> None:
        """Cancel and await every task this checker started."""
        self._running = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._ramp_task = None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- probing ----------------------------------------------------------------------------------
    def _next_delay(self) -> float:
        interval = self.config.interval
        jitter = min(max(self.config.jitter, 0.0), 0.9)
        return interval * (1.0 + self.rng.uniform(-jitter, jitter))

    async def _probe_loop(self, name: str) -> None:
        delay = self.rng.uniform(0.0, self.config.interval)
        while True:
            await asyncio.sleep(delay)
            try:
                await self.check_once(name)
            except Exception:
                self.errors_total += 1
                log.warning(
                    "pool %s backend %s: health check failed unexpectedly",
                    self.pool.name,
                    name,
                    exc_info=True,
                )
            delay = self._next_delay()

    async def _probe(self, name: str) -> ProbeResult:
        backend = self.pool.get(name)
        if backend is None:
            return ProbeResult(False, "backend no longer in pool", 0.0)
        cfg = self.config
        if cfg.kind == "tcp":
            return await tcp_probe(backend.host, backend.port, cfg.timeout)
        if cfg.kind == "http":
            host_header = cfg.host or format_host_port(backend.host, backend.port)
            return await http_probe(
                backend.host,
                backend.port,
                cfg.path,
                cfg.timeout,
                host_header,
                (cfg.expect_status[0], cfg.expect_status[1]),
            )
        return ProbeResult(True, "no health check configured", 0.0)

    async def check_once(self, name: str) -> Transition | None:
        """Probe one backend now and apply the result (the probe loops call this; tests may too)."""
        st = self._states[name]
        result = await self._probe(name)
        now = self.clock()
        st.checks_total += 1
        st.last_check_at = now
        st.last_duration = result.duration
        st.last_detail = result.detail
        if not result.ok:
            st.check_failures_total += 1
            log.debug("pool %s backend %s: check failed: %s", self.pool.name, name, result.detail)
        transition = st.tracker.observe(result.ok, now, detail=result.detail)
        if transition is not None:
            self._apply(st, transition)
        return transition

    def report_passive_failure(self, backend_name: str) -> Transition | None:
        """A real connect to this backend failed; counts toward `fall` like a failed probe."""
        st = self._states.get(backend_name)
        if st is None:
            return None
        st.passive_failures_total += 1
        if self.config.kind == "none":
            return None
        try:
            transition = st.tracker.observe(
                False, self.clock(), passive=True, detail="connect failed on traffic"
            )
            if transition is not None:
                self._apply(st, transition)
            return transition
        except Exception:
            self.errors_total += 1
            log.warning(
                "pool %s backend %s: passive failure handling failed",
                self.pool.name,
                backend_name,
                exc_info=True,
            )
            return None

    # --- transitions and slow start ---------------------------------------------------------------
    def _apply(self, st: _BackendHealth, transition: Transition) -> None:
        if transition.up:
            factor = st.tracker.slowstart_factor(transition.at)
            self.pool.set_state(st.name, healthy=True, slowstart_factor=factor)
            log.info("pool %s backend %s is UP: %s", self.pool.name, st.name, transition.reason)
            if factor < 1.0:
                self._ensure_ramp_task()
        else:
            self.pool.set_state(st.name, healthy=False, slowstart_factor=1.0)
            log.warning("pool %s backend %s is DOWN: %s", self.pool.name, st.name, transition.reason)
        if self.on_transition is not None:
            try:
                self.on_transition(self.pool.name, st.name, transition)
            except Exception:
                self.errors_total += 1
                log.warning("on_transition callback failed for %s/%s", self.pool.name, st.name, exc_info=True)

    def _ensure_ramp_task(self) -> None:
        if self._ramp_task is not None and not self._ramp_task.done():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a passive report outside asyncio): the next recovery inside the loop starts it
        self._ramp_task = self._spawn(self._slowstart_loop(), f"halb-slowstart:{self.pool.name}")

    def refresh_slowstart(self) -> bool:
        """Push the current slow-start factors to the pool; True while any ramp is still in progress."""
        now = self.clock()
        ramping = False
        for st in self._states.values():
            if not st.tracker.up:
                continue
            factor = st.tracker.slowstart_factor(now)
            backend = self.pool.get(st.name)
            if backend is not None and backend.slowstart_factor != factor:
                self.pool.set_state(st.name, slowstart_factor=factor)
            ramping = ramping or factor < 1.0
        return ramping

    async def _slowstart_loop(self) -> None:
        slowstart = self.pool.config.slowstart
        step = min(SLOWSTART_REFRESH, slowstart / SLOWSTART_MIN_STEPS) if slowstart > 0 else SLOWSTART_REFRESH
        step = max(step, 0.01)
        while True:
            await asyncio.sleep(step)
            try:
                if not self.refresh_slowstart():
                    return
            except Exception:
                self.errors_total += 1
                log.warning("pool %s: slow-start refresh failed", self.pool.name, exc_info=True)

    # --- admin --------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per backend: state, consecutive counts, last probe detail and timing, last change, counters."""
        now = self.clock()
        out: dict[str, dict[str, Any]] = {}
        for name, st in self._states.items():
            tr = st.tracker
            out[name] = {
                "state": "up" if tr.up else "down",
                "check": self.config.kind,
                "consecutive_successes": tr.consecutive_successes,
                "consecutive_failures": tr.consecutive_failures,
                "rise": tr.rise,
                "fall": tr.fall,
                "last_detail": st.last_detail,
                "last_check_at": st.last_check_at,
                "last_duration": st.last_duration,
                "last_change": tr.last_change,
                "last_reason": tr.last_reason,
                "slowstart_factor": tr.slowstart_factor(now),
                "checks_total": st.checks_total,
                "check_failures_total": st.check_failures_total,
                "passive_failures_total": st.passive_failures_total,
            }
        return out

    def tracker(self, backend_name: str) -> HealthTracker | None:
        st = self._states.get(backend_name)
        return st.tracker if st is not None else None
