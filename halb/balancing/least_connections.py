"""least_connections: the backend with the fewest active connections.

How this works: each call scores every candidate (available, not excluded) by `active_connections` and
returns the lowest. Ties are broken by smooth weighted round robin among the tied backends, so equally
loaded backends take turns instead of the first one always winning. A slow backend holds its connections
longer, so its count stays high and it naturally gets fewer new requests. O(N) per call, no sorting.

`MinScorePolicy` is the shared "lowest score wins, ties rotate" engine; the other least_* policies subclass
it and only define `score()`.
"""

from __future__ import annotations

import math
import random
from abc import abstractmethod
from collections.abc import Collection, Sequence

from halb.backend import Backend
from halb.balancing.base import Context, Policy, register


class MinScorePolicy(Policy):
    """Choose the candidate with the lowest `score()`; ties broken by smooth weighted round robin.

    Like HAProxy's leastconn, "round-robin is performed within groups of servers of the same load": when
    several candidates share the lowest score (e.g. all idle under sequential traffic), they take turns in
    proportion to their `effective_weight` (nginx's smooth WRR among the tied ones), so an idle pool still
    spreads 1:2:3 for weights 1:2:3 and equal weights simply rotate.
    """

    def __init__(self, backends: Sequence[Backend], rng: random.Random | None = None) -> None:
        self._current: dict[Backend, float] = {}
        super().__init__(backends, rng)

    def update(self, backends: Sequence[Backend]) -> None:
        super().update(backends)
        self._current = {b: self._current.get(b, 0.0) for b in self.backends}

    @abstractmethod
    def score(self, backend: Backend, ctx: Context) -> float: ...

    def choose(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None:
        best_score = math.inf
        tied: list[Backend] = []
        for b in self.backends:
            if not b.available or b in exclude:
                continue
            s = self.score(b, ctx)
            if s < best_score:
                best_score, tied = s, [b]
            elif s == best_score:
                tied.append(b)
        if len(tied) <= 1:
            return tied[0] if tied else None
        current = self._current
        total = 0.0
        pick = tied[0]
        pick_value = -math.inf
        for b in tied:
            weight = b.effective_weight
            total += weight
            value = current.get(b, 0.0) + weight
            current[b] = value
            if value > pick_value:
                pick, pick_value = b, value
        current[pick] = pick_value - total
        return pick


@register
class LeastConnections(MinScorePolicy):
    name = "least_connections"

    def score(self, backend: Backend, ctx: Context) -> float:
        return float(backend.active_connections)
