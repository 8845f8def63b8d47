"""The thin pysyncobj wrapper: one Raft member per node, feeding committed commands to `ClusterState`.

How this works
==============

`RaftMember` owns a `SyncObj` subclass (`_HalbSyncObj`) with one `@replicated` method,
`apply_command(command)`, which hands the command to `ClusterState.apply` (inside a `SyncObjConsumer`,
`_Store`, so pysyncobj's full dump stores `state.to_dict()` -- plain builtins -- and reloads it).
pysyncobj runs its own tick thread: elections, replication, journal writes and every `apply` happen
there. Nothing else in halb touches pysyncobj objects from another thread, except `apply_command(...,
callback=...)`, which only puts the command on pysyncobj's locked queue.

**Into asyncio.** Every applied command produces an `Applied` event (the command, its result, the new
shared configuration when it changed, the lease records) that is passed to the event loop with
`loop.call_soon_threadsafe`; listeners run on the loop. `submit(command, timeout)` returns the
state's result through a future settled the same way; it never blocks the loop. Any member accepts a
command: a follower forwards it to the leader (pysyncobj does that). With `commandsWaitLeader=False` a
command fails at once with "no leader" during an election instead of queueing for later, and a command
that is not answered within `timeout` raises `CommandTimeout` -- its outcome is unknown (it may still
commit), the usual Raft client contract.

**Timeouts** (`RaftTimings`, checked by pysyncobj's `validate()`): heartbeats every 50 ms, elections
after 0.35-0.7 s of silence, a leader that hears from no majority for 0.7 s steps down
(`leaderFallbackTimeout`, 30 s by default!), connections silent for 1 s are dead and are retried every
0.3 s. Leadership is advisory anyway: the VIP lease does not depend on who leads.

**Files.** `data_dir/raft.journal` (every log entry, written as it arrives) and `data_dir/raft.dump` (the
full state at each log compaction, `useFork=False`), so the state survives a restart of every member.
`data_dir/lock` (flock) stops a second process from using the same journal.

**Reachability and the secret.** The transport (`_Transport`, a `TCPTransport` subclass) sends a tiny
`halb_ping` to every connected member every 0.2 s and records when it last heard from each (followers
otherwise never talk to each other, and an idle connection never times out). A member is reachable
when connected and heard from within `connection_timeout`. With `password=secret` pysyncobj encrypts
every message; a member with a different secret simply fails the key exchange and is disconnected,
silently. The transport counts those failed handshakes; when no member is reachable while handshakes
fail, the status says "cannot authenticate with peers: check [cluster].secret" (and it is logged).

**Stopping.** A leader that stops asks pysyncobj to hand leadership to the most caught-up follower first
(`transferLeadership`, on pysyncobj's thread) and waits up to 1 s for it, so a rolling restart does not
cost an election timeout per node. Then pysyncobj's thread is stopped and waited for, at most
`STOP_TIMEOUT`, from a daemon thread: a tick thread that never ends cannot hang the process's exit.

**Status.** A tick callback snapshots `getStatus()` on pysyncobj's thread every 0.1 s: leader as
"host:port", term, commit index, quorum (this node plus reachable members form a majority), each
member's reachability. `status()` returns the snapshot with its age.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, SyncObjException, replicated
from pysyncobj.transport import TCPTransport

from halb.cluster.state import ClusterState
from halb.config_model import ClusterSettings, HostPort
from halb.errors import HalbError

# pysyncobj 0.3.17 (pysyncobj/win_inet_pton.py, imported by its tcp_connection) replaces socket.inet_ntop with
# a Windows-only stub on EVERY platform; pyroute2 then returns raw attribute bytes instead of addresses
# (the VRRP driver could not find its own address). Put the real one back.
socket.inet_ntop = _socket.inet_ntop

log = logging.getLogger("halb.cluster")
PING = "halb_ping"
AUTH_WINDOW = 10.0  # a failed handshake this recent counts for the "check the secret" diagnosis
STATUS_PERIOD = 0.1
STOP_TIMEOUT = 5.0  # seconds `stop()` waits for pysyncobj's thread to end
_STATES = {0: "follower", 1: "candidate", 2: "leader"}
_REASONS = {
    FAIL_REASON.QUEUE_FULL: "the Raft command queue is full",
    FAIL_REASON.MISSING_LEADER: "no Raft leader (election in progress, or no quorum)",
    FAIL_REASON.DISCARDED: "discarded by a new Raft leader",
    FAIL_REASON.NOT_LEADER: "the Raft leader changed before committing",
    FAIL_REASON.LEADER_CHANGED: "the Raft leader changed before committing",
    FAIL_REASON.REQUEST_DENIED: "denied by the Raft leader",
    FAIL_REASON.UNKNOWN_OUTCOME: "outcome unknown (leader restarted)",
}


class ClusterError(HalbError):
    """The Raft member cannot run (bind failure, data_dir in use...)."""


class CommandFailed(ClusterError):
    """Raft did not commit the command. `retryable`: it never reached a leader (no leader, queue full);
    otherwise (leader changed...) it may or may not have been committed."""

    def __init__(self, reason: str, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class CommandTimeout(ClusterError):
    """No answer in time; the command may still be committed later."""


@dataclass(frozen=True)
class RaftTimings:
    append_entries_period: float = 0.05
    raft_min_timeout: float = 0.35
    raft_max_timeout: float = 0.7
    leader_fallback_timeout: float = 0.7
    connection_timeout: float = 1.0
    connection_retry_time: float = 0.3
    ping_interval: float = 0.2
    bind_retry_time: float = 0.5
    max_bind_retries: int = 10


def raft_id(address: HostPort) -> str:
    """The name pysyncobj knows a member by: "host:port" (IPv6 unbracketed: it splits at the last colon)."""
    return f"{address.host}:{address.port}"


def make_conf(
    settings: ClusterSettings,
    timings: RaftTimings = RaftTimings(),
    on_state_changed: Callable[[int, int], None] | None = None,
) -> SyncObjConf:
    """The SyncObjConf halb runs with; raises AssertionError (pysyncobj's validate) on bad timings."""
    conf = SyncObjConf(
        password=settings.secret,
        appendEntriesPeriod=timings.append_entries_period,
        raftMinTimeout=timings.raft_min_timeout,
        raftMaxTimeout=timings.raft_max_timeout,
        leaderFallbackTimeout=timings.leader_fallback_timeout,
        connectionTimeout=timings.connection_timeout,
        connectionRetryTime=timings.connection_retry_time,
        bindAddress=raft_id(settings.address),  # never 0.0.0.0, pysyncobj's default
        bindRetryTime=timings.bind_retry_time,
        maxBindRetries=timings.max_bind_retries,
        journalFile=os.path.join(settings.data_dir, "raft.journal"),
        fullDumpFile=os.path.join(settings.data_dir, "raft.dump"),
        useFork=False,
        commandsWaitLeader=False,
        dynamicMembershipChange=False,
        onStateChanged=on_state_changed,
    )
    conf.validate()
    return conf


@dataclass(frozen=True)
class Applied:
    """One applied command (or, with `command=None`, the whole state replaced from a snapshot)."""

    command: dict[str, Any] | None
    result: dict[str, Any] | None
    config: dict[str, Any] | None  # {version, pools} when the shared configuration changed
    leases: dict[str, dict[str, Any]]
    members: dict[str, dict[str, Any]]


class _Store(SyncObjConsumer):
    """Holds the ClusterState; pysyncobj serialises it through `_serialize`/`_deserialize`."""

    def __init__(self, on_applied: Callable[[Applied], None]) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.state = ClusterState()
        self.on_applied = on_applied

    def apply(self, command: Any) -> dict[str, Any]:
        with self.lock:
            before = self.state.version
            result = self.state.apply(command)
            changed = self.state.version != before
            event = Applied(
                command=command if isinstance(command, dict) else None,
                result=result,
                config=self.state.config_view() if changed else None,
                leases={k: dict(v) for k, v in self.state.leases.items()},
                members={k: dict(v) for k, v in self.state.members.items()},
            )
        self.on_applied(event)
        return result

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return self.state.to_dict()

    def _serialize(self) -> dict[str, Any]:
        return {"state": self.snapshot()}

    def _deserialize(self, data: dict[str, Any]) -> None:
        with self.lock:
            self.state = ClusterState.from_dict(data.get("state", {}))
            event = Applied(
                command=None,
                result=None,
                config=self.state.config_view(),
                leases={k: dict(v) for k, v in self.state.leases.items()},
                members={k: dict(v) for k, v in self.state.members.items()},
            )
        self.on_applied(event)


class _Transport(TCPTransport):
    """TCPTransport plus pings, last-heard times and failed-handshake counts (see module docstring)."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self.halb_last_heard: dict[str, float] = {}
        self.halb_auth_failures: dict[str, int] = {}  # peer id, or "incoming" (peer unknown yet)
        self.halb_last_auth_failure: float | None = None
        self._halb_outgoing_pending: dict[Any, str] = {}
        self._halb_incoming_pending: set[Any] = set()
        self._halb_next_ping = 0.0
        self._halb_ping_interval = RaftTimings.ping_interval
        syncObj._halb_transport = self  # a public handle, instead of SyncObj's name-mangled attribute
        super().__init__(syncObj, selfNode, otherNodes)

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        self.halb_last_heard[node.id] = time.monotonic()
        if isinstance(message, dict) and message.get("type") == PING:
            return
        super()._onMessageReceived(node, message)

    def _onTick(self) -> None:
        super()._onTick()
        now = time.monotonic()
        if now >= self._halb_next_ping:
            self._halb_next_ping = now + self._halb_ping_interval
            for node in list(self._nodes):
                self.send(node, {"type": PING})

    def _onOutgoingConnected(self, conn: Any) -> None:
        if self._syncObj.encryptor:
            node = self._connToNode(conn)
            if node is not None:
                self._halb_outgoing_pending[conn] = node.id
        super()._onOutgoingConnected(conn)

    def _onOutgoingMessageReceived(self, conn: Any, message: Any) -> None:
        self._halb_outgoing_pending.pop(conn, None)  # the peer's key decrypted: same secret
        super()._onOutgoingMessageReceived(conn, message)

    def _onNewIncomingConnection(self, conn: Any) -> None:
        if self._syncObj.encryptor:
            self._halb_incoming_pending.add(conn)
        super()._onNewIncomingConnection(conn)

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        self._halb_incoming_pending.discard(conn)  # decrypted: same secret
        super()._onIncomingMessageReceived(conn, message)

    def _onDisconnected(self, conn: Any) -> None:
        peer = self._halb_outgoing_pending.pop(conn, None)
        if peer is None and conn in self._halb_incoming_pending:
            peer = "incoming"
        self._halb_incoming_pending.discard(conn)
        if peer is not None:
            self.halb_auth_failures[peer] = self.halb_auth_failures.get(peer, 0) + 1
            self.halb_last_auth_failure = time.monotonic()
        super()._onDisconnected(conn)


class _HalbSyncObj(SyncObj):
    def __init__(self, self_id: str, peers: list[str], conf: SyncObjConf, store: _Store) -> None:
        self._halb_store = store  # set before SyncObj.__init__: not part of its own dump
        super().__init__(self_id, peers, conf, consumers=[store], transportClass=_Transport)

    @replicated
    def apply_command(self, command: dict[str, Any]) -> dict[str, Any]:
        return self._halb_store.apply(command)

    def halb_transport(self) -> _Transport:
        return self._halb_transport  # type: ignore[attr-defined,no-any-return]


class RaftMember:
    """This node's Raft member; see the module docstring."""

    def __init__(
        self, settings: ClusterSettings, node_name: str, timings: RaftTimings = RaftTimings()
    ) -> None:
        self.settings = settings
        self.node_name = node_name
        self.timings = timings
        self.self_id = raft_id(settings.address)
        self.peer_ids = [raft_id(p) for p in settings.peers]
        self._listeners: list[Callable[[Applied], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync: _HalbSyncObj | None = None
        self._store: _Store | None = None
        self._lock_file: Any = None
        self._status: dict[str, Any] = {}
        self._status_at = 0.0
        self._auth_logged = False
        self._transfer_requested = False
        self.members: dict[str, dict[str, Any]] = {}  # from the replicated state: name -> record

    # --- life cycle -------------------------------------------------------------------------------
    def add_listener(self, callback: Callable[[Applied], None]) -> None:
        """Called on the event loop for every applied command (and after a snapshot is loaded)."""
        self._listeners.append(callback)

    async def start(self) -> None:
        """Open data_dir, start the member and wait until its port is bound. Raises ClusterError."""
        self._loop = asyncio.get_running_loop()
        data_dir = self.settings.data_dir
        try:
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
            self._lock_file = open(os.path.join(data_dir, "lock"), "a+")  # noqa: SIM115 (held while running)
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterError(f"cluster.data_dir {data_dir} is in use by another halb process") from None
        except OSError as exc:
            raise ClusterError(f"cluster.data_dir {data_dir}: {exc.strerror or exc}") from None
        conf = make_conf(self.settings, self.timings, self._on_state_changed)
        self._store = _Store(self._from_tick)
        self._sync = _HalbSyncObj(self.self_id, self.peer_ids, conf, self._store)
        self._sync.halb_transport()._halb_ping_interval = self.timings.ping_interval
        try:
            await self._loop.run_in_executor(None, self._sync.waitBinded)
        except SyncObjException:
            await self.stop()
            raise ClusterError(
                f"cannot bind the Raft address {self.self_id} (cluster.address): in use, or not local"
            ) from None
        self._sync.addOnTickCallback(self._on_tick)
        log.warning(
            "raft member %s started (%s); peers: %s; data in %s",
            self.self_id,
            self.settings.role,
            ", ".join(self.peer_ids) or "none (single-member cluster)",
            data_dir,
        )

    async def stop(self) -> None:
        """Hand leadership over (if we lead), then stop the member; the state stays in data_dir."""
        if self._sync is not None and self._status.get("state") == "leader" and self.peer_ids:
            self._transfer_requested = True  # done on pysyncobj's thread by `_on_tick`
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and self._status.get("leader") in (self.self_id, None):
                await asyncio.sleep(0.02)
        sync, self._sync = self._sync, None
        if sync is not None:
            await _destroy(sync, STOP_TIMEOUT)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # --- commands ---------------------------------------------------------------------------------
    async def submit(self, command: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        """Commit `command` through Raft; the state's result dict. Raises CommandFailed/CommandTimeout."""
        sync = self._sync
        if sync is None:
            raise CommandFailed("the Raft member is not running", retryable=False)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()

        def settle(result: Any, error: Any) -> None:  # on the event loop
            if future.done():
                return
            if error == FAIL_REASON.SUCCESS:
                future.set_result(result)
            else:
                never_sent = error in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.QUEUE_FULL)
                reason = _REASONS.get(error, f"Raft error {error}")
                future.set_exception(CommandFailed(reason, retryable=never_sent))

        def callback(result: Any, error: Any) -> None:  # on pysyncobj's thread
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(settle, result, error)

        sync.apply_command(command, callback=callback)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise CommandTimeout(
                f"not committed within {timeout:.1f}s (no quorum?); it may still be applied later"
            ) from None

    def state(self) -> dict[str, Any]:
        """A copy of the local replica (may lag the leader by a heartbeat)."""
        return self._store.snapshot() if self._store is not None else ClusterState().to_dict()

    # --- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self._sync is None:
            return {"running": False}
        doc = dict(self._status)
        if not doc:
            return {"running": True, "self": self.self_id, "starting": True}
        doc["status_age_seconds"] = round(time.monotonic() - self._status_at, 3)
        names = {rec.get("address"): name for name, rec in self.members.items()}
        for member in doc.get("members", []):
            member["name"] = names.get(member["address"])
        doc["leader_name"] = names.get(doc.get("leader"))
        return doc

    def _on_tick(self) -> None:
        """On pysyncobj's thread, every tick: refresh the status snapshot (cheap, every 0.1 s)."""
        now = time.monotonic()
        if now - self._status_at < STATUS_PERIOD:
            return
        sync = self._sync
        if sync is None:
            return
        if self._transfer_requested:
            self._transfer_requested = False
            sync.transferLeadership()  # best effort: to the most caught-up connected follower
        try:
            self._status = self._build_status(sync, now)
        except Exception:  # never break pysyncobj's tick
            log.exception("raft status snapshot failed")
        self._status_at = now

    def _build_status(self, sync: _HalbSyncObj, now: float) -> dict[str, Any]:
        raw = sync.getStatus()
        transport = sync.halb_transport()
        heard = transport.halb_last_heard
        failures = transport.halb_auth_failures
        window = self.timings.connection_timeout
        members = []
        reachable = 0
        for peer in self.peer_ids:
            connected = raw.get(f"partner_node_status_server_{peer}") == 2
            last = heard.get(peer)
            ok = connected and last is not None and now - last <= window
            reachable += ok
            members.append(
                {
                    "address": peer,
                    "reachable": ok,
                    "connected": connected,
                    "last_heard_seconds_ago": round(now - last, 3) if last is not None else None,
                    "auth_failures": failures.get(peer, 0),
                }
            )
        total = len(self.peer_ids) + 1
        quorum = (reachable + 1) > total / 2
        leader = raw.get("leader")
        leader_id = getattr(leader, "address", None) or (str(leader) if leader is not None else None)
        state = _STATES.get(raw.get("state"), str(raw.get("state")))
        if leader_id == self.self_id:
            leader_fresh = state == "leader" and quorum
        else:
            last = heard.get(leader_id) if leader_id else None
            leader_fresh = last is not None and now - last <= window
        auth_error = None
        last_failure = transport.halb_last_auth_failure
        if (
            self.peer_ids
            and reachable == 0
            and last_failure is not None
            and now - last_failure <= AUTH_WINDOW
        ):
            auth_error = (
                "cannot authenticate with peers: check [cluster].secret (their Raft ports answer, "
                "but the encrypted handshake fails)"
            )
        auth_warning = None
        if auth_error is None and last_failure is not None and now - last_failure <= AUTH_WINDOW:
            failing = [m["address"] for m in members if m["auth_failures"] and not m["reachable"]]
            auth_warning = (
                "encrypted handshakes are failing "
                + (f"with {', '.join(failing)}" if failing else "from a peer that connects to us")
                + ": a member with a different [cluster].secret?"
            )
        if auth_error and not self._auth_logged:
            log.error("raft: %s", auth_error)
        self._auth_logged = auth_error is not None
        return {
            "running": True,
            "self": self.self_id,
            "role": self.settings.role,
            "state": state,
            "leader": leader_id,
            "leader_fresh": leader_fresh,
            "term": raw.get("raft_term"),
            "commit_index": raw.get("commit_idx"),
            "last_applied": raw.get("last_applied"),
            "ready": bool(sync.isReady()),
            "quorum": quorum,
            "votes": {"reachable": reachable + 1, "total": total, "needed": total // 2 + 1},
            "members": members,
            "auth_failures": sum(failures.values()),
            "auth_error": auth_error,
            "auth_warning": auth_warning,
        }

    # --- from pysyncobj's thread ------------------------------------------------------------------
    def _from_tick(self, event: Applied) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            loop.call_soon_threadsafe(self._dispatch, event)

    def _dispatch(self, event: Applied) -> None:
        self.members = event.members
        for callback in self._listeners:
            try:
                callback(event)
            except Exception:
                log.exception("raft: an applied-command listener failed")

    def _on_state_changed(self, old: int, new: int) -> None:
        log.warning("raft %s: %s -> %s", self.self_id, _STATES.get(old, old), _STATES.get(new, new))


async def _destroy(sync: SyncObj, timeout: float) -> None:
    """Stop pysyncobj's thread and wait for it, at most `timeout` seconds. The wait runs in a daemon
    thread of its own, not the loop's executor: at exit Python joins the executor's threads, so a tick
    thread that never ends would otherwise hang the process that is stopping (systemd would kill it after
    TimeoutStopSec)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def destroy() -> None:
        try:
            sync.destroy_synchronous()
        except Exception:
            log.exception("stopping the Raft member failed")
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(settle)

    threading.Thread(target=destroy, name="raft-stop", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout)
    except TimeoutError:
        log.warning("the Raft member did not stop within %.0f s; going on without it", timeout)
