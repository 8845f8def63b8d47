"""Which pool an HTTP request goes to (content switching), and what comes with each pool.

How this works: an HTTP listener sends its requests to its `pool` unless one of its `routes` matches first
(HAProxy's `use_backend NAME if { hdr(host) ... } { path_beg ... }`). A route names a pool and matches on
the request's host, `host = "api.example.com"` (case-insensitive, the port ignored) or
`host = "*.example.com"` (any name below it), and/or on the beginning of its path,
`path_prefix = "/api/"`; the first route whose every condition holds wins. `Router.route(req)` makes
that choice; a listener without routes pays one attribute check.

Each pool an HTTP listener can reach is a `PoolRoute`: the pool, its per-backend maxconn queue, the
[state] hook for it (the listener's rate limits and the pool's sticky sessions), and how to take the
pool's `hash_key` from a request. `inline_ok` is False when the hook or the queue may have to wait:
such requests are never served from the protocol callbacks (halb.proxy.http_proxy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from halb.config_model import RouteConfig
from halb.pool import Pool
from halb.proxy.http_codec import RequestHead
from halb.proxy.limits import BackendQueue

if TYPE_CHECKING:
    from halb.proxy.sessions_hook import ListenerHook


class PoolRoute:
    """One pool an HTTP listener sends requests to, with its queue, its [state] hook and its hash key."""

    __slots__ = ("_key_kind", "_key_name", "inline_ok", "keyed", "pool", "queue", "sessions")

    def __init__(
        self, pool: Pool, queue: BackendQueue | None = None, sessions: ListenerHook | None = None
    ) -> None:
        self.pool = pool
        self.sessions = sessions  # [state] hook: rate limits + sticky sessions (halb.proxy.sessions_hook)
        self.set_queue(queue)
        hash_key = pool.config.hash_key
        self._key_kind = 0
        self._key_name = b""
        if hash_key.startswith("header:"):
            self._key_kind, self._key_name = 1, hash_key[7:].strip().lower().encode()
        elif hash_key.startswith("cookie:"):
            self._key_kind, self._key_name = 2, hash_key[7:].strip().encode()
        elif hash_key == "path":
            self._key_kind = 3
        self.keyed = self._key_kind != 0  # hash_key() has something to extract from requests

    def set_queue(self, queue: BackendQueue | None) -> None:
        """The pool's per-backend maxconn queue (None when no backend has a maxconn). A route is served
        inline (from the protocol callbacks) unless a per-request hook may have to wait."""
        self.queue = queue
        self.inline_ok = self.sessions is None and queue is None

    def hash_key(self, req: RequestHead) -> str:
        """The balancing key of a request per `pool.config.hash_key` ("" = use the client IP)."""
        kind = self._key_kind
        if kind == 0:
            return ""
        if kind == 1:
            value = req.header(self._key_name)
            return value.decode("latin-1") if value else ""
        if kind == 2:
            name = self._key_name
            for hname, value in req.headers:
                if hname.lower() != b"cookie":
                    continue
                for part in value.split(b";"):
                    key, sep, val = part.strip(b" \t").partition(b"=")
                    if sep and key == name:
                        return val.strip(b'"').decode("latin-1")
            return ""
        return req.path.decode("latin-1")


class _Match:
    __slots__ = ("exact_host", "host_suffix", "path_prefix", "target")

    def __init__(self, config: RouteConfig, target: PoolRoute) -> None:
        host = config.host.lower().encode()
        self.exact_host = host if host and not host.startswith(b"*.") else b""
        self.host_suffix = host[1:] if host.startswith(b"*.") else b""  # ".example.com"
        self.path_prefix = config.path_prefix.encode()
        self.target = target

    def matches(self, host: bytes, path: bytes) -> bool:
        if self.exact_host and host != self.exact_host:
            return False
        if self.host_suffix and not host.endswith(self.host_suffix):
            return False
        return not self.path_prefix or path.startswith(self.path_prefix)


class Router:
    """The listener's routes in order, then its default pool."""

    __slots__ = ("_matches", "default")

    def __init__(self, default: PoolRoute, routes: Sequence[tuple[RouteConfig, PoolRoute]] = ()) -> None:
        self.default = default
        self._matches = [_Match(config, target) for config, target in routes]

    @property
    def all(self) -> list[PoolRoute]:
        return [self.default, *(match.target for match in self._matches)]

    def route(self, req: RequestHead) -> PoolRoute:
        matches = self._matches
        if not matches:
            return self.default
        host = req.host_name() or b""
        path = req.path
        for match in matches:
            if match.matches(host, path):
                return match.target
        return self.default
