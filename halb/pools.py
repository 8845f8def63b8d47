"""Build runtime pools from configuration and move backend state between processes as plain data."""

from __future__ import annotations

from typing import Any

from halb.config_model import Config
from halb.pool import Pool


def build_pools(config: Config) -> dict[str, Pool]:
    return {name: Pool(pool_config) for name, pool_config in config.pools.items()}


def backend_states(pools: dict[str, Pool]) -> dict[tuple[str, str], tuple[Any, ...]]:
    """What the control process decides about each backend, and a worker must copy."""
    return {
        (pool.name, b.name): (b.healthy, round(b.slowstart_factor, 3), b.load, b.draining, b.weight)
        for pool in pools.values()
        for b in pool.backends
    }


def apply_backend_states(pools: dict[str, Pool], states: dict[tuple[str, str], tuple[Any, ...]]) -> None:
    for (pool_name, backend_name), (healthy, factor, load, draining, weight) in states.items():
        pool = pools.get(pool_name)
        if pool is not None:
            pool.set_state(
                backend_name,
                healthy=healthy,
                slowstart_factor=factor,
                load=load,
                draining=draining,
                weight=weight,
            )


def backend_counters(pools: dict[str, Pool], now: float) -> dict[tuple[str, str], dict[str, float]]:
    """Traffic statistics of each backend as seen by one worker."""
    return {
        (pool.name, b.name): {
            "active_connections": b.active_connections,
            "requests_total": b.requests_total,
            "connect_failures_total": b.connect_failures_total,
            "bytes_to_backend": b.bytes_to_backend,
            "bytes_from_backend": b.bytes_from_backend,
            "response_time_ewma": b.response_time_ewma if b.response_time_ewma is not None else -1.0,
            "bandwidth": b.bandwidth.rate(now),
        }
        for pool in pools.values()
        for b in pool.backends
    }
