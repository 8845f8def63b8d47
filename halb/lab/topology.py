"""The lab's shape as plain data: which hosts exist, their namespaces, addresses and switch ports.

How this works: `build(prefix, lbs, backends, witness)` is a pure function. Every host gets a network
namespace `<prefix>-<host>` with one interface `eth0` on a /24, whose other end (`v-<host>`) hangs on the
bridge `br0` in the switch namespace `<prefix>-sw`. Addresses are fixed per host so that a lab always looks
the same (default subnet 10.99.0.0/24):

    lb1..lbN     .11 ...        (N <= 39)
    web1..webM   .51 ...        (M <= 49)
    VIP          .100
    witness      .240
    redis        .200
    redis2       .201           (--sentinel: a replica of redis)
    sentinel     .210           (--sentinel: redis-sentinel on SENTINEL_PORT, watching redis as "halb")
    client       .250

Two labs with different prefixes may use the same subnet: each has its own bridge in its own namespace,
and nothing is routed between labs or to the root namespace. A prefix is lower-case letters and digits
(no '-'), so `<prefix>-*` names exactly one lab's namespaces.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Any

from halb.cluster_config import BackendSpec, ClusterSpec, NodeSpec

DEFAULT_PREFIX = "halb"
DEFAULT_SUBNET = "10.99.0.0/24"
SWITCH = "sw"
BRIDGE = "br0"
HOST_IF = "eth0"
ADMIN_PORT = 9901
LISTEN_PORT = 80
BACKEND_PORT = 80
REDIS_PORT = 6379
SENTINEL_PORT = 26379
REDIS_SERVICE = "halb"  # the master's name in the lab's Sentinel
MAX_LBS = 39
MAX_BACKENDS = 49
ROLES = ("lb", "web", "redis", "client", "witness", "sentinel")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_OFFSETS = {
    "lb": 10,
    "web": 50,
    "vip": 100,
    "redis": 200,
    "redis2": 201,
    "sentinel": 210,
    "witness": 240,
    "client": 250,
}


class TopologyError(ValueError):
    """A lab that cannot be built as asked (bad prefix, too many hosts, unknown host...)."""


@dataclass(frozen=True)
class Host:
    name: str  # lb1, web2, redis, client, witness
    role: str  # one of ROLES
    namespace: str  # <prefix>-<name>
    address: str  # on eth0, without the prefix length
    port: str  # the veth end on the bridge, in the switch namespace


@dataclass(frozen=True)
class Topology:
    prefix: str
    subnet: str
    vip: str
    hosts: tuple[Host, ...]

    @property
    def switch_namespace(self) -> str:
        return f"{self.prefix}-{SWITCH}"

    @property
    def prefix_len(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the lab, the switch first."""
        return [self.switch_namespace, *(h.namespace for h in self.hosts)]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise TopologyError(f"no host {name!r} in lab {self.prefix!r} (hosts: {self.names()})")

    def names(self) -> str:
        return ", ".join(h.name for h in self.hosts)

    def by_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if h.role == role]

    def cluster_spec(self) -> ClusterSpec:
        """The halb cluster that runs on this lab (the balancers' configs come from it)."""
        witness = self.by_role("witness")
        redis = self.by_role("redis")
        sentinels = self.by_role("sentinel")
        return ClusterSpec(
            lbs=tuple(NodeSpec(h.name, h.address) for h in self.by_role("lb")),
            backends=tuple(BackendSpec(h.name, h.address, BACKEND_PORT) for h in self.by_role("web")),
            vip=self.vip,
            prefix_len=self.prefix_len,
            listen_port=LISTEN_PORT,
            admin_port=ADMIN_PORT,
            redis=f"{redis[0].address}:{REDIS_PORT}" if redis else None,
            witness=NodeSpec(witness[0].name, witness[0].address) if witness else None,
            redis_sentinels=tuple(f"{h.address}:{SENTINEL_PORT}" for h in sentinels),
            redis_service=REDIS_SERVICE,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "subnet": self.subnet,
            "vip": self.vip,
            "hosts": [asdict(h) for h in self.hosts],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        return cls(
            prefix=data["prefix"],
            subnet=data["subnet"],
            vip=data["vip"],
            hosts=tuple(Host(**h) for h in data["hosts"]),
        )


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise TopologyError(
            f"lab prefix {prefix!r} must be 1-12 lower-case letters or digits, starting with a letter"
        )
    return prefix


def build(
    prefix: str = DEFAULT_PREFIX,
    lbs: int = 2,
    backends: int = 2,
    witness: bool = False,
    subnet: str = DEFAULT_SUBNET,
    sentinel: bool = False,
) -> Topology:
    check_prefix(prefix)
    if not 1 <= lbs <= MAX_LBS:
        raise TopologyError(f"--lbs must be 1..{MAX_LBS}, got {lbs}")
    if not 1 <= backends <= MAX_BACKENDS:
        raise TopologyError(f"--backends must be 1..{MAX_BACKENDS}, got {backends}")
    try:
        network = ipaddress.IPv4Network(subnet)
    except ValueError as exc:
        raise TopologyError(f"subnet {subnet!r}: {exc}") from None
    if network.prefixlen != 24:
        raise TopologyError(f"the lab needs a /24 subnet, got {subnet}")

    def address(offset: int) -> str:
        return str(network.network_address + offset)

    def host(name: str, role: str, offset: int) -> Host:
        return Host(name, role, f"{prefix}-{name}", address(offset), f"v-{name}")

    hosts = [host(f"lb{i}", "lb", _OFFSETS["lb"] + i) for i in range(1, lbs + 1)]
    hosts += [host(f"web{i}", "web", _OFFSETS["web"] + i) for i in range(1, backends + 1)]
    hosts.append(host("redis", "redis", _OFFSETS["redis"]))
    if sentinel:
        hosts.append(host("redis2", "redis", _OFFSETS["redis2"]))
        hosts.append(host("sentinel", "sentinel", _OFFSETS["sentinel"]))
    if witness:
        hosts.append(host("witness", "witness", _OFFSETS["witness"]))
    hosts.append(host("client", "client", _OFFSETS["client"]))
    return Topology(prefix=prefix, subnet=str(network), vip=address(_OFFSETS["vip"]), hosts=tuple(hosts))
