"""The kernel-enforced VIP fence: nftables drops all traffic and ARP for a VIP unless the lease is live.

How this works
==============

A node holds a VIP only while it holds the Raft lease (``halb.vrrp.lease_gate``), but the process can be
frozen (SIGSTOP, a long pause) while the address is still on the interface, and the KERNEL would keep
answering ARP and TCP for it -- after the lease ran out and another node took the VIP over. The fence
makes the kernel enforce the lease by itself. In the node's network namespace halb owns two tables:

    table inet halb_fence
      set lease_vips { type ipv4_addr; flags timeout; }
      chain input  { hook input,  priority raw: ip daddr VIP ip daddr != @lease_vips drop }
      chain output { hook output, priority raw: ip saddr VIP ip saddr != @lease_vips drop }
    table arp halb_fence
      set lease_vips { type ipv4_addr; flags timeout; }
      chain output { hook output: arp saddr ip VIP arp saddr ip != @lease_vips drop }
      chain input  { hook input:  arp daddr ip VIP arp daddr ip != @lease_vips drop }

(VIP: the configured addresses, written into the rules; several become an anonymous set, so the only
named set that ever holds a VIP is ``lease_vips``.) A VIP's packets (IPv4 to it, from it) and its ARP (a
reply or request with the VIP as sender; a request asking for it) pass only while the VIP is an element
of ``lease_vips``. On every granted lease
(first grant and each renewal) the element is set again with ``timeout`` = what is left of the holder's
own conservative expiry (``act_until``, counted from the renewal's SEND time, see ``halb.cluster.lease``)
minus ``slack``: ``flush set`` + ``add element`` in ONE ``nft -f -`` transaction, both families at once
(nft applies a script atomically). The kernel removes the element when the timeout runs out -- with no
help from the process, which may be frozen or dead by then. Losing or giving up the lease flushes the
sets at once.

``slack`` (0.1 s) covers the time between computing the timeout and nft committing it (the kernel counts
from the commit): an ``nft`` run takes a few ms. If a run took longer than ``slack`` (the machine was
overloaded, or the process group was frozen in between), the element might outlive ``act_until`` by the
excess, so it is set again at once with a freshly computed timeout -- long before that end comes
(up to 3 tries, then the fence is flushed and the next renewal reopens it).

``install()`` (idempotent: add, delete, create, in one transaction) runs before VRRP starts; the sets
start empty, so the VIP is dead until a lease is granted. ``remove()`` deletes both tables (clean
shutdown, and ``halb vip release``). Operations are serialised by a lock and each is one ``nft -f -``
subprocess (asyncio; ~5 ms), never run by the VRRP hot path itself: the lease gate waits for ``open_until``
only before it adds a VIP.

:class:`FakeFence` records calls for unit tests; :func:`release_fence_sync` is the blocking form used by
``halb vip release``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from halb.errors import HalbError
from halb.vrrp.vip import split_vip

log = logging.getLogger("halb.vrrp.fence")

__all__ = [
    "FakeFence",
    "FenceError",
    "NftFence",
    "close_script",
    "install_script",
    "open_script",
    "release_fence_sync",
    "remove_script",
]

TABLE = "halb_fence"
LEASE_SET = "lease_vips"
FAMILIES = ("inet", "arp")
SLACK = 0.1
OPEN_ATTEMPTS = 3
NFT_TIMEOUT = 2.0


class FenceError(HalbError):
    """nft refused a fence script (or is not installed)."""


def _addresses(vips: Iterable[str]) -> list[str]:
    return sorted({split_vip(v)[0] for v in vips})


def _set_decl(name: str, timeout: bool) -> str:
    body = "type ipv4_addr;" + (" flags timeout;" if timeout else "")
    return f"set {name} {{ {body} }}"


def install_script(vips: Iterable[str]) -> str:
    """Create (or re-create, empty) both tables; atomic and idempotent."""
    addresses = _addresses(vips)
    if not addresses:
        raise ValueError("the fence needs at least one VIP")
    fenced = addresses[0] if len(addresses) == 1 else f"{{ {', '.join(addresses)} }}"
    inet = [
        _set_decl(LEASE_SET, True),
        "chain input { type filter hook input priority raw; policy accept; "
        f"ip daddr {fenced} ip daddr != @{LEASE_SET} counter drop; }}",
        "chain output { type filter hook output priority raw; policy accept; "
        f"ip saddr {fenced} ip saddr != @{LEASE_SET} counter drop; }}",
    ]
    arp = [
        _set_decl(LEASE_SET, True),
        "chain output { type filter hook output priority filter; policy accept; "
        f"arp saddr ip {fenced} arp saddr ip != @{LEASE_SET} counter drop; }}",
        "chain input { type filter hook input priority filter; policy accept; "
        f"arp daddr ip {fenced} arp daddr ip != @{LEASE_SET} counter drop; }}",
    ]
    lines: list[str] = []
    for family, body in (("inet", inet), ("arp", arp)):
        lines += [f"add table {family} {TABLE}", f"delete table {family} {TABLE}"]
        lines.append(f"table {family} {TABLE} {{")
        lines += [f"  {line}" for line in body]
        lines.append("}")
    return "\n".join(lines) + "\n"


def open_script(vips: Iterable[str], timeout: float) -> str:
    """Let the VIPs' traffic through for `timeout` seconds from the commit (replaces any older element)."""
    ms = math.floor(timeout * 1000)
    if ms <= 0:
        return close_script()
    elements = ", ".join(f"{a} timeout {ms}ms" for a in _addresses(vips))
    lines = []
    for family in FAMILIES:
        lines.append(f"flush set {family} {TABLE} {LEASE_SET}")
        lines.append(f"add element {family} {TABLE} {LEASE_SET} {{ {elements} }}")
    return "\n".join(lines) + "\n"


def close_script() -> str:
    """Empty the lease sets (drop the VIPs' traffic now); idempotent, also when the tables are missing."""
    lines = []
    for family in FAMILIES:
        lines.append(f"add table {family} {TABLE}")
        lines.append(f"add set {family} {TABLE} {LEASE_SET} {{ type ipv4_addr; flags timeout; }}")
        lines.append(f"flush set {family} {TABLE} {LEASE_SET}")
    return "\n".join(lines) + "\n"


def remove_script() -> str:
    """Delete both tables; idempotent."""
    lines = []
    for family in FAMILIES:
        lines += [f"add table {family} {TABLE}", f"delete table {family} {TABLE}"]
    return "\n".join(lines) + "\n"


# --- running nft ------------------------------------------------------------------------------------------
async def run_nft(script: str, timeout: float = NFT_TIMEOUT) -> None:
    """`nft -f -` with `script` on stdin, in this process's network namespace. Raises FenceError.

    nft runs in a session of its own, so a signal sent to the node's process group (the lab's SIGTERM,
    SIGSTOP) does not hit it half-way; one killed by a signal anyway (systemd signals the whole cgroup)
    is run once more (every fence script is one transaction and idempotent: running it again is harmless)."""
    for attempt in (1, 2):
        try:
            proc = await asyncio.create_subprocess_exec(
                "nft",
                "-f",
                "-",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise FenceError(
                f"cannot run nft ({exc}): install nftables, or set cluster.vip_lease = false"
            ) from None
        try:
            _, err = await asyncio.wait_for(proc.communicate(script.encode()), timeout)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
        code = proc.returncode
        if code == 0:
            return
        if code is not None and code < 0 and attempt == 1:
            continue  # killed by a signal (applied or not): run it again
        raise FenceError(f"nft -f - failed ({code}): {err.decode(errors='replace').strip()}")


def run_nft_sync(script: str, timeout: float = NFT_TIMEOUT) -> None:
    try:
        result = subprocess.run(
            ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FenceError(f"cannot run nft: {exc}") from None
    if result.returncode != 0:
        raise FenceError(f"nft -f - failed ({result.returncode}): {result.stderr.strip()}")


def release_fence_sync(close_only: bool = False) -> None:
    """`halb vip release`: flush the lease sets (close), or delete the tables. Raises FenceError."""
    run_nft_sync(close_script() if close_only else remove_script())


Runner = Callable[[str], Awaitable[None]]


class Fence(Protocol):
    """What the lease gate needs from a fence."""

    @property
    def open_until_time(self) -> float | None: ...

    async def open_until(self, until: float) -> bool: ...

    async def close(self) -> None: ...


class NftFence:
    """The fence of one node's VIPs (see the module docstring). Times are `clock()` readings."""

    def __init__(
        self,
        vips: Iterable[str],
        clock: Callable[[], float],
        runner: Runner = run_nft,
        slack: float = SLACK,
    ) -> None:
        self.vips = _addresses(vips)
        self.clock = clock
        self.runner = runner
        self.slack = slack
        self._lock = asyncio.Lock()
        self._until: float | None = None  # the deadline last programmed (None: closed)
        self.installed = False
        self.opens = 0
        self.closes = 0
        self.overruns = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_run_seconds: float | None = None

    @property
    def open_until_time(self) -> float | None:
        """The deadline of the element last programmed, while it has not passed (None: closed)."""
        until = self._until
        return until if until is not None and until > self.clock() else None

    async def install(self) -> None:
        async with self._lock:
            await self._run(install_script(self.vips))
            self._until = None
            self.installed = True

    async def open_until(self, until: float) -> bool:
        """Program the element to expire `slack` before `until`; True if it is open now."""
        async with self._lock:
            for _ in range(OPEN_ATTEMPTS):
                started = self.clock()
                remaining = until - started - self.slack
                if remaining <= 0.001:
                    await self._close_locked()
                    return False
                try:
                    await self._run(open_script(self.vips, remaining))
                except FenceError:
                    self._until = None
                    raise
                elapsed = self.clock() - started
                self.opens += 1
                if elapsed <= self.slack:
                    self._until = until
                    return True
                # The element may outlive `until` by the excess: replace it at once with a fresh timeout
                # (its end is still far ahead: this happens long before it matters).
                self.overruns += 1
                log.warning("fence: nft took %.3fs (> slack %.3fs): setting it again", elapsed, self.slack)
            await self._close_locked()
            return False

    async def close(self) -> None:
        async with self._lock:
            await self._close_locked()

    async def remove(self) -> None:
        async with self._lock:
            await self._run(remove_script())
            self._until = None
            self.installed = False

    async def _close_locked(self) -> None:
        self._until = None
        self.closes += 1
        await self._run(close_script())

    async def _run(self, script: str) -> None:
        started = self.clock()
        try:
            await self.runner(script)
        except FenceError as exc:
            self.errors += 1
            self.last_error = str(exc)
            raise
        finally:
            self.last_run_seconds = round(self.clock() - started, 4)

    def snapshot(self) -> dict[str, Any]:
        until = self.open_until_time
        return {
            "installed": self.installed,
            "open": until is not None,
            "open_for_seconds": round(until - self.clock(), 3) if until is not None else None,
            "opens": self.opens,
            "closes": self.closes,
            "overruns": self.overruns,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_run_seconds": self.last_run_seconds,
        }


class FakeFence:
    """In-memory fence for unit tests: `calls` records ("open", until) / ("close", None)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.calls: list[tuple[str, float | None]] = []
        self._until: float | None = None
        self.fail = False

    @property
    def open_until_time(self) -> float | None:
        until = self._until
        return until if until is not None and until > self.clock() else None

    async def open_until(self, until: float) -> bool:
        self.calls.append(("open", until))
        if self.fail:
            raise FenceError("fake fence failure")
        if until <= self.clock():
            self._until = None
            return False
        self._until = until
        return True

    async def close(self) -> None:
        self.calls.append(("close", None))
        self._until = None

    def is_open(self) -> bool:
        return self.open_until_time is not None
