"""Plain VRRP under a partition: two keepalived nodes, cut from each other, both hold the VIP. Needs root.

How this works: one lab (2 lbs, 1 backend, the lab's VIP and VRID 51); halb is stopped on both
balancers (`halb lab stop lb1`, `stop lb2`: the namespaces stay, the supervisor releases the VIP) and
Debian's keepalived runs in each balancer's namespace instead (`tests/lab/keepalived.py`: VRRPv3,
priorities 150/140, advert_int 0.1 s as in halb's scenario b). Then the same cut as halb's scenario b:
lb1 is partitioned from lb2 at the lab's switch, the client still reaches both, and the VIP sampler
(`halb.lab.observe`, every 50 ms, read from the namespaces themselves, plus an ARP probe per balancer)
records who holds the VIP and whose kernel answers for it.

What it asserts is what keepalived does -- documented, not endorsed: before the cut one holder; during it
both nodes hold the VIP and both answer ARP for it (split brain) within a few advert intervals, and the
backup announces itself with gratuitous ARPs; after `heal` the lower priority node goes back to BACKUP.
The figures go beside halb's scenario b in docs/quorum.md. keepalived is stopped and its files removed in
`finally`; the lab's teardown checks that nothing of the lab is left.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from halb.lab import control, netns
from halb.lab.observe import Observer, describe, figures
from tests.conftest import report
from tests.lab.keepalived import KeepalivedNode, stop_group
from tests.lab.test_lab import Lab, running_lab, wait_for

# no skip without keepalived: scripts/setup installs it, and a missing peer must fail the run, not hide it
pytestmark = pytest.mark.lab

PREFIX = f"hp{os.getpid() % 1000}"
ADVERT = 0.1
VIP = "10.99.0.100"
PRIORITY = {"lb1": 150, "lb2": 140}
MASTER_DOWN_LB2 = 3 * ADVERT + (256 - PRIORITY["lb2"]) * ADVERT / 256
CUT = 3.0  # seconds the partition lasts
RATE = 50.0  # requests/s through the VIP
AFTER = 3.0  # seconds observed after heal


def holders(lab: Lab) -> list[str]:
    return control.vip_holders(control.lab_state(lab.prefix))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(PREFIX, "--lbs", "2", "--backends", "1", "--advert-interval", str(ADVERT)) as running:
        running("stop", "lb1")
        running("stop", "lb2")
        assert holders(running) == []
        yield running


@pytest.fixture(scope="module")
def services(lab: Lab) -> Iterator[None]:
    """The service behind the VIP on each keepalived node: `halb demo-backend lbN` on port 80, whose
    answer names the node that served it."""
    procs = []
    try:
        for name in PRIORITY:
            argv = ["ip", "netns", "exec", lab.ns(name), sys.executable, "-m", "halb", "demo-backend", name]
            procs.append(
                subprocess.Popen(
                    [*argv, "--listen", "0.0.0.0:80"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        for name, address in (("lb1", "10.99.0.11"), ("lb2", "10.99.0.12")):
            wait_for(lambda a=address: serves(lab, a), timeout=10, what=f"the service on {name}")
        yield
    finally:
        for proc in procs:
            stop_group(proc)
    for name in PRIORITY:
        wait_for(lambda n=name: not netns.pids(lab.ns(n)), timeout=5, what=f"no process left in {name}")


def serves(lab: Lab, address: str) -> bool:
    try:
        return lab.get(address, timeout=0.5)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def nodes(lab: Lab, services: None) -> Iterator[dict[str, KeepalivedNode]]:
    made: dict[str, KeepalivedNode] = {}
    try:
        for name, priority in PRIORITY.items():
            made[name] = KeepalivedNode(lab.ns(name), priority, VIP, advert=ADVERT)
            made[name].start()
        wait_for(
            lambda: made["lb1"].state() == "MASTER" and made["lb2"].state() == "BACKUP",
            timeout=10,
            what="keepalived lb1 MASTER, lb2 BACKUP",
        )
        wait_for(lambda: holders(lab) == ["lb1"], timeout=5, what="the VIP on lb1 only")
        yield made
    finally:
        for node in made.values():
            node.close()
    for name, node in made.items():
        assert not node.dir.exists()
        wait_for(lambda n=name: "keepalived" not in ns_commands(lab.ns(n)), timeout=5, what=f"{name} stopped")


def ns_commands(namespace: str) -> list[str]:
    names = []
    for pid in netns.pids(namespace):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def test_keepalived_pair_partitioned_both_hold_the_vip(lab: Lab, nodes: dict[str, KeepalivedNode]) -> None:
    with Observer(lab.prefix, rate=RATE) as obs:
        time.sleep(1.0)
        cut = obs.mark("partition lb1 | lb2")
        control.partition_hosts(lab.prefix, ["lb1"], ["lb2"])  # what `halb lab partition lb1 --from lb2` does
        try:
            time.sleep(CUT)
        finally:
            healed = obs.mark("heal")
            control.heal(lab.prefix)
        settled = obs.wait_until(lambda t: t.holders == ("lb1",), healed, timeout=5.0)
        time.sleep(AFTER)
    assert not obs.errors, obs.errors
    before = obs.timeline(until=cut)
    during = obs.timeline(since=cut, until=healed)
    after = obs.timeline(since=healed)
    fig_before, fig_during = figures(before), figures(during, origin=cut)
    assert fig_before.max_holders == 1 and fig_before.two_answering == 0

    # split brain: lb2 no longer hears lb1's adverts, becomes MASTER after Master_Down_Interval and adds
    # the VIP while lb1 keeps it; both kernels answer ARP for it
    both = [t for t in during if set(t.holders) == {"lb1", "lb2"}]
    assert both, f"keepalived did not split: {describe(during, cut)}"
    split_at = both[0].at - cut
    assert split_at < MASTER_DOWN_LB2 + 0.5
    assert all(set(t.holders) == {"lb1", "lb2"} for t in during if t.at > both[0].at + 0.1)
    assert fig_during.two_answering > 0
    assert any(set(t.answering) == {"lb1", "lb2"} for t in during)
    assert nodes["lb1"].state() in ("MASTER", "BACKUP")
    assert "MASTER" in [line[3] for line in nodes["lb2"].state_lines()]
    garps_lb2 = obs.frames_of("garp", since=cut, mac=obs.macs["lb2"])
    assert any(f.at < healed for f in garps_lb2), "lb2 sent no gratuitous ARP for the VIP"

    # heal: lb2 hears priority 150 again and goes back to BACKUP
    assert settled is not None, f"no single holder after heal: {describe(after, healed)}"
    assert nodes["lb2"].state() == "BACKUP" and nodes["lb1"].state() == "MASTER"
    requests = obs.requests()
    served = {
        lb: sum(1 for r in requests if cut <= r.start < healed and r.ok and r.body == lb) for lb in PRIORITY
    }
    after_heal = [r for r in requests if r.start >= healed]
    failed_after = sum(1 for r in after_heal if not r.ok)
    back = next((r for r in after_heal if r.ok and r.body == "lb1"), None)  # served by the holder again
    share = fig_during.two_holders / max(1, fig_during.ticks)
    report(
        "keepalived partition",
        f"keepalived x2 (VRRPv3, advert {ADVERT}s), lb1 | lb2 for {CUT:.0f}s, client reaches both: "
        f"{fig_during.two_holders}/{fig_during.ticks} samples ({share:.0%}) with TWO holders, "
        f"{fig_during.two_answering} with two answering ARP; split brain {split_at:.2f}s after the cut; "
        f"{len(garps_lb2)} GARP(s) from lb2; one holder again {settled.at - healed:.2f}s after heal",
    )
    report(
        "keepalived partition",
        f"  requests ({RATE:g}/s) during the cut served by lb1 {served['lb1']}, lb2 {served['lb2']}; after "
        f"heal {failed_after}/{len(after_heal)} failed in {AFTER:g}s, first answer "
        + (f"from lb1 {back.end - healed:.2f}s after heal" if back else f"from lb1: none in {AFTER:g}s"),
    )
    report("keepalived partition", f"  holders: {describe(obs.timeline(), cut)}")
    report(
        "keepalived partition",
        f"  sampler: {obs.late_ticks} late tick(s), max spacing {obs.max_spacing:.3f}s",
    )
