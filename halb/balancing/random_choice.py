"""random: weighted random choice.

How this works: draw `r` uniformly in [0, sum of effective weights) from the policy's own `rng` and walk the
candidates subtracting weights until `r` goes negative. Each candidate is chosen with probability
proportional to its `effective_weight` (so slow start applies). Stateless apart from the RNG; O(N) per call.
Seed the `rng` for reproducible tests.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from halb.backend import Backend
from halb.balancing.base import Context, Policy, register


def weighted_index(rng: random.Random, weights: Sequence[float], skip: int = -1) -> int:
    """Index drawn with probability proportional to `weights`, never `skip`. Needs a positive weight."""
    total = 0.0
    for i, w in enumerate(weights):
        if i != skip:
            total += w
    r = rng.random() * total
    last = -1
    for i, w in enumerate(weights):
        if i == skip:
            continue
        last = i
        r -= w
        if r < 0.0:
            return i
    return last  # float rounding left r at ~0: the last eligible index


@register
class RandomChoice(Policy):
    name = "random"

    def choose(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None:
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        return candidates[weighted_index(self.rng, [b.effective_weight for b in candidates])]
