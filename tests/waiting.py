"""Polling until something holds: the one `wait_for` the test suites share."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition", interval: float = 0.05
) -> float:
    """Call `predicate` every `interval` s until it is true; the seconds that took. AssertionError after
    `timeout` s."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
