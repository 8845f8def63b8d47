"""A pool at run time: its backends, its balancing policy and the hooks the proxy reports failures to.

How this works: built from a `PoolConfig`, a `Pool` owns one `Backend` record per configured backend and one
policy instance. The proxy calls `choose()` for each new request/connection and `report_connect_failure()`
when a connect fails (that counts toward the backend's `fall` in the health layer, wired by the composition
root through `on_connect_failure`). Health and operator state arrive through `set_state()`.

Backup backends (`backup = true`, HAProxy's `backup` servers, keepalived's sorry server) have a policy
of their own, with the same algorithm: `choose()` asks it only while no other backend is available
(healthy, not draining, weight above 0), so traffic goes back to the others as soon as one recovers.

`reconfigure(new_config)` applies a changed pool definition (from the cluster's shared configuration)
in place: a backend whose name and address are unchanged keeps its `Backend` record (health, counters,
in-flight connections), new ones start fresh, removed ones are dropped, and the policy is rebuilt.
Listeners keep their reference to the same `Pool` object.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection

from halb.backend import Backend
from halb.balancing.base import Context, Policy, make_policy
from halb.config_model import BackendConfig, PoolConfig


class Pool:
    def __init__(self, config: PoolConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.name = config.name
        self._rng = rng
        self.backends: list[Backend] = [self._new_backend(b) for b in config.backends]
        self._by_name = {b.name: b for b in self.backends}
        self.primaries, self.backups = _split(self.backends)
        self.policy: Policy = make_policy(config.algorithm, self.primaries, rng)
        self.backup_policy: Policy = make_policy(config.algorithm, self.backups, rng)
        # Set by the composition root; called with the backend whose connect failed.
        self.on_connect_failure: Callable[[Backend], None] = lambda backend: None
        self.no_backend_total = 0  # requests answered 503 because no backend was available

    def _new_backend(self, b: BackendConfig) -> Backend:
        return Backend(
            name=b.name,
            host=b.address.host,
            port=b.address.port,
            weight=b.weight,
            healthy=self.config.health.initial == "up" or self.config.health.kind == "none",
            draining=b.draining,
            backup=b.backup,
        )

    def reconfigure(self, config: PoolConfig) -> set[str]:
        """Apply a changed definition in place; returns the names of the backends kept as they were."""
        kept: set[str] = set()
        backends: list[Backend] = []
        self.config = config
        for b in config.backends:
            old = self._by_name.get(b.name)
            if old is not None and (old.host, old.port) == (b.address.host, b.address.port):
                old.weight = b.weight
                old.draining = b.draining
                old.backup = b.backup
                backends.append(old)
                kept.add(b.name)
            else:
                backends.append(self._new_backend(b))
        self.backends = backends
        self._by_name = {b.name: b for b in backends}
        self.primaries, self.backups = _split(backends)
        if self.policy.name != config.algorithm:
            self.policy = make_policy(config.algorithm, self.primaries, self._rng)
            self.backup_policy = make_policy(config.algorithm, self.backups, self._rng)
        else:
            self.policy.update(self.primaries)
            self.backup_policy.update(self.backups)
        return kept

    def get(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    def choose(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None:
        backend = self.policy.choose(ctx, exclude)
        if backend is None and self.backups and not any(b.available for b in self.primaries):
            backend = self.backup_policy.choose(ctx, exclude)  # (not when the others are only busy)
        if backend is None and not exclude:
            self.no_backend_total += 1
        return backend

    def report_connect_failure(self, backend: Backend) -> None:
        backend.on_connect_failed()
        self.on_connect_failure(backend)

    def set_state(
        self,
        name: str,
        *,
        healthy: bool | None = None,
        slowstart_factor: float | None = None,
        load: float | bool | None = False,
        draining: bool | None = None,
        weight: int | None = None,
    ) -> None:
        """Apply health/operator state to one backend; tells the policy when its inputs changed.

        `load=False` means "leave unchanged" (None is a real value: unknown load).
        """
        backend = self._by_name.get(name)
        if backend is None:
            return
        if healthy is not None:
            backend.healthy = healthy
        if slowstart_factor is not None:
            backend.slowstart_factor = slowstart_factor
        if load is not False:
            backend.load = load  # type: ignore[assignment]
        if draining is not None:
            backend.draining = draining
        if weight is not None:
            backend.weight = weight
        if backend.backup:
            self.backup_policy.update(self.backups)
        else:
            self.policy.update(self.primaries)

    @property
    def healthy_count(self) -> int:
        return sum(1 for b in self.backends if b.available)


def _split(backends: list[Backend]) -> tuple[list[Backend], list[Backend]]:
    """(the backends in normal use, the backups), each in configured order."""
    return [b for b in backends if not b.backup], [b for b in backends if b.backup]
