"""least_response_time: the backend expected to answer soonest.

How this works: each candidate scores `response_time_ewma * (active_connections + 1) / effective_weight`,
roughly "time to drain what it already has plus this request, per unit of capacity"; the lowest wins, ties
rotated (see `MinScorePolicy`). A backend with no response sample yet (`response_time_ewma is None`: new or
just added) scores 0, so it gets tried and acquires a measurement. O(N) per call.
"""

from __future__ import annotations

from halb.backend import Backend
from halb.balancing.base import Context, register
from halb.balancing.least_connections import MinScorePolicy


@register
class LeastResponseTime(MinScorePolicy):
    name = "least_response_time"

    def score(self, backend: Backend, ctx: Context) -> float:
        ewma = backend.response_time_ewma or 0.0
        return ewma * (backend.active_connections + 1) / backend.effective_weight
