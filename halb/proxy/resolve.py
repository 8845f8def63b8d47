"""Where a backend given by host name points: looked up once, kept, refreshed; every address is tried.

How this works: `BackendResolver.addresses(host, port)` gives the `(family, sockaddr)` list to connect
to, in getaddrinfo's order (the system's preference, e.g. RFC 6724). An IP address is its own answer,
with no lookup. A host name is resolved through the event loop's `getaddrinfo` (a thread, so the loop
never blocks) on first use; the answer is then used at once by every connection, and refreshed in the
background when it is more than `valid` seconds old: no connection waits for DNS after the first lookup
of a name. When a refresh fails (DNS down, a timeout), the last answer stays in use and the next refresh
is tried `valid` seconds later, as HAProxy keeps a server's address while its resolvers fail; the
failure is logged once per attempt. A name that has never resolved fails at once for `valid` seconds
after a failed lookup, instead of asking DNS per connection. Callers asking for the same name at once
share one lookup. `cached()` answers without waiting when it can (the raw TCP relay's synchronous path,
which tries the addresses itself). `connect()` opens a transport to the first address that accepts, for
the code paths on asyncio transports; the first lookup of a name counts against its connect timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

log = logging.getLogger("halb.proxy")

Address = tuple[int, tuple]  # (family, sockaddr) ready for socket() and connect()
VALID_SECONDS = 10.0
_MAX_NAMES = 4096

_P = TypeVar("_P", bound=asyncio.BaseProtocol)


class _Entry:
    __slots__ = ("addresses", "error", "lookup", "next_lookup")

    def __init__(self) -> None:
        self.addresses: list[Address] = []  # the last good answer (empty before the first one)
        self.error = ""  # why the name has not resolved yet (no answer so far)
        self.next_lookup = 0.0  # loop time when the answer (or the error) is due for a new lookup
        self.lookup: asyncio.Future[list[Address]] | None = None  # in progress, shared by its callers


class BackendResolver:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        valid: float = VALID_SECONDS,
        *,
        getaddrinfo: Callable[..., Awaitable[list[Any]]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.loop = loop
        self.valid = valid
        self.getaddrinfo = getaddrinfo or loop.getaddrinfo  # (tests give their own answers)
        self.clock = clock or loop.time
        self._fixed: dict[tuple[str, int], list[Address]] = {}  # IP addresses: their own answer
        self._names: dict[tuple[str, int], _Entry] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.lookups_total = 0
        self.lookup_failures_total = 0

    def cached(self, host: str, port: int) -> list[Address] | None:
        """The addresses when known without waiting (an IP address, or a name's last answer, refreshed in
        the background when due); None while a name has no answer yet."""
        key = (host, port)
        fixed = self._fixed.get(key)
        if fixed is not None:
            return fixed
        entry = self._names.get(key)
        if entry is None:
            literal = _literal(host, port)
            if literal is not None:
                if len(self._fixed) >= _MAX_NAMES:
                    self._fixed.clear()
                self._fixed[key] = literal
            return literal
        if not entry.addresses:
            return None
        if entry.lookup is None and self.clock() >= entry.next_lookup:
            self._start_lookup(host, port, entry)  # (the callers go on with the last answer)
        return entry.addresses

    async def addresses(self, host: str, port: int, timeout: float | None = None) -> list[Address]:
        """The addresses to try, in order. Raises OSError while the name has never resolved (the
        failed lookup is repeated at most every `valid` seconds, not per caller), TimeoutError when a
        first lookup takes longer than `timeout` (it goes on for the next caller)."""
        known = self.cached(host, port)
        if known is not None:
            return known
        key = (host, port)
        entry = self._names.get(key)
        if entry is None:
            if len(self._names) >= _MAX_NAMES:
                self._names.clear()
            entry = self._names[key] = _Entry()
        if entry.error and self.clock() < entry.next_lookup:
            raise OSError(entry.error)
        lookup = entry.lookup or self._start_lookup(host, port, entry)
        return await asyncio.wait_for(asyncio.shield(lookup), timeout)

    def _start_lookup(self, host: str, port: int, entry: _Entry) -> asyncio.Future[list[Address]]:
        lookup: asyncio.Future[list[Address]] = self.loop.create_future()
        entry.lookup = lookup
        task = self.loop.create_task(self._look_up(host, port, entry, lookup))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return lookup

    async def _look_up(
        self, host: str, port: int, entry: _Entry, lookup: asyncio.Future[list[Address]]
    ) -> None:
        self.lookups_total += 1
        try:
            infos = await self.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            found: list[Address] = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
            if not found:
                raise OSError(f"{host} has no address")
        except Exception as exc:  # (socket.gaierror mostly; whatever it is, the callers get an answer)
            self.lookup_failures_total += 1
            if entry.addresses:
                log.warning("backend %s: lookup failed (%s): keeping %s", host, exc, _show(entry.addresses))
            else:
                entry.error = f"cannot resolve backend {host}: {exc}"
        else:
            entry.addresses, entry.error = found, ""
        finally:  # (also when cancelled: the next caller starts a new lookup, nobody waits forever)
            entry.next_lookup = self.clock() + self.valid
            entry.lookup = None
            if entry.addresses:
                lookup.set_result(entry.addresses)
            else:
                lookup.set_exception(OSError(entry.error or f"the lookup of backend {host} was cancelled"))
                lookup.exception()  # (retrieved: nobody may be waiting any more)

    def close(self) -> None:
        """Cancel the lookups in progress (the proxy is closing)."""
        for task in list(self._tasks):
            task.cancel()

    async def connect(
        self, factory: Callable[[], _P], host: str, port: int, timeout: float
    ) -> tuple[asyncio.BaseTransport, _P]:
        """`loop.create_connection` to the first of the backend's addresses that accepts, each given
        `timeout` seconds (HAProxy's `timeout connect` is per attempt too). Raises the last error."""
        error: OSError | None = None
        for family, sockaddr in await self.addresses(host, port, timeout):
            try:
                async with asyncio.timeout(timeout):
                    return await self.loop.create_connection(
                        factory, _host(sockaddr), sockaddr[1], family=family
                    )
            except OSError as exc:  # (TimeoutError is an OSError)
                error = exc
        assert error is not None
        raise error


def _literal(host: str, port: int) -> list[Address] | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]


def _host(sockaddr: tuple[Any, ...]) -> str:
    """The address as `create_connection` takes it: an IPv6 link-local one keeps its scope (fe80::1%2)."""
    if len(sockaddr) >= 4 and sockaddr[3]:
        return f"{sockaddr[0]}%{sockaddr[3]}"
    return str(sockaddr[0])


def _show(addresses: list[Address]) -> str:
    return ", ".join(str(sockaddr[0]) for _, sockaddr in addresses)
