"""`halb lab failover` for real: SIGKILL the VIP holder under client traffic, in a lab. Needs root.

How this works: one lab per module (2 lbs, 2 webs, advert_interval 0.1 s, so Master_Down_Interval is
~0.35 s for lb2). The command runs as a user would run it (`python -m halb lab failover ...`); every test
leaves lb1 MASTER with the VIP and no traffic process behind in the client namespace. The lab's teardown
checks that nothing of it is left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from halb.lab import failover, netns
from halb.lab.netns import LabError
from tests.conftest import report
from tests.lab.test_lab import Lab, running_lab, wait_for

pytestmark = pytest.mark.lab

PREFIX = f"hf{os.getpid() % 1000}"
ADVERT = 0.1
MASTER_DOWN_LB2 = 3 * ADVERT + (256 - 140) * ADVERT / 256


def holders(lab: Lab) -> list[str]:
    return list(lab.status()["vip_holders"])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(PREFIX, "--advert-interval", str(ADVERT)) as running:
        wait_for(lambda: holders(running) == ["lb1"], timeout=5, what="lb1 to hold the VIP")
        yield running


@pytest.fixture(autouse=True)
def settled(lab: Lab) -> Iterator[None]:
    yield
    for host in lab.status()["hosts"]:
        if host["state"] == "frozen":
            lab("thaw", host["name"])
    wait_for(lambda: holders(lab) == ["lb1"], timeout=10, what="lb1 to hold the VIP again")
    client = lab.ns("client")
    wait_for(lambda: not netns.pids(client), timeout=5, what="no process left in the client namespace")


def test_failover_json_times_each_takeover(lab: Lab) -> None:
    result = lab("failover", "--rounds", "2", "--rate", "50", "--json")
    doc = json.loads(result.stdout)
    assert "round 1: killed lb1" in result.stderr  # progress goes to stderr with --json
    assert doc["advert_interval"] == ADVERT and doc["rate"] == 50
    assert doc["master_down_interval"] == pytest.approx(MASTER_DOWN_LB2, abs=0.01)
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    for r in doc["rounds"]:
        assert (r["killed"], r["new_holder"], r["answered_by"]) == ("lb1", "lb2", "lb2")
        assert r["backend"] in ("web1", "web2")
        assert 0 < r["vip_moved"] <= r["takeover"] < MASTER_DOWN_LB2 + 1.0
        assert r["failed"] > 0  # the client did notice: requests sent to the dead master's MAC
        assert r["restore"] > 0
    summary = doc["summary"]
    assert summary["rounds"] == 2 and summary["no_takeover"] == 0
    report(
        "failover",
        f"halb lab failover (advert {ADVERT}s, 50 req/s): takeover p50 {summary['takeover']['p50']:.3f}s "
        f"max {summary['takeover']['max']:.3f}s, failed p50 {summary['failed']['p50']:.0f} "
        f"max {summary['failed']['max']:.0f}",
    )
    assert holders(lab) == ["lb1"]  # preempted back before the command returned
    assert all(h["state"] == "running" for h in lab.status()["hosts"] if h["role"] == "lb")


def test_failover_prints_a_table(lab: Lab) -> None:
    out = lab("failover", "--rounds", "1").stdout
    assert "round 1: killed lb1" in out
    assert "SIGKILL of the VIP holder" in out and "lb2>web" in out
    assert "takeover p50" in out and "failed requests p50" in out


def test_two_holders_with_a_frozen_master(lab: Lab) -> None:
    lab("freeze", "lb1")  # a hung master keeps the VIP on its interface; lb2 takes it as well
    wait_for(lambda: holders(lab) == ["lb1", "lb2"], timeout=5, what="lb2 to take the VIP from frozen lb1")
    out = lab("status").stdout
    assert "held by lb1, lb2" in out
    assert "warning: 2 balancers hold the VIP (lb1 frozen: thaw it)" in out
    with pytest.raises(LabError, match="frozen master"):
        failover.run(lab.prefix, 1, stable_timeout=1.0)
    lab("thaw", "lb1")  # lb1 still thinks it is MASTER: its priority-150 advert sends lb2 back to BACKUP
    wait_for(lambda: holders(lab) == ["lb1"], timeout=5, what="lb2 to drop the VIP")


def test_failover_needs_a_running_lab() -> None:
    with pytest.raises(LabError, match="no lab"):
        failover.run("hnolab", 1)
