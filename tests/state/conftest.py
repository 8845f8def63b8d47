"""Real Redis for the state tests: the fixtures `redis_url` (session-wide, shared; tests use their own key
prefixes), `redis_servers` (per test: processes a test may kill, stop and restart) and `sentinel_topology`
live in tests/conftest.py (shared with the integration tests), the process helpers in
tests/redis_servers.py. Here: `run`, the per-test key `prefix`, and the names the state tests import.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from tests.redis_servers import (  # noqa: F401 - re-exported for the state tests
    RedisProcess,
    RedisServers,
    SentinelTopology,
    redis_ping,
    sync_client,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], limit: float = 30.0) -> T:
    """Run one test coroutine on a fresh loop, with an overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, limit))


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone (the session Redis is shared)."""
    return f"t{uuid.uuid4().hex[:10]}:"
