"""The VIP lease, node side: when this node may act as the VIP holder. Pure: every input carries `now`.

How this works
==============

A node may hold a VIP only while it holds a lease committed through Raft (`halb.cluster.state` keeps the
lease table; this module is what one node does with it). Times are seconds of ONE local clock that
keeps running while the process is stopped (`lease_clock`: CLOCK_BOOTTIME on Linux, which is
CLOCK_MONOTONIC plus time spent suspended). No two machines' clocks are ever compared.

**Holding.** The node sends `acquire` (or, while it holds, `renew`) and remembers the local time the
request was SENT, `t_sent`. Only a committed, granting result for that very request counts, and it
counts from `t_sent`, never from the time the answer arrived:

    act_until = t_sent + duration - margin                  margin = HOLDER_MARGIN * duration

`may_act(now)` is true only while `now < act_until` -- the check the VRRP driver makes before EVERY master
action (adding the VIP, every GARP round). At `act_until` `tick()` reports `LeaseLost` and the node must
remove the VIP at once. Renewal starts `renew_after = duration / 3` after `t_sent`, retried every
`retry_interval` while it fails (no leader, no quorum, timeout), so a renewal has about
`duration * (1 - 1/3 - HOLDER_MARGIN)` (1.13 s of a 2 s lease) to get through a Raft election.

**Taking over.** Another node may be granted the lease only after the holder's lease has run out as
measured by the ACQUIRING node's clock from the moment it SAW the holder's latest grant or renewal
applied, plus a guard:

    acquirer may take over at   seen_at + takeover_delay(duration),   takeover_delay = duration * (1 + GUARD)

The acquirer puts `seen = {holder, seq, at}` and its `now` into the `acquire` command; the replicated
state grants only if `seq` is still the holder's latest (no renewal since) and `now - at` is long
enough. Both readings come from the acquirer's clock, so the state machine compares two readings of one
clock and stays deterministic. Why this is safe: the holder's renewal was sent before it was committed,
and committed before anyone saw it applied, so the acquirer starts counting later than the holder did;
the holder stops after `duration - margin` of its clock, the acquirer waits `duration + guard` of its
own. With clock rates within `MAX_RATE_ERROR` of real time the holder stops first with
`duration * (margin + guard - 2 * MAX_RATE_ERROR)` to spare (0.36 s for a 2 s lease) -- the time it has
to take the address off its interface. `LeaseTiming` checks that inequality. (The issue's first sketch
stamped the LEADER's clock into the command; pysyncobj forwards a follower's command to the leader
unchanged, so a leader cannot stamp it, and a new leader's clock has nothing to do with the old one's.)

**Freeze and resume.** A stopped process does not see its lease run out. The clock keeps running, so
`may_act` after a resume is already false if the lease expired meanwhile. On top of that, any gap
longer than `gap_threshold` between two calls (the node's loop ticks every ~50 ms) marks the lease
*unconfirmed*: `may_act` stays false until a renewal SENT AFTER the gap is granted, so not even a GARP
that was due during the freeze goes out on the strength of the old lease.

**Giving up.** `set_wanted(False)` (called after the VIP is off the interface) stops acting at once and
sends `release`, which lets a peer take over without waiting for expiry. A node that wants the lease and
sees it become free (`observe` with no holder) asks again at the next tick instead of waiting out a
`retry_in` it was given while the lease was still held: that is what makes a takeover after a release
(SIGTERM, or `halb vip release` on a killed node's behalf) cost one commit.

`LeaseHolder` takes inputs (`tick`, `on_result`, `observe`, `set_wanted`) and returns actions
(`SendCommand`, `LeaseGranted`, `LeaseLost`); `halb.cluster.keeper` runs it against Raft.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LEASE = "vip"
DEFAULT_DURATION = 2.0
RENEW_FRACTION = 1 / 3  # renew this far into the lease
HOLDER_MARGIN = 0.1  # the holder stops acting this fraction of the duration before nominal expiry
GUARD = 0.1  # others wait this fraction of the duration beyond nominal expiry
MAX_RATE_ERROR = 0.01  # assumed bound on any clock's rate error vs real time (1 %, NTP slews <= 0.05 %)


def lease_clock() -> float:
    """Seconds that keep counting while the process is stopped or the host is suspended."""
    if sys.platform.startswith("linux"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


def takeover_delay(duration: float) -> float:
    """How long a node must have seen a grant unchanged before another node may take the lease."""
    return duration * (1.0 + GUARD)


@dataclass(frozen=True)
class LeaseTiming:
    """The numbers of one lease; `for_duration(2.0)` gives the defaults documented in docs/quorum.md."""

    duration: float
    renew_after: float
    margin: float
    retry_interval: float
    request_timeout: float
    gap_threshold: float

    @classmethod
    def for_duration(cls, duration: float = DEFAULT_DURATION) -> LeaseTiming:
        return cls(
            duration=duration,
            renew_after=duration * RENEW_FRACTION,
            margin=duration * HOLDER_MARGIN,
            retry_interval=min(0.1, duration / 20),
            request_timeout=duration / 4,
            gap_threshold=max(0.25, duration / 8),
        )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError(f"lease duration must be positive, got {self.duration}")
        if not 0 < self.renew_after < self.duration - self.margin:
            raise ValueError("renew_after must fall inside the part of the lease the holder may use")
        holder_stops = (self.duration - self.margin) / (1 - MAX_RATE_ERROR)  # slowest holder clock
        others_start = takeover_delay(self.duration) / (1 + MAX_RATE_ERROR)  # fastest acquirer clock
        if holder_stops >= others_start:
            raise ValueError("unsafe lease timing: the holder could still act when another may take over")

    @property
    def spare(self) -> float:
        """Real seconds, at worst, between the holder stopping and anyone else being allowed to start."""
        return takeover_delay(self.duration) / (1 + MAX_RATE_ERROR) - (self.duration - self.margin) / (
            1 - MAX_RATE_ERROR
        )


# --- actions --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendCommand:
    """Submit `command` through Raft; report the outcome with `on_result(request_id, result, now)`."""

    request_id: int
    command: dict[str, Any]


@dataclass(frozen=True)
class LeaseGranted:
    act_until: float


@dataclass(frozen=True)
class LeaseLost:
    reason: str


Action = SendCommand | LeaseGranted | LeaseLost


@dataclass
class _Request:
    request_id: int
    kind: str  # acquire | renew | release
    sent_at: float


@dataclass(frozen=True)
class Observed:
    """The lease record as this node last saw it applied, and when it first saw that version."""

    holder: str | None
    seq: int
    duration: float
    at: float


@dataclass
class LeaseHolder:
    """One node's side of one lease (see the module docstring)."""

    node: str
    timing: LeaseTiming = field(default_factory=LeaseTiming.for_duration)
    lease: str = DEFAULT_LEASE

    def __post_init__(self) -> None:
        self.wanted = False
        self._act_until: float | None = None  # set only while we hold
        self._unconfirmed_since: float | None = None  # a gap was seen: need a renewal sent after it
        self._last_call: float | None = None
        self._inflight: dict[int, _Request] = {}
        self._next_id = 0
        self._next_attempt = -math.inf
        self._release_due = False
        self.observed: Observed | None = None
        self.gaps = 0
        self.lost_total = 0
        self.granted_total = 0
        self.last_lost_reason: str | None = None

    # --- queries ----------------------------------------------------------------------------------
    def may_act(self, now: float) -> bool:
        """True while this node may act as VIP holder: add the VIP, send a GARP, answer as master."""
        self._clock(now)
        return self._holding(now) and self._unconfirmed_since is None

    def holds(self, now: float) -> bool:
        """Holds a lease that has not run out (it may still be unconfirmed after a gap)."""
        return self._holding(now)

    def remaining(self, now: float) -> float:
        """Seconds this node may still act on its lease (0 when it holds none)."""
        if not self._holding(now):
            return 0.0
        assert self._act_until is not None
        return self._act_until - now

    @property
    def act_until(self) -> float | None:
        """This node's own conservative expiry (see the module docstring); None while it holds nothing."""
        return self._act_until

    @property
    def releasing(self) -> bool:
        """A release is due or in flight (after `set_wanted(False)`)."""
        return self._release_due or any(r.kind == "release" for r in self._inflight.values())

    def takeover_at(self) -> float | None:
        """When (our clock) another holder's lease will have run out for us; None if nobody holds it."""
        seen = self.observed
        if seen is None or seen.holder is None or seen.holder == self.node:
            return None
        return seen.at + takeover_delay(seen.duration)

    def status(self, now: float) -> dict[str, Any]:
        seen = self.observed
        holder = seen.holder if seen is not None else None
        if self._holding(now):
            holder = self.node
        takeover = self.takeover_at()
        return {
            "lease": self.lease,
            "holder": holder,
            "seq": seen.seq if seen is not None else None,
            "held_here": self._holding(now),
            "may_act": self._holding(now) and self._unconfirmed_since is None,
            "remaining_seconds": round(self.remaining(now), 3) if self._holding(now) else None,
            "expires_for_others_in": round(max(0.0, takeover - now), 3) if takeover is not None else None,
            "wanted": self.wanted,
            "duration": self.timing.duration,
            "gaps": self.gaps,
            "granted_total": self.granted_total,
            "lost_total": self.lost_total,
            "last_lost_reason": self.last_lost_reason,
        }

    # --- inputs -----------------------------------------------------------------------------------
    def set_wanted(self, wanted: bool, now: float) -> list[Action]:
        """The node wants to be VIP holder (VRRP master) or not. False only AFTER the VIP is removed."""
        self._clock(now)
        actions: list[Action] = []
        if wanted == self.wanted:
            return actions
        self.wanted = wanted
        if wanted:
            self._release_due = False
            self._next_attempt = -math.inf
            return self.tick(now)
        if self._act_until is not None:
            self._drop("released", actions, emit=False)
            self._release_due = True
        actions += self.tick(now)
        return actions

    def observe(self, record: dict[str, Any] | None, now: float) -> list[Action]:
        """The replicated lease record, each time it is applied here (None: no such lease yet)."""
        self._clock(now)
        holder = record.get("holder") if record else None
        seq = int(record.get("seq", 0)) if record else 0
        duration = float(record.get("duration", self.timing.duration)) if record else self.timing.duration
        seen = self.observed
        if seen is None or (seen.holder, seen.seq) != (holder, seq):
            self.observed = Observed(holder, seq, duration, now)
            if holder is None and self.wanted and self._act_until is None:
                # Released (by its holder, or on a dead holder's behalf): try at once, not after a
                # `retry_in` computed while it was still held. Acquiring a free lease is always safe.
                self._next_attempt = -math.inf
        actions: list[Action] = []
        if holder is not None and holder != self.node and self._act_until is not None:
            # Cannot happen while our lease runs (the state waits it out); belt and braces.
            self._drop(f"the cluster granted the lease to {holder}", actions)
        return actions

    def on_result(self, request_id: int, result: dict[str, Any] | None, now: float) -> list[Action]:
        """Outcome of a SendCommand: the state's result dict, or None (failed, timed out, unknown)."""
        self._clock(now)
        request = self._inflight.pop(request_id, None)
        actions: list[Action] = []
        if request is None or request.kind == "release":
            return actions
        if result is None:
            self._next_attempt = min(self._next_attempt, now + self.timing.retry_interval)
            return actions
        if result.get("ok"):
            if not self.wanted:
                self._release_due = True  # granted after we stopped wanting it: give it back
                return actions + self.tick(now)
            act_until = request.sent_at + self.timing.duration - self.timing.margin
            if act_until <= now:
                return actions  # answered too late to be of use
            was_holding = self._holding(now)
            self._next_attempt = -math.inf  # the next renewal is due by the schedule, not by a retry
            if self._act_until is None or act_until > self._act_until:
                self._act_until = act_until
            if self._unconfirmed_since is not None and request.sent_at >= self._unconfirmed_since:
                self._unconfirmed_since = None
            if not was_holding:
                self.granted_total += 1
                actions.append(LeaseGranted(self._act_until))
            return actions
        # Rejected: somebody else holds it (or we never did).
        if self._act_until is not None:
            self._drop(f"renewal rejected: {result.get('error', 'not the holder')}", actions)
        holder = result.get("holder")
        if holder is not None and "seq" in result:
            self.observe(
                {
                    "holder": holder,
                    "seq": result["seq"],
                    "duration": result.get("duration", self.timing.duration),
                },
                now,
            )
        retry = result.get("retry_in")
        wait = float(retry) if isinstance(retry, int | float) else self.timing.retry_interval
        self._next_attempt = now + max(self.timing.retry_interval, wait)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Call every ~50 ms and at `next_wakeup()`: expiry, renewals, acquisition attempts, release."""
        self._clock(now)
        actions: list[Action] = []
        if self._act_until is not None and now >= self._act_until:
            self._drop("lease expired before a renewal was committed (no quorum?)", actions)
        for rid, request in list(self._inflight.items()):
            if now - request.sent_at > self.timing.request_timeout:
                del self._inflight[rid]  # outcome unknown; a late grant would only be safe (see docs)
        if self._release_due and not self._inflight:
            self._release_due = False
            actions.append(self._send("release", now, {}))
            return actions
        if not self.wanted or self._inflight or now < self._next_attempt:
            return actions
        if self._act_until is not None:
            last_sent = self._act_until - (self.timing.duration - self.timing.margin)
            if self._unconfirmed_since is None and now < last_sent + self.timing.renew_after:
                return actions
            actions.append(self._send("renew", now, {"duration": self.timing.duration}))
            return actions
        extra: dict[str, Any] = {"duration": self.timing.duration}
        seen = self.observed
        if seen is not None and seen.holder is not None and seen.holder != self.node:
            takeover = seen.at + takeover_delay(seen.duration)
            if now < takeover:
                self._next_attempt = takeover
                return actions
            extra["seen"] = {"holder": seen.holder, "seq": seen.seq, "at": seen.at}
        actions.append(self._send("acquire", now, extra))
        return actions

    def next_wakeup(self, now: float) -> float | None:
        """The next time `tick` has something to do (besides the regular ticks)."""
        times = []
        if self._act_until is not None:
            times.append(self._act_until)
            last_sent = self._act_until - (self.timing.duration - self.timing.margin)
            times.append(last_sent + self.timing.renew_after)
        if self.wanted and self._next_attempt > now:
            times.append(self._next_attempt)
        return min(times) if times else None

    # --- internals --------------------------------------------------------------------------------
    def _holding(self, now: float) -> bool:
        return self._act_until is not None and now < self._act_until

    def _clock(self, now: float) -> None:
        last = self._last_call
        if last is not None and now - last > self.timing.gap_threshold and self._act_until is not None:
            self.gaps += 1
            self._unconfirmed_since = now
            self._next_attempt = -math.inf
        if last is None or now > last:
            self._last_call = now

    def _drop(self, reason: str, actions: list[Action], emit: bool = True) -> None:
        self._act_until = None
        self._unconfirmed_since = None
        if emit:  # a voluntary release is not a loss
            self.last_lost_reason = reason
            self.lost_total += 1
            actions.append(LeaseLost(reason))

    def _send(self, kind: str, now: float, extra: dict[str, Any]) -> SendCommand:
        self._next_id += 1
        self._inflight[self._next_id] = _Request(self._next_id, kind, now)
        self._next_attempt = now + self.timing.retry_interval
        command = {"op": kind, "lease": self.lease, "node": self.node, "now": now, **extra}
        return SendCommand(self._next_id, command)
