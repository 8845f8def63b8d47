"""allow/deny networks of a listener: deny wins, an empty allow means everyone, IPv4-mapped clients."""

from __future__ import annotations

import pytest

from halb.proxy.source_acl import SourceAcl, parse_networks


def acl(allow: list[str] = [], deny: list[str] = []) -> SourceAcl:  # noqa: B006 (never mutated)
    return SourceAcl(parse_networks(allow), parse_networks(deny))


def test_deny_wins_over_allow_and_empty_allow_means_everyone() -> None:
    a = acl(allow=["10.0.0.0/8", "192.0.2.7"], deny=["10.6.6.0/24"])
    assert a.permits("10.1.2.3") and a.permits("192.0.2.7")
    assert not a.permits("10.6.6.9")  # denied inside an allowed range
    assert not a.permits("192.0.2.8") and not a.permits("127.0.0.1")  # outside allow
    only_deny = acl(deny=["203.0.113.0/24"])
    assert only_deny.permits("198.51.100.1") and not only_deny.permits("203.0.113.50")


def test_ipv6_and_ipv4_mapped_clients() -> None:
    a = acl(allow=["2001:db8::/32", "10.0.0.0/8"])
    assert a.permits("2001:db8::1") and not a.permits("2001:db9::1")
    assert a.permits("::ffff:10.1.2.3")  # an IPv4 client on a dual-stack socket
    assert not a.permits("::ffff:11.1.2.3")


def test_something_that_is_not_an_address_is_refused() -> None:
    assert not acl(deny=["10.0.0.0/8"]).permits("")
    assert not acl(allow=["0.0.0.0/0"]).permits("not-an-ip")


def test_verdicts_are_cached_and_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("halb.proxy.source_acl.CACHE_LIMIT", 4)
    a = acl(allow=["10.0.0.0/8"])
    assert a.permits("10.0.0.1") and not a.permits("11.0.0.1")
    assert a._cache == {"10.0.0.1": True, "11.0.0.1": False}  # judged once each, then looked up
    for i in range(10):
        assert a.permits(f"10.0.0.{i}")
        assert len(a._cache) <= 4
    assert a._cache["10.0.0.9"] is True  # (the newest verdict is kept)


def test_parse_networks_names_the_bad_entry() -> None:
    with pytest.raises(ValueError, match=r"\[1\]: 'nope' is not an IP address or network"):
        parse_networks(["10.0.0.0/8", "nope"])
