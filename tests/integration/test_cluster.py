"""Three real `halb serve` processes on loopback forming one Raft cluster (two balancers and a witness):
shared configuration through any node, applied everywhere, kept across a restart of every node; a
member with the wrong secret cannot join and says why; changes need the token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Processes, free_port, report
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
SECRET = "integration-secret-0123456789"
TOKEN = "integration-token-0123456789"


class Cluster:
    def __init__(self, processes: Processes, tmp_path: Path) -> None:
        self.processes = processes
        self.tmp_path = tmp_path
        self.names = ["n1", "n2", "n3"]  # n3 is the witness
        self.admin = {n: free_port() for n in self.names}
        self.raft = {n: free_port() for n in self.names}
        self.listen = {n: free_port() for n in self.names[:2]}
        self.web = {"web1": free_port(), "web2": free_port()}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def config(self, name: str, secret: str = SECRET) -> str:
        peers = ", ".join(f'"127.0.0.1:{self.raft[n]}"' for n in self.names if n != name)
        text = f"""
[node]
name = "{name}"
admin = "127.0.0.1:{self.admin[name]}"
drain_timeout = 1.0

[cluster]
address = "127.0.0.1:{self.raft[name]}"
peers = [{peers}]
secret = "{secret}"
token = "{TOKEN}"
data_dir = "{self.tmp_path / "data" / name}"
"""
        if name == "n3":
            return text + 'role = "witness"\n'
        return (
            text
            + f"""
[[listeners]]
name = "web"
bind = "127.0.0.1:{self.listen[name]}"
pool = "app"

[pools.app]
backends = [{{ name = "web1", address = "127.0.0.1:{self.web["web1"]}" }}]
health = {{ kind = "http", path = "/healthz", interval = 0.2, timeout = 0.15, rise = 1, fall = 2 }}
"""
        )

    def start(self, *names: str, secret: str = SECRET) -> None:
        for name in names:
            path = self.tmp_path / f"{name}.toml"
            path.write_text(self.config(name, secret))
            self.procs[name] = self.processes.start("serve", str(path), "--log-level", "INFO", log_name=name)
        for name in names:
            wait_for(lambda n=name: healthz(self.admin[n]), 30, f"{name} healthy")

    def stop(self, *names: str) -> None:
        for name in names:
            os.killpg(self.procs[name].pid, signal.SIGTERM)
        for name in names:
            assert self.procs[name].wait(timeout=15) == 0

    def status(self, name: str) -> dict[str, Any]:
        return get(self.admin[name], "/status")

    def log(self, name: str) -> str:
        return Path(self.procs[name].log_path).read_text()  # type: ignore[attr-defined]


def get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def send(port: int, method: str, path: str, body: Any, token: str | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method=method
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5) as response:
            return response.status == 200
    except OSError:
        return False


def backends_of(doc: dict[str, Any]) -> list[tuple[str, int, bool]]:
    (pool,) = doc["pools"]
    return [(b["name"], b["weight"], b["draining"]) for b in pool["backends"]]


def halb(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HALB_TOKEN"}
    if token is not None:
        env["HALB_TOKEN"] = token
    return subprocess.run(["halb", *args], capture_output=True, text=True, timeout=30, env=env, check=False)


def http_get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
        return response.read().decode()


def test_shared_configuration_through_raft(processes: Processes, tmp_path: Path) -> None:
    c = Cluster(processes, tmp_path)
    for name, port in c.web.items():
        processes.backend(name, port)
    c.start(*c.names)
    wait_for(lambda: all(c.status(n)["cluster"].get("quorum") for n in c.names), 10, "quorum everywhere")
    assert c.status("n3")["node"]["workers"] == []  # the witness runs no proxy
    wait_for(lambda: c.status("n1")["cluster"]["config_version"] == 1, 10, "n1 seeded the cluster")

    # A change through the WITNESS's admin API is committed and applied by every node within 1 s.
    done = halb(
        "backends",
        "add",
        "app",
        "web2",
        f"127.0.0.1:{c.web['web2']}",
        "--admin",
        f"127.0.0.1:{c.admin['n3']}",
    )
    assert done.returncode == 0, done.stderr
    assert "backend web2" in done.stdout
    expected = [("web1", 1, False), ("web2", 1, False)]
    took = wait_for(
        lambda: (
            all(backends_of(c.status(n)) == expected for n in ("n1", "n2"))
            and get(c.admin["n3"], "/api/config")["version"] == 2
        ),
        1.0,
        "web2 everywhere",
    )
    report("cluster", f"a backend added via the witness was applied by all 3 nodes in {took * 1000:.0f} ms")

    # Drain web1 via n2; the proxy workers of BOTH balancers then send everything to the new backend.
    assert halb("backends", "drain", "app", "web1", "--admin", f"127.0.0.1:{c.admin['n2']}").returncode == 0
    assert (
        halb("backends", "weight", "app", "web2", "7", "--admin", f"127.0.0.1:{c.admin['n1']}").returncode
        == 0
    )
    expected = [("web1", 1, True), ("web2", 7, False)]
    wait_for(lambda: all(backends_of(c.status(n)) == expected for n in ("n1", "n2")), 1.0, "drain everywhere")
    wait_for(
        lambda: all(c.status(n)["pools"][0]["backends"][1]["healthy"] for n in ("n1", "n2")), 5, "web2 up"
    )
    for name in ("n1", "n2"):
        answers = Counter(http_get(c.listen[name]).split()[0] for _ in range(6))
        assert set(answers) == {"web2"}, (name, answers)

    shown = halb("config", "show", "--json", "--admin", f"127.0.0.1:{c.admin['n1']}", token=None)
    assert json.loads(shown.stdout)["version"] == 4
    listed = halb("backends", "list", "--admin", f"127.0.0.1:{c.admin['n3']}", token=None)
    assert "web2" in listed.stdout and "DRAIN" in listed.stdout

    # Changes need the token: none -> 401, a wrong one -> 403, both with a body that says so.
    status, doc = send(c.admin["n1"], "PUT", "/api/pools/app/backends/web1", {"weight": 2}, None)
    assert status == 401 and "Bearer" in doc["error"]
    status, doc = send(c.admin["n1"], "PUT", "/api/pools/app/backends/web1", {"weight": 2}, "not-the-token")
    assert status == 403 and "invalid token" in doc["error"]
    refused = halb("backends", "undrain", "app", "web1", "--admin", f"127.0.0.1:{c.admin['n1']}", token=None)
    assert refused.returncode == 1 and "401" in refused.stderr

    # Restart EVERY node: the configuration survives in the data_dirs.
    c.stop(*c.names)
    c.start(*c.names)
    wait_for(lambda: all(c.status(n)["cluster"].get("quorum") for n in c.names), 10, "quorum after restart")
    wait_for(lambda: all(backends_of(c.status(n)) == expected for n in ("n1", "n2")), 5, "config restored")
    assert get(c.admin["n3"], "/api/config")["version"] == 4
    assert "seeded" not in c.log("n1").split("starting")[-1]  # the TOML did not seed it again

    # A member with another secret cannot join, and its status and log say why.
    c.stop("n3")
    c.start("n3", secret="a-different-secret-0123456789")
    wait_for(lambda: c.status("n3")["cluster"].get("auth_error") is not None, 10, "auth error on n3")
    cluster = c.status("n3")["cluster"]
    assert "check [cluster].secret" in cluster["auth_error"]
    assert cluster["quorum"] is False and not any(m["reachable"] for m in cluster["members"])
    assert "cannot authenticate with peers" in c.log("n3")
    shown = halb("status", "--admin", f"127.0.0.1:{c.admin['n3']}", token=None)
    assert "cannot authenticate with peers" in " ".join(shown.stdout.split())
    # the balancers keep their quorum (2 of 3) and see the failing handshakes
    wait_for(lambda: c.status("n1")["cluster"].get("auth_warning") is not None, 10, "warning on n1")
    assert c.status("n1")["cluster"]["quorum"] is True
    ok = halb("backends", "undrain", "app", "web1", "--admin", f"127.0.0.1:{c.admin['n1']}")
    assert ok.returncode == 0, ok.stderr


def test_a_raft_thread_that_never_ends_does_not_hang_the_stopping_process() -> None:
    # pysyncobj's destroy_synchronous() joins its tick thread. Should that thread never end, the stop
    # gives up after its timeout and the process still exits (it used to wait in the loop's executor,
    # whose threads Python joins at exit).
    code = (
        "import asyncio, threading\n"
        "from halb.cluster import raft\n"
        "class Stuck:\n"
        "    def destroy_synchronous(self):\n"
        "        threading.Event().wait()\n"
        "asyncio.run(raft._destroy(Stuck(), 0.2))\n"
        "print('stopped')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stderr
    assert "did not stop within" in done.stderr
