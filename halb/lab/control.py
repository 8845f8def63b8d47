"""What the `halb lab` commands do, as plain functions (the click layer in `cli.py` only parses and prints).

How this works: `up` builds the topology, saves the state file, then creates, in this order: node configs,
namespaces (switch first), the bridge, one cable per host, the balancers' sysctls, and the services (web
backends, redis, `halb serve` per balancer under its VIP-releasing supervisor, `halb serve` on the
witness -- a Raft vote only -- all started at once), then
waits until every service answers from inside its own namespace and, with VRRP (the default), until
exactly one balancer holds the VIP. Any failure on the way tears the half-built lab down again and
re-raises, so `up` either returns a working lab or leaves nothing.

`down` works from whatever is there: the state file if readable, plus every namespace named
`<prefix>-<something>`. It stops recorded services (SIGTERM, SIGKILL after a grace), SIGKILLs any other
process still inside a lab namespace (`ip netns pids`), removes the nft table, deletes the namespaces
(their interfaces, the bridge and the veths go with them) and the run directory. Running it twice is fine.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

from halb.cluster_config import ClusterSpec, node_config
from halb.lab import netns, partition, processes
from halb.lab.netns import LabError
from halb.lab.state import LabState, load, remove_run_dir, run_dir
from halb.lab.topology import (
    ADMIN_PORT,
    BACKEND_PORT,
    DEFAULT_SUBNET,
    REDIS_PORT,
    REDIS_SERVICE,
    SENTINEL_PORT,
    SWITCH,
    Host,
    Topology,
    build,
    check_prefix,
)

READY_TIMEOUT = 30.0
Echo = Callable[[str], None]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "halb lab needs root: it creates network namespaces, veth pairs and nftables rules "
            "(run it with sudo, or as root in a VM/container)"
        )


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise LabError(
            f"missing tools: {', '.join(missing)} (Debian: apt-get install iproute2 nftables redis-server)"
        )


def lab_namespaces(prefix: str) -> list[str]:
    """Existing namespaces that belong to lab `prefix` by name (`<prefix>-<host>`)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-[a-z0-9]+$")
    return [ns for ns in netns.list_namespaces() if pattern.match(ns)]


def lab_state(prefix: str) -> LabState:
    """The state of a lab that is up; LabError if there is none."""
    check_prefix(prefix)
    st = load(prefix)
    if st is None:
        raise LabError(f"no lab {prefix!r} is up (start one with: halb lab up --prefix {prefix})")
    return st


# --- up ----------------------------------------------------------------------------------------------
def up(
    prefix: str,
    lbs: int = 2,
    backends: int = 2,
    witness: bool = False,
    vrrp: bool = True,
    subnet: str = DEFAULT_SUBNET,
    timeout: float = READY_TIMEOUT,
    echo: Echo = lambda _: None,
    advert_interval: float = 1.0,
    sentinel: bool = False,
) -> LabState:
    require_root()
    topo = build(prefix, lbs, backends, witness, subnet, sentinel=sentinel)
    require_tools("ip", "nft", "redis-server", *(["redis-sentinel"] if sentinel else []))
    if load(prefix) is not None or lab_namespaces(prefix):
        raise LabError(f"lab {prefix!r} is already up (or left over): run `halb lab down --prefix {prefix}`")
    options = {"vrrp": vrrp, "advert_interval": advert_interval, "sentinel": sentinel}
    st = LabState(prefix=prefix, topology=topo, options=options)
    st.save()
    try:
        _build(st, vrrp, echo, advert_interval)
        wait_ready(st, [h for h in topo.hosts if h.name in st.processes], timeout, echo)
        if vrrp:
            wait_vip(st, timeout, echo)
    except BaseException:
        echo("lab up failed; tearing down what was built")
        down(prefix)
        raise
    return st


def lab_spec(
    topo: Topology, vrrp: bool, advert_interval: float = 1.0, data_dir: str | None = None
) -> ClusterSpec:
    """The cluster spec the lab runs: the topology's, with a short drain so `stop` and `down` are quick,
    and the Raft data of every node in the lab's run directory (gone with `down`) unless `data_dir`."""
    return dataclasses.replace(
        topo.cluster_spec(),
        vrrp=vrrp,
        drain_timeout=1.0,
        advert_interval=advert_interval,
        data_dir=data_dir if data_dir is not None else str(run_dir(topo.prefix) / "raft"),
    )


def _build(st: LabState, vrrp: bool, echo: Echo, advert_interval: float = 1.0) -> None:
    topo = st.topology
    spec = lab_spec(topo, vrrp, advert_interval)
    for host in [*topo.by_role("lb"), *topo.by_role("witness")]:
        path = st.config_path(host.name)
        st.configs[host.name] = str(path)
        path.write_text(node_config(spec, host.name))
    _redis_configs(st)
    started = time.monotonic()
    for ns in topo.namespaces:
        st.namespaces.append(ns)
        st.save()
        netns.add_namespace(ns)
    netns.add_bridge(topo.switch_namespace)
    for host in topo.hosts:
        netns.add_cable(topo.switch_namespace, host, topo.prefix_len)
        if host.role == "lb":
            netns.sysctl(host.namespace, netns.LB_SYSCTLS)
    elapsed = time.monotonic() - started
    echo(f"network: {len(topo.namespaces)} namespaces, bridge in {topo.switch_namespace} ({elapsed:.2f}s)")
    for host in topo.hosts:
        if processes.service_argv(host, st.config_path(host.name)) is not None:
            processes.start(st, host)


def _redis_configs(st: LabState) -> None:
    """--sentinel: the replica's config (replicaof the first redis) and the sentinel's (it watches that
    master as REDIS_SERVICE, quorum 1, down after 500 ms). Both live in the run directory."""
    topo = st.topology
    redis = topo.by_role("redis")
    for replica in redis[1:]:
        path = st.dir / f"{replica.name}.conf"
        path.write_text(f"replicaof {redis[0].address} {REDIS_PORT}\n")
        st.configs[replica.name] = str(path)
    for host in topo.by_role("sentinel"):
        path = st.dir / f"{host.name}.conf"
        path.write_text(
            f"port {SENTINEL_PORT}\nbind {host.address}\ndaemonize no\nprotected-mode no\ndir {st.dir}\n"
            f"sentinel monitor {REDIS_SERVICE} {redis[0].address} {REDIS_PORT} 1\n"
            f"sentinel down-after-milliseconds {REDIS_SERVICE} 500\n"
            f"sentinel failover-timeout {REDIS_SERVICE} 4000\n"
            f"sentinel parallel-syncs {REDIS_SERVICE} 1\n"
        )
        st.configs[host.name] = str(path)


def _ready(host: Host) -> bool:
    try:
        if host.role in ("lb", "witness"):
            return netns.http_get(host.address, ADMIN_PORT, "/healthz", 0.5)[0] == 200
        if host.role == "web":
            return netns.http_get(host.address, BACKEND_PORT, "/healthz", 0.5)[0] == 200
        if host.role == "redis":
            return netns.redis_ping(host.address, REDIS_PORT, 0.5)
        if host.role == "sentinel":
            return netns.redis_ping(host.address, SENTINEL_PORT, 0.5)
    except OSError:
        return False
    return True


def wait_ready(st: LabState, hosts: Iterable[Host], timeout: float, echo: Echo = lambda _: None) -> None:
    """Wait until each host's service answers (probed from inside its namespace), or raise LabError."""
    pending = list(hosts)
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while pending:
        for host in list(pending):
            record = st.processes[host.name]
            if not processes.is_ours(record):
                raise LabError(
                    f"{host.name}'s service exited during start-up; last lines of {record.log}:\n"
                    + processes.log_tail(record)
                )
            if netns.in_netns(host.namespace, _ready, host):
                pending.remove(host)
        if not pending:
            break
        if time.monotonic() > deadline:
            names = ", ".join(h.name for h in pending)
            tails = "\n".join(f"--- {h.name}:\n{processes.log_tail(st.processes[h.name])}" for h in pending)
            raise LabError(f"not ready after {timeout:.0f}s: {names}\n{tails}")
        time.sleep(0.05)
    echo(f"services ready ({time.monotonic() - started:.2f}s)")


def vip_holders(st: LabState) -> list[str]:
    """The balancers whose namespace has the VIP on an interface right now."""
    topo = st.topology
    return [h.name for h in topo.by_role("lb") if topo.vip in netns.ipv4_addresses(h.namespace)]


def wait_vip(st: LabState, timeout: float, echo: Echo = lambda _: None) -> str:
    """Wait until exactly one balancer holds the VIP (VRRP elected a master); returns its name."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        holders = vip_holders(st)
        if len(holders) == 1:
            echo(f"VIP {st.topology.vip} held by {holders[0]} ({time.monotonic() - started:.2f}s)")
            return holders[0]
        if time.monotonic() > deadline:
            lbs = st.topology.by_role("lb")
            tails = "\n".join(f"--- {h.name}:\n{processes.log_tail(st.processes[h.name])}" for h in lbs)
            who = ", ".join(holders) or "nobody"
            raise LabError(f"VIP {st.topology.vip} held by {who} after {timeout:.0f}s\n{tails}")
        time.sleep(0.02)


# --- down --------------------------------------------------------------------------------------------
def down(prefix: str, echo: Echo = lambda _: None) -> dict[str, Any]:
    """Remove everything of lab `prefix`; idempotent. Returns what was removed."""
    require_root()
    check_prefix(prefix)
    st = load(prefix)
    switch = f"{prefix}-{SWITCH}"
    namespaces = set(lab_namespaces(prefix))
    records = []
    if st is not None:
        namespaces.update(st.namespaces)
        records = list(st.processes.values())
    alive = [r for r in records if processes.is_ours(r)]
    processes.stop(alive)
    strays = 0
    for _ in range(10):  # processes that were never recorded (a crash mid-start, `halb lab exec` shells)
        found = [pid for ns in sorted(namespaces) for pid in netns.pids(ns) if pid != os.getpid()]
        if not found:
            break
        strays += len(found)
        processes.kill_pids(found)
        time.sleep(0.05)
    if netns.exists(switch):
        partition.heal(switch)
    deleted = []
    for ns in sorted(namespaces, key=lambda n: n == switch):  # the switch last
        if netns.delete_namespace(ns):
            deleted.append(ns)
    remove_run_dir(prefix)
    echo(
        f"lab {prefix} down: stopped {len(alive)} service(s), killed {strays} stray process(es), "
        f"deleted {len(deleted)} namespace(s)"
    )
    return {"stopped": [r.host for r in alive], "strays": strays, "namespaces": sorted(deleted)}


# --- per-host actions --------------------------------------------------------------------------------
def _record(st: LabState, node: str) -> processes.ProcessRecord:
    host = st.topology.host(node)
    record = st.processes.get(host.name)
    if record is None:
        raise LabError(f"{node} ({host.role}) runs no service")
    return record


def kill(prefix: str, node: str) -> bool:
    require_root()
    return processes.kill(_record(lab_state(prefix), node))


def stop(prefix: str, node: str) -> bool:
    require_root()
    record = _record(lab_state(prefix), node)
    if not processes.is_ours(record):
        return False
    processes.stop([record])
    return True


def start(prefix: str, node: str, timeout: float = READY_TIMEOUT) -> processes.ProcessRecord:
    require_root()
    st = lab_state(prefix)
    host = st.topology.host(node)
    record = processes.start(st, host)
    wait_ready(st, [host], timeout)
    return record


def freeze(prefix: str, node: str, frozen: bool) -> None:
    require_root()
    record = _record(lab_state(prefix), node)
    if not processes.signal_group(record, signal.SIGSTOP if frozen else signal.SIGCONT):
        raise LabError(f"{node} is not running")
    want = "frozen" if frozen else "running"
    deadline = time.monotonic() + 2.0
    while processes.run_state(record) != want and time.monotonic() < deadline:
        time.sleep(0.01)


def partition_hosts(prefix: str, side_a: list[str], side_b: list[str]) -> list[str]:
    """Cut side A from side B (default: from every other host); returns side B's names."""
    require_root()
    st = lab_state(prefix)
    topo = st.topology
    a_hosts = [topo.host(n) for n in side_a]
    b_hosts = [topo.host(n) for n in side_b] if side_b else [h for h in topo.hosts if h not in a_hosts]
    entry = {"a": [h.name for h in a_hosts], "b": [h.name for h in b_hosts]}
    st.partitions.append(entry)
    st.nft_table = True
    st.save()
    partition.partition(topo.switch_namespace, [h.port for h in a_hosts], [h.port for h in b_hosts])
    return entry["b"]


def heal(prefix: str) -> bool:
    require_root()
    st = lab_state(prefix)
    healed = partition.heal(st.topology.switch_namespace)
    st.partitions = []
    st.nft_table = False
    st.save()
    return healed


def namespace_of(prefix: str, node: str) -> str:
    st = lab_state(prefix)
    if node in (SWITCH, "switch"):
        return st.topology.switch_namespace
    return st.topology.host(node).namespace


# --- status ------------------------------------------------------------------------------------------
def status(prefix: str) -> dict[str, Any]:
    require_root()
    st = lab_state(prefix)
    topo: Topology = st.topology
    hosts = []
    holders = []
    for host in topo.hosts:
        record = st.processes.get(host.name)
        present = netns.exists(host.namespace)
        vip = present and topo.vip in netns.ipv4_addresses(host.namespace)
        if vip:
            holders.append(host.name)
        hosts.append(
            {
                "name": host.name,
                "role": host.role,
                "namespace": host.namespace,
                "namespace_exists": present,
                "address": host.address,
                "pid": record.pid if record else None,
                "state": processes.run_state(record) if record else "-",
                "holds_vip": vip,
                "config": st.configs.get(host.name),
                "log": record.log if record else None,
            }
        )
    return {
        "prefix": prefix,
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.created_at)),
        "subnet": topo.subnet,
        "switch_namespace": topo.switch_namespace,
        "vips": [topo.vip],
        "vip_holders": holders,
        "partitions": st.partitions,
        "hosts": hosts,
    }


def config_text(
    prefix: str,
    node: str,
    lbs: int,
    backends: int,
    witness: bool,
    vrrp: bool,
    subnet: str = DEFAULT_SUBNET,
    vrrp_interface: str | None = None,
) -> str:
    """A balancer's (or the witness's) config: the running lab's file if there is one, else generated
    from the options.

    `subnet` and `vrrp_interface` serve hosts outside the lab (Vagrant: 192.168.56.0/24 on eth1); a
    config generated without a running lab keeps its Raft data in the spec's default, /var/lib/halb.
    """
    st = load(check_prefix(prefix))
    if st is not None and node in st.configs:
        with open(st.configs[node]) as f:
            return f.read()
    topo = st.topology if st is not None else build(prefix, lbs, backends, witness, subnet)
    host = topo.host(node)
    if host.role not in ("lb", "witness"):
        raise LabError(f"{node} is a {host.role}; only balancers (lb1..) and the witness have a halb config")
    spec = lab_spec(topo, vrrp, data_dir=ClusterSpec.data_dir)
    if vrrp_interface is not None:
        spec = dataclasses.replace(spec, vrrp_interface=vrrp_interface)
    return node_config(spec, node)
