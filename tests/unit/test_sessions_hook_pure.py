"""The pure parts of halb.proxy.sessions_hook: cookie parsing and issuing, rate-limit keys, id minting."""

from __future__ import annotations

import pytest

from halb.config_model import (
    BackendConfig,
    HostPort,
    PoolConfig,
    RateLimitConfig,
    RateLimitTierConfig,
    StickyConfig,
)
from halb.pool import Pool
from halb.proxy.http_codec import parse_request_head
from halb.proxy.sessions_hook import PoolSticky, Rule, cookie_line, find_cookie
from halb.state.memory import MemoryStore


def head(*fields: str, target: str = "/") -> object:
    raw = f"GET {target} HTTP/1.1\r\n" + "".join(f"{f}\r\n" for f in fields) + "\r\n"
    return parse_request_head(raw.encode(), 8192, 32768)


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        (["Host: x", "Cookie: a=1; HALBSID=abc"], b"abc"),
        (['cookie:HALBSID="q"', "Host: x"], b"q"),
        (["Host: x", "X-Cookie: HALBSID=no"], None),
        (["Host: x", "Cookie: a=1", "Cookie: HALBSID=two"], b"two"),
        (["Host: x", "Cookie: XHALBSID=no; HALBSIDX=no"], None),
        (["Host: x"], None),
    ],
)
def test_find_cookie(fields: list[str], want: bytes | None) -> None:
    assert find_cookie(head(*fields), b"HALBSID") == want  # type: ignore[arg-type]


def test_cookie_line() -> None:
    assert cookie_line(StickyConfig(), "ID") == b"Set-Cookie: HALBSID=ID; Path=/; HttpOnly; SameSite=Lax\r\n"
    full = StickyConfig(name="S", path="/a", domain="ex.com", secure=True, httponly=False, samesite="")
    assert cookie_line(full, "ID") == b"Set-Cookie: S=ID; Path=/a; Domain=ex.com; Secure\r\n"


def rule(**kw: object) -> Rule:
    return Rule(RateLimitConfig(name="r", rate=1.0, burst=1.0, **kw), None)  # type: ignore[arg-type]


def test_rule_keys() -> None:
    req = head("Host: x", "X-Key: k1", target="/api/v1?x=1")
    assert rule().key_for(req, "10.0.0.1") == "10.0.0.1"  # type: ignore[arg-type]
    assert rule(paths=("/other/",)).key_for(req, "10.0.0.1") is None  # type: ignore[arg-type]
    assert rule(key="path_prefix", paths=("/x", "/api/")).key_for(req, "10.0.0.1") == "/api/"  # type: ignore[arg-type]
    header = rule(key="header:x-key", tiers=(RateLimitTierConfig("gold", 5.0, 5.0, ("k1",)),))
    assert header.key_for(req, "10.0.0.1") == "h:k1"  # type: ignore[arg-type]
    assert header.key_for(head("Host: x"), "10.0.0.1") == "ip:10.0.0.1"  # type: ignore[arg-type]
    assert header.limiter.tiers.for_key("h:k1").name == "gold"  # tiers follow the key's namespace
    assert header.limiter.tiers.for_key("ip:k1").name == "default"  # an address can't borrow a tier


def test_minted_ids_hash_to_the_policys_choice() -> None:
    backends = tuple(BackendConfig(f"w{i}", HostPort("127.0.0.1", 9000 + i)) for i in range(5))
    pool = Pool(PoolConfig(name="p", backends=backends))
    sticky = PoolSticky(pool, StickyConfig(), MemoryStore())
    for backend in pool.backends * 20:
        sid, owner = sticky.mint(backend)
        assert owner is backend
        assert sticky.sessions.ring_choice(sid) is backend
    assert sticky.mint_misses == 0
    pool.set_state("w2", healthy=False)  # the ring walks past a down backend: ids still land on w3..
    sid, owner = sticky.mint(pool.backends[3])
    assert owner is pool.backends[3] and sticky.sessions.ring_choice(sid) is pool.backends[3]
    assert sticky.session_key(head("Host: x"), "1.2.3.4") is None  # type: ignore[arg-type]
