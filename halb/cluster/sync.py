"""From the cluster's shared configuration to this node's runtime pool definitions.

How this works: the replicated state holds, per pool, the algorithm and the backends (name, address,
weight, drain flag, agent, and the backend's own maxconn and backup flag when set). Everything else about
a pool -- health checks, timeouts, retries, hash key, slow start -- stays in each node's TOML file.
`merge_pools(local, shared)` returns the node's `PoolConfig`s with the shared parts substituted; a pool
the cluster does not know keeps its TOML definition (it is seeded on start), and a shared pool no local
listener uses is ignored here. `change_kind(old, new)` tells the composition root how much to redo:
nothing, only push backend state (weight, drain, maxconn, backup), or rebuild the pool (backends
added/removed/moved, algorithm changed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from halb.config import parse_host_port
from halb.config_model import BackendConfig, PoolConfig


def backend_config(record: Mapping[str, Any]) -> BackendConfig:
    agent = record.get("agent")
    return BackendConfig(
        name=str(record["name"]),
        address=parse_host_port(str(record["address"])),
        weight=int(record.get("weight", 1)),
        agent=parse_host_port(agent) if agent else None,
        draining=bool(record.get("draining", False)),
        maxconn=record.get("maxconn"),
        backup=bool(record.get("backup", False)),
    )


def merge_pools(local: Mapping[str, PoolConfig], shared: Mapping[str, Any]) -> dict[str, PoolConfig]:
    """The node's pools (same names as `local`), with algorithm and backends from `shared`."""
    merged: dict[str, PoolConfig] = {}
    for name, pool in local.items():
        record = shared.get(name)
        if record is None:
            merged[name] = pool
            continue
        merged[name] = dataclasses.replace(
            pool,
            algorithm=str(record["algorithm"]),
            backends=tuple(backend_config(b) for b in record["backends"]),
        )
    return merged


def change_kind(old: PoolConfig, new: PoolConfig) -> str:
    """ "none", "state" (only weights, drain flags, maxconn or backup flags changed) or "rebuild"."""
    if old == new:
        return "none"
    if old.algorithm != new.algorithm or [(b.name, b.address, b.agent) for b in old.backends] != [
        (b.name, b.address, b.agent) for b in new.backends
    ]:
        return "rebuild"
    return "state"
