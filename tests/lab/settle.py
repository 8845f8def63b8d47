"""Waiting for a two-balancer lab to settle: one VIP holder, the one VRRP should elect, for a while.

A lab test that kills, freezes or cuts "the holder" must first know the cluster has settled, or it may
pick a node that is about to lose the VIP anyway: just after `lab up` (or a restart, or a lease loss and
its hold-down) the lower-priority balancer can hold the VIP for a few hundred ms until the
higher-priority one preempts it. So `wait_stable` wants, unchanged for `hold` seconds: exactly one
holder, the balancer with the highest base priority, saying MASTER; every other balancer BACKUP; no
balancer running with a lowered priority (a hold-down or a failed check: a preemption is coming); an
answer through the VIP; and whatever `also` adds.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from halb.lab import control
from halb.lab.netns import http_get, in_netns
from tests.lab.test_lab import Lab

VIP = "10.99.0.100"
ADDRESS = {"lb1": "10.99.0.11", "lb2": "10.99.0.12", "witness": "10.99.0.240"}
BALANCERS = ("lb1", "lb2")


def holders(lab: Lab) -> list[str]:
    """The balancers with the VIP on an interface right now."""
    return control.vip_holders(control.lab_state(lab.prefix))


def node_status(lab: Lab, name: str) -> dict[str, Any] | None:
    """A node's /status (asked from the client namespace), None when it does not answer."""
    try:
        code, body = in_netns(lab.ns("client"), http_get, ADDRESS[name], 9901, "/status", 1.0)
        return json.loads(body) if code == 200 else None
    except (OSError, ValueError):
        return None


def vrrp_instance(lab: Lab, name: str) -> dict[str, Any] | None:
    doc = node_status(lab, name)
    try:
        return dict(doc["vrrp"]["instances"][0]) if doc else None
    except (KeyError, IndexError, TypeError):
        return None


def answers_through_vip(lab: Lab, timeout: float = 1.0) -> bool:
    try:
        return in_netns(lab.ns("client"), http_get, VIP, 80, "/", timeout)[0] == 200
    except OSError:
        return False


def client_arp(lab: Lab) -> str | None:
    """The client's neighbour entry for the VIP, "MAC STATE", or None."""
    out = subprocess.run(
        ["ip", "-n", lab.ns("client"), "-j", "neigh", "show", VIP], capture_output=True, text=True
    )
    entries = [e for e in json.loads(out.stdout or "[]") if "lladdr" in e]
    return f"{entries[0]['lladdr']} {entries[0].get('state')}" if entries else None


def _also(also: Callable[[dict[str, Any]], bool] | None, doc: dict[str, Any] | None) -> bool:
    if also is None:
        return True
    try:
        return doc is not None and bool(also(doc))
    except (KeyError, IndexError, TypeError):
        return False


def wait_stable(
    lab: Lab,
    hold: float = 0.5,
    timeout: float = 20.0,
    also: Callable[[dict[str, Any]], bool] | None = None,
) -> str:
    """Wait until the lab has settled (see the module's docstring) for `hold` seconds; returns the
    holder. `also(status)` is asked of the holder's /status on top."""
    deadline = time.monotonic() + timeout
    since: float | None = None
    last: str | None = None
    why = ""
    while time.monotonic() < deadline:
        found = holders(lab)
        docs = {lb: node_status(lab, lb) for lb in BALANCERS}
        instances: dict[str, dict[str, Any]] = {}
        for lb, doc in docs.items():
            try:
                instances[lb] = dict(doc["vrrp"]["instances"][0]) if doc else {}
            except (KeyError, IndexError, TypeError):
                instances[lb] = {}
        states = {lb: inst.get("state") for lb, inst in instances.items()}
        lowered = [lb for lb, inst in instances.items() if inst and inst["priority"] != inst["base_priority"]]
        top = max(instances, key=lambda lb: instances[lb].get("base_priority", 0))
        good = (
            len(found) == 1
            and found[0] == top
            and not lowered
            and states[top] == "MASTER"
            and all(s == "BACKUP" for lb, s in states.items() if lb != top)
            and _also(also, docs[top])
        )
        why = (
            f"holders {found}, VRRP {states}, lowered priority: {lowered or 'none'}, "
            f"client's ARP entry for the VIP: {client_arp(lab)}"
        )
        if good and found[0] == last and since is not None:
            if time.monotonic() - since >= hold and answers_through_vip(lab):
                return found[0]
        elif good:
            since, last = time.monotonic(), found[0]
        else:
            since, last = None, None
        time.sleep(0.05)
    raise AssertionError(f"the cluster did not become stable within {timeout}s: {why}")
