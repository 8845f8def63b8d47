"""custom_load: traffic steered by the load each backend's agent reports.

How this works: the health layer stores each backend's agent report in `backend.load` (0 = idle, 1 = full;
None = unknown, e.g. no agent configured: not an error). Each pick uses the smooth weighted round robin of
`weighted_round_robin` (deterministic, interleaved, exact proportions over a window) with per-backend weight
`effective_weight * max(1 - load, 0.05)`. The 0.05 floor keeps a fully loaded backend reachable at a trickle
so it is never starved of the traffic that would show it recovered. An unknown load is replaced by the mean
of the known loads among the candidates, so it is neutral; when no load is known at all, the plain
effective weights are used. Loads are clamped to [0, 1]; a non-finite value counts as unknown. O(N) per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from halb.backend import Backend
from halb.balancing.base import Context, register
from halb.balancing.weighted_round_robin import WeightedRoundRobin

# Smallest fraction of its weight a fully loaded backend keeps.
MIN_HEADROOM = 0.05


def _known_load(backend: Backend) -> float | None:
    load = backend.load
    if load is None or not math.isfinite(load):
        return None
    return min(max(load, 0.0), 1.0)


@register
class CustomLoad(WeightedRoundRobin):
    name = "custom_load"

    def weights(self, candidates: Sequence[Backend], ctx: Context) -> list[float]:
        loads = [_known_load(b) for b in candidates]
        known = [x for x in loads if x is not None]
        if not known:
            return [b.effective_weight for b in candidates]
        mean = sum(known) / len(known)
        return [
            b.effective_weight * max(1.0 - (mean if x is None else x), MIN_HEADROOM)
            for b, x in zip(candidates, loads, strict=True)
        ]
