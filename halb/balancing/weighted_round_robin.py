"""weighted_round_robin: nginx's *smooth* weighted round robin.

How this works: every backend carries a running `current` score. On each call, every candidate (available,
not excluded) adds its weight to its `current`; the candidate with the highest `current` wins and has the
sum of all candidates' weights subtracted from its `current`. Over any window of sum(weights) picks each
backend is chosen exactly in proportion to its weight, and the picks are interleaved (weights 1:3 give
b a b b, not a b b b), so a heavy backend never receives a burst. The weight is `effective_weight`, so a
backend in slow start ramps up smoothly. A backend that leaves (removed or unavailable at `update()`) loses
its score and re-enters at 0. O(N) per call.

Subclasses may override `weights()` to feed other weights into the same smooth scheduler (`custom_load`
does).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from halb.backend import Backend
from halb.balancing.base import Context, Policy, register


@register
class WeightedRoundRobin(Policy):
    name = "weighted_round_robin"

    def __init__(self, backends: Sequence[Backend], rng: random.Random | None = None) -> None:
        self._current: dict[Backend, float] = {}
        super().__init__(backends, rng)

    def update(self, backends: Sequence[Backend]) -> None:
        super().update(backends)
        keep = {b for b in self.backends if b.available}
        for b in [b for b in self._current if b not in keep]:
            del self._current[b]

    def weights(self, candidates: Sequence[Backend], ctx: Context) -> list[float]:
        """The weight of each candidate for this pick (same order)."""
        return [b.effective_weight for b in candidates]

    def choose(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None:
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        current = self._current
        total = 0.0
        best: Backend | None = None
        best_current = 0.0
        for b, w in zip(candidates, self.weights(candidates, ctx), strict=True):
            c = current.get(b, 0.0) + w
            current[b] = c
            total += w
            if best is None or c > best_current:
                best, best_current = b, c
        assert best is not None
        current[best] = best_current - total
        return best
