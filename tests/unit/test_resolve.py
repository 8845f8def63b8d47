"""BackendResolver: when a backend's host name is looked up, what callers get when lookups fail (fake
clock, a fake getaddrinfo: no DNS, no sockets)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest

from halb.proxy.resolve import BackendResolver


class FakeDns:
    """getaddrinfo with a settable answer (a list of IPs, or an exception) and a count of lookups."""

    def __init__(self, *ips: str) -> None:
        self.ips: list[str] | BaseException = list(ips)
        self.lookups = 0
        self.gate: asyncio.Event | None = None  # when set: lookups wait for it

    async def __call__(self, host: str, port: int, **_: Any) -> list[Any]:
        self.lookups += 1
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.ips, BaseException):
            raise self.ips
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in self.ips]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def resolver(dns: FakeDns, clock: Clock) -> BackendResolver:
    return BackendResolver(asyncio.get_running_loop(), valid=10.0, getaddrinfo=dns, clock=clock)


def ips(addresses: list[Any]) -> list[str]:
    return [sockaddr[0] for _, sockaddr in addresses]


def test_an_ip_address_is_its_own_answer() -> None:
    async def main() -> None:
        dns = FakeDns()
        r = resolver(dns, Clock())
        assert r.cached("10.0.0.7", 80) == [(socket.AF_INET, ("10.0.0.7", 80))]
        assert await r.addresses("2001:db8::1", 443) == [(socket.AF_INET6, ("2001:db8::1", 443))]
        assert dns.lookups == 0

    asyncio.run(main())


async def settle() -> None:
    """Let background lookups run (the fake DNS answers at once)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_name_is_looked_up_once_then_refreshed_in_the_background() -> None:
    async def main() -> None:
        dns, clock = FakeDns("10.0.0.1", "10.0.0.2"), Clock()
        r = resolver(dns, clock)
        assert r.cached("app", 80) is None  # (not known yet: the relay starts a lookup)
        assert ips(await r.addresses("app", 80)) == ["10.0.0.1", "10.0.0.2"]  # every address, in order
        clock.now += 9.9
        assert ips(r.cached("app", 80) or []) == ["10.0.0.1", "10.0.0.2"]
        assert ips(await r.addresses("app", 80)) == ["10.0.0.1", "10.0.0.2"]
        assert dns.lookups == 1
        dns.ips = ["10.0.0.3"]
        clock.now += 0.2  # due for a refresh: callers keep the last answer while it runs
        assert ips(r.cached("app", 80) or []) == ["10.0.0.1", "10.0.0.2"]
        assert ips(await r.addresses("app", 80)) == ["10.0.0.1", "10.0.0.2"]
        await settle()
        assert ips(await r.addresses("app", 80)) == ["10.0.0.3"]
        assert dns.lookups == 2 and r.lookups_total == 2  # one refresh, however many callers

    asyncio.run(main())


def test_a_slow_refresh_holds_no_caller_up() -> None:
    async def main() -> None:
        dns, clock = FakeDns("10.0.0.1"), Clock()
        r = resolver(dns, clock)
        await r.addresses("app", 80)
        dns.gate = asyncio.Event()  # DNS stops answering
        clock.now += 11
        for _ in range(3):
            assert ips(await asyncio.wait_for(r.addresses("app", 80), 1)) == ["10.0.0.1"]
        assert dns.lookups == 2  # one refresh waiting, not one per caller
        r.close()
        await settle()

    asyncio.run(main())


def test_a_first_lookup_counts_against_the_connect_timeout_and_a_cancelled_one_leaves_nothing() -> None:
    async def main() -> None:
        dns = FakeDns("127.0.0.1")
        dns.gate = asyncio.Event()  # DNS does not answer
        r = resolver(dns, Clock())
        with pytest.raises(TimeoutError):
            await r.connect(asyncio.Protocol, "app", 9, timeout=0.05)
        waiting = asyncio.ensure_future(r.addresses("app", 9))
        await asyncio.sleep(0)
        r.close()  # the proxy closes: the lookup is cancelled, its callers get an error
        with pytest.raises(OSError, match="cancelled"):
            await waiting
        dns.gate = None
        assert ips(await r.addresses("app", 9)) == ["127.0.0.1"]  # a new lookup, not a stuck one

    asyncio.run(main())


def test_callers_at_the_same_time_share_one_lookup() -> None:
    async def main() -> None:
        dns = FakeDns("10.0.0.1")
        dns.gate = asyncio.Event()
        r = resolver(dns, Clock())
        waiting = [asyncio.ensure_future(r.addresses("app", 80)) for _ in range(5)]
        await asyncio.sleep(0)
        dns.gate.set()
        answers = await asyncio.gather(*waiting)
        assert [ips(a) for a in answers] == [["10.0.0.1"]] * 5
        assert dns.lookups == 1

    asyncio.run(main())


def test_a_failed_refresh_keeps_the_last_answer(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        dns, clock = FakeDns("10.0.0.1"), Clock()
        r = resolver(dns, clock)
        await r.addresses("app", 80)
        dns.ips = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        clock.now += 11
        with caplog.at_level(logging.WARNING, logger="halb.proxy"):
            assert ips(await r.addresses("app", 80)) == ["10.0.0.1"]  # DNS down: still connectable
            await settle()
        assert "lookup failed" in caplog.text and "keeping 10.0.0.1" in caplog.text
        assert ips(r.cached("app", 80) or []) == ["10.0.0.1"]  # and not asked again for `valid` seconds
        assert dns.lookups == 2 and r.lookup_failures_total == 1
        dns.ips = ["10.0.0.9"]
        clock.now += 11
        await r.addresses("app", 80)
        await settle()
        assert ips(await r.addresses("app", 80)) == ["10.0.0.9"]  # back: the new answer

    asyncio.run(main())


def test_a_name_that_never_resolved_fails_and_is_not_asked_per_caller() -> None:
    async def main() -> None:
        dns, clock = FakeDns(), Clock()
        dns.ips = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        r = resolver(dns, clock)
        for _ in range(3):
            with pytest.raises(OSError, match=r"cannot resolve backend nowhere: .*not known"):
                await r.addresses("nowhere", 80)
        assert dns.lookups == 1  # the failure is remembered for `valid` seconds
        dns.ips = ["10.0.0.5"]
        clock.now += 10
        assert ips(await r.addresses("nowhere", 80)) == ["10.0.0.5"]

    asyncio.run(main())


def test_an_empty_answer_is_a_failure() -> None:
    async def main() -> None:
        r = resolver(FakeDns(), Clock())
        with pytest.raises(OSError, match="has no address"):
            await r.addresses("empty", 80)

    asyncio.run(main())
