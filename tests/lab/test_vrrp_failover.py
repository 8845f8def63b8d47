"""VRRP failover for real: two balancers in lab namespaces share the VIP 10.99.0.100. Needs root.

One lab per module (2 lbs, 2 webs, advert_interval 0.1 s so that Master_Down_Interval is ~0.35 s); every
test leaves it as it found it (lb1 MASTER with the VIP, lb2 BACKUP, no partition), and the teardown
checks that nothing of the lab is left. Takeover times are measured from the moment the lab's own
`control.kill` / `control.stop` (what `halb lab kill|stop` call) is entered to the moment a watcher thread
sees the VIP on the new holder and on nobody else; they are printed in the run's summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from halb.lab import control
from halb.lab.netns import http_get, in_netns, ipv4_addresses
from halb.vrrp.codec import Advert, encode
from tests.conftest import report
from tests.lab.test_lab import Lab, VipWatch, running_lab, wait_for

pytestmark = pytest.mark.lab

PREFIX = f"hv{os.getpid() % 1000}"
ADVERT = 0.1
VIP = "10.99.0.100"
LB1, LB2, CLIENT = "10.99.0.11", "10.99.0.12", "10.99.0.250"
PRIORITY = {"lb1": 150, "lb2": 140}


def master_down(priority: int, interval: float = ADVERT) -> float:
    return 3 * interval + (256 - priority) * interval / 256


def skew(priority: int, interval: float = ADVERT) -> float:
    return (256 - priority) * interval / 256


# --- looking at the lab ---------------------------------------------------------------------------------
def holders(lab: Lab) -> list[str]:
    return [lb for lb in ("lb1", "lb2") if VIP in ipv4_addresses(lab.ns(lb), "eth0")]


def status(lab: Lab, address: str) -> dict[str, Any]:
    code, body = lab.get(address, 9901, "/status", timeout=2.0)
    assert code == 200
    return json.loads(body)


def vrrp(lab: Lab, address: str) -> dict[str, Any]:
    (instance,) = status(lab, address)["vrrp"]["instances"]
    return instance


def mac(lab: Lab, host: str) -> str:
    out = subprocess.run(
        ["ip", "-n", lab.ns(host), "-j", "link", "show", "eth0"], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)[0]["address"]


def client_arp(lab: Lab) -> str | None:
    """The MAC in the client's neighbour entry for the VIP (`ip -n <prefix>-client neigh show VIP`)."""
    out = subprocess.run(
        ["ip", "-n", lab.ns("client"), "-j", "neigh", "show", VIP], capture_output=True, text=True, check=True
    ).stdout
    entries = [e for e in json.loads(out or "[]") if "lladdr" in e]
    return entries[0]["lladdr"] if entries else None


def curl_vip(lab: Lab) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", lab.ns("client"), "curl", "-s", "-m", "2", f"http://{VIP}/"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() if result.returncode == 0 else f"curl exit {result.returncode}"


def requests_served(lab: Lab, address: str) -> int:
    return sum(b["requests_total"] for pool in status(lab, address)["pools"] for b in pool["backends"])


def answers_through_vip(lab: Lab) -> bool:
    return curl_vip(lab) in ("web1", "web2")


def lb1_is_master_again(lab: Lab) -> bool:
    if holders(lab) != ["lb1"]:
        return False
    try:
        return vrrp(lab, LB1)["state"] == "MASTER" and vrrp(lab, LB2)["state"] == "BACKUP"
    except OSError:
        return False


# --- the lab ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(PREFIX, "--advert-interval", str(ADVERT)) as running:
        # `up` returns once one balancer holds the VIP; should lb2 have won the start-up race by a few
        # ms, lb1 preempts within one Master_Down_Interval
        wait_for(lambda: lb1_is_master_again(running), timeout=5, what="lb1 to be elected MASTER")
        yield running


@pytest.fixture(autouse=True)
def restore(lab: Lab) -> Iterator[None]:
    """Every test starts and ends with lb1 MASTER holding the VIP, lb2 BACKUP, both running, no partition."""
    yield
    if lab.status()["partitions"]:
        lab("heal")
    for host in lab.status()["hosts"]:
        if host["role"] == "lb" and host["state"] != "running":
            lab("start", host["name"])
    wait_for(lambda: lb1_is_master_again(lab), timeout=10, what="lb1 to be MASTER again")


# --- tests ----------------------------------------------------------------------------------------------
def test_lb1_alone_holds_the_vip_and_the_client_reaches_it(lab: Lab) -> None:
    assert holders(lab) == ["lb1"]
    assert lab.status()["vip_holders"] == ["lb1"]
    one, two = vrrp(lab, LB1), vrrp(lab, LB2)
    assert (one["state"], one["priority"], one["vips_held"], one["master_ip"]) == ("MASTER", 150, [VIP], LB1)
    assert (two["state"], two["priority"], two["vips_held"], two["master_ip"]) == ("BACKUP", 140, [], LB1)
    assert two["last_advert"]["source"] == LB1 and two["last_advert"]["priority"] == 150
    assert two["last_advert"]["at_seconds_ago"] < 1.0
    assert one["adverts_sent"] > 0 and two["adverts_received"] > 0
    assert one["virtual_ips"] == [f"{VIP}/32"]
    seen = {curl_vip(lab) for _ in range(6)}
    assert seen == {"web1", "web2"}
    assert client_arp(lab) == mac(lab, "lb1")
    code, body = lab.get(LB1, 9901, "/metrics")
    assert code == 200
    assert 'halb_vrrp_master{instance="VI_51",node="lb1",vrid="51"} 1.0' in body.decode()


def test_sigkill_of_the_master_moves_the_vip_to_lb2_and_lb1_preempts_back(lab: Lab) -> None:
    assert answers_through_vip(lab)  # the client has a neighbour entry for the VIP: lb1's MAC
    assert client_arp(lab) == mac(lab, "lb1")
    watch = VipWatch(lambda: holders(lab), ["lb2"], timeout=15)
    started = time.monotonic()
    assert control.kill(lab.prefix, "lb1")  # `halb lab kill lb1`: SIGKILL halb serve and its workers
    takeover = watch.result() - started
    limit = master_down(PRIORITY["lb2"]) + 1.0
    report(
        "vrrp", f"SIGKILL lb1 -> lb2 holds the VIP: {takeover:.3f}s (advert {ADVERT}s, limit {limit:.2f}s)"
    )
    assert takeover < limit
    # the supervisor ran `halb vip release` after serve died: lb1's namespace no longer has the VIP
    assert VIP not in ipv4_addresses(lab.ns("lb1"))
    log = lab.status()["hosts"][0]["log"]
    with open(log) as f:
        assert f"released {VIP}/32 from eth0" in f.read()
    # lb2's GARP moved the client's neighbour entry, and the client is served through the VIP
    wait_for(lambda: client_arp(lab) == mac(lab, "lb2"), timeout=3, what="the client's ARP entry -> lb2")
    served_before = requests_served(lab, LB2)
    wait_for(lambda: answers_through_vip(lab), timeout=5, what="an answer through the VIP")
    wait_for(lambda: requests_served(lab, LB2) > served_before, timeout=3, what="lb2 to count the request")
    two = vrrp(lab, LB2)
    assert (two["state"], two["vips_held"], two["master_ip"]) == ("MASTER", [VIP], LB2)
    assert two["last_transition"]["to"] == "MASTER"

    # lb1 comes back with the higher priority and preempts
    watch = VipWatch(lambda: holders(lab), ["lb1"], timeout=30)
    started = time.monotonic()
    lab("start", "lb1")
    preempt = watch.result() - started
    report("vrrp", f"start lb1 -> lb1 holds the VIP again (preempt): {preempt:.3f}s after `halb lab start`")
    wait_for(lambda: lb1_is_master_again(lab), timeout=5, what="lb1 MASTER, lb2 BACKUP")
    wait_for(lambda: client_arp(lab) == mac(lab, "lb1"), timeout=3, what="the client's ARP entry -> lb1")
    assert answers_through_vip(lab)


def test_sigterm_hands_over_at_once_with_a_priority_zero_advert(lab: Lab) -> None:
    assert answers_through_vip(lab)
    assert client_arp(lab) == mac(lab, "lb1")
    watch = VipWatch(lambda: holders(lab), ["lb2"], timeout=15)
    started = time.monotonic()
    assert control.stop(lab.prefix, "lb1")  # `halb lab stop lb1`: SIGTERM, wait for the exit
    takeover = watch.result() - started
    limit = master_down(PRIORITY["lb2"])
    report(
        "vrrp",
        f"SIGTERM lb1 -> lb2 holds the VIP: {takeover:.3f}s (skew {skew(PRIORITY['lb2']):.3f}s, "
        f"master_down {limit:.3f}s)",
    )
    assert takeover < limit, "a resigning master must be replaced faster than Master_Down_Interval"
    two = vrrp(lab, LB2)
    # the proof that the resignation did it: the last advert lb2 saw was lb1's priority 0
    assert two["last_advert"]["source"] == LB1 and two["last_advert"]["priority"] == 0
    assert two["state"] == "MASTER"
    assert VIP not in ipv4_addresses(lab.ns("lb1"))
    wait_for(lambda: client_arp(lab) == mac(lab, "lb2"), timeout=3, what="the client's ARP entry -> lb2")
    wait_for(lambda: answers_through_vip(lab), timeout=5, what="an answer through the VIP")


def test_tracking_an_empty_pool_hands_the_vip_over_and_healing_takes_it_back(lab: Lab) -> None:
    assert answers_through_vip(lab)
    # only lb1 loses its backends: it is cut from both webs, everything else still talks
    started = time.monotonic()
    lab("partition", "lb1", "--from", "web1", "web2")
    try:
        wait_for(lambda: holders(lab) == ["lb2"], timeout=10, what="lb2 to take the VIP")
        report("vrrp", f"lb1 cut from every web -> lb2 holds the VIP: {time.monotonic() - started:.3f}s")
        one = vrrp(lab, LB1)
        assert (one["state"], one["priority"], one["base_priority"]) == ("BACKUP", 100, 150)
        assert one["tracking"]["failing"] == ["pool:app"]
        assert vrrp(lab, LB2)["state"] == "MASTER"
        wait_for(lambda: client_arp(lab) == mac(lab, "lb2"), timeout=3, what="the client's ARP entry -> lb2")
        wait_for(lambda: answers_through_vip(lab), timeout=5, what="an answer through the VIP (from lb2)")
        started = time.monotonic()
    finally:
        lab("heal")
    wait_for(lambda: holders(lab) == ["lb1"], timeout=10, what="lb1 to take the VIP back")
    report("vrrp", f"heal -> lb1 holds the VIP again: {time.monotonic() - started:.3f}s")
    one = vrrp(lab, LB1)
    assert (one["state"], one["priority"], one["tracking"]["failing"]) == ("MASTER", 150, [])
    wait_for(lambda: client_arp(lab) == mac(lab, "lb1"), timeout=3, what="the client's ARP entry -> lb1")


def _send_raw(packets: list[bytes]) -> None:
    """From inside the client namespace: whole IPv4 datagrams (our own headers) to 224.0.0.18."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(CLIENT))
        for packet in packets:
            sock.sendto(packet, ("224.0.0.18", 0))


def _ip(payload: bytes, ttl: int = 255) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0xC0, 20 + len(payload), 0, 0, ttl, 112, 0,
        socket.inet_aton(CLIENT), socket.inet_aton("224.0.0.18"),
    )  # fmt: skip
    return header + payload


def test_the_masters_link_going_down_means_fault_and_lb2_takes_over(lab: Lab) -> None:
    """keepalived's implicit interface tracking: lb1's switch port goes down (its eth0 loses the carrier),
    lb1 enters FAULT and drops the VIP, lb2 takes over; the port back up, lb1 is BACKUP and preempts."""
    topo = control.lab_state(lab.prefix).topology
    switch, port = topo.switch_namespace, topo.host("lb1").port

    def set_port(state: str) -> None:
        subprocess.run(["ip", "-n", switch, "link", "set", port, state], check=True)

    def lb1_seen_from_inside() -> dict[str, Any]:  # its eth0 is cut off: ask from its own namespace
        code, body = in_netns(lab.ns("lb1"), http_get, LB1, 9901, "/status", 2.0)
        assert code == 200
        return dict(json.loads(body)["vrrp"]["instances"][0])

    assert holders(lab) == ["lb1"]
    started = time.monotonic()
    set_port("down")
    try:
        wait_for(lambda: holders(lab) == ["lb2"], timeout=10, what="lb2 (alone) to hold the VIP")
        took = time.monotonic() - started
        one = lb1_seen_from_inside()
        assert one["state"] == "FAULT" and "interface:eth0" in one["tracking"]["failing"]
        assert vrrp(lab, LB2)["state"] == "MASTER"
        wait_for(lambda: answers_through_vip(lab), timeout=5, what="an answer through the VIP (from lb2)")
        started = time.monotonic()
    finally:
        set_port("up")
    wait_for(lambda: lb1_is_master_again(lab), timeout=10, what="lb1 to preempt once its link is back")
    back = time.monotonic() - started
    assert vrrp(lab, LB1)["tracking"]["failing"] == []
    report(
        "vrrp",
        f"lb1's link down (no carrier) -> lb1 FAULT, lb2 holds the VIP: {took:.3f}s; "
        f"link up -> lb1 holds the VIP again: {back:.3f}s",
    )


def test_malformed_vrrp_packets_are_counted_and_the_master_keeps_the_vip(lab: Lab) -> None:
    before = {lb: vrrp(lab, address) for lb, address in (("lb1", LB1), ("lb2", LB2))}
    # each would win the election at priority 254 if it were accepted
    good = encode(Advert(51, 254, 10, (VIP,)), CLIENT, "224.0.0.18")
    bad_checksum = good[:6] + bytes([good[6] ^ 0xFF]) + good[7:]
    two_addresses_one_sent = good[:3] + b"\x02" + good[4:]  # count 2, one address present
    version2 = bytes([0x21]) + good[1:]
    packets = [
        _ip(good, ttl=64),
        _ip(bad_checksum),
        _ip(two_addresses_one_sent),
        _ip(good[:4]),
        _ip(version2),
    ]
    in_netns(lab.ns("client"), _send_raw, packets)

    expected = {"ttl": 1, "checksum": 1, "truncated": 2, "version": 1}

    def counted(address: str, lb: str) -> Callable[[], bool]:
        def check() -> bool:
            errors = vrrp(lab, address)["rx_errors"]
            return all(errors[k] - before[lb]["rx_errors"][k] >= n for k, n in expected.items())

        return check

    wait_for(counted(LB1, "lb1"), timeout=5, what="lb1 to count every malformed packet")
    wait_for(counted(LB2, "lb2"), timeout=5, what="lb2 to count every malformed packet")
    one, two = vrrp(lab, LB1), vrrp(lab, LB2)
    assert one["state"] == "MASTER" and one["vips_held"] == [VIP]
    assert one["transitions"] == before["lb1"]["transitions"]
    assert two["state"] == "BACKUP" and two["transitions"] == before["lb2"]["transitions"]
    assert two["last_advert"]["source"] == LB1  # none of them was taken for an advert
    assert holders(lab) == ["lb1"]
    _, body = lab.get(LB1, 9901, "/metrics")
    assert (
        'halb_vrrp_rx_errors_total{instance="VI_51",node="lb1",reason="checksum",vrid="51"}' in body.decode()
    )
    # the valid form of the same advert would have been accepted: the counts above are not accidents
    assert one["rx_errors"]["vrid"] == before["lb1"]["rx_errors"]["vrid"]


def test_vip_release_command_is_idempotent_on_a_backup(lab: Lab) -> None:
    config = lab.status()["hosts"][1]["config"]
    result = lab("exec", "lb2", "--", sys.executable, "-m", "halb", "vip", "release", config)
    assert result.stdout.strip() == f"no VIP of {VIP}/32 was on eth0"
    assert holders(lab) == ["lb1"]
    with contextlib.suppress(OSError):
        assert in_netns(lab.ns("client"), http_get, VIP, 80, "/", 2.0)[0] == 200
