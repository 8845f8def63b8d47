"""Tests for halb.vrrp.machine: every RFC 5798 section 6.4 transition on a fake clock, plus a simulation.

No sleeps anywhere: time is a float passed into the machine.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halb.vrrp import (
    Action,
    AddVips,
    Advert,
    RemoveVips,
    SendAdvert,
    SendGarp,
    State,
    StateChanged,
    TransitionReason,
    VrrpConfig,
    VrrpMachine,
)

VIPS = ("192.168.1.100",)
ME = "192.168.1.10"
PEER_LOW = "192.168.1.5"  # numerically lower than ME
PEER_HIGH = "192.168.1.20"  # numerically greater than ME


def make(
    priority: int = 100,
    *,
    interval: float = 1.0,
    preempt: bool = True,
    preempt_delay: float = 0.0,
    primary_ip: str = ME,
    reassert: bool = True,
) -> VrrpMachine:
    return VrrpMachine(
        VrrpConfig(
            vrid=51,
            priority=priority,
            primary_ip=primary_ip,
            virtual_ips=VIPS,
            advert_interval=interval,
            preempt=preempt,
            preempt_delay=preempt_delay,
            reassert_on_lower_priority=reassert,
        )
    )


def adv(priority: int, interval_cs: int = 100, vrid: int = 51) -> Advert:
    return Advert(vrid=vrid, priority=priority, max_advert_interval_cs=interval_cs, addresses=VIPS)


def sent(actions: list[Action]) -> list[int]:
    return [a.priority for a in actions if isinstance(a, SendAdvert)]


def deadline(m: VrrpMachine) -> float:
    value = m.next_deadline()
    assert value is not None
    return value


def master_down(priority: int, interval: float = 1.0) -> float:
    return 3 * interval + (256 - priority) * interval / 256


def backup_at(t: float = 0.0, **kwargs: object) -> VrrpMachine:
    m = make(**kwargs)  # type: ignore[arg-type]
    m.startup(t)
    assert m.state is State.BACKUP
    return m


def master_at(t: float = 0.0, **kwargs: object) -> VrrpMachine:
    m = backup_at(t, **kwargs)
    m.timer_fired(deadline(m))
    assert m.state is State.MASTER
    return m


BECOME_MASTER = [SendAdvert, AddVips, SendGarp, StateChanged]


def new_state(actions: list[Action]) -> State:
    """The state named by the last StateChanged in ``actions``."""
    changes = [a for a in actions if isinstance(a, StateChanged)]
    assert changes, actions
    return changes[-1].new


# --------------------------------------------------------------------------- timers arithmetic


def test_skew_and_master_down_interval_formulas() -> None:
    m = make(priority=100)
    assert m.skew_time == pytest.approx((256 - 100) / 256)
    assert m.master_down_interval == pytest.approx(3 + 156 / 256)
    fast = make(priority=200, interval=0.1)
    assert fast.master_down_interval == pytest.approx(0.3 + 56 * 0.1 / 256)


# --------------------------------------------------------------------------- Initialize


def test_owner_startup_becomes_master_at_once() -> None:
    m = make(priority=255)
    actions = m.startup(10.0)
    assert [type(a) for a in actions] == BECOME_MASTER
    assert actions[0] == SendAdvert(Advert(51, 255, 100, VIPS))
    assert actions[1] == AddVips(VIPS) and actions[2] == SendGarp(VIPS)
    assert actions[3] == StateChanged(State.INITIALIZE, State.MASTER, TransitionReason.OWNER_STARTUP)
    assert m.state is State.MASTER
    assert m.next_deadline() == pytest.approx(11.0)


def test_startup_below_owner_is_backup_then_master_after_master_down_interval_of_silence() -> None:
    m = make(priority=100)
    assert m.state is State.INITIALIZE and m.next_deadline() is None
    assert m.startup(5.0) == [StateChanged(State.INITIALIZE, State.BACKUP, TransitionReason.STARTUP)]
    due = deadline(m)
    assert due == pytest.approx(5.0 + master_down(100))
    assert m.timer_fired(due - 0.001) == []  # early: nothing
    actions = m.timer_fired(due)
    assert [type(a) for a in actions] == BECOME_MASTER
    assert actions[-1] == StateChanged(State.BACKUP, State.MASTER, TransitionReason.MASTER_DOWN)
    assert m.timer_fired(due) == []  # twice: nothing
    # Master then advertises every Advertisement_Interval
    assert sent(m.timer_fired(due + 1.0)) == [100]
    assert m.next_deadline() == pytest.approx(due + 2.0)


@pytest.mark.parametrize("call", ["shutdown", "advert", "timer"])
def test_initialize_ignores_everything_but_startup(call: str) -> None:
    m = make()
    if call == "shutdown":
        assert m.shutdown(1.0) == []
    elif call == "advert":
        assert m.advert_received(1.0, adv(200), PEER_HIGH) == []
    else:
        assert m.timer_fired(1.0) == []
    assert m.state is State.INITIALIZE and m.next_deadline() is None


def test_startup_when_running_is_a_no_op() -> None:
    b = backup_at(0.0)
    deadline = b.next_deadline()
    assert b.startup(1.0) == [] and b.next_deadline() == deadline
    m = master_at(0.0)
    assert m.startup(10.0) == [] and m.state is State.MASTER


def test_set_priority_in_initialize_is_used_at_startup() -> None:
    m = make(priority=100)
    assert m.set_priority(0.0, 255) == []
    assert [type(a) for a in m.startup(0.0)] == BECOME_MASTER


# --------------------------------------------------------------------------- Backup


def test_backup_resets_master_down_timer_on_adverts() -> None:
    m = backup_at(0.0, priority=100)
    assert m.advert_received(2.0, adv(150), PEER_HIGH) == []
    assert m.next_deadline() == pytest.approx(2.0 + master_down(100))
    assert m.master_ip == PEER_HIGH
    # silence afterwards -> takeover
    assert [type(a) for a in m.timer_fired(2.0 + master_down(100))] == BECOME_MASTER


def test_priority_zero_advert_takeover_after_skew_time() -> None:
    m = backup_at(0.0, priority=100)
    m.advert_received(1.0, adv(150), PEER_HIGH)
    assert m.advert_received(1.5, adv(0), PEER_HIGH) == []
    assert m.next_deadline() == pytest.approx(1.5 + m.skew_time)
    assert m.skew_time == pytest.approx(156 / 256)
    actions = m.timer_fired(1.5 + m.skew_time)
    assert actions[-1] == StateChanged(State.BACKUP, State.MASTER, TransitionReason.MASTER_DOWN)


def test_priority_zero_uses_learned_interval_for_skew() -> None:
    m = backup_at(0.0, priority=128)
    m.advert_received(0.5, adv(200, interval_cs=400), PEER_HIGH)
    m.advert_received(1.0, adv(0, interval_cs=400), PEER_HIGH)
    assert m.next_deadline() == pytest.approx(1.0 + 128 * 4.0 / 256)


def test_backup_learns_master_adver_interval() -> None:
    m = backup_at(0.0, priority=100, interval=1.0)
    assert m.master_adver_interval == 1.0
    m.advert_received(1.0, adv(200, interval_cs=25), PEER_HIGH)
    assert m.master_adver_interval == pytest.approx(0.25)
    assert m.master_down_interval == pytest.approx(0.75 + 156 * 0.25 / 256)
    assert m.next_deadline() == pytest.approx(1.0 + m.master_down_interval)
    # our own adverts keep our own interval once we are master
    deadline = m.next_deadline()
    assert deadline is not None
    actions = m.timer_fired(deadline)
    assert actions[0] == SendAdvert(Advert(51, 100, 100, VIPS))
    assert m.next_deadline() == pytest.approx(deadline + 1.0)
    # and a restart forgets the learned value
    m.shutdown(deadline + 0.5)
    m.startup(deadline + 1.0)
    assert m.master_adver_interval == 1.0


def test_preempt_on_lower_priority_master_is_discarded_then_preempted() -> None:
    m = backup_at(0.0, priority=200)
    first_deadline = m.next_deadline()
    for t in (1.0, 2.0, 3.0):
        assert m.advert_received(t, adv(100), PEER_LOW) == []
    assert m.next_deadline() == first_deadline  # discarded: timer not reset
    assert first_deadline is not None
    assert new_state(m.timer_fired(first_deadline)) is State.MASTER


def test_preempt_off_higher_priority_backup_stays_backup() -> None:
    m = backup_at(0.0, priority=200, preempt=False)
    for t in range(1, 30):
        m.advert_received(float(t), adv(100), PEER_LOW)
        assert m.next_deadline() == pytest.approx(t + master_down(200))
    assert m.state is State.BACKUP
    assert m.timer_fired(29.5) == []


def test_preempt_off_owner_still_preempts() -> None:
    m = backup_at(0.0, priority=100, preempt=False)
    m.advert_received(1.0, adv(150), PEER_HIGH)
    m.set_priority(1.5, 255)  # tracking made us owner while backup
    due = deadline(m)
    m.advert_received(2.0, adv(150), PEER_HIGH)  # lower than 255: discarded even with preempt off
    assert m.next_deadline() == due
    assert new_state(m.timer_fired(due)) is State.MASTER


def test_preempt_delay_counts_from_startup() -> None:
    m = backup_at(0.0, priority=200, preempt_delay=10.0)
    assert m.preempt_until == 10.0
    for t in range(1, 10):  # inside the delay: lower-priority adverts hold us in backup
        m.advert_received(float(t), adv(100), PEER_LOW)
        assert m.next_deadline() == pytest.approx(t + master_down(200))
    m.advert_received(10.5, adv(100), PEER_LOW)  # after it: discarded
    assert m.next_deadline() == pytest.approx(9 + master_down(200))
    assert new_state(m.timer_fired(9 + master_down(200))) is State.MASTER


def test_preempt_delay_restarts_when_seeing_a_lower_master_after_a_higher_one() -> None:
    m = backup_at(0.0, priority=200, preempt_delay=5.0)
    m.advert_received(1.0, adv(250), PEER_HIGH)  # higher master clears the delay
    assert m.preempt_until is None
    m.advert_received(20.0, adv(100), PEER_LOW)  # first lower advert starts it: 25.0
    assert m.preempt_until == 25.0
    m.advert_received(24.0, adv(100), PEER_LOW)
    assert m.next_deadline() == pytest.approx(24.0 + master_down(200))
    m.advert_received(25.0, adv(100), PEER_LOW)  # delay over: discarded
    assert m.next_deadline() == pytest.approx(24.0 + master_down(200))


def test_preempt_delay_without_preempt_is_moot() -> None:
    m = backup_at(0.0, priority=200, preempt=False, preempt_delay=1.0)
    m.advert_received(50.0, adv(100), PEER_LOW)
    assert m.next_deadline() == pytest.approx(50.0 + master_down(200))


def test_equal_priority_backup_accepts() -> None:
    m = backup_at(0.0, priority=100)
    m.advert_received(1.0, adv(100), PEER_LOW)  # lower address but equal priority: p >= P accepts
    assert m.next_deadline() == pytest.approx(1.0 + master_down(100))


def test_backup_shutdown() -> None:
    m = backup_at(0.0)
    assert m.shutdown(1.0) == [StateChanged(State.BACKUP, State.INITIALIZE, TransitionReason.SHUTDOWN)]
    assert m.state is State.INITIALIZE and m.next_deadline() is None
    assert m.timer_fired(100.0) == []


@pytest.mark.parametrize(
    ("advert", "src"),
    [
        (adv(200, vrid=52), PEER_HIGH),  # other VRID
        (adv(200, interval_cs=0), PEER_HIGH),  # zero interval
        (adv(200), ME),  # our own advert looped back
        (adv(200), "not-an-ip"),
    ],
)
def test_irrelevant_adverts_are_ignored(advert: Advert, src: str) -> None:
    b = backup_at(0.0)
    deadline = b.next_deadline()
    assert b.advert_received(1.0, advert, src) == [] and b.next_deadline() == deadline
    m = master_at(0.0)
    assert m.advert_received(5.0, advert, src) == [] and m.state is State.MASTER


# --------------------------------------------------------------------------- Master


def test_master_to_backup_on_higher_priority() -> None:
    m = master_at(0.0, priority=100)
    actions = m.advert_received(10.0, adv(150, interval_cs=50), PEER_LOW)
    assert actions == [
        RemoveVips(VIPS),
        StateChanged(State.MASTER, State.BACKUP, TransitionReason.HIGHER_PRIORITY),
    ]
    assert m.state is State.BACKUP
    assert m.master_adver_interval == pytest.approx(0.5)
    assert m.next_deadline() == pytest.approx(10.0 + master_down(100, 0.5))


def test_equal_priority_tie_break_greater_address_wins() -> None:
    m = master_at(0.0, priority=100)
    actions = m.advert_received(10.0, adv(100), PEER_HIGH)
    assert actions[-1] == StateChanged(State.MASTER, State.BACKUP, TransitionReason.HIGHER_PRIORITY)


def test_equal_priority_tie_break_lower_address_loses() -> None:
    m = master_at(0.0, priority=100)
    assert sent(m.advert_received(10.0, adv(100), PEER_LOW)) == [100]
    assert m.state is State.MASTER


def test_tie_break_compares_numerically_not_as_strings() -> None:
    # "10.0.0.9" > "10.0.0.10" as strings, but 9 < 10 numerically.
    m = master_at(0.0, priority=100, primary_ip="10.0.0.10")
    assert m.advert_received(1.0, adv(100), "10.0.0.9") == [
        SendAdvert(Advert(51, 100, 100, VIPS)),
        SendGarp(VIPS),  # the other node thought it was master: re-announce
    ]
    m = master_at(0.0, priority=100, primary_ip="10.0.0.9")
    assert new_state(m.advert_received(1.0, adv(100), "10.0.0.10")) is State.BACKUP


def test_master_reasserts_on_lower_priority_advert() -> None:
    m = master_at(0.0, priority=200)
    due = deadline(m)
    assert sent(m.advert_received(due - 0.5, adv(100), PEER_HIGH)) == [200]
    assert m.state is State.MASTER
    assert m.next_deadline() == due  # keepalived does not reset the Adver_Timer for this


def test_master_lower_priority_discard_when_reassert_disabled() -> None:
    m = master_at(0.0, priority=200, reassert=False)
    assert m.advert_received(5.0, adv(100), PEER_HIGH) == []
    assert m.state is State.MASTER


def test_master_answers_priority_zero_at_once() -> None:
    m = master_at(0.0, priority=100)
    assert sent(m.advert_received(7.25, adv(0), PEER_HIGH)) == [100]
    assert m.state is State.MASTER
    assert m.next_deadline() == pytest.approx(8.25)


def test_master_shutdown_sends_priority_zero_and_removes_vips() -> None:
    m = master_at(0.0, priority=100)
    actions = m.shutdown(9.0)
    assert actions == [
        SendAdvert(Advert(51, 0, 100, VIPS)),
        RemoveVips(VIPS),
        StateChanged(State.MASTER, State.INITIALIZE, TransitionReason.SHUTDOWN),
    ]
    assert sent(actions) == [0]
    assert m.state is State.INITIALIZE and m.next_deadline() is None
    assert m.shutdown(9.5) == []
    # and it can come back
    assert new_state(m.startup(20.0)) is State.BACKUP


# --------------------------------------------------------------------------- tracking


def test_master_priority_drop_is_advertised_at_once_and_hands_over() -> None:
    a = master_at(0.0, priority=200, primary_ip=ME)
    b = backup_at(0.0, priority=150, primary_ip=PEER_LOW)
    b.advert_received(1.0, adv(200), ME)
    actions = a.set_priority(1.5, 100)
    assert sent(actions) == [100] and a.next_deadline() == pytest.approx(2.5)
    # the backup discards the now-lower adverts and takes over when its timer fires
    due = deadline(b)
    for action in actions:
        assert isinstance(action, SendAdvert)
        b.advert_received(1.5, action.advert, ME)
    assert b.next_deadline() == due
    takeover = b.timer_fired(due)
    assert takeover[-1] == StateChanged(State.BACKUP, State.MASTER, TransitionReason.MASTER_DOWN)
    # the old master yields to the new master's first advert
    first = takeover[0]
    assert isinstance(first, SendAdvert)
    yielded = a.advert_received(due, first.advert, PEER_LOW)
    assert yielded[-1] == StateChanged(State.MASTER, State.BACKUP, TransitionReason.HIGHER_PRIORITY)


def test_unchanged_priority_is_a_no_op() -> None:
    m = master_at(0.0, priority=100)
    assert m.set_priority(1.0, 100) == []


def test_backup_priority_raise_pulls_timer_in_and_preempts() -> None:
    m = backup_at(0.0, priority=50)
    m.advert_received(1.0, adv(100), PEER_HIGH)
    old_deadline = deadline(m)
    assert m.set_priority(1.2, 150) == []
    assert m.next_deadline() == pytest.approx(old_deadline - (150 - 50) / 256)
    m.advert_received(2.0, adv(100), PEER_HIGH)  # lower than us now: discarded
    due = deadline(m)
    assert due == pytest.approx(1.0 + master_down(150))
    assert new_state(m.timer_fired(due)) is State.MASTER


def test_backup_priority_drop_keeps_timer() -> None:
    m = backup_at(0.0, priority=150)
    due = m.next_deadline()
    assert m.set_priority(0.5, 20) == [] and m.next_deadline() == due


@pytest.mark.parametrize("bad", [0, 256, -1, True])
def test_set_priority_range(bad: int) -> None:
    with pytest.raises(ValueError):
        make().set_priority(0.0, bad)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vrid": 0},
        {"vrid": 256},
        {"priority": 0},
        {"priority": 256},
        {"primary_ip": "nope"},
        {"virtual_ips": ("1.2.3.4.5",)},
        {"advert_interval": 0.0},
        {"advert_interval": 0.005},
        {"advert_interval": 41.0},
        {"advert_interval": 1.234},
        {"advert_interval": float("nan")},
        {"preempt_delay": -1.0},
        {"preempt_delay": float("inf")},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"vrid": 1, "priority": 100, "primary_ip": ME, "virtual_ips": VIPS}
    with pytest.raises(ValueError):
        VrrpConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_config_interval_centiseconds() -> None:
    assert VrrpConfig(1, 100, ME, ("10.0.0.1",), advert_interval=0.1).advert_interval_cs == 10
    assert VrrpConfig(1, 100, ME, (), advert_interval=40.95).advert_interval_cs == 4095


# --------------------------------------------------------------------------- simulation


LATENCY = 0.0005  # one-way delivery delay on the simulated LAN, seconds


@dataclass
class Node:
    index: int
    ip: str
    config: VrrpConfig
    machine: VrrpMachine
    running: bool = False
    holds_vips: bool = False
    timer_generation: int = 0
    transitions: list[tuple[float, StateChanged]] = field(default_factory=list)


@dataclass(frozen=True)
class TimerEvent:
    index: int
    generation: int


@dataclass(frozen=True)
class Delivery:
    index: int
    advert: Advert
    src_ip: str


class Lan:
    """N machines on a lossy multicast LAN driven by a virtual clock, each with one timer."""

    def __init__(self, configs: list[VrrpConfig], rng: random.Random) -> None:
        self.nodes = [Node(i, c.primary_ip, c, VrrpMachine(c)) for i, c in enumerate(configs)]
        self.rng = rng
        self.loss = 0.0
        self.now = 0.0
        self.events = 0
        self._queue: list[tuple[float, int, TimerEvent | Delivery]] = []
        self._seq = itertools.count()

    # -- plumbing

    def _push(self, at: float, event: TimerEvent | Delivery) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), event))

    def _apply(self, node: Node, actions: list[Action]) -> None:
        """Carry out actions like a driver would, checking the machine's invariants on the way."""
        for action in actions:
            if isinstance(action, SendAdvert):
                assert action.advert.vrid == node.config.vrid
                for other in self.nodes:
                    if other is not node and self.rng.random() >= self.loss:
                        self._push(self.now + LATENCY, Delivery(other.index, action.advert, node.ip))
            elif isinstance(action, AddVips):
                assert not node.holds_vips, "AddVips while holding VIPs"
                node.holds_vips = True
            elif isinstance(action, RemoveVips):
                assert node.holds_vips, "RemoveVips without holding VIPs"
                node.holds_vips = False
            elif isinstance(action, StateChanged):
                assert action.old is not action.new
                node.transitions.append((self.now, action))
        state = node.machine.state
        assert node.holds_vips == (state is State.MASTER)
        for action in actions:
            if isinstance(action, StateChanged):
                assert action.new is state  # the last StateChanged names the state we are in
        deadline = node.machine.next_deadline()
        node.timer_generation += 1
        if deadline is not None:
            assert deadline >= self.now - 1.0, "deadline far in the past"
            self._push(max(deadline, self.now), TimerEvent(node.index, node.timer_generation))
        else:
            assert state is State.INITIALIZE

    def run_until(self, end: float) -> None:
        while self._queue and self._queue[0][0] <= end:
            self.events += 1
            assert self.events < 200_000, "runaway simulation"
            at, _, event = heapq.heappop(self._queue)
            self.now = at
            node = self.nodes[event.index]
            if isinstance(event, TimerEvent):
                if node.running and event.generation == node.timer_generation:
                    self._apply(node, node.machine.timer_fired(at))
                    after = node.machine.next_deadline()
                    assert after is None or after > at, "an expired timer must move its deadline"
            elif node.running:
                self._apply(node, node.machine.advert_received(at, event.advert, event.src_ip))
        self.now = end

    # -- operator actions

    def start(self, index: int) -> None:
        node = self.nodes[index]
        if not node.running:
            node.running = True
            self._apply(node, node.machine.startup(self.now))

    def stop(self, index: int) -> None:
        node = self.nodes[index]
        if node.running:
            self._apply(node, node.machine.shutdown(self.now))
            node.running = False

    def crash(self, index: int) -> None:
        """Power loss: no goodbye advert; a fresh machine (keeping its tracked priority) on restart."""
        node = self.nodes[index]
        if node.running:
            node.running = False
            node.holds_vips = False
            priority = node.machine.priority
            node.machine = VrrpMachine(node.config)
            node.machine.set_priority(self.now, priority)
            node.timer_generation += 1

    def set_priority(self, index: int, priority: int) -> None:
        node = self.nodes[index]
        if node.running:
            self._apply(node, node.machine.set_priority(self.now, priority))
        else:
            node.machine.set_priority(self.now, priority)

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.running]


# Priorities biased towards a few shared values (ties) and the owner value 255.
priority_values = st.one_of(st.integers(1, 255), st.sampled_from([1, 100, 200, 254, 255]))

operations = st.lists(
    st.tuples(
        st.floats(0.0, 8.0),  # wait this many advert intervals first
        st.sampled_from(["stop", "crash", "start", "priority", "loss", "nothing"]),
        st.integers(0, 3),  # node index (mod N)
        priority_values,  # new priority
        st.sampled_from([0.0, 0.1, 0.3, 0.6, 1.0]),  # new loss rate
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 4),
    priorities=st.lists(priority_values, min_size=4, max_size=4, unique=True),
    interval=st.sampled_from([1.0, 0.1, 0.35]),
    preempt=st.booleans(),
    preempt_delay_intervals=st.sampled_from([0, 0, 2, 7]),
    start_offsets=st.lists(st.floats(0.0, 8.0), min_size=4, max_size=4),
    ops=operations,
    seed=st.integers(0, 2**32 - 1),
)
def test_simulated_lan_converges_to_one_master(
    n: int,
    priorities: list[int],
    interval: float,
    preempt: bool,
    preempt_delay_intervals: int,
    start_offsets: list[float],
    ops: list[tuple[float, str, int, int, float]],
    seed: int,
) -> None:
    """Random stops, crashes, restarts, priority changes and message loss, then a quiet period.

    After a quiet period (no loss, no operator actions) of at least 10 x Master_Down_Interval plus the
    preempt delay, exactly one running node is MASTER and no state changes happen any more. With
    preempt on it has the highest priority of the running nodes (with equal priorities, any of those).
    With preempt off the incumbent keeps the role, so which node wins depends on history; what still
    holds is: exactly one master, and a running owner (priority 255) is master, since owners always
    preempt.
    """
    preempt_delay = preempt_delay_intervals * interval
    configs = [
        VrrpConfig(
            vrid=7,
            priority=priorities[i],
            primary_ip=str(ipaddress.IPv4Address("10.0.0.1") + 10 * i),
            virtual_ips=("10.0.0.254",),
            advert_interval=interval,
            preempt=preempt,
            preempt_delay=preempt_delay,
        )
        for i in range(n)
    ]
    lan = Lan(configs, random.Random(seed))
    # staggered start: a low-priority node may already be master when a higher one comes up
    for offset, i in sorted((start_offsets[i] * interval, i) for i in range(n)):
        lan.run_until(offset)
        lan.start(i)

    # chaotic phase
    for wait, kind, node, priority, loss in ops:
        lan.run_until(lan.now + wait * interval)
        index = node % n
        if kind == "stop":
            lan.stop(index)
        elif kind == "crash":
            lan.crash(index)
        elif kind == "start":
            lan.start(index)
        elif kind == "priority":
            lan.set_priority(index, priority)
        elif kind == "loss":
            lan.loss = loss

    # quiet phase
    lan.loss = 0.0
    if not lan.running():
        lan.start(0)
    worst_master_down = 4 * interval  # 3 * interval + skew, skew < interval
    quiet = 10 * worst_master_down + preempt_delay
    settle_start = lan.now
    lan.run_until(settle_start + quiet)
    settled_at = lan.now
    lan.run_until(settled_at + 3 * worst_master_down)

    running = lan.running()
    masters = [node for node in running if node.machine.state is State.MASTER]
    assert len(masters) == 1, [(node.ip, node.machine.state, node.machine.priority) for node in running]
    master = masters[0]
    assert all(node.machine.state is State.BACKUP for node in running if node is not master)
    assert not any(node.holds_vips for node in lan.nodes if node is not master)
    top = max(node.machine.priority for node in running)
    if preempt or top == 255:
        assert master.machine.priority == top
    # stable: nobody changed state during the last 3 x Master_Down_Interval
    late = [t for node in lan.nodes for (t, _) in node.transitions if t > settled_at]
    assert late == []


def _lan(priorities: list[int], *, preempt: bool = True, interval: float = 1.0) -> Lan:
    configs = [
        VrrpConfig(
            vrid=7,
            priority=priority,
            primary_ip=f"10.0.0.{i + 1}",
            virtual_ips=("10.0.0.254",),
            advert_interval=interval,
            preempt=preempt,
        )
        for i, priority in enumerate(priorities)
    ]
    return Lan(configs, random.Random(0))


def _masters(lan: Lan) -> list[str]:
    return [node.ip for node in lan.running() if node.machine.state is State.MASTER]


def test_lan_equal_priorities_started_together_elect_the_greatest_address() -> None:
    lan = _lan([100, 100, 100])
    for i in range(3):
        lan.start(i)
    lan.run_until(4.0)  # all three time out at the same instant and all become master ...
    became_master = [t for node in lan.nodes for t, c in node.transitions if c.new is State.MASTER]
    assert became_master == [pytest.approx(master_down(100))] * 3
    lan.run_until(30.0)  # ... and the tie-break leaves the greatest address
    assert _masters(lan) == ["10.0.0.3"]
    assert all(t < 4.0 for node in lan.nodes for t, _ in node.transitions)


def test_lan_crash_takeover_after_master_down_interval() -> None:
    lan = _lan([200, 150, 100])
    for i in range(3):
        lan.start(i)
    lan.run_until(10.0)
    assert _masters(lan) == ["10.0.0.1"]
    last_advert = 9.0 + LATENCY + master_down(200) - 3.0  # adverts at 3.22 + k, the last one before 10.0
    lan.crash(0)
    lan.run_until(20.0)
    assert _masters(lan) == ["10.0.0.2"]
    ((t, change),) = lan.nodes[1].transitions[1:]
    assert change.reason is TransitionReason.MASTER_DOWN
    assert t == pytest.approx(last_advert + master_down(150), abs=1e-6)


def test_lan_graceful_stop_takeover_after_skew_time() -> None:
    lan = _lan([200, 150, 100])
    for i in range(3):
        lan.start(i)
    lan.run_until(10.0)
    lan.stop(0)  # priority 0 advert
    lan.run_until(20.0)
    assert _masters(lan) == ["10.0.0.2"]
    ((t, _),) = lan.nodes[1].transitions[1:]
    assert t == pytest.approx(10.0 + LATENCY + (256 - 150) / 256)  # Skew_Time, not Master_Down_Interval
    assert len(lan.nodes[2].transitions) == 1  # the lowest never became master


def test_lan_preempt_off_keeps_incumbent_until_it_leaves() -> None:
    lan = _lan([200, 100], preempt=False)
    lan.start(1)
    lan.run_until(10.0)
    lan.start(0)
    lan.run_until(60.0)
    assert _masters(lan) == ["10.0.0.2"]  # the higher one waits
    lan.stop(1)
    lan.run_until(70.0)
    assert _masters(lan) == ["10.0.0.1"]


def test_lan_preempt_on_higher_node_started_late_takes_over() -> None:
    lan = _lan([200, 100])
    lan.start(1)
    lan.run_until(10.0)
    lan.start(0)
    lan.run_until(60.0)
    assert _masters(lan) == ["10.0.0.1"]
    ((t, _),) = lan.nodes[0].transitions[1:]
    assert t == pytest.approx(10.0 + master_down(200))  # discards the lower adverts, timer runs out


def test_master_ending_a_split_brain_reannounces_with_garp_once_a_second() -> None:
    """After a healed partition the surviving master re-sends GARP so the client follows it back."""
    from halb.vrrp.codec import Advert as _Advert
    from halb.vrrp.machine import SendAdvert as _SendAdvert
    from halb.vrrp.machine import SendGarp as _SendGarp
    from halb.vrrp.machine import State as _State
    from halb.vrrp.machine import VrrpConfig as _VrrpConfig
    from halb.vrrp.machine import VrrpMachine as _VrrpMachine

    machine = _VrrpMachine(
        _VrrpConfig(
            vrid=51, priority=255, primary_ip="10.0.0.2", virtual_ips=("10.0.0.100",), advert_interval=0.1
        )
    )
    machine.startup(0.0)
    assert machine.state is _State.MASTER
    lower = _Advert(vrid=51, priority=140, max_advert_interval_cs=10, addresses=("10.0.0.100",))
    first = machine.advert_received(1.0, lower, "10.0.0.3")
    assert [type(a) for a in first] == [_SendAdvert, _SendGarp]
    again = machine.advert_received(1.1, lower, "10.0.0.3")
    assert [type(a) for a in again] == [_SendAdvert]  # rate-limited
    later = machine.advert_received(2.2, lower, "10.0.0.3")
    assert _SendGarp in [type(a) for a in later]
    assert machine.state is _State.MASTER
