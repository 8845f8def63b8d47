"""HealthTracker: rise/fall hysteresis, passive failures, slow start. Pure: fake times, no sleeps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from halb.config_model import HealthConfig
from halb.health.tracker import SLOWSTART_FLOOR, HealthTracker, Transition


def default_tracker(**kw: object) -> HealthTracker:
    cfg = HealthConfig()
    return HealthTracker(rise=cfg.rise, fall=cfg.fall, **kw)  # type: ignore[arg-type]


def feed(tracker: HealthTracker, results: list[bool], start: float = 0.0) -> list[Transition]:
    out = []
    for i, ok in enumerate(results):
        tr = tracker.observe(ok, start + i)
        if tr is not None:
            out.append(tr)
    return out


def test_defaults_are_fall_3_rise_5() -> None:
    t = default_tracker()
    assert (t.rise, t.fall) == (5, 3)
    assert t.up and t.last_change is None


def test_up_goes_down_after_exactly_fall_failures() -> None:
    t = default_tracker()
    assert t.observe(False, 1.0) is None
    assert t.observe(False, 2.0) is None
    assert t.up and t.consecutive_failures == 2
    tr = t.observe(False, 3.0)
    assert tr is not None and tr.up is False and tr.at == 3.0
    assert not t.up and t.last_change == 3.0
    # further failures do not produce more transitions, the run keeps counting
    assert t.observe(False, 4.0) is None
    assert t.consecutive_failures == 4


def test_down_comes_back_after_exactly_rise_successes() -> None:
    t = default_tracker()
    feed(t, [False] * 3)
    assert not t.up
    for i in range(4):
        assert t.observe(True, 10.0 + i) is None
        assert not t.up
    tr = t.observe(True, 14.0)
    assert tr == Transition(up=True, at=14.0, reason=tr.reason)
    assert t.up and t.consecutive_successes == 5 and t.consecutive_failures == 0


def test_success_resets_failure_run_and_vice_versa() -> None:
    t = default_tracker()
    feed(t, [False, False, True, False, False])
    assert t.up and t.consecutive_failures == 2
    feed(t, [False])
    assert not t.up
    feed(t, [True] * 4 + [False] + [True] * 4)
    assert not t.up and t.consecutive_successes == 4
    feed(t, [True])
    assert t.up


@pytest.mark.parametrize("initial_up", [True, False])
def test_alternating_results_never_flap(initial_up: bool) -> None:
    t = HealthTracker(rise=2, fall=2, initial_up=initial_up)
    transitions = feed(t, [True, False] * 200)
    assert transitions == []
    assert t.up is initial_up


def test_passive_failures_count_toward_fall() -> None:
    t = default_tracker()
    assert t.observe(False, 1.0) is None  # probe
    assert t.observe(False, 1.5, passive=True) is None
    tr = t.observe(False, 1.6, passive=True)
    assert tr is not None and not tr.up
    assert "3 consecutive failures" in tr.reason and "2 passive" in tr.reason


def test_passive_success_is_ignored() -> None:
    t = default_tracker()
    feed(t, [False, False])
    assert t.observe(True, 5.0, passive=True) is None
    assert t.consecutive_failures == 2  # not reset by a passive success
    assert t.observe(False, 6.0) is not None


def test_initial_down_needs_rise_successes() -> None:
    t = HealthTracker(rise=5, fall=3, initial_up=False)
    assert not t.up
    assert feed(t, [True] * 4) == []
    tr = t.observe(True, 99.0)
    assert tr is not None and tr.up and tr.at == 99.0
    # initial down with failures stays down silently
    t2 = HealthTracker(rise=5, fall=3, initial_up=False)
    assert feed(t2, [False] * 10) == []


def test_transitions_carry_time_and_reason() -> None:
    t = HealthTracker(rise=2, fall=2)
    t.observe(False, 10.0, detail="connect refused")
    down = t.observe(False, 12.5, detail="connect refused")
    assert down is not None and down.at == 12.5 and not down.up
    assert "2 consecutive failures" in down.reason and "connect refused" in down.reason
    assert t.last_reason == down.reason and t.last_change == 12.5
    t.observe(True, 20.0, detail="status 200")
    up = t.observe(True, 21.0, detail="status 200")
    assert up is not None and up.at == 21.0 and up.up
    assert "2 consecutive successful checks" in up.reason
    assert t.last_reason == up.reason and t.last_change == 21.0


def test_slowstart_ramp_values() -> None:
    t = HealthTracker(rise=1, fall=1, slowstart=10.0)
    assert t.slowstart_factor(0.0) == 1.0  # no slow start at boot
    t.observe(False, 100.0)
    assert not t.up
    assert t.slowstart_factor(100.0) == 1.0
    t.observe(True, 200.0)
    assert t.up
    assert t.slowstart_factor(200.0) == pytest.approx(SLOWSTART_FLOOR)
    assert t.slowstart_factor(205.0) == pytest.approx(SLOWSTART_FLOOR + (1 - SLOWSTART_FLOOR) / 2)
    assert t.slowstart_factor(210.0) == 1.0
    assert t.slowstart_factor(1000.0) == 1.0
    assert t.ramping(201.0) and not t.ramping(210.0)
    # monotonic within the ramp
    values = [t.slowstart_factor(200.0 + i * 0.5) for i in range(21)]
    assert values == sorted(values)
    assert all(SLOWSTART_FLOOR <= v <= 1.0 for v in values)


def test_slowstart_zero_is_always_one() -> None:
    t = HealthTracker(rise=1, fall=1, slowstart=0.0)
    t.observe(False, 1.0)
    t.observe(True, 2.0)
    assert t.slowstart_factor(2.0) == 1.0


def test_initial_down_recovery_does_slow_start() -> None:
    t = HealthTracker(rise=1, fall=1, slowstart=4.0, initial_up=False)
    t.observe(True, 50.0)
    assert t.slowstart_factor(50.0) == pytest.approx(SLOWSTART_FLOOR)
    assert t.slowstart_factor(54.0) == 1.0


def test_going_down_mid_ramp_restarts_ramp_on_next_recovery() -> None:
    t = HealthTracker(rise=1, fall=1, slowstart=10.0)
    t.observe(False, 0.0)
    t.observe(True, 1.0)
    t.observe(False, 3.0)
    assert t.slowstart_factor(3.0) == 1.0  # down: irrelevant, reported as 1.0
    t.observe(True, 4.0)
    assert t.slowstart_factor(4.0) == pytest.approx(SLOWSTART_FLOOR)


@pytest.mark.parametrize(("rise", "fall", "slowstart"), [(0, 1, 0.0), (1, 0, 0.0), (1, 1, -1.0)])
def test_invalid_parameters(rise: int, fall: int, slowstart: float) -> None:
    with pytest.raises(ValueError):
        HealthTracker(rise=rise, fall=fall, slowstart=slowstart)


# (ok, passive) observations; passive successes are no-ops and are filtered by the model below.
observations = st.lists(st.tuples(st.booleans(), st.booleans()), max_size=200)


@given(
    rise=st.integers(min_value=1, max_value=6),
    fall=st.integers(min_value=1, max_value=6),
    initial_up=st.booleans(),
    seq=observations,
)
def test_state_changes_only_after_exact_runs(
    rise: int, fall: int, initial_up: bool, seq: list[tuple[bool, bool]]
) -> None:
    t = HealthTracker(rise=rise, fall=fall, initial_up=initial_up)
    history: list[bool] = []  # results that count (passive successes are ignored)
    up = initial_up
    for i, (ok, passive) in enumerate(seq):
        before = t.up
        tr = t.observe(ok, float(i), passive=passive)
        if passive and ok:
            assert tr is None and t.up == before
            continue
        history.append(ok)
        # independent model: the length of the current run of identical results
        run = 0
        for r in reversed(history):
            if r != ok:
                break
            run += 1
        if up and not ok and run == fall:
            up = False
        elif not up and ok and run == rise:
            up = True
        assert t.up == up
        if t.up != before:
            assert tr is not None and tr.up == t.up and tr.at == float(i)
            assert t.last_change == float(i)
            # the flip happened exactly at the threshold of a run of identical results
            assert run == (rise if ok else fall)
            assert all(r == ok for r in history[-run:])
        else:
            assert tr is None
        assert (t.consecutive_successes if ok else t.consecutive_failures) == run
        assert (t.consecutive_failures if ok else t.consecutive_successes) == 0
