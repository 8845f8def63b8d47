"""`halb lab` for real: namespaces, a bridge, services, partitions. Needs root (CI runs it as root).

One lab is brought up per module and shared; tests that break it (crash, second lab) make their own small
labs. Every lab is torn down in `finally`, and the teardown then checks that nothing is left: no namespace
with the lab's prefix, no recorded process alive, no run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from halb.lab import netns
from halb.lab.netns import http_get, in_netns
from halb.lab.processes import is_ours, proc_stat, supervisor_of
from halb.lab.state import ProcessRecord, run_dir
from tests.conftest import report
from tests.waiting import wait_for

pytestmark = pytest.mark.lab

LB1, LB2 = "10.99.0.11", "10.99.0.12"
WEB1 = "10.99.0.51"


def halb_lab(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "halb", "lab", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"halb lab {' '.join(args)} -> {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def recorded(prefix: str) -> list[ProcessRecord]:
    try:
        state = json.loads((run_dir(prefix) / "state.json").read_text())
    except FileNotFoundError:
        return []
    return [ProcessRecord(**p) for p in state["processes"].values()]


class VipWatch:
    """A thread calling `holders()` every few ms; `at` is when it first returned `want` (monotonic)."""

    def __init__(self, holders: Callable[[], list[str]], want: list[str], timeout: float) -> None:
        self.holders, self.want, self.timeout = holders, want, timeout
        self.at: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.holders() == self.want:
                self.at = time.monotonic()
                return
            time.sleep(0.003)

    def result(self) -> float:
        self._thread.join(self.timeout + 1)
        assert self.at is not None, f"VIP holders never became {self.want} (now {self.holders()})"
        return self.at


class Lab:
    """A running lab, seen from the test: its prefix and helpers that run inside its namespaces."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ever: dict[tuple[int | None, int | None], ProcessRecord] = {}

    def __call__(self, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # --prefix right after the command: anything after `halb lab exec NODE --` belongs to NODE
        result = halb_lab(command, "--prefix", self.prefix, *args, check=check)
        self.remember()
        return result

    def remember(self) -> None:
        for record in recorded(self.prefix):
            self.ever[(record.pid, record.starttime)] = record

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def get(self, address: str, port: int = 80, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
        return in_netns(self.ns("client"), http_get, address, port, path, timeout)

    def backend(self, lb: str, name: str) -> dict:  # type: ignore[type-arg]
        status, body = self.get(lb, 9901, "/status")
        assert status == 200
        (pool,) = json.loads(body)["pools"]
        return next(b for b in pool["backends"] if b["name"] == name)

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self("status", "--json").stdout)

    def host_state(self, name: str) -> str:
        return next(h["state"] for h in self.status()["hosts"] if h["name"] == name)


def assert_nothing_left(lab: Lab) -> None:
    lab.remember()
    left_ns = [ns for ns in namespaces() if ns.startswith(f"{lab.prefix}-")]
    assert not left_ns, f"namespaces left: {left_ns}"
    alive = [f"{r.host} pid {r.pid}" for r in lab.ever.values() if is_ours(r)]
    assert not alive, f"processes left: {alive}"
    assert not run_dir(lab.prefix).exists(), f"run dir left: {run_dir(lab.prefix)}"


def emergency_cleanup(prefix: str) -> None:
    """Only if `halb lab down` itself failed: leave the machine clean anyway (the test still fails)."""
    for record in recorded(prefix):
        if is_ours(record):
            os.killpg(record.pid, signal.SIGKILL)  # type: ignore[arg-type]
    for ns in namespaces():
        if ns.startswith(f"{prefix}-"):
            for pid in netns.pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", ns], check=False)
    subprocess.run(["rm", "-rf", str(run_dir(prefix))], check=False)


@contextlib.contextmanager
def running_lab(prefix: str, *up_args: str) -> Iterator[Lab]:
    lab = Lab(prefix)
    try:
        started = time.monotonic()
        halb_lab("up", "--prefix", prefix, *up_args)
        report(
            "lab", f"lab up {' '.join(up_args) or '(2 lbs, 2 backends)'}: {time.monotonic() - started:.2f}s"
        )
        lab.remember()
        yield lab
    finally:
        lab.remember()
        started = time.monotonic()
        result = halb_lab("down", "--prefix", prefix, check=False)
        report("lab", f"lab down ({prefix}): {time.monotonic() - started:.2f}s")
        if result.returncode != 0:
            emergency_cleanup(prefix)
            raise AssertionError(f"halb lab down failed: {result.stdout}{result.stderr}")
        assert_nothing_left(lab)


PREFIX = f"ht{os.getpid() % 1000}"
# VRRP adverts every 0.1 s: `up` waits ~0.35 s for the VIP instead of ~3.5 s at the default 1 s
FAST = ("--advert-interval", "0.1")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(PREFIX, *FAST) as running:
        # should lb2 win the start-up race by a few ms, lb1 (higher priority) preempts within ~0.35 s
        wait_for(lambda: running.status()["vip_holders"] == ["lb1"], timeout=5, what="lb1 to hold the VIP")
        yield running


def test_client_reaches_every_balancer(lab: Lab) -> None:
    for lb in (LB1, LB2):
        seen = set()
        for _ in range(4):
            status, body = lab.get(lb)
            assert status == 200
            seen.add(body.decode().strip())
        assert seen == {"web1", "web2"}, f"{lb} balanced to {seen}"
    # and with curl, the way the summary of `halb lab up` suggests
    curl = subprocess.run(
        ["ip", "netns", "exec", lab.ns("client"), "curl", "-s", "-m", "3", f"http://{LB2}/"],
        capture_output=True,
        text=True,
    )
    assert curl.returncode == 0
    assert curl.stdout.strip() in ("web1", "web2")


def test_status_lists_hosts_roles_and_services(lab: Lab) -> None:
    doc = lab.status()
    assert doc["vips"] == ["10.99.0.100"]
    assert doc["vip_holders"] == ["lb1"]  # VRRP is on by default; `up` waits for the election
    roles = {h["name"]: (h["role"], h["namespace"], h["state"]) for h in doc["hosts"]}
    assert roles["lb1"] == ("lb", lab.ns("lb1"), "running")
    assert roles["web2"] == ("web", lab.ns("web2"), "running")
    assert roles["redis"] == ("redis", lab.ns("redis"), "running")
    assert roles["client"] == ("client", lab.ns("client"), "-")
    assert all(h["namespace_exists"] for h in doc["hosts"])
    # the admin API is on the node's own lab address, so `halb status` works from inside the lab
    result = lab(
        "exec", "client", "--", sys.executable, "-m", "halb", "status", "--json", "--admin", f"{LB1}:9901"
    )
    assert json.loads(result.stdout)["node"]["name"] == "lb1"


def test_killed_and_restarted_backend_is_seen_by_health(lab: Lab) -> None:
    assert "killed" in lab("kill", "web2").stdout
    assert lab.host_state("web2") == "stopped"
    wait_for(lambda: lab.backend(LB1, "web2")["healthy"] is False, what="lb1 to mark web2 down")
    assert {lab.get(LB1)[1] for _ in range(4)} == {b"web1\n"}
    lab("start", "web2")
    assert lab.host_state("web2") == "running"
    wait_for(lambda: lab.backend(LB1, "web2")["healthy"] is True, what="lb1 to mark web2 up")
    wait_for(lambda: lab.backend(LB2, "web2")["healthy"] is True, what="lb2 to mark web2 up")


def test_freeze_and_thaw(lab: Lab) -> None:
    lab("freeze", "web1")
    try:
        pid = next(h["pid"] for h in lab.status()["hosts"] if h["name"] == "web1")
        assert lab.host_state("web1") == "frozen"
        assert proc_stat(pid)[0] == "T"  # type: ignore[index]
    finally:
        lab("thaw", "web1")
    assert lab.host_state("web1") == "running"
    assert proc_stat(pid)[0] in ("S", "R")  # type: ignore[index]
    assert in_netns(lab.ns("client"), http_get, WEB1, 80, "/", 2.0) == (200, b"web1\n")


def test_partition_and_heal(lab: Lab) -> None:
    lab("partition", "lb1", "--from", "client")
    try:
        assert lab.status()["partitions"] == [{"a": ["lb1"], "b": ["client"]}]
        with pytest.raises(OSError):
            lab.get(LB1, timeout=1.0)
        assert lab.get(LB2)[0] == 200  # the other balancer still answers
        # lb1 still reaches its backends: only lb1 <-> client is cut
        assert lab.backend(LB2, "web1")["healthy"] is True
        result = lab("exec", "lb1", "--", "curl", "-s", "-m", "2", f"http://{WEB1}/")
        assert result.stdout.strip() == "web1"
    finally:
        lab("heal")
    assert lab.status()["partitions"] == []
    assert lab.get(LB1)[0] == 200


def test_exec_passes_the_exit_code_through(lab: Lab) -> None:
    assert lab("exec", "client", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    result = lab("exec", "web1", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    assert f"{WEB1}/24" in result.stdout
    assert lab("exec", "nosuchhost", "--", "true", check=False).returncode == 1


def test_two_labs_with_the_same_subnet_coexist(lab: Lab) -> None:
    other = f"hu{os.getpid() % 1000}"
    with running_lab(other, "--lbs", "1", "--backends", "1", *FAST) as second:
        # same addresses, separate bridges: each client sees its own lab's lb1
        assert second.get(LB1) == (200, b"web1\n")
        assert lab.get(LB1)[0] == 200
        with pytest.raises(OSError):
            second.get(LB2, timeout=0.5)
    # the first lab is untouched by the second one's teardown
    assert lab.get(LB1)[0] == 200
    assert lab.status()["hosts"][0]["state"] == "running"


def test_down_after_a_crash_leaves_nothing() -> None:
    prefix = f"hc{os.getpid() % 1000}"
    crashed = Lab(prefix)
    try:
        halb_lab("up", "--prefix", prefix, "--lbs", "1", "--backends", "1", *FAST)
        crashed.remember()
        # the crash: every service dies, nothing else is cleaned up; plus an unrecorded process in a namespace
        for record in recorded(prefix):
            os.killpg(record.pid, signal.SIGKILL)  # type: ignore[arg-type]
        stray = subprocess.Popen(
            ["ip", "netns", "exec", f"{prefix}-client", "sleep", "300"], start_new_session=True
        )
        wait_for(lambda: not any(is_ours(r) for r in recorded(prefix)), what="services to die")
        # and their supervisors, which run `halb vip release` (and hand the lease over) once serve is gone
        supervisors = [s for r in recorded(prefix) if (s := supervisor_of(r)) is not None]
        wait_for(lambda: not any(is_ours(s) for s in supervisors), what="the supervisors to finish")
        assert any(ns.startswith(f"{prefix}-") for ns in namespaces())
        result = halb_lab("down", "--prefix", prefix)
        assert "killed 1 stray" in result.stdout
        stray.wait(timeout=5)
        assert_nothing_left(crashed)
        assert "deleted 0 namespace" in halb_lab("down", "--prefix", prefix).stdout  # idempotent
    finally:
        if halb_lab("down", "--prefix", prefix, check=False).returncode != 0:
            emergency_cleanup(prefix)
    assert_nothing_left(crashed)


def test_down_without_a_state_file_sweeps_by_name() -> None:
    prefix = f"hs{os.getpid() % 1000}"
    leftover = Lab(prefix)
    try:
        for ns in (f"{prefix}-sw", f"{prefix}-lb1"):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        result = halb_lab("down", "--prefix", prefix)
        assert "deleted 2 namespace" in result.stdout
    finally:
        emergency_cleanup(prefix)
    assert_nothing_left(leftover)


def test_up_refuses_a_lab_that_is_already_up(lab: Lab) -> None:
    result = halb_lab("up", "--prefix", lab.prefix, check=False)
    assert result.returncode == 1
    assert "already up" in result.stderr
    assert lab.get(LB1)[0] == 200
