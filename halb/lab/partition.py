"""Network partitions at the lab's switch: nftables bridge-family rules inside the switch namespace.

How this works: every host hangs on `br0` by its own port `v-<host>`, so "A cannot talk to B" is "drop
frames bridged from A's port to B's port, and back". `partition(switch_ns, A, B)` makes (or extends) the
table `bridge halb_lab` with a `forward` chain and adds a drop rule per (a, b) pair and direction, matching
`iifname`/`oifname`. The bridge's forward hook runs once per output port, so flooded frames (ARP
broadcasts, VRRP multicast) are cut too, while each side still reaches everyone else. `heal` deletes the
table, which removes every partition at once. Nothing here runs outside the switch namespace.
"""

from __future__ import annotations

from collections.abc import Iterable

from halb.lab.netns import LabError, run

TABLE = "halb_lab"
FAMILY = "bridge"


def _nft(namespace: str, script: str) -> None:
    """Run an nft script inside `namespace` (atomically: all of it or none)."""
    argv = ["ip", "netns", "exec", namespace, "nft", "-f", "-"]
    run(argv, input=script)


def rules(ports_a: Iterable[str], ports_b: Iterable[str]) -> list[str]:
    """The drop rules cutting every port of A from every port of B, both directions (pure)."""
    a_list, b_list = sorted(set(ports_a)), sorted(set(ports_b))
    overlap = set(a_list) & set(b_list)
    if overlap:
        raise LabError(f"a port cannot be on both sides of a partition: {', '.join(sorted(overlap))}")
    out = []
    for a in a_list:
        for b in b_list:
            out.append(f'add rule {FAMILY} {TABLE} forward iifname "{a}" oifname "{b}" counter drop')
            out.append(f'add rule {FAMILY} {TABLE} forward iifname "{b}" oifname "{a}" counter drop')
    return out


def partition(switch_ns: str, ports_a: Iterable[str], ports_b: Iterable[str]) -> None:
    script = [
        f"add table {FAMILY} {TABLE}",
        f"add chain {FAMILY} {TABLE} forward {{ type filter hook forward priority 0; policy accept; }}",
        *rules(ports_a, ports_b),
    ]
    _nft(switch_ns, "\n".join(script) + "\n")


def heal(switch_ns: str) -> bool:
    """Remove every partition; False if there was none."""
    result = run(["ip", "netns", "exec", switch_ns, "nft", "list", "tables", FAMILY], check=False)
    if result.returncode != 0 or f"table {FAMILY} {TABLE}" not in result.stdout:
        return False
    run(["ip", "netns", "exec", switch_ns, "nft", "delete", "table", FAMILY, TABLE])
    return True


def ruleset(switch_ns: str) -> str:
    """The lab table as nft prints it (with counters), or "" if there is none."""
    result = run(["ip", "netns", "exec", switch_ns, "nft", "list", "table", FAMILY, TABLE], check=False)
    return result.stdout if result.returncode == 0 else ""
