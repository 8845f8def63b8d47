"""One generator of per-node halb configuration for a whole cluster: the lab uses it now, Vagrant later.

How this works: a `ClusterSpec` describes the cluster once (balancer nodes and their addresses, web
backends, the VIP, ports, algorithm, optional Redis and witness); `node_config(spec, "lb1")` renders the
TOML that `halb serve` on lb1 reads. The text is built by hand (the standard library only reads TOML) with
every string passed through `_q`, and the result must always be accepted by `halb.config.load`; the tests
check that for every node.

`vrrp=True` (the default) adds a `[vrrp]` table: interface, vrid, a priority per node that falls by 10 with
the node's position (150, 140, ...), advert_interval, and virtual_ips = [vip] -- a bare address, which the
loader makes a /32 like keepalived's `virtual_ipaddress` without a mask. Tracking keeps its default weight
of 50, more than the 10-point gap, so a balancer whose pool is empty hands the VIP to the next one.
With `redis` on the spec ("host:port", the lab's and Vagrant's Redis host) every balancer gets a
`[state]` table (`url = "redis://host:port/0"`) and the pool gets `sticky = { mode = <spec.sticky> }`
("cookie" by default: a session cookie HALBSID mapped to its backend in Redis, so sessions survive a VIP
move); `sticky=None` leaves stickiness off, and no `redis` leaves both out. With `redis_sentinels`
(the lab's `--sentinel`) `[state]` names the sentinels and `redis_service` instead of a url.

`cluster=True` (the default) adds a `[cluster]` table to every node: its Raft address
(`<address>:raft_port`), the other members as peers (the witness included), the shared `secret` and
admin `token`, and `data_dir = <spec.data_dir>/<node>`. With a witness on the spec,
`node_config(spec, "witness")` renders the witness's own config: `[node]` and `[cluster]` with
`role = "witness"`, nothing else (a witness runs no proxy and holds no VIP). The default secret and
token are for the lab and the Vagrant dev cluster only; set real ones on the spec for anything else.
A balancer's `[cluster]` also lists the other members' admin APIs (`admin_peers`, where `halb vip release`
releases a stopped node's VIP lease) and `vip_lease`: on, unless `spec.vip_lease` says otherwise or the
cluster has exactly two members (two balancers, no witness: either one's loss would take the majority,
and with it the VIP, away from the other; such a lab runs plain VRRP for the VIP).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeSpec:
    """A halb node (balancer or witness): its name and its own address in the cluster network."""

    name: str
    address: str


@dataclass(frozen=True)
class BackendSpec:
    """A web backend behind the balancers."""

    name: str
    address: str
    port: int = 80
    weight: int = 1


@dataclass(frozen=True)
class HealthSpec:
    """The active health check every balancer runs against every backend."""

    kind: str = "http"
    path: str = "/healthz"
    interval: float = 0.5
    timeout: float = 0.3
    rise: int = 2
    fall: int = 2


@dataclass(frozen=True)
class ClusterSpec:
    lbs: tuple[NodeSpec, ...]
    backends: tuple[BackendSpec, ...]
    vip: str
    prefix_len: int = 24  # of the cluster subnet (the VIP is added as vip/prefix_len)
    listen_port: int = 80
    admin_port: int = 9901
    algorithm: str = "round_robin"
    redis: str | None = None  # "host:port": [state] url = "redis://host:port/0"
    sticky: str | None = "cookie"  # the pool's sticky mode when redis is set ("cookie" | "source_ip" | None)
    # Redis through Sentinel instead: the sentinels' "host:port"s (then `redis` is only informative)
    redis_sentinels: tuple[str, ...] = ()
    redis_service: str = "mymaster"
    witness: NodeSpec | None = None  # a Raft-only vote: no proxy, no VIP
    workers: int = 1
    drain_timeout: float = 10.0
    health: HealthSpec = field(default_factory=HealthSpec)
    # [vrrp]
    vrrp: bool = True
    vrrp_interface: str = "eth0"
    vrid: int = 51
    top_priority: int = 150
    advert_interval: float = 1.0  # seconds, whole centiseconds in 0.01..40.95
    # [cluster]
    cluster: bool = True
    raft_port: int = 7000
    secret: str = "halb-lab-cluster-secret"  # lab/dev only
    token: str = "halb-lab-admin-token"  # lab/dev only
    data_dir: str = "/var/lib/halb"  # each node uses <data_dir>/<node name>
    lease_duration: float = 2.0
    # the VIP only with the Raft lease; None: unless the cluster has exactly two members (no witness),
    # which lose their majority -- and so the VIP everywhere -- when either one is down
    vip_lease: bool | None = None

    def __post_init__(self) -> None:
        if not self.lbs:
            raise ValueError("a cluster needs at least one balancer node")
        if not self.backends:
            raise ValueError("a cluster needs at least one backend")
        names = [n.name for n in self.lbs] + [b.name for b in self.backends]
        if self.witness is not None:
            names.append(self.witness.name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate node names: {', '.join(duplicates)}")
        members = [*self.lbs, *([self.witness] if self.witness is not None else [])]
        for text in [self.vip, *(n.address for n in members), *(b.address for b in self.backends)]:
            ipaddress.ip_address(text)  # raises ValueError naming the bad address
        if not 0 < self.prefix_len <= 32:
            raise ValueError(f"prefix_len {self.prefix_len} is outside 1..32")

    def lb(self, name: str) -> NodeSpec:
        for node in self.lbs:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.lbs)
        raise KeyError(f"no balancer node named {name!r} (balancers: {known})")

    def members(self) -> tuple[NodeSpec, ...]:
        """Every Raft member: the balancers, then the witness."""
        return (*self.lbs, *([self.witness] if self.witness is not None else []))

    def priority(self, name: str) -> int:
        """VRRP priority: the first balancer is the preferred master, each next one 10 lower."""
        index = [n.name for n in self.lbs].index(self.lb(name).name)
        return max(1, self.top_priority - 10 * index)


def _q(text: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML escapes)."""
    return json.dumps(text)


def _num(value: float) -> str:
    return repr(float(value))


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cluster_lines(spec: ClusterSpec, node: NodeSpec, role: str) -> list[str]:
    peers = ", ".join(_q(_host_port(m.address, spec.raft_port)) for m in spec.members() if m != node)
    lines = [
        "",
        "[cluster]",
        f"address = {_q(_host_port(node.address, spec.raft_port))}",
        f"peers = [{peers}]",
        f"secret = {_q(spec.secret)}",
        f"token = {_q(spec.token)}",
        f"data_dir = {_q(spec.data_dir.rstrip('/') + '/' + node.name)}",
        f"lease_duration = {_num(spec.lease_duration)}",
    ]
    if role == "witness":
        lines.append('role = "witness"')
        return lines
    admins = ", ".join(_q(_host_port(m.address, spec.admin_port)) for m in spec.members() if m != node)
    lease = spec.vip_lease if spec.vip_lease is not None else len(spec.members()) != 2
    if not lease:
        lines.append("# two members, no witness: with either one down there is no majority and the VIP")
        lines.append("# would be dropped everywhere; plain VRRP places it (add a witness for the lease)")
    lines += [
        f"vip_lease = {'true' if lease else 'false'}",
        "# where `halb vip release` releases this node's lease once its `halb serve` has stopped",
        f"admin_peers = [{admins}]",
    ]
    return lines


def witness_config(spec: ClusterSpec) -> str:
    """The witness's TOML: [node] and [cluster] with role = "witness" (no listeners, pools or VRRP)."""
    if spec.witness is None:
        raise KeyError("the cluster spec has no witness")
    node = spec.witness
    return (
        "\n".join(
            [
                f"# halb witness {node.name}: generated by halb.cluster_config; Raft vote only, no proxy.",
                f"# cluster: balancers {', '.join(n.name for n in spec.lbs)}",
                "",
                "[node]",
                f"name = {_q(node.name)}",
                f"admin = {_q(_host_port(node.address, spec.admin_port))}",
                f"drain_timeout = {_num(spec.drain_timeout)}",
                *_cluster_lines(spec, node, "witness"),
            ]
        )
        + "\n"
    )


def node_config(spec: ClusterSpec, node_name: str) -> str:
    """The TOML configuration for balancer `node_name` (or the witness); `halb.config.load` accepts it."""
    if spec.witness is not None and node_name == spec.witness.name:
        return witness_config(spec)
    node = spec.lb(node_name)
    h = spec.health
    backends = ",\n".join(
        f"  {{ name = {_q(b.name)}, address = {_q(_host_port(b.address, b.port))}, weight = {b.weight} }}"
        for b in spec.backends
    )
    lines = [
        f"# halb node {node.name}: generated by halb.cluster_config; edit the ClusterSpec, not this file.",
        f"# cluster: balancers {', '.join(n.name for n in spec.lbs)}; VIP {spec.vip}/{spec.prefix_len}",
    ]
    if spec.redis:
        lines.append(f"# redis: {spec.redis} (sticky sessions and rate limits)")
    if spec.witness is not None:
        lines.append(f"# witness: {spec.witness.name} at {spec.witness.address}")
    lines += [
        "",
        "[node]",
        f"name = {_q(node.name)}",
        f"admin = {_q(_host_port(node.address, spec.admin_port))}",
        f"workers = {spec.workers}",
        f"drain_timeout = {_num(spec.drain_timeout)}",
        "",
        "[[listeners]]",
        'name = "web"',
        f'bind = "0.0.0.0:{spec.listen_port}"',
        'mode = "http"',
        'pool = "app"',
        "",
        "[pools.app]",
        f"algorithm = {_q(spec.algorithm)}",
        "backends = [",
        backends,
        "]",
        f"health = {{ kind = {_q(h.kind)}, path = {_q(h.path)}, interval = {_num(h.interval)}, "
        f"timeout = {_num(h.timeout)}, rise = {h.rise}, fall = {h.fall} }}",
    ]
    if (spec.redis or spec.redis_sentinels) and spec.sticky:
        lines.append(f"sticky = {{ mode = {_q(spec.sticky)} }}")
    if spec.redis_sentinels:
        sentinels = ", ".join(_q(s) for s in spec.redis_sentinels)
        lines += ["", "[state]", f"sentinels = [{sentinels}]", f"service_name = {_q(spec.redis_service)}"]
    elif spec.redis:
        lines += ["", "[state]", f"url = {_q('redis://' + spec.redis + '/0')}"]
    if spec.vrrp:
        lines += [
            "",
            "[vrrp]",
            f"interface = {_q(spec.vrrp_interface)}",
            f"vrid = {spec.vrid}",
            f"priority = {spec.priority(node.name)}",
            f"advert_interval = {_num(spec.advert_interval)}",
            f"virtual_ips = [{_q(spec.vip)}]",
        ]
    if spec.cluster:
        lines += _cluster_lines(spec, node, "balancer")
    return "\n".join(lines) + "\n"


def all_node_configs(spec: ClusterSpec) -> dict[str, str]:
    """Every balancer's configuration, by node name (the witness: `witness_config`)."""
    return {node.name: node_config(spec, node.name) for node in spec.lbs}
