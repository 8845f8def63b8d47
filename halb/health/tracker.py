"""Health state of one backend: HAProxy-style rise/fall hysteresis plus the slow-start ramp.

How this works: `HealthTracker` is a pure state machine. It never reads a clock and never does I/O; every
observation carries its own time `now` (seconds, monotonic). Each observation extends either the run of
consecutive successes or the run of consecutive failures and resets the other run. While UP, the
backend goes DOWN when the failure run reaches `fall`; while DOWN, it comes back UP when the success run
reaches `rise`. Runs keep counting past the threshold (the counters are what an operator wants to see), so
a state can only flip at the single observation that makes the run exactly `fall` (or `rise`) long.

Passive observations (`passive=True`) are failed connects seen by the proxy on real traffic. A passive
failure counts toward `fall` exactly like a failed probe. Passive *successes* are not reported by the
proxy and are ignored here if they are: only a probe can prove a backend healthy (and a successful
connect says nothing about whether the backend would answer a health check), so `observe(True, now,
passive=True)` is a no-op returning None.

Slow start: after a DOWN->UP transition, `slowstart_factor(now)` ramps linearly from `SLOWSTART_FLOOR`
(0.05, i.e. the recovered backend first gets ~5 % of its normal share, never zero) to 1.0 over `slowstart`
seconds. It is 1.0 when slowstart is 0, when the tracker has never flipped to UP (HAProxy does not
slow-start servers at boot), once the ramp is over, and while DOWN (a down backend receives no traffic).
"""

from __future__ import annotations

from dataclasses import dataclass

# Share of the normal weight a backend gets at the very start of its slow-start ramp.
SLOWSTART_FLOOR = 0.05


@dataclass(frozen=True, slots=True)
class Transition:
    """The state flipped: `up` is the new state, `at` the time of the deciding observation."""

    up: bool
    at: float
    reason: str


class HealthTracker:
    def __init__(self, rise: int, fall: int, slowstart: float = 0.0, initial_up: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be >= 1 (got rise={rise}, fall={fall})")
        if slowstart < 0:
            raise ValueError(f"slowstart must be >= 0 (got {slowstart})")
        self.rise = rise
        self.fall = fall
        self.slowstart = float(slowstart)
        self.up = initial_up
        self.consecutive_successes = 0
        self.consecutive_failures = 0
        self.passive_failures = 0  # passive failures within the current failure run
        self.last_change: float | None = None
        self.last_reason = "initial state " + ("up" if initial_up else "down")
        self._ramp_start: float | None = None  # time of the last DOWN->UP transition

    def observe(self, ok: bool, now: float, passive: bool = False, detail: str = "") -> Transition | None:
        """Record one check result; returns the `Transition` when this observation flips the state.

        `detail` (e.g. "connect refused", "status 500") only goes into the transition's reason.
        """
        if passive and ok:
            return None  # see the module docstring: passive successes are ignored
        if ok:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            self.passive_failures = 0
            if not self.up and self.consecutive_successes == self.rise:
                reason = f"{self.rise} consecutive successful checks"
                return self._flip(True, now, f"{reason} ({detail})" if detail else reason)
            return None
        self.consecutive_failures += 1
        self.consecutive_successes = 0
        if passive:
            self.passive_failures += 1
        if self.up and self.consecutive_failures == self.fall:
            reason = f"{self.fall} consecutive failures"
            if self.passive_failures:
                reason += f" ({self.passive_failures} passive)"
            last = detail or ("connect failed on live traffic" if passive else "check failed")
            return self._flip(False, now, f"{reason}, last: {last}")
        return None

    def _flip(self, up: bool, now: float, reason: str) -> Transition:
        self.up = up
        self.last_change = now
        self.last_reason = reason
        self._ramp_start = now if up else None
        return Transition(up=up, at=now, reason=reason)

    def slowstart_factor(self, now: float) -> float:
        """Share of the configured weight to use at `now`, in [SLOWSTART_FLOOR, 1.0]."""
        if self.slowstart <= 0 or not self.up or self._ramp_start is None:
            return 1.0
        elapsed = now - self._ramp_start
        if elapsed >= self.slowstart:
            return 1.0
        progress = max(elapsed, 0.0) / self.slowstart
        return SLOWSTART_FLOOR + (1.0 - SLOWSTART_FLOOR) * progress

    def ramping(self, now: float) -> bool:
        """A slow-start ramp is in progress at `now` (the factor is below 1.0)."""
        return self.slowstart_factor(now) < 1.0
