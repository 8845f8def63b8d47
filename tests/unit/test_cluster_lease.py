"""The node-side VIP lease on a fake clock: every fault, and a simulated cluster that must never have two
nodes allowed to act at the same real time."""

from __future__ import annotations

import asyncio
import heapq
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halb.cluster.keeper import LeaseKeeper
from halb.cluster.lease import (
    MAX_RATE_ERROR,
    LeaseGranted,
    LeaseHolder,
    LeaseLost,
    LeaseTiming,
    SendCommand,
    takeover_delay,
)
from halb.cluster.state import ClusterState
from tests.unit.vrrp_fakes import RaftMember

T = LeaseTiming.for_duration(2.0)


def sends(actions: list[Any]) -> list[SendCommand]:
    return [a for a in actions if isinstance(a, SendCommand)]


def ticks(holder: LeaseHolder, start: float, end: float, step: float = 0.05) -> list[Any]:
    """The node's loop ticking from `start` (exclusive) to `end` (inclusive); the actions it produced."""
    actions: list[Any] = []
    now = start
    while now < end - 1e-9:
        now = min(round(now + step, 6), end)
        actions += holder.tick(now)
    return actions


def granted(holder: LeaseHolder, now: float) -> SendCommand:
    """Acquire at `now` and have it granted at once."""
    (cmd,) = sends(holder.set_wanted(True, now))
    assert cmd.command["op"] == "acquire" and cmd.command["now"] == now
    holder.on_result(cmd.request_id, {"ok": True, "holder": holder.node, "seq": 1}, now)
    return cmd


def test_timing_numbers_and_the_safety_inequality() -> None:
    assert (T.duration, T.margin, T.retry_interval, T.request_timeout) == (2.0, 0.2, 0.1, 0.5)
    assert T.renew_after == pytest.approx(2 / 3)
    assert takeover_delay(2.0) == pytest.approx(2.2)
    assert T.spare == pytest.approx(2.2 / (1 + MAX_RATE_ERROR) - 1.8 / (1 - MAX_RATE_ERROR))
    assert T.spare > 0.35
    with pytest.raises(ValueError, match="unsafe"):
        LeaseTiming(2.0, 0.5, margin=-0.3, retry_interval=0.1, request_timeout=0.5, gap_threshold=0.25)


def test_validity_counts_from_the_send_time_not_the_ack() -> None:
    holder = LeaseHolder("lb1", T)
    (cmd,) = sends(holder.set_wanted(True, 10.0))
    assert not holder.may_act(10.0)
    ticks(holder, 10.0, 10.45)
    actions = holder.on_result(cmd.request_id, {"ok": True}, 10.45)  # a slow ack
    assert actions == [LeaseGranted(11.8)]  # 10.0 + 2.0 - 0.2, not 10.45 + ...
    ticks(holder, 10.45, 11.0)
    ticks(holder, 11.0, 11.75)  # renewals go unanswered
    assert holder.may_act(11.79)
    assert not holder.may_act(11.8)


def test_an_ack_after_the_lease_would_have_ended_grants_nothing() -> None:
    holder = LeaseHolder("lb1", T)
    (cmd,) = sends(holder.set_wanted(True, 10.0))
    ticks(holder, 10.0, 11.85)
    assert holder.on_result(cmd.request_id, {"ok": True}, 11.85) == []
    assert not holder.may_act(11.85)


def test_renews_at_a_third_and_keeps_the_lease() -> None:
    holder = LeaseHolder("lb1", T)
    granted(holder, 0.0)
    assert sends(ticks(holder, 0.0, 0.65)) == []
    (renew,) = sends(ticks(holder, 0.65, 0.7))
    assert renew.command["op"] == "renew" and renew.command["now"] == 0.7
    holder.on_result(renew.request_id, {"ok": True}, 0.72)
    assert holder.remaining(0.72) == pytest.approx(0.7 + 1.8 - 0.72)
    assert holder.next_wakeup(0.72) == pytest.approx(0.7 + 2 / 3)


def test_failing_renewals_are_retried_then_the_vip_is_dropped_before_expiry() -> None:
    holder = LeaseHolder("lb1", T)
    granted(holder, 0.0)
    now, attempts, lost = 0.0, 0, []
    while now < 2.5:
        now = round(now + 0.05, 2)
        for action in holder.tick(now):
            if isinstance(action, SendCommand):
                attempts += 1
                holder.on_result(action.request_id, None, now + 0.01)  # no leader / no quorum
            elif isinstance(action, LeaseLost):
                lost.append((now, action.reason))
    assert attempts >= 10  # every retry_interval from 0.67 s on
    assert lost and lost[0][0] == pytest.approx(1.8)  # 0.2 s before the nominal 2.0 s
    assert "no quorum" in lost[0][1]
    assert not holder.may_act(1.8)


def test_a_rejected_renewal_drops_the_lease_at_once() -> None:
    holder = LeaseHolder("lb1", T)
    granted(holder, 0.0)
    (renew,) = sends(ticks(holder, 0.0, 0.7))
    rejected = {"ok": False, "error": "held by lb2", "holder": "lb2", "seq": 5}
    actions = holder.on_result(renew.request_id, rejected, 0.71)
    assert [type(a) for a in actions] == [LeaseLost]
    assert not holder.may_act(0.71)
    assert holder.observed is not None and holder.observed.holder == "lb2"


def test_frozen_longer_than_the_lease_resumes_without_acting() -> None:
    holder = LeaseHolder("lb1", T)
    granted(holder, 0.0)
    # SIGSTOP at 0.3, SIGCONT at 6.0: the first thing after the resume is a master action's check
    assert not holder.may_act(6.0)
    actions = holder.tick(6.0)
    assert any(isinstance(a, LeaseLost) for a in actions)
    assert holder.gaps == 1


def test_a_short_pause_makes_the_lease_unconfirmed_until_a_fresh_renewal() -> None:
    holder = LeaseHolder("lb1", T)
    granted(holder, 0.0)
    (renew,) = sends(ticks(holder, 0.0, 0.7))  # in flight when the process is paused
    # paused 0.75 .. 1.3: the lease still runs until 1.8 by the clock, but not even a GARP goes out
    assert not holder.may_act(1.3)
    assert holder.holds(1.3)
    holder.on_result(renew.request_id, {"ok": True}, 1.31)  # sent BEFORE the gap: does not confirm
    assert not holder.may_act(1.31)
    assert holder.remaining(1.31) == pytest.approx(0.7 + 1.8 - 1.31)
    (fresh,) = sends(holder.tick(1.35))  # renewal right away
    holder.on_result(fresh.request_id, {"ok": True}, 1.4)
    assert holder.may_act(1.4)
    assert holder.remaining(1.4) == pytest.approx(1.35 + 1.8 - 1.4)


def test_takeover_waits_a_full_takeover_delay_from_the_last_seen_renewal() -> None:
    b = LeaseHolder("lb2", T)
    b.observe({"holder": "lb1", "seq": 3, "duration": 2.0}, 10.0)
    assert sends(b.set_wanted(True, 10.05)) == []
    assert sends(ticks(b, 10.05, 10.6)) == []
    b.observe({"holder": "lb1", "seq": 4, "duration": 2.0}, 10.6)  # lb1 renewed: the clock restarts
    assert b.takeover_at() == pytest.approx(12.8)
    assert sends(ticks(b, 10.6, 12.75)) == []
    (acquire,) = sends(b.tick(12.8))
    assert acquire.command["seen"] == {"holder": "lb1", "seq": 4, "at": 10.6}
    # the state agrees (same clock readings)
    state = ClusterState()
    state.apply({"op": "acquire", "lease": "vip", "node": "lb1", "now": 0.0, "duration": 2.0})
    for _ in range(3):
        state.apply({"op": "renew", "lease": "vip", "node": "lb1", "now": 0.0, "duration": 2.0})
    result = state.apply(acquire.command)
    assert result["ok"] and result["holder"] == "lb2"
    assert b.on_result(acquire.request_id, result, 12.82) == [LeaseGranted(12.8 + 1.8)]


def test_a_rejected_acquire_waits_what_the_state_says() -> None:
    b = LeaseHolder("lb2", T)
    (acquire,) = sends(b.set_wanted(True, 5.0))
    rejected = {"ok": False, "code": "held", "holder": "lb1", "seq": 7, "retry_in": 2.2}
    b.on_result(acquire.request_id, rejected, 5.1)
    assert sends(b.tick(5.2)) == []
    assert b.takeover_at() == pytest.approx(5.1 + 2.2)


def test_seeing_another_holder_while_holding_drops_the_lease() -> None:
    holder = LeaseHolder("lb1", T)
    granted(holder, 0.0)
    actions = holder.observe({"holder": "lb2", "seq": 9, "duration": 2.0}, 0.5)
    assert [type(a) for a in actions] == [LeaseLost]
    assert not holder.may_act(0.5)


def test_giving_up_stops_acting_at_once_and_releases() -> None:
    holder = LeaseHolder("lb1", T)
    granted(holder, 0.0)
    actions = holder.set_wanted(False, 0.3)
    assert not any(isinstance(a, LeaseLost) for a in actions)  # our own decision is no loss
    (release,) = sends(actions)
    assert release.command == {"op": "release", "lease": "vip", "node": "lb1", "now": 0.3}
    assert not holder.may_act(0.3)


def test_a_grant_that_arrives_after_giving_up_is_returned() -> None:
    holder = LeaseHolder("lb1", T)
    (acquire,) = sends(holder.set_wanted(True, 0.0))
    assert sends(holder.set_wanted(False, 0.1)) == []  # nothing held yet: nothing to release
    (release,) = sends(holder.on_result(acquire.request_id, {"ok": True}, 0.2))
    assert release.command["op"] == "release"
    assert not holder.may_act(0.2)


def test_a_lost_request_times_out_and_is_sent_again() -> None:
    holder = LeaseHolder("lb1", T)
    (first,) = sends(holder.set_wanted(True, 0.0))
    assert sends(ticks(holder, 0.0, 0.5)) == []
    (second,) = sends(holder.tick(0.55))  # after request_timeout (0.5 s)
    assert second.request_id != first.request_id


# --- a simulated cluster: mutual exclusion under drift, delays, losses, pauses ---------------------------
@dataclass(order=True)
class _Event:
    at: float
    seq: int
    kind: str = field(compare=False)
    data: Any = field(compare=False)


@dataclass
class _Node:
    holder: LeaseHolder
    rate: float
    offset: float
    frozen: list[tuple[float, float]]
    loss: float
    cut: tuple[float, float] = (0.0, 0.0)  # partitioned from the quorum: everything it sends is lost

    def lost(self, t: float, rng: random.Random) -> bool:
        return self.cut[0] <= t < self.cut[1] or rng.random() < self.loss

    def clock(self, t: float) -> float:
        return self.offset + self.rate * t

    def is_frozen(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.frozen)


def simulate(
    seed: int,
    rates: tuple[float, float],
    freeze: tuple[float, float],
    loss: float,
    cut: tuple[float, float] = (0.0, 0.0),
) -> int:
    """Two nodes that BOTH want the lease (lb1 may be frozen and/or partitioned for a while); returns how
    often the lease changed hands."""
    rng = random.Random(seed)
    state = ClusterState()
    nodes = [
        _Node(LeaseHolder("lb1", T), rates[0], 100.0, [freeze], loss, cut),
        _Node(LeaseHolder("lb2", T), rates[1], 5000.0, [], loss),
    ]
    queue: list[_Event] = []
    counter = 0

    def push(at: float, kind: str, data: Any) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(queue, _Event(at, counter, kind, data))

    def run(node: _Node, actions: list[Any], t: float) -> None:
        for action in actions:
            if isinstance(action, SendCommand) and not node.lost(t, rng):
                push(t + rng.uniform(0.002, 0.4), "commit", (node, action))

    handovers, last_holder = 0, None
    t, dt = 0.0, 0.01
    run(nodes[0], nodes[0].holder.set_wanted(True, nodes[0].clock(0.0)), 0.0)  # lb1 first
    while t < 12.0:
        if t == 0.5:  # lb2 wants it too (say VRRP made both MASTER): only the lease decides
            run(nodes[1], nodes[1].holder.set_wanted(True, nodes[1].clock(t)), t)
        while queue and queue[0].at <= t:
            event = heapq.heappop(queue)
            if event.kind == "commit":  # the log orders commands by commit time
                node, action = event.data
                result = state.apply(action.command)
                record = state.lease("vip")
                for other in nodes:  # each member applies it a little later (unless cut off)
                    if not (other.cut[0] <= event.at < other.cut[1]):
                        push(event.at + rng.uniform(0.001, 0.1), "observe", (other, record))
                if not node.lost(event.at, rng):
                    push(event.at + rng.uniform(0.001, 0.2), "result", (node, action, result))
            elif event.kind in ("observe", "result"):
                node = event.data[0]
                if node.is_frozen(event.at):
                    push(event.at + 0.05, event.kind, event.data)  # delivered after the thaw
                elif event.kind == "observe":
                    run(node, node.holder.observe(event.data[1], node.clock(event.at)), event.at)
                else:
                    _, action, result = event.data
                    run(
                        node, node.holder.on_result(action.request_id, result, node.clock(event.at)), event.at
                    )
        acting = []
        for node in nodes:
            if node.is_frozen(t):
                continue  # a stopped process does nothing at all
            if node.holder.may_act(node.clock(t)):  # the check before a master action
                acting.append(node.holder.node)
            run(node, node.holder.tick(node.clock(t)), t)
        assert len(acting) <= 1, f"both nodes may act at t={t:.2f}: {acting}"
        if acting and acting[0] != last_holder:
            handovers += 1
            last_holder = acting[0]
        t = round(t + dt, 4)
    return handovers


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    rates=st.tuples(
        st.floats(1 - MAX_RATE_ERROR, 1 + MAX_RATE_ERROR), st.floats(1 - MAX_RATE_ERROR, 1 + MAX_RATE_ERROR)
    ),
    freeze_at=st.floats(0.0, 8.0),
    freeze_for=st.floats(0.0, 4.0),
    loss=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    cut_at=st.floats(0.0, 8.0),
    cut_for=st.floats(0.0, 5.0),
)
def test_never_two_holders_in_a_simulated_cluster(
    seed: int,
    rates: tuple[float, float],
    freeze_at: float,
    freeze_for: float,
    loss: float,
    cut_at: float,
    cut_for: float,
) -> None:
    simulate(seed, rates, (freeze_at, freeze_at + freeze_for), loss, (cut_at, cut_at + cut_for))


def test_the_simulation_does_hand_the_lease_over() -> None:
    # lb1 gets it first, is frozen for 3 s, lb2 takes over (the check above is not vacuous)
    assert simulate(1, (1.0, 1.0), (1.0, 4.0), 0.0) == 2
    assert simulate(2, (1.0, 1.0), (0.0, 0.0), 0.0, (3.0, 8.0)) == 2  # the same with a partition


def test_the_simulation_catches_a_too_short_takeover_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    import halb.cluster.lease as lease_module
    import halb.cluster.state as state_module

    monkeypatch.setattr(state_module, "takeover_delay", lambda d: 0.7 * d)
    monkeypatch.setattr(lease_module, "takeover_delay", lambda d: 0.7 * d)
    caught = 0
    for seed in range(20):
        try:
            simulate(seed, (1.0, 1.0), (0.0, 0.0), 0.0, (1.0 + seed % 5, 6.0 + seed % 5))
        except AssertionError:
            caught += 1
    assert caught > 0


# --- the asyncio adapter ------------------------------------------------------------------------------------
async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_keeper_acquires_renews_and_loses_the_lease_without_quorum() -> None:
    async def main() -> None:
        member = RaftMember(delay=0.001)
        keeper = LeaseKeeper(member, "lb1", LeaseTiming.for_duration(1.0), tick=0.01)
        member.keepers.append(keeper)
        events: list[Any] = []
        keeper.add_listener(events.append)
        keeper.start()
        try:
            keeper.want(True)
            await _until(keeper.may_act)
            assert isinstance(events[0], LeaseGranted)
            await _until(lambda: member.state.leases["vip"]["seq"] >= 3)  # renewing
            assert keeper.may_act()
            member.down = True  # quorum lost
            await _until(lambda: not keeper.may_act())
            assert isinstance(events[-1], LeaseLost)
            assert keeper.status()["held_here"] is False
        finally:
            await keeper.stop()

    asyncio.run(main())
