"""halb and Debian's keepalived in one virtual router: halb in lb1, keepalived in lb2. Needs root.

How this works: one lab per module (2 lbs, 1 backend, advert_interval 0.1 s, or $HALB_INTEROP_ADVERT).
lb2's halb is stopped and keepalived runs in its namespace instead (`ip netns exec <prefix>-lb2
keepalived --dont-fork --vrrp ...`, VRRPv3, the lab's VRID 51, priority 140 below halb lb1's 150, the
same VIP and advert_int); lb1 is restarted without the [cluster] table of its lab config (keepalived is
no Raft member, and a lone member would wait for its missing peer). keepalived's own view of its state
comes from its `notify` script, which appends "<time> INSTANCE VI_HALB <STATE> <prio>" to a file.
The tests check that

* keepalived stays BACKUP behind halb's MASTER (so it accepts halb's adverts: checksum with the IPv4
  pseudo-header, Max Adver Int in centiseconds, the address list) and the VIP is only on lb1;
* an advert of keepalived, captured with a raw socket in the client namespace, decodes with halb's codec
  (`checksum_mode="pseudo_header"`, and not in the RFC 9568 mode), and re-encodes to the same bytes;
* SIGKILL of halb lb1 -> keepalived takes the VIP within its Master_Down_Interval + a margin (timed from
  the kill to the VIP on lb2's interface, reported in the run's summary); restarting halb lb1 -> halb
  preempts and keepalived goes back to BACKUP (after halb's BACKUP state read keepalived's adverts);
* `halb lab failover` measures the same under client traffic: beside keepalived runs `halb serve` with
  lb2's config minus its [vrrp] table, the proxy that answers on the VIP once keepalived moved it there.

keepalived and that proxy are stopped (SIGTERM, then SIGKILL of their process groups) and their files
removed in `finally`;
the lab's teardown then checks that nothing of the lab is left.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from halb.lab import control, failover, netns
from halb.lab.netns import in_netns, ipv4_addresses
from halb.vrrp.codec import DecodeError, decode, encode
from tests.conftest import report
from tests.lab.keepalived import KeepalivedNode, stop_group
from tests.lab.test_lab import Lab, VipWatch, running_lab, wait_for

# no skip without keepalived: scripts/setup installs it, and a missing peer must fail the run, not hide it
pytestmark = pytest.mark.lab

PREFIX = f"hk{os.getpid() % 1000}"
ADVERT = float(os.environ.get("HALB_INTEROP_ADVERT", "0.1"))  # e.g. 1 to run it at keepalived's default
VRID = 51
VIP = "10.99.0.100"
LB1, LB2, CLIENT = "10.99.0.11", "10.99.0.12", "10.99.0.250"
HALB_PRIORITY, KEEPALIVED_PRIORITY = 150, 140
INSTANCE = "VI_HALB"
# RFC 5798 6.1, as keepalived computes it for its own priority
MASTER_DOWN = 3 * ADVERT + (256 - KEEPALIVED_PRIORITY) * ADVERT / 256
MARGIN = 1.0  # the lab shares 2 CPUs with whatever else runs: scheduling delays, not protocol


def without_tables(toml: str, *names: str) -> str:
    """A TOML text minus the given top-level tables (each from its [header] to the next header)."""
    kept, skipping = [], False
    for line in toml.splitlines(keepends=True):
        if line.startswith("["):
            skipping = line.strip().strip("[]").strip() in names
        if not skipping:
            kept.append(line)
    return "".join(kept)


class Keepalived(KeepalivedNode):
    """keepalived (tests/lab/keepalived.py) in lb2's namespace, and beside it `halb serve` with the node's lab
    config minus its [vrrp] and [cluster] tables: the proxy that answers on the VIP once keepalived has
    moved it there (the keepalived + HAProxy pair, with halb as the proxy)."""

    def __init__(self, namespace: str, halb_config: str) -> None:
        super().__init__(namespace, KEEPALIVED_PRIORITY, VIP, vrid=VRID, advert=ADVERT, instance=INSTANCE)
        self.proxy_conf = self.dir / "halb-proxy.toml"
        self.proxy_conf.write_text(without_tables(Path(halb_config).read_text(), "vrrp", "cluster"))
        self.proxy: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        super().start()
        with open(self.dir / "halb-proxy.log", "wb") as log:
            self.proxy = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.namespace,
                    sys.executable,
                    "-m",
                    "halb",
                    "serve",
                    str(self.proxy_conf),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def close(self) -> None:
        """Stop the proxy and keepalived however they are, then remove every file of theirs."""
        try:
            if self.proxy is not None:
                stop_group(self.proxy)
        finally:
            super().close()


# --- looking at the lab ---------------------------------------------------------------------------------
def holders(lab: Lab) -> list[str]:
    return [lb for lb in ("lb1", "lb2") if VIP in ipv4_addresses(lab.ns(lb), "eth0")]


def proxy_ready(lab: Lab) -> bool:
    try:
        return lab.get(LB2, 9901, "/healthz", timeout=0.5)[0] == 200
    except OSError:
        return False


def halb_vrrp(lab: Lab) -> dict[str, Any]:
    code, body = lab.get(LB1, 9901, "/status")
    assert code == 200
    (instance,) = json.loads(body)["vrrp"]["instances"]
    return instance


def capture(src: str, count: int = 2, timeout: float = 5.0) -> list[bytes]:
    """Inside a namespace: `count` IPv4 datagrams of protocol 112 from `src` sent to 224.0.0.18."""
    found: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, 112) as sock:
        mreq = struct.pack("4s4s", socket.inet_aton("224.0.0.18"), socket.inet_aton(CLIENT))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, (source, _) = sock.recvfrom(2048)
            except TimeoutError:
                break
            if source == src:
                found.append(data)
    return found


def halb_master_keepalived_backup(lab: Lab, keepalived: Keepalived) -> bool:
    try:
        return (
            holders(lab) == ["lb1"] and keepalived.state() == "BACKUP" and halb_vrrp(lab)["state"] == "MASTER"
        )
    except OSError:
        return False


# --- the lab and keepalived -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(PREFIX, "--lbs", "2", "--backends", "1", "--advert-interval", str(ADVERT)) as running:
        running("stop", "lb2")  # lb2's namespace stays; keepalived takes halb's place there
        # keepalived speaks VRRP only: halb lb1 runs as a plain VRRP node, without its Raft member
        running("stop", "lb1")
        config = Path(running.status()["hosts"][0]["config"])
        config.write_text(without_tables(config.read_text(), "cluster"))
        running("start", "lb1")
        wait_for(lambda: holders(running) == ["lb1"], timeout=10, what="lb1 to hold the VIP")
        yield running


@pytest.fixture(scope="module")
def keepalived(lab: Lab) -> Iterator[Keepalived]:
    daemon = Keepalived(lab.ns("lb2"), lab.status()["hosts"][1]["config"])
    try:
        daemon.start()
        wait_for(lambda: daemon.state() is not None, timeout=10, what="keepalived's first notify")
        wait_for(lambda: proxy_ready(lab), timeout=20, what="halb's proxy beside keepalived")
        yield daemon
    finally:
        daemon.close()
    assert not daemon.dir.exists()
    wait_for(lambda: not netns.pids(lab.ns("lb2")), timeout=5, what="no process left in lb2's namespace")


@pytest.fixture(autouse=True)
def restore(lab: Lab, keepalived: Keepalived) -> Iterator[None]:
    """Every test starts and ends with halb lb1 MASTER holding the VIP and keepalived BACKUP."""
    wait_for(
        lambda: halb_master_keepalived_backup(lab, keepalived),
        timeout=10,
        what="halb MASTER, keepalived BACKUP",
    )
    yield
    if lab.host_state("lb1") != "running":
        lab("start", "lb1")
    wait_for(lambda: halb_master_keepalived_backup(lab, keepalived), timeout=10, what="halb MASTER again")


# --- tests ----------------------------------------------------------------------------------------------
def test_keepalived_stays_backup_behind_halb_and_the_vip_is_only_on_lb1(
    lab: Lab, keepalived: Keepalived
) -> None:
    time.sleep(10 * ADVERT)  # long enough for keepalived to have taken over, were halb's adverts refused
    assert keepalived.state() == "BACKUP"
    assert [line[3] for line in keepalived.state_lines()] == ["BACKUP"]  # never MASTER
    assert holders(lab) == ["lb1"]
    one = halb_vrrp(lab)
    assert (one["state"], one["priority"], one["vips_held"]) == ("MASTER", HALB_PRIORITY, [VIP])
    log = keepalived.log_text()
    assert f"({INSTANCE}) Entering BACKUP STATE" in log
    assert "MASTER STATE" not in log
    for complaint in ("checksum", "invalid", "mismatch", "bad "):
        assert complaint not in log.lower(), f"keepalived complains about halb's adverts:\n{log}"
    assert lab.get(VIP)[1] == b"web1\n"


def test_kill_halb_keepalived_takes_over_then_halb_preempts(lab: Lab, keepalived: Keepalived) -> None:
    watch = VipWatch(lambda: holders(lab), ["lb2"], timeout=10)
    killed_at = time.monotonic()
    assert control.kill(lab.prefix, "lb1")  # `halb lab kill lb1`
    takeover = watch.result() - killed_at
    report(
        "keepalived interop",
        f"SIGKILL halb lb1 -> keepalived (lb2) holds the VIP: {takeover:.3f}s "
        f"(advert {ADVERT}s, keepalived's master_down {MASTER_DOWN:.3f}s, limit {MASTER_DOWN + MARGIN:.3f}s)",
    )
    assert takeover < MASTER_DOWN + MARGIN
    wait_for(lambda: keepalived.state() == "MASTER", timeout=3, what="keepalived's notify MASTER")
    assert holders(lab) == ["lb2"]
    wait_for(
        lambda: lab.get(VIP, timeout=1.0)[1] == b"web1\n", timeout=5, what="an answer through keepalived"
    )

    # keepalived's advert, byte for byte, as halb's codec sees it
    packets = in_netns(lab.ns("client"), capture, LB2, 2, 5.0)
    assert packets, "no advert from keepalived captured"
    for packet in packets:
        received = decode(packet, expected_vrid=VRID, checksum_mode="pseudo_header")
        advert = received.advert
        assert (received.src_ip, received.dst_ip) == (LB2, "224.0.0.18")
        assert (advert.vrid, advert.priority, advert.max_advert_interval_cs, advert.addresses) == (
            VRID, KEEPALIVED_PRIORITY, round(ADVERT * 100), (VIP,),
        )  # fmt: skip
        header_len = (packet[0] & 0x0F) * 4
        assert encode(advert, LB2) == packet[header_len:]  # halb would have sent exactly these bytes
        with pytest.raises(DecodeError) as refused:
            decode(packet, expected_vrid=VRID, checksum_mode="rfc9568")
        assert refused.value.reason == "checksum"
    report(
        "keepalived interop", f"keepalived advert decoded by halb's codec: {packets[0][header_len:].hex()}"
    )

    # halb comes back: as BACKUP it reads keepalived's adverts, then preempts with its higher priority
    watch = VipWatch(lambda: holders(lab), ["lb1"], timeout=30)
    started = time.monotonic()
    lab("start", "lb1")
    preempt = watch.result() - started
    wait_for(lambda: keepalived.state() == "BACKUP", timeout=5, what="keepalived back to BACKUP")
    assert holders(lab) == ["lb1"]
    one = halb_vrrp(lab)
    assert one["state"] == "MASTER"
    assert one["last_advert"]["source"] == LB2 and one["last_advert"]["priority"] == KEEPALIVED_PRIORITY
    assert one["rx_errors"]["checksum"] == 0
    assert f"Master received advert from {LB1} with higher priority {HALB_PRIORITY}" in keepalived.log_text()
    report(
        "keepalived interop",
        f"halb lb1 restarted -> preempts keepalived: VIP back {preempt:.3f}s after start",
    )
    states = [line[3] for line in keepalived.state_lines()]
    detail = f"keepalived's states: {states}\n{keepalived.log_text()[-1500:]}"
    assert states[:3] == ["BACKUP", "MASTER", "BACKUP"] and states[-1] == "BACKUP", detail
    if len(states) > 3:  # a preempting master that stalls longer than Master_Down_Interval (0.1 s adverts)
        report("keepalived interop", f"keepalived flapped after halb preempted: {' '.join(states)}")


def test_failover_runner_with_keepalived_as_the_backup(lab: Lab, keepalived: Keepalived) -> None:
    result = failover.run(lab.prefix, rounds=2, rate=50)
    for r in result.rounds:
        assert (r.killed, r.new_holder, r.answered_by, r.backend) == ("lb1", "lb2", "lb2", "web1")
        assert r.vip_moved is not None and r.vip_moved < MASTER_DOWN + MARGIN
        assert r.takeover is not None and r.takeover < MASTER_DOWN + MARGIN + 0.3
        assert r.failed > 0
    summary = failover.summarize(result.rounds)
    report(
        "keepalived interop",
        f"halb lab failover, keepalived as backup: takeover p50 {summary['takeover']['p50']:.3f}s "
        f"max {summary['takeover']['max']:.3f}s, failed requests p50 {summary['failed']['p50']:.0f} "
        f"max {summary['failed']['max']:.0f} (50 req/s)",
    )
    assert keepalived.state() == "BACKUP"
