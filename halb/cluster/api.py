"""The cluster's configuration API behind `/api/...` on every node's admin port.

How this works: the admin server (`halb.admin`) authorises mutating requests (bearer token) and decodes
the JSON body; `ClusterApi.handle(method, path, body)` maps the request to one state command, commits it
through Raft from whichever node received it (a follower forwards to the leader) and answers with the
state's result once it is applied on this node:

    GET    /api/config                              the shared configuration, members and leases
    POST   /api/pools/POOL/backends                 {name, address, weight?, draining?, agent?, maxconn?,
                                                     backup?}  -> 201
    DELETE /api/pools/POOL/backends/NAME
    PUT    /api/pools/POOL/backends/NAME            {weight?, draining?}
    PUT    /api/pools/POOL                          {algorithm}
    POST   /api/leases/LEASE/release                {node, timeout?}: release a STOPPED node's lease

Answers: 200/201 `{"ok": true, "result": ...}`; the state's rejections map to 400 (invalid), 404 (no such
pool/backend), 409 (conflict); 503 when Raft cannot commit (no leader/quorum: retried for up to
`COMMIT_DEADLINE` first, but only while the command surely never reached a leader); 504 when no answer
came in time (the change may still be applied: look with GET /api/config).

`POST /api/leases/vip/release {"node": "lb1"}` is what `halb vip release` (the service manager's
ExecStopPost) sends after `halb serve` on lb1 has ended and its VIP is off the interface: it commits
`release{lease, node, seq}` for the grant the replica here shows, so a peer can take the VIP over at once
instead of after the lease's expiry. It re-reads and retries (no leader yet, a renewal that landed in
between) until `timeout` (default 1 s), and refuses (409) while lb1's Raft member is still connected to
this one -- a live holder's lease is its own business. 200 `{"released": true|false}` (false: lb1 held
nothing).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any, Protocol

from halb.cluster.raft import CommandFailed, CommandTimeout

COMMIT_DEADLINE = 3.0
STATUS_OF_CODE = {"invalid": 400, "not_found": 404, "conflict": 409, "held": 409, "internal": 500}


RELEASE_TIMEOUT = 1.0
RELEASE_RETRY = 0.05


class Member(Protocol):
    async def submit(self, command: dict[str, Any], timeout: float = ...) -> dict[str, Any]: ...

    def state(self) -> dict[str, Any]: ...


class ClusterApi:
    def __init__(self, member: Member, node_name: str) -> None:
        self.member = member
        self.node_name = node_name

    async def handle(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if parts == ["api", "config"]:
            if method not in ("GET", "HEAD"):
                return 405, {"error": "GET /api/config only"}
            return 200, self.config()
        if len(parts) == 4 and parts[:2] == ["api", "leases"] and parts[3] == "release":
            if method != "POST":
                return 405, {"error": "POST /api/leases/LEASE/release only"}
            if not isinstance(body, dict) or not isinstance(body.get("node"), str):
                return 400, {"error": 'POST /api/leases/LEASE/release takes {"node": NAME, "timeout"?: S}'}
            timeout = body.get("timeout", RELEASE_TIMEOUT)
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 10:
                return 400, {"error": "timeout must be a number of seconds in (0, 10]"}
            return await self.release_for(parts[2], body["node"], float(timeout))
        if len(parts) >= 3 and parts[:2] == ["api", "pools"]:
            command = self._command(method, parts[2:], body)
            if isinstance(command, tuple):
                return command
            return await self.commit(command, created=method == "POST")
        return 404, {"error": f"no API at {path}; see docs/configuration.md ([cluster])"}

    def config(self) -> dict[str, Any]:
        state = self.member.state()
        return {
            "node": self.node_name,
            "version": state["version"],
            "pools": state["pools"],
            "members": state["members"],
            "leases": state["leases"],
        }

    def _command(
        self, method: str, rest: list[str], body: Any
    ) -> dict[str, Any] | tuple[int, dict[str, Any]]:
        pool = rest[0]
        fields = body if isinstance(body, dict) else {}
        if body is not None and not isinstance(body, dict):
            return 400, {"error": "the body must be a JSON object"}
        if len(rest) == 1:
            if method in ("PUT", "PATCH"):
                if set(fields) != {"algorithm"}:
                    return 400, {"error": 'PUT /api/pools/POOL takes {"algorithm": NAME}'}
                return {"op": "set_algorithm", "pool": pool, "algorithm": fields["algorithm"]}
            return 405, {"error": "PUT /api/pools/POOL only"}
        if rest[1] != "backends" or len(rest) > 3:
            return 404, {"error": "no such API; see docs/configuration.md"}
        if len(rest) == 2:
            if method != "POST":
                return 405, {"error": "POST /api/pools/POOL/backends adds a backend"}
            return {"op": "add_backend", "pool": pool, "backend": fields}
        name = rest[2]
        if method == "DELETE":
            return {"op": "remove_backend", "pool": pool, "name": name}
        if method in ("PUT", "PATCH"):
            unknown = sorted(set(fields) - {"weight", "draining"})
            if unknown:
                return 400, {"error": f"unknown field {unknown[0]!r}; give weight and/or draining"}
            return {"op": "set_backend", "pool": pool, "name": name, **fields}
        return 405, {"error": "PUT or DELETE /api/pools/POOL/backends/NAME"}

    async def release_for(self, lease: str, node: str, timeout: float) -> tuple[int, dict[str, Any]]:
        """Release `node`'s lease on its behalf (it has stopped); see the module docstring."""
        deadline = time.monotonic() + timeout
        why, alive = "no answer", False
        while True:
            record = self.member.state()["leases"].get(lease)
            holder = record.get("holder") if record else None
            if holder != node:
                return 200, {"ok": True, "released": False, "holder": holder, "node": self.node_name}
            alive = self._connected(node)
            if alive:
                why = f"{node}'s Raft member is still connected to {self.node_name}: it has not stopped"
            else:
                command = {"op": "release", "lease": lease, "node": node, "seq": record["seq"]}
                try:
                    result = await self.member.submit(command, max(0.05, deadline - time.monotonic()))
                except CommandFailed as exc:  # no leader yet, or the leader changed: read again, retry
                    why = f"not committed: {exc.reason}"
                except CommandTimeout as exc:
                    return 504, {"error": str(exc), "node": self.node_name}
                else:
                    if result.get("ok"):
                        done = {"ok": True, "released": True, "seq": record["seq"], "node": self.node_name}
                        return 200, done
                    why = str(result.get("error"))  # a renewal landed in between (conflict): read again
            if time.monotonic() + RELEASE_RETRY >= deadline:
                return 409 if alive else 503, {"ok": False, "error": why, "node": self.node_name}
            await asyncio.sleep(RELEASE_RETRY)

    def _connected(self, node: str) -> bool:
        """Whether `node`'s Raft member is connected to this one right now (unknown: False)."""
        status = getattr(self.member, "status", None)
        address = (self.member.state()["members"].get(node) or {}).get("address")
        if status is None or address is None:
            return False
        members = status().get("members", [])
        return any(m.get("address") == address and m.get("connected") for m in members)

    async def commit(self, command: dict[str, Any], created: bool = False) -> tuple[int, dict[str, Any]]:
        deadline = time.monotonic() + COMMIT_DEADLINE
        while True:
            try:
                result = await self.member.submit(command, max(0.5, deadline - time.monotonic()))
                break
            except CommandFailed as exc:
                if not exc.retryable or time.monotonic() + 0.1 >= deadline:
                    return 503, {"error": f"not committed: {exc.reason}", "node": self.node_name}
                await asyncio.sleep(0.1)
            except CommandTimeout as exc:
                return 504, {"error": str(exc), "node": self.node_name}
        if not result.get("ok"):
            status = STATUS_OF_CODE.get(str(result.get("code")), 400)
            return status, {"ok": False, "error": result.get("error"), "code": result.get("code")}
        return (201 if created else 200), {"ok": True, "result": result, "node": self.node_name}
