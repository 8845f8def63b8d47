"""round_robin: plain rotation over the available backends, ignoring weights.

How this works: a cursor indexes the full configured backend list. Each call scans forward from the cursor
for the first backend that is available and not excluded, returns it and moves the cursor just past it.
Because the cursor walks the whole list (not a filtered copy), a backend going down simply gets skipped and
the others keep an even rotation; nothing has to be rebuilt when health flips. O(N) worst case per call.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from halb.backend import Backend
from halb.balancing.base import Context, Policy, register


@register
class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, backends: Sequence[Backend], rng: random.Random | None = None) -> None:
        self._cursor = 0
        super().__init__(backends, rng)

    def update(self, backends: Sequence[Backend]) -> None:
        super().update(backends)
        if self.backends:
            self._cursor %= len(self.backends)
        else:
            self._cursor = 0

    def choose(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None:
        backends = self.backends
        n = len(backends)
        i = self._cursor
        for _ in range(n):
            b = backends[i]
            i = i + 1 if i + 1 < n else 0
            if b.available and b not in exclude:
                self._cursor = i
                return b
        return None
