"""Releasing a STOPPED node's VIP lease through a live member: the last step of `halb vip release`.

How this works
==============

A node killed with SIGKILL (or crashed) never releases its lease; without help the next holder waits for
it to run out (`takeover_delay`, 2.2 s after it last saw a renewal). The service manager's post-stop step
(`ExecStopPost=halb vip release CFG`; the lab's supervisor runs the same code) knows more than the cluster
does: the process is gone. So after it has removed the VIP from the interface and flushed the kernel
fence, it asks the other members' admin APIs (`cluster.admin_peers`, bearer `cluster.token`) to commit
`release{lease, node, seq}` on this node's behalf (`POST /api/leases/vip/release`, see
`halb.cluster.api`); the next VRRP master then acquires in one commit.

Why that is safe: the release names the grant (`seq`) the member sees, so it can never release a later
grant; and it is sent only when

* this node's `halb serve` has provably stopped: `node_stopped()` takes the Raft `data_dir/lock` flock that
  a running member holds for its whole life (the kernel drops it when the process dies, SIGKILL
  included), and keeps it until the release is done, so no new `halb serve` can start meanwhile; and
* the VIP is off the interface (the caller removed it first; a failure there stops everything).

The member also refuses while the node's Raft connection is still up. All requests go out at once, each
bounded; the whole step takes at most `budget` and never raises: the outcome is returned for the
caller to print (a failure only means the peer waits for the expiry). `budget` is 1.5 s: past that the
expiry would hand the lease over anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from halb.admin_client import AdminError, request
from halb.cluster.lease import DEFAULT_LEASE

# A release helps only while it beats the expiry: others may take over 1.5..2.2 s after the crash (the
# takeover delay from the last renewal they saw). When the dead node was the Raft leader the release
# first waits for an election (0.4..0.7 s, more after a split vote), so 1 s was too short now and then.
BUDGET = 1.5
LOCK_WAIT = 0.3


@dataclass
class HandoffResult:
    released: bool | None  # True: committed; False: the node held nothing; None: no member could do it
    via: str | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def describe(self, node: str) -> str:
        if self.released:
            return f"lease of {node} released via {self.via} in {self.seconds:.3f}s"
        if self.released is False:
            return f"{node} held no lease ({self.via}, {self.seconds:.3f}s)"
        return f"lease of {node} NOT released ({'; '.join(self.errors) or 'no admin_peers'}): it expires"


@contextlib.contextmanager
def node_stopped(data_dir: str, wait: float = LOCK_WAIT) -> Iterator[bool]:
    """Yields True while holding `data_dir/lock`: no `halb serve` with this data_dir is running."""
    path = os.path.join(data_dir, "lock")
    if not os.path.isdir(data_dir):
        yield True  # never started: holds no lease either
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield False
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.01)
        yield True
    finally:
        os.close(fd)  # drops the lock


def release_via_peers(
    admin_peers: Sequence[str],
    token: str,
    node: str,
    lease: str = DEFAULT_LEASE,
    budget: float = BUDGET,
) -> HandoffResult:
    """Ask every peer at once to release `node`'s lease; the first definite answer wins. Never raises."""
    started = time.monotonic()
    result = HandoffResult(released=None)
    if not admin_peers:
        return result
    body: dict[str, Any] = {"node": node, "timeout": round(max(0.1, budget - 0.15), 3)}

    def ask(admin: str) -> tuple[str, dict[str, Any]]:
        return admin, request(admin, "POST", f"/api/leases/{lease}/release", body, token, timeout=budget)

    pool = ThreadPoolExecutor(max_workers=len(admin_peers), thread_name_prefix="halb-handoff")
    try:
        pending: set[Future[tuple[str, dict[str, Any]]]] = {pool.submit(ask, a) for a in admin_peers}
        deadline = started + budget
        while pending and result.released is None:
            done, pending = wait(
                pending, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED
            )
            if not done:
                result.errors.append(f"no answer within {budget:.1f}s")
                break
            for future in done:
                try:
                    admin, doc = future.result()
                except AdminError as exc:
                    result.errors.append(str(exc))
                    continue
                except Exception as exc:  # never let the post-stop step fail on a client bug
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                result.released = bool(doc.get("released"))
                result.via = f"{admin} ({doc.get('node')})"
                break
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    result.seconds = time.monotonic() - started
    return result
