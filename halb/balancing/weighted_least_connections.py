"""weighted_least_connections: fewest active connections per unit of weight.

How this works: each candidate scores `active_connections / effective_weight` and the lowest wins; ties
(all idle, under sequential traffic) are shared by smooth weighted round robin (see `MinScorePolicy`), so an
idle pool spreads by weight and under load each backend's connection count tracks its weight. Using
`effective_weight` makes a backend in slow start take proportionally fewer connections. O(N) per call.
"""

from __future__ import annotations

from halb.backend import Backend
from halb.balancing.base import Context, register
from halb.balancing.least_connections import MinScorePolicy


@register
class WeightedLeastConnections(MinScorePolicy):
    name = "weighted_least_connections"

    def score(self, backend: Backend, ctx: Context) -> float:
        return backend.active_connections / backend.effective_weight
