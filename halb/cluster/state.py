"""The replicated state of a halb cluster: shared pool configuration and the VIP lease table.

How this works
==============

`ClusterState` is a plain class. Raft (`halb.cluster.raft`) hands every committed command, in log
order, to `apply(command) -> result` on every member; nothing else ever changes it. So `apply` must be
deterministic: it reads no clock, no randomness, no environment -- time arrives inside the command
(`now`, from the submitting node's clock; see below). It never raises: a malformed or impossible command
returns `{"ok": False, "code": ..., "error": ...}` and leaves the state exactly as it was (everything is
validated before anything is changed). A successful one returns `{"ok": True, ...}`.

Commands (dicts with an "op"):

    seed            {pools: {NAME: {algorithm, backends: [BACKEND, ...]}}}
                    adds each pool the state does not have yet; pools it has are never overwritten, so
                    the TOML file seeds the cluster on its first start and is ignored for those pools
                    after that (the state is the truth; `halb config show` prints it)
    add_backend     {pool, backend: BACKEND}                BACKEND = {name, address "HOST:PORT",
    remove_backend  {pool, name}                                       weight 0..256 = 1,
    set_backend     {pool, name, weight?, draining?}                   draining = false,
    set_algorithm   {pool, algorithm}                                  agent "HOST:PORT" | null,
                                                                       maxconn?, backup?}
    register        {node, address, admin, role}            who is who (status shows names)
    acquire         {lease, node, now, duration, seen?: {holder, seq, at}}
    renew           {lease, node, now, duration}
    release         {lease, node, seq?}     seq: only if the holder's latest grant is that one

`version` counts configuration changes (pools); nodes rebuild their pools when it moves. Lease and
member commands leave it alone.

The lease rule (the node side is `halb.cluster.lease`): a lease record is `{holder, seq, duration,
granted_at}`; `seq` grows with every grant, renewal and release. `acquire` is granted when nobody holds
the lease, when the requester already holds it, or -- taking over from another holder -- only when the
requester proves it has seen the holder's CURRENT `seq` for at least `takeover_delay(duration)` of its
own clock: `seen.seq == seq` and `now - seen.at >= duration * (1 + GUARD)`. Both times are readings of
the requester's clock, so no two clocks are ever compared and every replica decides the same.
`renew` and `release` succeed only for the current holder. A release with `seq` (what `halb vip release`
commits, through a live member's admin API, on behalf of a node whose process is gone) succeeds only
while the holder's latest grant is that `seq`: a stale request can never release a later grant.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from halb.cluster.lease import takeover_delay

MAX_NAME = 64
MAX_POOLS = 256
MAX_BACKENDS = 1024
MAX_LEASE_DURATION = 3600.0
_NAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")
ROLES = ("balancer", "witness")


class Rejected(Exception):
    """A command that cannot be applied; `code` is one of invalid | not_found | conflict | held."""

    def __init__(self, code: str, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.code = code
        self.error = error
        self.extra = extra


def _algorithms() -> list[str]:
    from halb.balancing.base import policy_names

    return policy_names()


# --- validation (pure functions of the command) -----------------------------------------------------------
def _field(cmd: dict[str, Any], key: str) -> Any:
    if key not in cmd:
        raise Rejected("invalid", f"missing {key!r}")
    return cmd[key]


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise Rejected("invalid", f"{what} must be 1-{MAX_NAME} letters, digits or _.:@-, got {value!r}")
    return value


def _host_port(value: Any, what: str) -> str:
    from halb.config import parse_host_port

    if not isinstance(value, str):
        raise Rejected("invalid", f"{what} must be a string HOST:PORT, got {value!r}")
    try:
        return str(parse_host_port(value))
    except ValueError as exc:
        raise Rejected("invalid", f"{what}: {exc}") from None


def _weight(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise Rejected("invalid", f"weight must be an integer 0..256, got {value!r}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise Rejected("invalid", f"{what} must be true or false, got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Rejected("invalid", f"{what} must be a finite number, got {value!r}")
    return float(value)


def _algorithm(value: Any) -> str:
    names = _algorithms()
    if value not in names:
        raise Rejected("invalid", f"algorithm must be one of {', '.join(names)}, got {value!r}")
    return str(value)


def backend_record(raw: Any) -> dict[str, Any]:
    """A validated, normalised backend: {name, address, weight, draining, agent}, plus `maxconn` and
    `backup` only when set (a record without them is what members before those fields wrote and read)."""
    if not isinstance(raw, dict):
        raise Rejected("invalid", f"a backend must be an object, got {raw!r}")
    unknown = sorted(set(raw) - {"name", "address", "weight", "draining", "agent", "maxconn", "backup"})
    if unknown:
        raise Rejected("invalid", f"unknown backend field {unknown[0]!r}")
    agent = raw.get("agent")
    record = {
        "name": _name(_field(raw, "name"), "backend name"),
        "address": _host_port(_field(raw, "address"), "backend address"),
        "weight": _weight(raw.get("weight", 1)),
        "draining": _bool(raw.get("draining", False), "draining"),
        "agent": None if agent is None else _host_port(agent, "agent"),
    }
    maxconn = raw.get("maxconn")
    if maxconn is not None:
        if isinstance(maxconn, bool) or not isinstance(maxconn, int) or not 0 <= maxconn <= 10_000_000:
            raise Rejected("invalid", f"maxconn must be an integer 0..10000000, got {maxconn!r}")
        record["maxconn"] = maxconn
    if _bool(raw.get("backup", False), "backup"):
        record["backup"] = True
    return record


def _one_not_backup(pool: str, backends: list[dict[str, Any]]) -> None:
    """A pool keeps at least one backend that is not a backup (as the TOML loader requires)."""
    if backends and all(b.get("backup") for b in backends):
        raise Rejected("conflict", f"pool {pool!r} would have only backup backends")


def pool_record(raw: Any, pool: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise Rejected("invalid", f"pool {pool!r} must be an object")
    backends_raw = raw.get("backends")
    if not isinstance(backends_raw, list) or not backends_raw:
        raise Rejected("invalid", f"pool {pool!r} needs a non-empty list of backends")
    if len(backends_raw) > MAX_BACKENDS:
        raise Rejected("invalid", f"pool {pool!r}: at most {MAX_BACKENDS} backends")
    backends = [backend_record(b) for b in backends_raw]
    _one_not_backup(pool, backends)
    names = [b["name"] for b in backends]
    if len(set(names)) != len(names):
        raise Rejected("invalid", f"pool {pool!r} lists a backend name twice")
    return {"algorithm": _algorithm(raw.get("algorithm", "round_robin")), "backends": backends}


class ClusterState:
    """Pools, members and leases; changed only by `apply`."""

    def __init__(self) -> None:
        self.version = 0  # configuration changes applied
        self.applied = 0  # commands applied successfully
        self.pools: dict[str, dict[str, Any]] = {}
        self.members: dict[str, dict[str, Any]] = {}
        self.leases: dict[str, dict[str, Any]] = {}

    # --- the one way in ---------------------------------------------------------------------------
    def apply(self, command: Any) -> dict[str, Any]:
        """Apply one committed command; never raises; a rejected command changes nothing."""
        try:
            if not isinstance(command, dict):
                raise Rejected("invalid", f"a command must be an object, got {type(command).__name__}")
            op = command.get("op")
            handler = self._OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise Rejected("invalid", f"unknown op {op!r}")
            result = handler(self, command)
        except Rejected as exc:
            return {"ok": False, "code": exc.code, "error": exc.error, **exc.extra}
        except Exception as exc:  # a bug must not poison the log: report it, change nothing
            return {"ok": False, "code": "internal", "error": f"{type(exc).__name__}: {exc}"}
        self.applied += 1
        return {"ok": True, **result}

    # --- configuration ----------------------------------------------------------------------------
    def _seed(self, cmd: dict[str, Any]) -> dict[str, Any]:
        raw = _field(cmd, "pools")
        if not isinstance(raw, dict) or len(raw) > MAX_POOLS:
            raise Rejected("invalid", f"pools must be an object of at most {MAX_POOLS} pools")
        records = {_name(name, "pool name"): pool_record(p, name) for name, p in raw.items()}
        added = sorted(name for name in records if name not in self.pools)
        if len(self.pools) + len(added) > MAX_POOLS:
            raise Rejected("conflict", f"at most {MAX_POOLS} pools")
        for name in added:
            self.pools[name] = records[name]
        if added:
            self.version += 1
        return {"added": added, "kept": sorted(set(records) - set(added)), "version": self.version}

    def _pool(self, cmd: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        name = _name(_field(cmd, "pool"), "pool name")
        pool = self.pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self.pools)) or "none"
            raise Rejected("not_found", f"no pool {name!r} (pools: {known})")
        return name, pool

    def _backend_index(self, pool_name: str, pool: dict[str, Any], name: Any) -> int:
        name = _name(name, "backend name")
        for i, b in enumerate(pool["backends"]):
            if b["name"] == name:
                return i
        raise Rejected("not_found", f"pool {pool_name!r} has no backend {name!r}")

    def _changed(self, pool_name: str, **extra: Any) -> dict[str, Any]:
        self.version += 1
        return {"pool": pool_name, "version": self.version, **extra}

    def _add_backend(self, cmd: dict[str, Any]) -> dict[str, Any]:
        pool_name, pool = self._pool(cmd)
        backend = backend_record(_field(cmd, "backend"))
        if any(b["name"] == backend["name"] for b in pool["backends"]):
            raise Rejected("conflict", f"pool {pool_name!r} already has a backend {backend['name']!r}")
        if len(pool["backends"]) >= MAX_BACKENDS:
            raise Rejected("conflict", f"pool {pool_name!r} already has {MAX_BACKENDS} backends")
        _one_not_backup(pool_name, [*pool["backends"], backend])
        pool["backends"].append(backend)
        return self._changed(pool_name, backend=dict(backend))

    def _remove_backend(self, cmd: dict[str, Any]) -> dict[str, Any]:
        pool_name, pool = self._pool(cmd)
        index = self._backend_index(pool_name, pool, _field(cmd, "name"))
        if len(pool["backends"]) == 1:
            raise Rejected(
                "conflict", f"{cmd['name']!r} is the last backend of pool {pool_name!r}; drain it instead"
            )
        _one_not_backup(pool_name, [b for i, b in enumerate(pool["backends"]) if i != index])
        removed = pool["backends"].pop(index)
        return self._changed(pool_name, backend=dict(removed))

    def _set_backend(self, cmd: dict[str, Any]) -> dict[str, Any]:
        pool_name, pool = self._pool(cmd)
        index = self._backend_index(pool_name, pool, _field(cmd, "name"))
        if "weight" not in cmd and "draining" not in cmd:
            raise Rejected("invalid", "nothing to set: give weight and/or draining")
        changes: dict[str, Any] = {}
        if "weight" in cmd:
            changes["weight"] = _weight(cmd["weight"])
        if "draining" in cmd:
            changes["draining"] = _bool(cmd["draining"], "draining")
        backend = pool["backends"][index]
        backend.update(changes)
        return self._changed(pool_name, backend=dict(backend))

    def _set_algorithm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        pool_name, pool = self._pool(cmd)
        pool["algorithm"] = _algorithm(_field(cmd, "algorithm"))
        return self._changed(pool_name, algorithm=pool["algorithm"])

    def _register(self, cmd: dict[str, Any]) -> dict[str, Any]:
        node = _name(_field(cmd, "node"), "node")
        role = _field(cmd, "role")
        if role not in ROLES:
            raise Rejected("invalid", f"role must be one of {', '.join(ROLES)}, got {role!r}")
        admin = cmd.get("admin")
        record = {
            "address": _host_port(_field(cmd, "address"), "address"),
            "admin": None if admin is None else _host_port(admin, "admin"),
            "role": role,
        }
        for other, rec in self.members.items():
            if other != node and rec["address"] == record["address"]:
                raise Rejected("conflict", f"{record['address']} is already member {other!r}")
        self.members[node] = record
        return {"node": node}

    # --- leases -----------------------------------------------------------------------------------
    def _lease_args(self, cmd: dict[str, Any]) -> tuple[str, str]:
        return _name(_field(cmd, "lease"), "lease"), _name(_field(cmd, "node"), "node")

    def _duration(self, cmd: dict[str, Any]) -> float:
        duration = _number(_field(cmd, "duration"), "duration")
        if not 0 < duration <= MAX_LEASE_DURATION:
            raise Rejected("invalid", f"duration must be in (0, {MAX_LEASE_DURATION}], got {duration}")
        return duration

    def _grant(self, lease: str, node: str, now: float, duration: float) -> dict[str, Any]:
        old = self.leases.get(lease)
        record = {
            "holder": node,
            "seq": (old["seq"] if old else 0) + 1,
            "duration": duration,
            "granted_at": now,
        }
        self.leases[lease] = record
        return {"lease": lease, **record}

    def _acquire(self, cmd: dict[str, Any]) -> dict[str, Any]:
        lease, node = self._lease_args(cmd)
        now = _number(_field(cmd, "now"), "now")
        duration = self._duration(cmd)
        seen = cmd.get("seen")
        record = self.leases.get(lease)
        if record is None or record["holder"] is None or record["holder"] == node:
            return self._grant(lease, node, now, duration)
        holder, seq = record["holder"], record["seq"]
        wait = takeover_delay(record["duration"])
        if seen is not None:
            if not isinstance(seen, dict):
                raise Rejected("invalid", "seen must be an object {holder, seq, at}")
            seen_at = _number(_field(seen, "at"), "seen.at")
            if seen.get("holder") == holder and seen.get("seq") == seq:
                waited = now - seen_at
                if waited >= wait:
                    return {**self._grant(lease, node, now, duration), "previous": holder}
                wait -= max(0.0, waited)
        raise Rejected(
            "held",
            f"lease {lease!r} is held by {holder}",
            holder=holder,
            seq=seq,
            duration=record["duration"],
            retry_in=round(wait, 3),
        )

    def _renew(self, cmd: dict[str, Any]) -> dict[str, Any]:
        lease, node = self._lease_args(cmd)
        now = _number(_field(cmd, "now"), "now")
        duration = self._duration(cmd)
        record = self.leases.get(lease)
        if record is None or record["holder"] != node:
            holder = record["holder"] if record else None
            raise Rejected(
                "held" if holder else "not_found",
                f"{node} does not hold lease {lease!r} (holder: {holder or 'nobody'})",
                holder=holder,
                seq=record["seq"] if record else 0,
                duration=record["duration"] if record else duration,
            )
        return self._grant(lease, node, now, duration)

    def _release(self, cmd: dict[str, Any]) -> dict[str, Any]:
        lease, node = self._lease_args(cmd)
        record = self.leases.get(lease)
        if record is None or record["holder"] != node:
            holder = record["holder"] if record else None
            raise Rejected(
                "not_found", f"{node} does not hold lease {lease!r} (holder: {holder or 'nobody'})"
            )
        if "seq" in cmd:  # a release on a stopped holder's behalf: only the grant that was seen
            seq = cmd["seq"]
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise Rejected("invalid", f"seq must be an integer, got {seq!r}")
            if seq != record["seq"]:
                raise Rejected(
                    "conflict",
                    f"lease {lease!r} of {node} is at seq {record['seq']}, not {seq}",
                    holder=node,
                    seq=record["seq"],
                )
        record["holder"] = None
        record["seq"] += 1
        return {"lease": lease, **record}

    _OPS: dict[str, Any] = {
        "seed": _seed,
        "add_backend": _add_backend,
        "remove_backend": _remove_backend,
        "set_backend": _set_backend,
        "set_algorithm": _set_algorithm,
        "register": _register,
        "acquire": _acquire,
        "renew": _renew,
        "release": _release,
    }

    # --- views and persistence ----------------------------------------------------------------------
    def config_view(self) -> dict[str, Any]:
        """The shared configuration (deep copy): {version, pools}."""
        return {"version": self.version, "pools": copy.deepcopy(self.pools)}

    def lease(self, name: str) -> dict[str, Any] | None:
        record = self.leases.get(name)
        return dict(record) if record is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain builtins only: what the Raft full dump stores (no class is pickled)."""
        return {
            "format": 1,
            "version": self.version,
            "applied": self.applied,
            "pools": copy.deepcopy(self.pools),
            "members": copy.deepcopy(self.members),
            "leases": copy.deepcopy(self.leases),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterState:
        state = cls()
        state.version = int(data.get("version", 0))
        state.applied = int(data.get("applied", 0))
        state.pools = copy.deepcopy(data.get("pools", {}))
        state.members = copy.deepcopy(data.get("members", {}))
        state.leases = copy.deepcopy(data.get("leases", {}))
        return state

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterState) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


def seed_command(pools: dict[str, Any]) -> dict[str, Any]:
    """The `seed` command for a node's TOML pools (a `Config.pools` mapping of PoolConfig)."""
    return {
        "op": "seed",
        "pools": {
            name: {
                "algorithm": pool.algorithm,
                "backends": [
                    {
                        "name": b.name,
                        "address": str(b.address),
                        "weight": b.weight,
                        "draining": b.draining,
                        "agent": str(b.agent) if b.agent is not None else None,
                        **({"maxconn": b.maxconn} if b.maxconn is not None else {}),
                        **({"backup": True} if b.backup else {}),
                    }
                    for b in pool.backends
                ],
            }
            for name, pool in pools.items()
        },
    }
