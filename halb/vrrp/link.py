"""The VRRP interface's link, as keepalived tracks it: down, or without carrier, means FAULT.

How this works: :func:`link_up` is the rule, on the link's flags: up only with ``IFF_UP`` (an
administrator has not set it down) and ``IFF_RUNNING`` (the carrier is there: the cable, the switch port,
the veth peer). :func:`read_link` asks the kernel over netlink (pyroute2's ``AsyncIPRoute``, one short-lived
socket, in this process's network namespace) and says why a link is not up, including "no such
interface". The composition root (``halb.node``) polls it every advert interval and reports the result
to the VRRP driver as the check ``interface:<name>`` with ``fault=True`` (:class:`LinkWatch` decides
what a reading changes): while it fails the instance is in
FAULT (priority-0 advert if it was MASTER, VIPs dropped), whatever ``track.weight`` is, and it starts
again as BACKUP when the link comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["IFF_RUNNING", "IFF_UP", "LinkWatch", "link_up", "read_link"]

IFF_UP = 0x1
IFF_RUNNING = 0x40
ENODEV = 19


def link_up(flags: int) -> tuple[bool, str]:
    """(up, why not) from a link's flags."""
    if not flags & IFF_UP:
        return False, "link set down"
    if not flags & IFF_RUNNING:
        return False, "no carrier"
    return True, "up"


def _default_iproute() -> Any:
    from pyroute2 import AsyncIPRoute

    return AsyncIPRoute(groups=0)


async def read_link(interface: str, iproute: Callable[[], Any] = _default_iproute) -> tuple[bool | None, str]:
    """Whether ``interface`` is up (see :func:`link_up`) and why not. None when netlink could not be
    asked (the caller keeps the last state: one failed read is no reason to fail over)."""
    ipr = iproute()
    try:
        links = await ipr.link("get", ifname=interface)
        messages = [m async for m in links] if hasattr(links, "__aiter__") else list(links)
        if not messages:
            return False, "no such interface"
        return link_up(int(messages[0]["flags"]))
    except Exception as exc:
        if getattr(exc, "code", None) == ENODEV:
            return False, "no such interface"
        return None, f"cannot read the link: {exc}"
    finally:
        ipr.close()


class LinkWatch:
    """The link as last read, and what a new reading means: a message to log when it changed (the first
    reading only when it is not up), and the up/down to report, or None to keep the last report (netlink
    did not answer: one failed read is no reason to fail over)."""

    def __init__(self) -> None:
        self.state: tuple[bool | None, str] | None = None

    def update(self, up: bool | None, why: str) -> tuple[str | None, bool | None]:
        message = None
        if (up, why) != self.state:
            if self.state is not None or not up:
                message = why
            self.state = (up, why)
        return message, up
