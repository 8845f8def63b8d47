"""Loader of the shared-state configuration: `[state]`, pool `sticky = {...}`, `[ratelimits.NAME]`.

How this works: `halb.config` calls these with its `Reader` (which knows the key path, so every error names
the file, the key and the problem, and rejects unknown keys). They return the frozen dataclasses of
`halb.config_model` (`StateConfig`, `StickyConfig`, `RateLimitConfig`). `check_references` runs once the
whole document is read: listeners name existing rules, rules and sticky pools serve HTTP listeners only,
and sticky sessions need a `[state]` table (their mappings live in Redis). The Redis settings are also
checked by building `halb.state.redis_store.RedisSettings` from them, so `halb check` refuses anything
the store itself would refuse. Nothing here opens a connection.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from halb.config_model import (
    HostPort,
    ListenerConfig,
    PoolConfig,
    RateLimitConfig,
    RateLimitTierConfig,
    StateConfig,
    StickyConfig,
)

if TYPE_CHECKING:
    from halb.config import Reader

# RFC 9110 token: header names, and (RFC 6265) cookie names.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}$")
_RULE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DOMAIN = re.compile(r"^\.?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")
_KEY_PREFIX = re.compile(r"^[!-~]{0,64}$")  # printable ASCII, no spaces
SENTINEL_ONLY = ("service_name", "sentinel_password", "db", "sentinel_check_interval")
COOKIE_ONLY = ("path", "domain", "secure", "httponly", "samesite")
STICKY_MODES = ("cookie", "source_ip", "header")
SAMESITE = ("Lax", "Strict", "None", "")
ALGORITHMS = ("token_bucket", "leaky_bucket")
MAX_RATE = 1e6


def _number(r: Reader, name: str, default: float | None, lo: float, hi: float, *, above: bool) -> float:
    """A number in [lo, hi] (or (lo, hi] with `above`); for rates and shares, not seconds."""
    value = r.raw(name, default)
    if value is None:
        r.fail(name, "is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        r.fail(name, f"expected a number, got {value!r}")
    if (value <= lo) if above else (value < lo):
        r.fail(name, f"must be {'>' if above else '>='} {lo:g}, got {value}")
    if value > hi:
        r.fail(name, f"must be <= {hi:g}, got {value}")
    return float(value)


def _plain(r: Reader, name: str, value: str, what: str) -> None:
    if not value or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        r.fail(name, f"{what} must be non-empty, without spaces or control characters, got {value!r}")


# --- [state] -------------------------------------------------------------------------------------------
def _check_url(r: Reader, url: str) -> None:
    scheme = url.partition("://")[0]
    if scheme not in ("redis", "rediss", "unix") or "://" not in url:
        r.fail("url", f"must start with redis://, rediss:// or unix://, got {url!r}")
    if any(ch.isspace() for ch in url):
        r.fail("url", "must not contain spaces")
    parts = urlsplit(url)
    if scheme == "unix":
        if not parts.path.startswith("/"):
            r.fail("url", f"unix:// needs an absolute socket path, got {url!r}")
        return
    if not parts.hostname:
        r.fail("url", f"no host in {url!r} (redis://HOST:PORT/DB)")
    try:
        port = parts.port
    except ValueError:
        r.fail("url", f"bad port in {url!r}")
        raise AssertionError from None
    if port == 0:
        r.fail("url", f"bad port in {url!r}")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        r.fail("url", f"the path must be a database number (redis://HOST:PORT/0), got {parts.path!r}")


def _url_password(url: str) -> str | None:
    parts = urlsplit(url)
    return parts.password if parts.scheme in ("redis", "rediss") else None


def with_password(url: str, password: str) -> str:
    """`url` with `password` put in its authority (the loader refuses a url that already has one)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://:{quote(password, safe='')}@{rest}"


def parse_state(r: Reader | None) -> StateConfig | None:
    if r is None:
        return None
    from halb.config import parse_host_port

    d = StateConfig()
    has_url, has_sentinels = r.has("url"), r.has("sentinels")
    if has_url == has_sentinels:
        where = "sentinels" if has_url else ""
        r.fail(where, "give exactly one of url (plain Redis) or sentinels (+ service_name)")
    url = ""
    sentinels: list[HostPort] = []
    if has_url:
        url = r.str("url")
        _check_url(r, url)
        for key in SENTINEL_ONLY:
            if r.has(key):
                r.fail(key, "only with sentinels (a plain url names the server and database itself)")
    else:
        for i, text in enumerate(r.str_list("sentinels")):
            key = f"sentinels[{i}]"
            try:
                hp = parse_host_port(text)
            except ValueError as exc:
                r.fail(key, str(exc))
                raise AssertionError from None
            if hp in sentinels:
                r.fail(key, f"{hp} is listed twice")
            sentinels.append(hp)
        if not sentinels:
            r.fail("sentinels", "at least one sentinel address (HOST:PORT) is required")
    password = r.str("password") if r.has("password") else None
    if password is not None:
        if not password:
            r.fail("password", "must not be empty (leave the key out for no password)")
        if url and _url_password(url):
            r.fail("password", "the url has a password already; give it in one place")
        if url.startswith("unix://"):
            r.fail("password", "put it in the unix:// url as ?password=...")
    sentinel_password = None
    if r.has("sentinel_password"):
        sentinel_password = r.str("sentinel_password")
        if not sentinel_password:
            r.fail("sentinel_password", "must not be empty (leave the key out for no password)")
    service_name = r.str("service_name", d.service_name)
    _plain(r, "service_name", service_name, "a Sentinel service name")
    key_prefix = r.str("key_prefix", d.key_prefix)
    if not _KEY_PREFIX.match(key_prefix):
        r.fail("key_prefix", f"up to 64 printable ASCII characters without spaces, got {key_prefix!r}")
    state = StateConfig(
        url=url,
        sentinels=tuple(sentinels),
        service_name=service_name,
        password=password,
        sentinel_password=sentinel_password,
        db=r.int("db", d.db, lo=0, hi=1_000_000),
        connect_timeout=r.float("connect_timeout", d.connect_timeout, lo=0.001, hi=60),
        socket_timeout=r.float("socket_timeout", d.socket_timeout, lo=0.001, hi=60),
        call_timeout=r.float("call_timeout", d.call_timeout, lo=0.001, hi=60),
        retries=r.int("retries", d.retries, lo=0, hi=10),
        backoff_base=r.float("backoff_base", d.backoff_base, lo=0, hi=10),
        backoff_cap=r.float("backoff_cap", d.backoff_cap, lo=0, hi=10),
        max_connections=r.int("max_connections", d.max_connections, lo=1, hi=100_000),
        failure_threshold=r.int("failure_threshold", d.failure_threshold, lo=1, hi=1000),
        open_min=r.float("open_min", d.open_min, lo=0.001, hi=3600),
        open_max=r.float("open_max", d.open_max, lo=0.001, hi=3600),
        sentinel_check_interval=r.float(
            "sentinel_check_interval", d.sentinel_check_interval, lo=0.05, hi=3600
        ),
        key_prefix=key_prefix,
        ping_interval=r.float("ping_interval", d.ping_interval, lo=0.05, hi=3600),
    )
    if state.backoff_cap < state.backoff_base:
        r.fail("backoff_cap", f"({state.backoff_cap}) must be >= backoff_base ({state.backoff_base})")
    if state.open_max < state.open_min:
        r.fail("open_max", f"({state.open_max}) must be >= open_min ({state.open_min})")
    r.done()
    try:
        redis_settings(state)
    except ValueError as exc:  # anything the store refuses that the checks above let through
        r.fail("", str(exc))
    return state


def redis_settings(state: StateConfig) -> Any:
    """The `RedisSettings` of the store (imported here: redis-py is only loaded when [state] is used)."""
    from halb.state.redis_store import RedisSettings

    url = state.url
    if url and state.password:
        url = with_password(url, state.password)
    return RedisSettings(
        url=url,
        sentinels=tuple((s.host, s.port) for s in state.sentinels),
        service_name=state.service_name,
        password=state.password if state.sentinels else None,
        sentinel_password=state.sentinel_password,
        db=state.db,
        connect_timeout=state.connect_timeout,
        socket_timeout=state.socket_timeout,
        call_timeout=state.call_timeout,
        retries=state.retries,
        backoff_base=state.backoff_base,
        backoff_cap=state.backoff_cap,
        max_connections=state.max_connections,
        failure_threshold=state.failure_threshold,
        open_min=state.open_min,
        open_max=state.open_max,
        sentinel_check_interval=state.sentinel_check_interval,
        key_prefix=state.key_prefix,
    )


# --- pool sticky = {...} ---------------------------------------------------------------------------------
def parse_sticky(r: Reader | None) -> StickyConfig | None:
    if r is None:
        return None
    d = StickyConfig()
    mode = r.str("mode", d.mode, choices=STICKY_MODES)
    if mode == "header" and not r.has("name"):
        r.fail("name", 'is required with mode = "header" (the request header that carries the session)')
    if mode == "source_ip" and r.has("name"):
        r.fail("name", 'not used with mode = "source_ip" (the client address is the session)')
    if mode != "cookie":
        for key in COOKIE_ONLY:
            if r.has(key):
                r.fail(key, f'a cookie attribute: only with mode = "cookie", not {mode!r}')
    name = r.str("name", d.name)
    if not _TOKEN.match(name):
        what = "a cookie" if mode == "cookie" else "a header"
        r.fail("name", f"{name!r} is not {what} name (1-64 letters, digits and !#$%&'*+-.^_`|~)")
    path = r.str("path", d.path)
    if not path.startswith("/") or any(ch in ";," or ch.isspace() or ord(ch) < 32 for ch in path):
        r.fail("path", f"must start with '/', without ';', ',', spaces or control characters, got {path!r}")
    domain = r.str("domain", d.domain)
    if domain and not _DOMAIN.match(domain):
        r.fail("domain", f"{domain!r} is not a domain name")
    sticky = StickyConfig(
        mode=mode,
        name=name,
        ttl=r.float("ttl", d.ttl, lo=1, hi=30 * 86400),
        path=path,
        domain=domain,
        secure=r.bool("secure", d.secure),
        httponly=r.bool("httponly", d.httponly),
        samesite=r.str("samesite", d.samesite, choices=SAMESITE),
        cache=r.float("cache", d.cache, lo=0, hi=60),
    )
    if sticky.samesite == "None" and not sticky.secure:
        r.fail("samesite", "browsers drop SameSite=None cookies without Secure: set secure = true")
    r.done()
    return sticky


# --- [ratelimits.NAME] -----------------------------------------------------------------------------------
def _rule_key(r: Reader) -> str:
    value = r.str("key", "client_ip")
    kind, sep, arg = value.partition(":")
    if value in ("client_ip", "path_prefix") or (kind == "header" and sep and _TOKEN.match(arg)):
        return f"header:{arg.lower()}" if kind == "header" else value
    r.fail("key", f'must be "client_ip", "path_prefix" or "header:NAME", got {value!r}')
    raise AssertionError


def _tiers(r: Reader | None, algorithm: str) -> tuple[RateLimitTierConfig, ...]:
    if r is None:
        return ()
    tiers: list[RateLimitTierConfig] = []
    owner: dict[str, str] = {}
    for name in list(r.table):
        t = r.sub(name)
        assert t is not None
        if not _RULE_NAME.match(name):
            t.fail("", "a tier name is 1-64 letters, digits, '_', '-' or '.'")
        rate = _number(t, "rate", None, 0, MAX_RATE, above=True)
        burst = _number(t, "burst", max(1.0, rate), 1, 1e9, above=False)
        keys = t.str_list("keys")
        if not keys:
            t.fail("keys", "a tier needs at least one key (the client IPs, header values or path prefixes)")
        for i, key in enumerate(keys):
            if not key:
                t.fail(f"keys[{i}]", "must not be empty")
            if key in owner:
                t.fail(f"keys[{i}]", f"{key!r} is also in tier {owner[key]!r}")
            owner[key] = name
        t.done()
        tiers.append(RateLimitTierConfig(name=name, rate=rate, burst=burst, keys=tuple(keys)))
    r.done()
    return tuple(tiers)


def _rule(name: str, r: Reader) -> RateLimitConfig:
    if not _RULE_NAME.match(name):
        r.fail("", "a rule name is 1-64 letters, digits, '_', '-' or '.'")
    algorithm = r.str("algorithm", "token_bucket", choices=ALGORITHMS)
    rate = _number(r, "rate", None, 0, MAX_RATE, above=True)
    burst = _number(r, "burst", max(1.0, rate), 1, 1e9, above=False)
    key = _rule_key(r)
    paths = r.str_list("paths")
    for i, path in enumerate(paths):
        if not path.startswith("/") or any(ch.isspace() or ord(ch) < 32 for ch in path):
            r.fail(f"paths[{i}]", f"must start with '/' and contain no spaces, got {path!r}")
        if path in paths[:i]:
            r.fail(f"paths[{i}]", f"{path!r} is listed twice")
    if key == "path_prefix" and not paths:
        r.fail("paths", 'is required with key = "path_prefix" (one bucket per listed prefix)')
    local_share = _number(r, "local_share", 1.0, 0, 1, above=True)
    rule = RateLimitConfig(
        name=name,
        rate=rate,
        burst=burst,
        algorithm=algorithm,
        key=key,
        paths=tuple(paths),
        tiers=_tiers(r.sub("tiers"), algorithm),
        local_share=local_share,
    )
    if key == "path_prefix":
        for tier in rule.tiers:
            for k in tier.keys:
                if k not in rule.paths:
                    r.fail(f"tiers.{tier.name}.keys", f'{k!r} is not one of paths (key = "path_prefix")')
    r.done()
    return rule


def parse_ratelimits(r: Reader | None) -> dict[str, RateLimitConfig]:
    if r is None:
        return {}
    rules: dict[str, RateLimitConfig] = {}
    for name in list(r.table):
        sub = r.sub(name)
        assert sub is not None
        rules[name] = _rule(name, sub)
    r.done()
    return rules


def listener_ratelimits(r: Reader) -> tuple[str, ...]:
    """A listener's `ratelimits = ["NAME", ...]` (checked against the rules in `check_references`)."""
    names = r.str_list("ratelimits")
    for i, name in enumerate(names):
        if name in names[:i]:
            r.fail(f"ratelimits[{i}]", f"{name!r} is listed twice")
    return tuple(names)


def check_references(
    fail: Any,
    listeners: list[ListenerConfig],
    pools: dict[str, PoolConfig],
    state: StateConfig | None,
    ratelimits: dict[str, RateLimitConfig],
) -> None:
    """Cross-table checks; `fail(key, problem)` raises the ConfigError."""
    for i, lc in enumerate(listeners):
        for j, name in enumerate(lc.ratelimits):
            if name not in ratelimits:
                known = ", ".join(sorted(ratelimits)) or "none"
                fail(f"listeners[{i}].ratelimits[{j}]", f"no rule [ratelimits.{name}] (rules: {known})")
            if lc.mode != "http":
                fail(f"listeners[{i}].ratelimits", 'rate limits apply to HTTP listeners only (mode = "http")')
    for name, pool in pools.items():
        if pool.sticky is None:
            continue
        if state is None:
            fail(f"pools.{name}.sticky", "sticky sessions keep their mappings in Redis: add a [state] table")
        for i, lc in enumerate(listeners):
            if lc.pool == name and lc.mode != "http":
                fail(
                    f"pools.{name}.sticky",
                    f"sticky sessions work on HTTP listeners only, and listener {lc.name!r} "
                    f"(listeners[{i}]) is {lc.mode!r}",
                )
