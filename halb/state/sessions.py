"""Sticky sessions of one pool: which backend a session key goes to, with the store or without it.

How this works: the proxy builds the session key (cookie mode: the value of the session cookie, issued with
`new_session_id()` when absent or malformed; source_ip mode: the client address; header mode: the header's
value) and calls `await sticky.resolve(key, exclude)`. One store round trip (GETEX, which also slides the
TTL), then a pure decision (`decide`):

    store says backend B, B is in the pool and healthy, not excluded    -> B              (source "store")
        (a draining or weight-0 B keeps its existing sessions)
    store says B, but B is down, removed from the pool, or excluded     -> a new backend  ("rehomed", write)
    store has no mapping                                                 -> a new backend  ("new", write)
    store unavailable (StoreUnavailable)                                 -> ring owner     ("fallback")

A new backend is, by default, the consistent-hash ring's choice for the session key (the pool's
`halb.balancing.consistent_hash` ring: the same ring, the same hash, so the same answer in every balancer);
it only considers available backends, so a draining backend gets no new sessions, and it takes a `backup`
backend only while no other backend is available. The fallback asks the
same ring, so while Redis is unreachable every session whose mapping was made by the ring and whose
backend is still up lands exactly where the store would have sent it; sessions that were rehomed, or that
were assigned by a custom `choose_new` (e.g. the pool's least-connections policy), may land elsewhere
until the store is back. While degraded, a draining backend's sessions move (the ring cannot know them).

`write` tells the proxy to store the mapping (`await sticky.remember(key, choice)`, which never raises:
a lost write only means the next request decides again, and with the ring it decides the same). No I/O
happens in `decide`; `resolve` does at most one store call and never waits longer than the store's bound.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from halb.backend import Backend
from halb.balancing.base import Context
from halb.balancing.consistent_hash import ConsistentHash
from halb.errors import StoreUnavailable
from halb.state.store import SessionStore

SESSION_ID_BYTES = 16  # 128 random bits -> 22 url-safe base64 characters
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22}")

STORE, NEW, REHOMED, FALLBACK = "store", "new", "rehomed", "fallback"

ChooseNew = Callable[[str, Collection[Backend]], Backend | None]


def new_session_id() -> str:
    """An opaque, unguessable session id for the session cookie."""
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def valid_session_id(value: str) -> bool:
    """True for ids `new_session_id` could have made; anything else from a client is treated as absent."""
    return _SESSION_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class StickyChoice:
    backend: Backend | None  # None: no backend can take this session (the proxy answers 503)
    write: bool  # store (session key -> backend) now
    source: str  # "store" | "new" | "rehomed" | "fallback"


def decide(
    mapped: str | None,
    by_name: dict[str, Backend],
    choose_new: Callable[[], Backend | None],
    exclude: Collection[Backend] = (),
) -> StickyChoice:
    """The pure part: the store's answer (`mapped`) + the pool's backends -> where to send the session."""
    if mapped is not None:
        backend = by_name.get(mapped)
        if backend is not None and backend.healthy and backend not in exclude:
            return StickyChoice(backend, False, STORE)
        chosen = choose_new()
        return StickyChoice(chosen, chosen is not None, REHOMED)
    chosen = choose_new()
    return StickyChoice(chosen, chosen is not None, NEW)


class StickySessions:
    """Sticky sessions of one pool. Call `update()` when the pool's membership or weights change."""

    def __init__(
        self,
        pool: str,
        backends: Sequence[Backend],
        store: SessionStore,
        ttl: float,
        choose_new: ChooseNew | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        self.pool = pool
        self.store = store
        self.ttl = ttl
        self.ring = ConsistentHash([b for b in backends if not b.backup])
        self.backup_ring = ConsistentHash([b for b in backends if b.backup])
        self._primaries: list[Backend] = []
        self._choose_new = choose_new
        self._by_name: dict[str, Backend] = {}
        self.counts: Counter[str] = Counter()  # decisions by source, for metrics
        self.update(backends)

    def update(self, backends: Sequence[Backend]) -> None:
        self._primaries = [b for b in backends if not b.backup]
        self.ring.update(self._primaries)  # rebuilds only when names/addresses/weights changed
        self.backup_ring.update([b for b in backends if b.backup])
        self._by_name = {b.name: b for b in backends}

    def ring_choice(self, key: str, exclude: Collection[Backend] = ()) -> Backend | None:
        """The ring's backend for `key`: among the backends in normal use, or among the backups while
        none of those is available (halb.pool)."""
        ctx = Context(key=key)
        chosen = self.ring.choose(ctx, exclude)
        if chosen is None and not any(b.available for b in self._primaries):
            chosen = self.backup_ring.choose(ctx, exclude)
        return chosen

    async def resolve(self, key: str, exclude: Collection[Backend] = ()) -> StickyChoice:
        if self._choose_new is None:

            def choose_new() -> Backend | None:
                return self.ring_choice(key, exclude)

        else:
            custom = self._choose_new

            def choose_new() -> Backend | None:
                return custom(key, exclude)

        try:
            mapped = await self.store.get_backend(self.pool, key, self.ttl)
        except StoreUnavailable:
            self.store.status.fallback_decisions_total += 1
            choice = StickyChoice(self.ring_choice(key, exclude), False, FALLBACK)
        else:
            choice = decide(mapped, self._by_name, choose_new, exclude)
        self.counts[choice.source] += 1
        return choice

    async def remember(self, key: str, choice: StickyChoice) -> bool:
        """Write the mapping when the choice asks for it. False if it was needed and could not be written."""
        if not choice.write or choice.backend is None:
            return True
        try:
            await self.store.set_backend(self.pool, key, choice.backend.name, self.ttl)
        except StoreUnavailable:
            return False
        return True

    async def forget(self, key: str) -> bool:
        try:
            await self.store.delete(self.pool, key)
        except StoreUnavailable:
            return False
        return True
