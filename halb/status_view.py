"""`halb status`: fetch each node's /status and render it as rich tables, side by side.

Also the renderers of `halb config show` and `halb backends list` (the cluster's shared configuration).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from rich.columns import Columns
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


def fetch_status(admin: str, timeout: float = 2.0) -> dict[str, Any]:
    """The status document of one node, or {"admin": ..., "error": ...} when it does not answer."""
    url = f"http://{admin}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            doc = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"admin": admin, "error": f"unreachable: {reason}"}
    doc["admin"] = admin
    return doc


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render_node(doc: dict[str, Any]) -> Panel:
    if "error" in doc:
        return Panel(Text(doc["error"], style="bold red"), title=f"[b]{doc['admin']}[/b]", border_style="red")
    node = doc["node"]
    parts: list[Any] = []
    state_style = "green" if node["state"] == "serving" else "yellow"
    summary = Text.assemble(
        ("state ", "dim"),
        (node["state"], state_style),
        ("  pid ", "dim"),
        str(node["pid"]),
        ("  workers ", "dim"),
        str(len(node["workers"])),
        ("  up ", "dim"),
        f"{node['uptime_seconds']:.0f}s",
    )
    parts.append(summary)
    if doc.get("cluster"):
        parts.extend(render_cluster(doc["cluster"]))
    if doc.get("vrrp"):
        parts.append(render_vrrp(doc["vrrp"]))
    if doc.get("state"):  # [state]: the shared store, "DEGRADED" in bold red (halb.state_report)
        from halb.state_report import render as render_state

        parts.append(render_state(doc["state"]))
    if not doc["listeners"] and not doc["pools"]:  # a witness: Raft only
        return Panel(Group(*parts), title=f"[b]{node['name']}[/b] {doc['admin']}", border_style=state_style)
    listeners = Table(title="listeners", title_justify="left", expand=False, box=None, pad_edge=False)
    for col in ("name", "bind", "mode", "pool", "requests", "active", "refused"):
        listeners.add_column(col)
    for lc in doc["listeners"]:
        routes = lc.get("routes") or []
        refused = sum(lc.get("rejected", {}).values())  # limits, allow/deny, bad PROXY headers
        listeners.add_row(
            lc["name"],
            lc["bind"],
            lc["mode"],
            lc["pool"] + (f" +{len(routes)} route{'s' if len(routes) > 1 else ''}" if routes else ""),
            str(lc.get("requests_total", 0)),
            str(lc.get("active_connections", lc.get("client_connections_active", 0))),
            str(refused) if refused else "-",
        )
    parts.append(listeners)
    for pool in doc["pools"]:
        table = Table(
            title=f"pool {pool['name']} ({pool['algorithm']}, {pool['healthy_backends']}/"
            f"{pool['total_backends']} healthy)",
            title_justify="left",
        )
        for col in (
            "backend",
            "address",
            "health",
            "weight",
            "active",
            "requests",
            "fails",
            "bytes",
            "rt ewma",
        ):
            table.add_column(
                col, justify="right" if col in ("weight", "active", "requests", "fails") else "left"
            )
        for b in pool["backends"]:
            if b["draining"]:
                health = Text("DRAIN", style="yellow")
            elif b["healthy"]:
                health = Text("UP", style="green")
            else:
                health = Text("DOWN", style="bold red")
            weight = str(b["weight"])
            if b["slowstart_factor"] < 1 and b["healthy"]:
                weight += f" ({b['slowstart_factor']:.0%})"
            rt = b["response_time_ewma_ms"]
            table.add_row(
                b["name"] + (" (backup)" if b.get("backup") else ""),
                b["address"],
                health,
                weight,
                str(b["active_connections"]),
                str(b["requests_total"]),
                str(b["connect_failures_total"]),
                _fmt_bytes(b["bytes"]["to_backend"] + b["bytes"]["from_backend"]),
                f"{rt:.1f} ms" if rt is not None else "-",
            )
        parts.append(table)
    return Panel(Group(*parts), title=f"[b]{node['name']}[/b] {doc['admin']}", border_style=state_style)


def _fmt_last_advert(last: Any) -> str:
    """`{"at_seconds_ago", "source", "priority"}` -> "10.99.0.12 prio 140, 0.3s ago"."""
    if not last:
        return "-"
    if not isinstance(last, dict):
        return str(last)
    ago = last.get("at_seconds_ago")
    when = f", {ago:.1f}s ago" if isinstance(ago, int | float) else ""
    return f"{last.get('source', '?')} prio {last.get('priority', '?')}{when}"


def render_vrrp(vrrp: dict[str, Any]) -> Table:
    table = Table(title="vrrp", title_justify="left", box=None, pad_edge=False)
    for col in ("instance", "state", "priority", "vips held", "last advert", "rx errors"):
        table.add_column(col)
    styles = {"MASTER": "bold green", "BACKUP": "cyan", "FAULT": "bold red"}
    for inst in vrrp.get("instances", []):
        state = str(inst.get("state", ""))
        priority = str(inst.get("priority", ""))
        base = inst.get("base_priority")
        if base is not None and str(base) != priority:
            priority += f" (of {base})"
        errors = inst.get("rx_errors") or {}
        bad = (
            ", ".join(f"{k} {v}" for k, v in sorted(errors.items()) if v) if isinstance(errors, dict) else ""
        )
        table.add_row(
            str(inst.get("name", "")),
            Text(state, style=styles.get(state, "yellow")),
            priority,
            ", ".join(inst.get("vips_held", [])) or "-",
            _fmt_last_advert(inst.get("last_advert")),
            bad or "-",
        )
    return table


def _fmt_lease(lease: dict[str, Any]) -> Text:
    holder = lease.get("holder")
    if not holder:
        return Text("nobody holds it", style="yellow")
    if lease.get("held_here"):
        left = lease.get("remaining_seconds")
        style = "bold green" if lease.get("may_act") else "yellow"
        note = "" if lease.get("may_act") else " (unconfirmed after a pause: renewing)"
        return Text(f"held here ({holder}), {left:.2f}s left{note}", style=style)
    left = lease.get("expires_for_others_in")
    when = f", takeover possible in {left:.2f}s if not renewed" if isinstance(left, int | float) else ""
    return Text(f"{holder} (seq {lease.get('seq')}){when}", style="cyan")


def render_cluster(cluster: dict[str, Any]) -> list[Any]:
    """The Raft member: leader, term, quorum, members' reachability, the VIP lease."""
    if not cluster.get("running", True) or cluster.get("starting"):
        return [Text("cluster: starting", style="yellow")]
    parts: list[Any] = []
    quorum = cluster.get("quorum")
    votes = cluster.get("votes", {})
    leader = cluster.get("leader") or "none"
    if cluster.get("leader_name"):
        leader = f"{cluster['leader_name']} ({leader})"
    line = Text.assemble(
        ("raft ", "dim"),
        (str(cluster.get("state")), "bold"),
        ("  leader ", "dim"),
        (leader, "green" if cluster.get("leader_fresh") else "yellow"),
        ("  term ", "dim"),
        str(cluster.get("term")),
        ("  commit ", "dim"),
        str(cluster.get("commit_index")),
        ("  quorum ", "dim"),
        (
            f"{'yes' if quorum else 'NO'} ({votes.get('reachable')}/{votes.get('total')}, "
            f"need {votes.get('needed')})",
            "green" if quorum else "bold red",
        ),
    )
    if cluster.get("config_version") is not None:
        line.append_text(Text.assemble(("  config v", "dim"), str(cluster["config_version"])))
    parts.append(line)
    if cluster.get("auth_error"):
        parts.append(Text(str(cluster["auth_error"]), style="bold red"))
    elif cluster.get("auth_warning"):
        parts.append(Text(str(cluster["auth_warning"]), style="yellow"))
    lease = cluster.get("lease")
    if lease:
        parts.append(Text.assemble(("vip lease ", "dim"), _fmt_lease(lease)))
    members = Table(title="raft members", title_justify="left", box=None, pad_edge=False)
    for col in ("member", "address", "reachable", "last heard", "auth failures"):
        members.add_column(col)
    for m in cluster.get("members", []):
        ago = m.get("last_heard_seconds_ago")
        members.add_row(
            str(m.get("name") or "?"),
            str(m.get("address")),
            Text("yes", style="green") if m.get("reachable") else Text("NO", style="bold red"),
            f"{ago:.2f}s ago" if isinstance(ago, int | float) else "never",
            str(m.get("auth_failures", 0)),
        )
    parts.append(members)
    return parts


def render_shared_pools(pools: dict[str, Any], version: Any = None, console: Console | None = None) -> None:
    """`halb backends list`: one table per pool of the shared configuration."""
    console = console or Console()
    for name, pool in sorted(pools.items()):
        table = Table(title=f"pool {name} ({pool.get('algorithm')}), config v{version}", title_justify="left")
        for col in ("backend", "address", "weight", "state", "agent"):
            table.add_column(col)
        for b in pool.get("backends", []):
            table.add_row(
                str(b.get("name")),
                str(b.get("address")),
                str(b.get("weight")),
                Text("DRAIN", style="yellow") if b.get("draining") else Text("active", style="green"),
                str(b.get("agent") or "-"),
            )
        console.print(table)


def render_shared_config(doc: dict[str, Any], console: Console | None = None) -> None:
    """`halb config show`: pools, members and leases as one node has them."""
    console = console or Console()
    console.print(Text.assemble(("cluster configuration as seen by ", "dim"), str(doc.get("node"))))
    render_shared_pools(doc.get("pools", {}), doc.get("version"), console)
    members = Table(title="members", title_justify="left")
    for col in ("name", "raft address", "admin", "role"):
        members.add_column(col)
    for name, m in sorted(doc.get("members", {}).items()):
        members.add_row(name, str(m.get("address")), str(m.get("admin") or "-"), str(m.get("role")))
    console.print(members)
    for name, lease in sorted(doc.get("leases", {}).items()):
        console.print(
            Text.assemble(
                (f"lease {name}: ", "dim"),
                str(lease.get("holder") or "nobody"),
                (f"  seq {lease.get('seq')}  duration {lease.get('duration')}s", "dim"),
            )
        )


def render(docs: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    panels = [render_node(doc) for doc in docs]
    console.print(Columns(panels) if len(panels) > 1 else panels[0])
