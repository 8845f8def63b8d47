"""Degradation bookkeeping: the store's status document and the circuit breaker in front of Redis.

How this works: both classes are pure, time is passed in (`now`, seconds, monotonic for the breaker; wall
clock for `StoreStatus.since`, which is only displayed).

`CircuitBreaker` keeps the store from making requests wait on a dead Redis:

    closed     --(failure_threshold consecutive failures)-->  open      (calls fail at once)
    open       --(now >= retry_at; the caller runs ONE probe)-> half_open (calls still fail at once)
    half_open  --(probe succeeds)-->                          closed
    half_open  --(probe fails)-->                              open, open_for doubled up to open_max
    any state  --(a call succeeds)-->                          closed, open_for reset to open_min

So while Redis is down only the calls in flight when it died (plus, in the worst case, the first
`failure_threshold - 1` after) wait, each at most the store's call timeout; every later call fails without
waiting, and recovery needs no request at all: the probe is a background PING started by the first call
that finds a probe due. Failures reported while already open do not re-arm the timer (they are calls that
were in flight before the circuit opened).

`StoreStatus` is what `halb status` and `/metrics` show: backend kind, "ok"/"degraded", since when, and two
counters (store errors; decisions taken without the store: consistent-hash stickiness, per-node buckets).
The store flips `state` from the breaker's transitions; the callers that fall back count their decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class StoreStatus:
    """The state layer's health, one per store instance (one per worker process)."""

    backend: str  # "redis" | "sentinel" | "memory"
    state: str = "ok"  # "ok" | "degraded"
    since: float = 0.0  # wall-clock time of the last state change
    errors_total: int = 0  # store calls that failed (each raised StoreUnavailable)
    fallback_decisions_total: int = 0  # sticky/rate-limit decisions taken without the store
    last_error: str = ""

    @property
    def degraded(self) -> bool:
        return self.state == "degraded"

    def set_state(self, state: str, wall: float) -> bool:
        """Record a state change; False when it was already in that state."""
        if state == self.state:
            return False
        self.state = state
        self.since = wall
        return True

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "state": self.state,
            "since": self.since,
            "errors_total": self.errors_total,
            "fallback_decisions_total": self.fallback_decisions_total,
            "last_error": self.last_error,
        }


@dataclass
class CircuitBreaker:
    failure_threshold: int = 2
    open_min: float = 0.5  # first open period, seconds
    open_max: float = 5.0  # open periods double up to this while probes keep failing
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0  # consecutive failures while closed
    open_for: float = field(init=False)
    retry_at: float = 0.0  # when the next probe is due (open state)
    opened_total: int = 0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if not 0 < self.open_min <= self.open_max:
            raise ValueError("need 0 < open_min <= open_max")
        self.open_for = self.open_min

    def allow(self) -> bool:
        """May a call go to the store now? Only in the closed state."""
        return self.state is BreakerState.CLOSED

    def probe_due(self, now: float) -> bool:
        """Open and the wait is over: switch to half-open. True means the caller must run one probe."""
        if self.state is BreakerState.OPEN and now >= self.retry_at:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def on_success(self) -> bool:
        """A call or probe succeeded. True when this closed an open/half-open circuit."""
        was_closed = self.state is BreakerState.CLOSED
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.open_for = self.open_min
        return not was_closed

    def on_failure(self, now: float) -> bool:
        """A call failed. True when this opened the circuit."""
        if self.state is BreakerState.CLOSED:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._open(now)
                return True
        return False

    def on_probe_failure(self, now: float) -> None:
        """The half-open probe failed: open again, for twice as long (up to open_max)."""
        if self.state is not BreakerState.HALF_OPEN:
            return  # a call succeeded meanwhile and closed the circuit: that evidence is newer
        self.open_for = min(self.open_for * 2, self.open_max)
        self._open(now)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.failures = 0
        self.retry_at = now + self.open_for
        self.opened_total += 1
