"""least_bandwidth: the backend currently moving the fewest bytes per second per unit of weight.

How this works: each backend's `bandwidth` meter is an exponentially decaying rate (bytes/s over roughly the
last couple of seconds) fed by the proxy through `Backend.on_bytes`. Each candidate scores
`bandwidth.rate(ctx.now) / effective_weight` and the lowest wins, ties rotated (see `MinScorePolicy`), so
idle backends (all at 0) share evenly. Time comes from `ctx.now`; no clock is read. O(N) per call.
"""

from __future__ import annotations

from halb.backend import Backend
from halb.balancing.base import Context, register
from halb.balancing.least_connections import MinScorePolicy


@register
class LeastBandwidth(MinScorePolicy):
    name = "least_bandwidth"

    def score(self, backend: Backend, ctx: Context) -> float:
        return backend.bandwidth.rate(ctx.now) / backend.effective_weight
