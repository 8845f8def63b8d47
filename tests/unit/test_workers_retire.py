"""A worker that dies must not make any total go backwards (its counters are kept by the supervisor)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from halb.config import parse
from halb.workers import WorkerSupervisor

CONFIG = parse(
    {
        "node": {"name": "t"},
        "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "pool": "app"}],
        "pools": {"app": {"backends": [{"name": "a", "address": "127.0.0.1:9001"}]}},
    }
)


def worker_stats(requests: int, no_backend: int, responses_5xx: int) -> dict[str, Any]:
    return {
        "backends": {("app", "a"): {"requests_total": requests, "active_connections": 1}},
        "pools": {"app": {"no_backend_total": no_backend}},
        "listeners": {"web": {"requests_total": requests, "responses": {"5xx": responses_5xx}}},
    }


def totals(supervisor: WorkerSupervisor) -> tuple[float, int, float, float]:
    listener = supervisor.listener_totals()["web"]
    return (
        supervisor.backend_totals()[("app", "a")]["requests_total"],
        supervisor.no_backend_totals()["app"],
        listener["requests_total"],
        listener["responses"]["5xx"],
    )


def test_counters_of_a_dead_worker_are_kept() -> None:
    supervisor = WorkerSupervisor(CONFIG, lambda pool, backend: None)
    dying = SimpleNamespace(index=0, stats=worker_stats(10, 3, 2))
    living = SimpleNamespace(index=1, stats=worker_stats(5, 1, 1))
    supervisor.workers = {0: dying, 1: living}  # type: ignore[dict-item]
    before = totals(supervisor)
    assert before == (15, 4, 15, 3)

    supervisor._retire(dying)  # type: ignore[arg-type]
    del supervisor.workers[0]
    assert totals(supervisor) == before
    assert supervisor.backend_totals()[("app", "a")]["active_connections"] == 1  # gauges are not kept
