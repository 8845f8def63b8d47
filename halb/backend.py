"""Runtime view of one backend server, shared by the balancing policies, the health checker and the proxy.

How this works: a `Backend` is a plain mutable record. The proxy calls its `on_*` methods as traffic flows
(connections opened and closed, responses timed, bytes moved); the health layer sets `healthy`,
`slowstart_factor` and `load`; the policies in `halb.balancing` read it to choose. Nothing here does I/O or
reads a clock: every method that needs time takes `now` (seconds, monotonic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Smoothing of the response-time EWMA: each new sample moves the average by this fraction.
RESPONSE_TIME_ALPHA = 0.3
# Time constant (seconds) of the decaying bandwidth meter behind `least_bandwidth`.
BANDWIDTH_TAU = 2.0
# Units added within this many seconds of the meter's last decay count as added then: one exp() per window
# instead of per call, at most 0.5% off with BANDWIDTH_TAU (a request-rate meter would pay it per request).
RATE_WINDOW = 0.01


@dataclass
class RateMeter:
    """Exponentially decaying rate (units per second) with time constant `tau`.

    Every `add(n, now)` adds `n` units; `rate(now)` is sum(n_i * exp(-(now - t_i)/tau)) / tau, which is the
    EWMA of the throughput over roughly the last `tau` seconds.
    """

    tau: float = BANDWIDTH_TAU
    _acc: float = 0.0
    _last: float | None = None

    def _decay_to(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._acc *= math.exp(-(now - self._last) / self.tau)
        if self._last is None or now > self._last:
            self._last = now

    def add(self, n: float, now: float) -> None:
        last = self._last
        if last is None or not last <= now < last + RATE_WINDOW:
            self._decay_to(now)
        self._acc += n

    def rate(self, now: float) -> float:
        self._decay_to(now)
        return self._acc / self.tau


@dataclass(eq=False)
class Backend:
    """One backend server of a pool. Identity is the object (eq=False), so it can key dicts and sets."""

    name: str
    host: str
    port: int
    weight: int = 1
    # Set by the health layer.
    healthy: bool = True
    slowstart_factor: float = 1.0  # 0 < f <= 1 while a recovered backend ramps up
    load: float | None = None  # custom_load agent report in [0, 1]; None = unknown (no agent)
    # Set by an operator (drain: keep existing connections/sessions, take no new ones).
    draining: bool = False
    # Only used while no other backend of the pool is available (HAProxy's `backup` server).
    backup: bool = False
    # Traffic statistics, updated by the proxy.
    active_connections: int = 0
    requests_total: int = 0
    connect_failures_total: int = 0
    bytes_to_backend: int = 0
    bytes_from_backend: int = 0
    response_time_ewma: float | None = None  # seconds
    bandwidth: RateMeter = field(default_factory=RateMeter)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def available(self) -> bool:
        """May receive new traffic: healthy, not draining, positive weight."""
        return self.healthy and not self.draining and self.weight > 0

    @property
    def effective_weight(self) -> float:
        """Configured weight scaled by the slow-start ramp (never 0 for an available backend)."""
        return max(self.weight * self.slowstart_factor, 1e-3) if self.weight > 0 else 0.0

    # --- called by the proxy -------------------------------------------------------------------------
    def on_connection_opened(self) -> None:
        self.active_connections += 1

    def on_connection_closed(self) -> None:
        self.active_connections = max(0, self.active_connections - 1)

    def on_connect_failed(self) -> None:
        self.connect_failures_total += 1

    def on_response(self, seconds: float) -> None:
        """A request completed (HTTP: response head received; TCP: connection finished)."""
        self.requests_total += 1
        if self.response_time_ewma is None:
            self.response_time_ewma = seconds
        else:
            self.response_time_ewma += RESPONSE_TIME_ALPHA * (seconds - self.response_time_ewma)

    def on_exchange(self, seconds: float, to_backend: int, from_backend: int, now: float) -> None:
        """A request answered on a connection the proxy now gives back: `on_response(seconds)`,
        `on_connection_closed()` and `on_bytes(...)` in one call (the HTTP proxy's per-request path)."""
        self.requests_total += 1
        ewma = self.response_time_ewma
        self.response_time_ewma = seconds if ewma is None else ewma + RESPONSE_TIME_ALPHA * (seconds - ewma)
        if self.active_connections > 0:
            self.active_connections -= 1
        self.bytes_to_backend += to_backend
        self.bytes_from_backend += from_backend
        self.bandwidth.add(to_backend + from_backend, now)

    def on_bytes(self, to_backend: int, from_backend: int, now: float) -> None:
        self.bytes_to_backend += to_backend
        self.bytes_from_backend += from_backend
        self.bandwidth.add(to_backend + from_backend, now)
