"""consistent_hash: a ketama-style hash ring, so a backend leaving moves only its own keys.

How this works: each backend with a positive weight is placed on a 64-bit ring at `POINTS_PER_WEIGHT` points
per unit of weight; its points are the blake2b digests of "<name>#<i>" (four 64-bit points per digest), so
they are the same in every process and depend only on the backend's own name. If the ring would exceed
`MAX_RING_POINTS`, every backend's count is scaled down proportionally (never below `MIN_POINTS`); since a
backend's points are a prefix of its own fixed sequence, rescaling only adds or drops points at the tail.
A key (`ctx.hash_key`) is hashed with the same stable hash and owned by the first point clockwise (bisect);
if that owner is unavailable or excluded the lookup keeps walking clockwise to the next point whose owner can
take it. Keys owned by healthy backends therefore never move when another backend goes down or is removed,
and a down backend's keys scatter over the others (its points are interleaved with theirs).

The ring is rebuilt in `update()` only when membership or weights change (cached on the (name, host, port,
weight) tuples in order); health, drain and slow-start flips reuse it. Per call: one hash plus a bisect; the
clockwise walk is only taken when the owner cannot serve.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left
from collections.abc import Collection, Sequence

from halb.backend import Backend
from halb.balancing.base import Context, Policy, register

POINTS_PER_WEIGHT = 160
MAX_RING_POINTS = 160 * 256
MIN_POINTS = 40

_Signature = tuple[tuple[str, str, int, int], ...]


def key_hash(key: bytes) -> int:
    """64-bit position of `key` on the ring, the same in every process."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _points_of(name: str, count: int) -> list[int]:
    points: list[int] = []
    i = 0
    while len(points) < count:
        digest = hashlib.blake2b(f"{name}#{i}".encode(), digest_size=32).digest()
        for off in range(0, 32, 8):
            points.append(int.from_bytes(digest[off : off + 8], "big"))
        i += 1
    return points[:count]


def _point_counts(weights: Sequence[int]) -> list[int]:
    total = POINTS_PER_WEIGHT * sum(w for w in weights if w > 0)
    scale = min(1.0, MAX_RING_POINTS / total) if total else 1.0
    return [max(MIN_POINTS, round(POINTS_PER_WEIGHT * w * scale)) if w > 0 else 0 for w in weights]


@register
class ConsistentHash(Policy):
    name = "consistent_hash"

    def __init__(self, backends: Sequence[Backend], rng: random.Random | None = None) -> None:
        self._signature: _Signature | None = None
        self._points: list[int] = []
        self._owners: list[int] = []  # index into self.backends of each point's owner
        self.ring_builds = 0  # how many times the ring was (re)built; for tests and debugging
        super().__init__(backends, rng)

    def update(self, backends: Sequence[Backend]) -> None:
        super().update(backends)
        signature = tuple((b.name, b.host, b.port, b.weight) for b in self.backends)
        if signature != self._signature:
            self._signature = signature
            self._build()

    def _build(self) -> None:
        ring: list[tuple[int, int]] = []
        counts = _point_counts([b.weight for b in self.backends])
        for index, (b, count) in enumerate(zip(self.backends, counts, strict=True)):
            ring.extend((p, index) for p in _points_of(b.name, count))
        ring.sort()
        self._points = [p for p, _ in ring]
        self._owners = [i for _, i in ring]
        self.ring_builds += 1

    @property
    def ring_size(self) -> int:
        return len(self._points)

    def choose(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None:
        points, owners, backends = self._points, self._owners, self.backends
        n = len(points)
        h = key_hash(ctx.hash_key.encode())
        i = 0
        if n:
            i = bisect_left(points, h)
            if i == n:
                i = 0
            b = backends[owners[i]]
            if b.available and b not in exclude:
                return b
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        for _ in range(n - 1):
            i += 1
            if i == n:
                i = 0
            b = backends[owners[i]]
            if b.available and b not in exclude:
                return b
        # Only reachable if a candidate has no points (its weight changed without an update()).
        return candidates[h % len(candidates)]
