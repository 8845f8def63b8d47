"""power_of_two_choices: pick two at random, keep the less loaded one.

How this works: draw one candidate with probability proportional to `effective_weight`, then a second,
distinct one the same way from the rest; keep whichever has the lower `active_connections / effective_weight`
(on a tie, the first draw, so with no load the split is exactly the weights). This gets most of the benefit of
least-connections while avoiding the herd effect of every balancer piling onto the same least-loaded
backend. One candidate: it; none: None. O(N) per call.
"""

from __future__ import annotations

from collections.abc import Collection

from halb.backend import Backend
from halb.balancing.base import Context, Policy, register
from halb.balancing.random_choice import weighted_index


def _load(backend: Backend) -> float:
    return backend.active_connections / backend.effective_weight


@register
class PowerOfTwoChoices(Policy):
    name = "power_of_two_choices"

    def choose(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None:
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        weights = [b.effective_weight for b in candidates]
        first = weighted_index(self.rng, weights)
        second = weighted_index(self.rng, weights, skip=first)
        a, b = candidates[first], candidates[second]
        return b if _load(b) < _load(a) else a
