"""The one interface every balancing policy implements, and the registry that finds them by name.

How this works: a policy is built once per pool with the pool's backends, told again via `update()` when the
backend list or weights change, and asked `choose(ctx, exclude)` for every new request or connection. It
chooses only among `backend.available` backends not in `exclude` (the proxy excludes backends that already
failed this request), and returns None when there is none. Policies keep their own small state (a cursor,
a hash ring) but never do I/O and never read a clock: `ctx.now` carries the time.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar

from halb.backend import Backend


@dataclass(slots=True)
class Context:
    """What a policy may look at for one decision."""

    client_ip: str = ""
    # Hash key for ip_hash/consistent_hash; defaults to client_ip when empty.
    key: str = ""
    now: float = 0.0

    @property
    def hash_key(self) -> str:
        return self.key or self.client_ip


class Policy(ABC):
    name: ClassVar[str]

    def __init__(self, backends: Sequence[Backend], rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.backends: list[Backend] = list(backends)
        self.update(backends)

    def update(self, backends: Sequence[Backend]) -> None:
        """The backend list, a weight or a health state changed. Default: remember the list."""
        self.backends = list(backends)

    def candidates(self, exclude: Collection[Backend] = ()) -> list[Backend]:
        return [b for b in self.backends if b.available and b not in exclude]

    @abstractmethod
    def choose(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None: ...


_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def make_policy(name: str, backends: Sequence[Backend], rng: random.Random | None = None) -> Policy:
    _load_all()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return cls(backends, rng)


def _load_all() -> None:
    # Import every policy module once so each registers itself.
    import halb.balancing  # noqa: F401
