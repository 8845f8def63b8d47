"""The kernel fence's nft scripts and its timing rules (fake runner, fake clock), the release on a stopped
node's behalf (state command, admin API, `halb vip release`'s client and its data_dir lock), the lease
holder asking again at once when the lease is released, and the [cluster] keys for all this."""

from __future__ import annotations

import asyncio
import fcntl
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from halb.admin import AdminServer
from halb.cluster.api import ClusterApi
from halb.cluster.handoff import node_stopped, release_via_peers
from halb.cluster.lease import LeaseHolder, LeaseTiming, SendCommand
from halb.cluster.raft import CommandFailed
from halb.cluster.state import ClusterState
from halb.cluster_config import node_config
from halb.config import parse
from halb.config_model import HostPort
from halb.lab.topology import build
from halb.vrrp.fence import (
    NftFence,
    close_script,
    install_script,
    open_script,
    remove_script,
)
from tests.unit.test_vrrp_driver import Clock

TOKEN = "0123456789abcdef-token"


# --- nft scripts --------------------------------------------------------------------------------------------
def test_install_script_drops_vip_traffic_and_arp_unless_leased() -> None:
    script = install_script(["10.0.0.100/32"])
    assert script.splitlines()[:3] == [
        "add table inet halb_fence",
        "delete table inet halb_fence",
        "table inet halb_fence {",
    ]
    assert "ip daddr 10.0.0.100 ip daddr != @lease_vips counter drop" in script
    assert "ip saddr 10.0.0.100 ip saddr != @lease_vips counter drop" in script
    assert "arp saddr ip 10.0.0.100 arp saddr ip != @lease_vips counter drop" in script
    assert "arp daddr ip 10.0.0.100 arp daddr ip != @lease_vips counter drop" in script
    assert "hook input priority raw" in script and "hook output priority raw" in script
    assert script.count("set lease_vips { type ipv4_addr; flags timeout; }") == 2
    two = install_script(["10.0.0.101", "10.0.0.100/24"])
    assert "ip daddr { 10.0.0.100, 10.0.0.101 }" in two
    with pytest.raises(ValueError):
        install_script([])


def test_open_close_remove_scripts() -> None:
    assert open_script(["10.0.0.100/32"], 1.2345).splitlines() == [
        "flush set inet halb_fence lease_vips",
        "add element inet halb_fence lease_vips { 10.0.0.100 timeout 1234ms }",
        "flush set arp halb_fence lease_vips",
        "add element arp halb_fence lease_vips { 10.0.0.100 timeout 1234ms }",
    ]
    assert open_script(["10.0.0.100"], 0.0004) == close_script()
    assert "flush set inet halb_fence lease_vips" in close_script()
    assert "add set arp halb_fence lease_vips" in close_script()  # idempotent without the tables
    assert remove_script().splitlines() == [
        "add table inet halb_fence",
        "delete table inet halb_fence",
        "add table arp halb_fence",
        "delete table arp halb_fence",
    ]


def timeout_ms(script: str) -> int:
    return int(script.split("timeout ", 1)[1].split("ms", 1)[0])


class Runner:
    """A fake `nft -f -`: records scripts; each run advances the clock by `cost`."""

    def __init__(self, clock: Clock, cost: float = 0.005) -> None:
        self.clock, self.cost = clock, cost
        self.scripts: list[str] = []
        self.costs: list[float] = []

    async def __call__(self, script: str) -> None:
        self.scripts.append(script)
        self.clock.now += self.costs.pop(0) if self.costs else self.cost


def test_the_element_ends_slack_before_the_lease_and_never_outlives_it() -> None:
    async def go() -> None:
        clock = Clock(100.0)
        runner = Runner(clock, cost=0.0)
        fence = NftFence(["10.0.0.100/32"], clock, runner, slack=0.1)
        await fence.install()
        assert fence.installed and fence.open_until_time is None
        assert await fence.open_until(101.8)
        assert timeout_ms(runner.scripts[-1]) in (1699, 1700)  # 1.8 s left - 0.1 s slack, rounded down
        assert fence.open_until_time == 101.8
        # nft took longer than the slack (loaded machine, a freeze): set again with a fresh timeout
        runner.costs = [0.3, 0.005]
        assert await fence.open_until(102.5)
        assert fence.overruns == 1
        first, second = runner.scripts[-2:]
        assert timeout_ms(first) in (2399, 2400) and timeout_ms(second) in (2099, 2100)
        # too late to be of use: closed
        clock.now = 102.45
        assert not await fence.open_until(102.5)
        assert runner.scripts[-1] == close_script() and fence.open_until_time is None
        await fence.remove()
        assert runner.scripts[-1] == remove_script() and not fence.installed
        snap = fence.snapshot()
        assert snap["opens"] == 3 and snap["overruns"] == 1 and snap["open"] is False

    asyncio.run(go())


def test_three_overruns_in_a_row_close_the_fence() -> None:
    async def go() -> None:
        clock = Clock(100.0)
        runner = Runner(clock, cost=0.2)
        fence = NftFence(["10.0.0.100/32"], clock, runner, slack=0.1)
        assert not await fence.open_until(105.0)
        assert fence.overruns == 3 and runner.scripts[-1] == close_script()

    asyncio.run(go())


# --- the state's conditional release ------------------------------------------------------------------------
def test_a_release_with_seq_only_releases_that_grant() -> None:
    state = ClusterState()
    state.apply({"op": "acquire", "lease": "vip", "node": "lb1", "now": 1.0, "duration": 2.0})
    state.apply({"op": "renew", "lease": "vip", "node": "lb1", "now": 1.5, "duration": 2.0})
    stale = state.apply({"op": "release", "lease": "vip", "node": "lb1", "seq": 1})
    assert stale["ok"] is False and stale["code"] == "conflict" and stale["seq"] == 2
    assert state.leases["vip"]["holder"] == "lb1"
    bad = state.apply({"op": "release", "lease": "vip", "node": "lb1", "seq": "2"})
    assert bad["code"] == "invalid"
    done = state.apply({"op": "release", "lease": "vip", "node": "lb1", "seq": 2})
    assert done["ok"] and state.leases["vip"]["holder"] is None and state.leases["vip"]["seq"] == 3
    again = state.apply({"op": "release", "lease": "vip", "node": "lb1", "seq": 3})
    assert again["code"] == "not_found"


# --- the lease holder: a released lease is acquired at once -------------------------------------------------
def test_a_wanted_lease_that_becomes_free_is_asked_for_at_once() -> None:
    b = LeaseHolder("lb2", LeaseTiming.for_duration(2.0))
    b.observe({"holder": "lb1", "seq": 3, "duration": 2.0}, 10.0)
    assert b.set_wanted(True, 10.1) == []  # lb1's lease has not run out for us: wait until 12.2
    assert b.tick(10.3) == [] and b.next_wakeup(10.3) == pytest.approx(12.2)
    b.observe({"holder": None, "seq": 4, "duration": 2.0}, 10.35)  # lb1's release was applied
    (again,) = [a for a in b.tick(10.4) if isinstance(a, SendCommand)]
    assert again.command["op"] == "acquire" and "seen" not in again.command
    # also after a refusal that said "retry in 2.1 s"
    c = LeaseHolder("lb2", LeaseTiming.for_duration(2.0))
    (first,) = [a for a in c.set_wanted(True, 20.0) if isinstance(a, SendCommand)]
    held = {"ok": False, "code": "held", "holder": "lb1", "seq": 7, "duration": 2.0, "retry_in": 2.1}
    c.on_result(first.request_id, held, 20.01)
    assert c.tick(20.2) == []
    c.observe({"holder": None, "seq": 8, "duration": 2.0}, 20.25)
    assert [a.command["op"] for a in c.tick(20.3) if isinstance(a, SendCommand)] == ["acquire"]


# --- the admin API: release on a stopped node's behalf ------------------------------------------------------
class _Member:
    def __init__(self) -> None:
        self.state_ = ClusterState()
        self.state_.apply({"op": "register", "node": "lb1", "address": "10.0.0.11:7000", "role": "balancer"})
        self.state_.apply({"op": "acquire", "lease": "vip", "node": "lb1", "now": 1.0, "duration": 2.0})
        self.connected = False
        self.fail: list[Exception] = []
        self.submitted: list[dict[str, Any]] = []

    async def submit(self, command: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        self.submitted.append(command)
        if self.fail:
            raise self.fail.pop(0)
        return self.state_.apply(command)

    def state(self) -> dict[str, Any]:
        return self.state_.to_dict()

    def status(self) -> dict[str, Any]:
        return {"members": [{"address": "10.0.0.11:7000", "connected": self.connected}]}


def api_call(api: ClusterApi, body: Any, path: str = "/api/leases/vip/release") -> tuple[int, dict[str, Any]]:
    return asyncio.run(api.handle("POST", path, body))


def test_the_api_releases_a_stopped_nodes_lease_naming_its_seq() -> None:
    member = _Member()
    api = ClusterApi(member, "lb2")
    member.fail = [CommandFailed("no Raft leader")]  # the killed node led: retried until a leader exists
    status, doc = api_call(api, {"node": "lb1"})
    assert status == 200 and doc["released"] is True and doc["seq"] == 1
    assert member.submitted[-1] == {"op": "release", "lease": "vip", "node": "lb1", "seq": 1}
    assert member.state_.leases["vip"]["holder"] is None
    status, doc = api_call(api, {"node": "lb1"})  # nothing held any more: nothing to do
    assert status == 200 and doc["released"] is False and doc["holder"] is None


def test_the_api_refuses_while_the_node_is_still_connected_and_checks_its_input() -> None:
    member = _Member()
    member.connected = True
    api = ClusterApi(member, "lb2")
    status, doc = api_call(api, {"node": "lb1", "timeout": 0.2})
    assert status == 409 and "still connected" in doc["error"]
    assert member.submitted == [] and member.state_.leases["vip"]["holder"] == "lb1"
    assert api_call(api, {"nobody": 1})[0] == 400
    assert api_call(api, {"node": "lb1", "timeout": 99})[0] == 400
    assert asyncio.run(api.handle("GET", "/api/leases/vip/release", None))[0] == 405


def test_the_release_needs_the_token() -> None:
    from tests.unit.test_cluster_sync import _Node, call

    server = AdminServer(HostPort("127.0.0.1", 0), _Node(), ClusterApi(_Member(), "lb2"), TOKEN)
    assert call(server, "POST", "/api/leases/vip/release", {"node": "lb1"})[0] == 401
    status, doc = call(server, "POST", "/api/leases/vip/release", {"node": "lb1"}, token=TOKEN)
    assert status == 200 and doc["released"] is True


# --- `halb vip release`'s client ----------------------------------------------------------------------------
def test_release_via_peers_takes_the_first_answer_and_never_raises() -> None:
    member = _Member()

    async def go() -> Any:
        server = AdminServer(HostPort("127.0.0.1", 0), _Node(), ClusterApi(member, "lb2"), TOKEN)
        await server.start()
        assert server._server is not None
        port = server._server.sockets[0].getsockname()[1]
        try:
            dead = "127.0.0.1:9"  # nothing listens: refused at once
            return await asyncio.to_thread(
                release_via_peers, [dead, f"127.0.0.1:{port}"], TOKEN, "lb1", budget=2.0
            )
        finally:
            await server.close()

    from tests.unit.test_cluster_sync import _Node

    result = asyncio.run(go())
    assert result.released is True and result.via is not None and "lb2" in result.via
    assert "released via" in result.describe("lb1") and result.seconds < 2.0
    none = release_via_peers(["127.0.0.1:9"], TOKEN, "lb1", budget=0.5)
    assert none.released is None and none.errors and "NOT released" in none.describe("lb1")
    assert release_via_peers([], TOKEN, "lb1").released is None


def test_node_stopped_holds_the_data_dir_lock_only_when_serve_is_gone(tmp_path: Path) -> None:
    data_dir = tmp_path / "lb1"
    with node_stopped(str(data_dir)) as stopped:
        assert stopped  # never started
    data_dir.mkdir()
    held = open(data_dir / "lock", "a+")  # noqa: SIM115 -- a running member's lock
    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with node_stopped(str(data_dir), wait=0.05) as stopped:
        assert not stopped
    held.close()
    with node_stopped(str(data_dir)) as stopped:
        assert stopped
        # while we hold it, a new `halb serve` cannot start its Raft member on this data_dir
        fd = os.open(data_dir / "lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)


# --- configuration ------------------------------------------------------------------------------------------
def test_the_generator_turns_the_lease_on_unless_two_members_and_lists_admin_peers() -> None:
    with_witness = tomllib.loads(node_config(build("x", lbs=2, witness=True).cluster_spec(), "lb1"))
    assert with_witness["cluster"]["vip_lease"] is True
    assert with_witness["cluster"]["admin_peers"] == ["10.99.0.12:9901", "10.99.0.240:9901"]
    two = tomllib.loads(node_config(build("x", lbs=2).cluster_spec(), "lb2"))
    assert two["cluster"]["vip_lease"] is False and two["cluster"]["admin_peers"] == ["10.99.0.11:9901"]
    one = tomllib.loads(node_config(build("x", lbs=1).cluster_spec(), "lb1"))
    assert one["cluster"]["vip_lease"] is True and one["cluster"]["admin_peers"] == []
    witness = tomllib.loads(node_config(build("x", lbs=2, witness=True).cluster_spec(), "witness"))
    assert "vip_lease" not in witness["cluster"]
    parsed = parse(with_witness, "lb1.toml").cluster
    assert parsed is not None and parsed.vip_lease is True
    assert [str(a) for a in parsed.admin_peers] == ["10.99.0.12:9901", "10.99.0.240:9901"]


def test_admin_peers_must_be_host_port() -> None:
    from halb.errors import ConfigError

    doc = tomllib.loads(node_config(build("x", lbs=2, witness=True).cluster_spec(), "lb1"))
    doc["cluster"]["admin_peers"] = ["nope"]
    with pytest.raises(ConfigError, match="admin_peers"):
        parse(doc, "lb1.toml")
