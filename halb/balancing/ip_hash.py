"""ip_hash: classic map-based hashing of the client (or configured key) onto the backend list.

How this works: at `update()` the backends with a positive configured weight are laid out as a weighted list
(cumulative weights, so weight 3 takes three slots without materialising them). A request's `ctx.hash_key`
is hashed with a stable 64-bit hash (blake2b: identical in every process, unlike Python's salted `hash()`)
and taken modulo the total weight to pick a slot. The list holds ALL configured backends whatever their
health, so a backend going down only moves its own keys: when the pick is unavailable or excluded the key is
re-hashed with a salt (attempt 1, 2, ...) up to `MAX_REHASH` times, and if all of those miss, the key is
hashed over the remaining candidates. Everything is deterministic, so every balancer maps a key the same way.

The contrast with `consistent_hash`: removing a backend from the configuration (update with N-1 backends)
changes the modulus and remaps most keys (about (N-1)/N of them), not just the removed backend's share.
Per call: one hash plus a bisect over N cumulative weights in the common case.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from collections.abc import Collection, Sequence

from halb.backend import Backend
from halb.balancing.base import Context, Policy, register

MAX_REHASH = 20


def stable_hash(key: bytes, attempt: int = 0) -> int:
    """64-bit hash of `key`, the same in every process; `attempt` salts it for re-hashing."""
    digest = hashlib.blake2b(key, digest_size=8, salt=attempt.to_bytes(16, "little")).digest()
    return int.from_bytes(digest, "big")


@register
class IpHash(Policy):
    name = "ip_hash"

    def __init__(self, backends: Sequence[Backend], rng: random.Random | None = None) -> None:
        self._slots: list[Backend] = []
        self._cumulative: list[int] = []
        self._total = 0
        super().__init__(backends, rng)

    def update(self, backends: Sequence[Backend]) -> None:
        super().update(backends)
        self._slots = [b for b in self.backends if b.weight > 0]
        cumulative: list[int] = []
        total = 0
        for b in self._slots:
            total += b.weight
            cumulative.append(total)
        self._cumulative = cumulative
        self._total = total

    def _slot(self, h: int) -> Backend:
        return self._slots[bisect_right(self._cumulative, h % self._total)]

    def choose(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None:
        key = ctx.hash_key.encode()
        if self._total > 0:
            b = self._slot(stable_hash(key))
            if b.available and b not in exclude:
                return b
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        if self._total > 0:
            for attempt in range(1, MAX_REHASH + 1):
                b = self._slot(stable_hash(key, attempt))
                if b.available and b not in exclude:
                    return b
        return candidates[stable_hash(key, MAX_REHASH + 1) % len(candidates)]
