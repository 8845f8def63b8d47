"""`halb serve` as a real process in front of real backend processes on loopback."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, report
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def node_config(
    admin: int,
    listen: int,
    backends: list[tuple[str, int, int]],
    algorithm: str = "round_robin",
    health: str = '{ kind = "http", path = "/healthz", interval = 0.1, timeout = 0.08, rise = 3, fall = 2 }',
    extra_pool: str = "",
    workers: int = 1,
    mode: str = "http",
    drain_timeout: float = 5.0,
    backups: tuple[str, ...] = (),
) -> str:
    rows = ",\n".join(
        f'  {{ name = "{name}", address = "127.0.0.1:{port}", weight = {weight}'
        + (", backup = true }" if name in backups else " }")
        for name, port, weight in backends
    )
    return f"""
[node]
name = "test"
admin = "127.0.0.1:{admin}"
workers = {workers}
drain_timeout = {drain_timeout}

[[listeners]]
name = "web"
bind = "127.0.0.1:{listen}"
mode = "{mode}"
pool = "app"

[pools.app]
algorithm = "{algorithm}"
backends = [
{rows}
]
health = {health}
{extra_pool}
"""


def get(port: int, path: str = "/", headers: dict[str, str] | None = None, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def status(admin: int) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=2) as r:
        return json.loads(r.read())


def backend_status(admin: int, name: str) -> dict:  # type: ignore[type-arg]
    (pool,) = status(admin)["pools"]
    return next(b for b in pool["backends"] if b["name"] == name)


def start_backends(processes: Processes, names: list[str], *extra: str) -> dict[str, int]:
    ports = {name: free_port() for name in names}
    for name, port in ports.items():
        processes.backend(name, port, *extra)
    return ports


# --- spread per algorithm --------------------------------------------------------------------------------

SPREAD_CASES = {
    # algorithm: (weights, hash_key, expected share per backend or None when only checked loosely)
    "round_robin": ([1, 1, 1], None, [1 / 3, 1 / 3, 1 / 3]),
    "weighted_round_robin": ([1, 2, 3], None, [1 / 6, 2 / 6, 3 / 6]),
    "least_connections": ([1, 1, 1], None, [1 / 3, 1 / 3, 1 / 3]),
    "weighted_least_connections": ([1, 2, 3], None, None),
    "ip_hash": ([1, 1, 1], "header:X-User", None),
    "consistent_hash": ([1, 1, 1], "header:X-User", None),
    "least_response_time": ([1, 1, 1], None, None),
    "random": ([1, 1, 2], None, [1 / 4, 1 / 4, 2 / 4]),
    "power_of_two_choices": ([1, 1, 1], None, None),
    "least_bandwidth": ([1, 1, 1], None, None),
    "custom_load": ([1, 1, 1], None, None),
}


@pytest.mark.parametrize("algorithm", sorted(SPREAD_CASES))
def test_spread_per_algorithm(processes: Processes, algorithm: str) -> None:
    weights, hash_key, expected = SPREAD_CASES[algorithm]
    names = ["web1", "web2", "web3"]
    ports = {name: free_port() for name in names}
    loads = {"web1": "0.9", "web2": "0.5", "web3": "0.1"}
    for name, port in ports.items():
        extra = ("--load", loads[name]) if algorithm == "custom_load" else ()
        processes.backend(name, port, *extra)
    admin, listen = free_port(), free_port()
    extra_pool = f'hash_key = "{hash_key}"\n' if hash_key else ""
    if algorithm == "custom_load":
        extra_pool += 'agent = { path = "/load", interval = 0.1, timeout = 0.08 }\n'
    config = node_config(
        admin,
        listen,
        [(n, ports[n], w) for n, w in zip(names, weights, strict=True)],
        algorithm,
        extra_pool=extra_pool,
    )
    processes.node(config, admin)
    if algorithm == "custom_load":  # wait until every agent reported
        wait_for(lambda: all(b["load"] is not None for b in status(admin)["pools"][0]["backends"]))

    total = 600
    seen: Counter[str] = Counter()
    per_user: dict[str, set[str]] = {}
    conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
    for i in range(total):
        user = f"user-{i % 50}"
        conn.request("GET", "/", headers={"X-User": user})
        response = conn.getresponse()
        body = response.read().decode().strip()
        assert response.status == 200, body
        seen[body] += 1
        per_user.setdefault(user, set()).add(body)
    conn.close()

    shares = [seen[n] / total for n in names]
    report(
        "halb: spread per algorithm (600 requests, 3 backends)",
        f"{algorithm:28s} weights {weights} -> "
        + ", ".join(f"{n}={seen[n]:3d} ({s:.1%})" for n, s in zip(names, shares, strict=True)),
    )
    assert sum(seen.values()) == total
    if expected is not None:
        for share, want in zip(shares, expected, strict=True):
            assert abs(share - want) < (0.02 if algorithm != "random" else 0.07), (shares, expected)
    if hash_key:
        assert all(len(backends) == 1 for backends in per_user.values()), "a user moved between backends"
        assert len(seen) >= 2, "50 users should spread over more than one backend"
    if algorithm == "weighted_least_connections":
        assert seen["web3"] >= seen["web1"]
    if algorithm == "custom_load":
        assert seen["web3"] > seen["web2"] > seen["web1"], seen
    if algorithm in ("least_response_time", "least_bandwidth", "power_of_two_choices"):
        assert len(seen) == 3, f"{algorithm} never tried a backend: {seen}"
    # the node's own counters agree with what the client saw
    st = status(admin)["pools"][0]["backends"]
    wait_for(
        lambda: sum(b["requests_total"] for b in status(admin)["pools"][0]["backends"]) == total, timeout=3
    )
    assert {b["name"]: b["requests_total"] for b in status(admin)["pools"][0]["backends"]} == {
        n: seen[n] for n in names
    }
    assert all(b["healthy"] for b in st)


def test_least_response_time_prefers_fast_backend(processes: Processes) -> None:
    ports = {"fast": free_port(), "slow": free_port()}
    processes.backend("fast", ports["fast"])
    processes.backend("slow", ports["slow"], "--delay", "0.05")
    admin, listen = free_port(), free_port()
    processes.node(
        node_config(admin, listen, [(n, p, 1) for n, p in ports.items()], "least_response_time"), admin
    )
    seen: Counter[str] = Counter()
    for _ in range(100):
        seen[get(listen)[1].decode().strip()] += 1
    report(
        "halb: spread per algorithm (600 requests, 3 backends)",
        f"least_response_time fast vs 50 ms-slow backend -> {dict(seen)}",
    )
    assert seen["fast"] > 4 * seen["slow"], seen


# --- health, failure and recovery ----------------------------------------------------------------------


class Load:
    """Steady client traffic from threads; records (time, ok, detail) per request."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.results: list[tuple[float, bool, str]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read().decode().strip()
                ok = response.status == 200
                detail = body if ok else f"{response.status} {body}"
            except (OSError, http.client.HTTPException) as exc:
                ok, detail = False, repr(exc)
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                self.results.append((t, ok, detail))
            time.sleep(0.002)
        if conn is not None:
            conn.close()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


def test_backend_killed_under_load_then_recovers(processes: Processes) -> None:
    names = ["web1", "web2", "web3"]
    ports = {name: free_port() for name in names}
    procs = {name: processes.backend(name, port) for name, port in ports.items()}
    admin, listen = free_port(), free_port()
    rise, fall, interval = 5, 3, 0.1
    health = (
        f'{{ kind = "http", path = "/healthz", interval = {interval}, timeout = 0.08, '
        f"rise = {rise}, fall = {fall} }}"
    )
    processes.node(node_config(admin, listen, [(n, p, 1) for n, p in ports.items()], health=health), admin)

    with Load(listen) as load:
        time.sleep(0.5)
        killed_at = time.monotonic()
        procs["web2"].kill()
        procs["web2"].wait()
        detection = wait_for(lambda: not backend_status(admin, "web2")["healthy"], timeout=5)
        detected_at = killed_at + detection
        time.sleep(1.0)
        restarted_at = time.monotonic()
        procs["web2"] = processes.backend("web2", ports["web2"])
        recovery = wait_for(lambda: backend_status(admin, "web2")["healthy"], timeout=10)
        time.sleep(0.5)
    failures_after_detection = [r for r in load.results if not r[1] and r[0] > detected_at]
    failures = [r for r in load.results if not r[1]]
    after_recovery = Counter(r[2] for r in load.results if r[1] and r[0] > restarted_at + recovery + 0.1)
    report(
        "halb: backend killed under load",
        f"{len(load.results)} requests, {len(failures)} failed in total "
        f"(in flight at the kill), 0 allowed after detection: {len(failures_after_detection)}; "
        f"detected down in {detection:.2f}s, back up {recovery:.2f}s after restart "
        f"(rise={rise}, interval={interval}s)",
    )
    assert failures_after_detection == [], failures_after_detection[:5]
    assert len(failures) <= 4, failures[:5]  # at most the requests in flight at the kill (4 client threads)
    # recovery needs `rise` consecutive successes: never faster than (rise - 1) intervals (jitter 10%)
    assert recovery >= (rise - 1) * interval * 0.9 - 0.05
    assert after_recovery["web2"] > 0, after_recovery
    web2 = backend_status(admin, "web2")
    assert web2["healthy"] and web2["connect_failures_total"] >= 0
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2).read().decode()
    assert 'halb_backend_up{backend="web2",node="test",pool="app"} 1.0' in metrics
    assert "halb_backend_requests_total{" in metrics


def test_down_backend_visible_in_status_and_metrics(processes: Processes) -> None:
    ports = start_backends(processes, ["web1"])
    dead = free_port()
    admin, listen = free_port(), free_port()
    processes.node(node_config(admin, listen, [("web1", ports["web1"], 1), ("dead", dead, 1)]), admin)
    wait_for(lambda: not backend_status(admin, "dead")["healthy"], timeout=5)
    for _ in range(10):
        assert get(listen)[1] == b"web1\n"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2).read().decode()
    assert 'halb_backend_up{backend="dead",node="test",pool="app"} 0.0' in metrics
    assert 'halb_pool_healthy_backends{node="test",pool="app"} 1.0' in metrics
    health = backend_status(admin, "dead")["health"]
    assert health, "status carries the health checker's view"


def test_no_healthy_backend_gives_clear_503_without_hanging(processes: Processes) -> None:
    admin, listen = free_port(), free_port()
    processes.node(node_config(admin, listen, [("gone", free_port(), 1)]), admin)
    wait_for(lambda: not backend_status(admin, "gone")["healthy"], timeout=5)
    start = time.monotonic()
    code, body, _ = get(listen, timeout=5)
    assert code == 503
    assert b"no healthy backend" in body
    assert time.monotonic() - start < 1.0

    def answered_503_as_no_backend() -> bool:
        # The worker learns the health state up to 50 ms after /status shows it; until then its connect
        # fails and it also answers 503 (connect retries exhausted), counted elsewhere.
        assert get(listen, timeout=5)[0] == 503
        return status(admin)["pools"][0]["no_backend_total"] >= 1

    wait_for(answered_503_as_no_backend, timeout=3, interval=0.1)


def test_forwarded_headers_and_request_id(processes: Processes) -> None:
    ports = start_backends(processes, ["web1"])
    admin, listen = free_port(), free_port()
    processes.node(node_config(admin, listen, [("web1", ports["web1"], 1)]), admin)
    code, body, headers = get(listen, "/headers", {"X-Forwarded-For": "203.0.113.9"})
    seen = json.loads(body)
    assert code == 200
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert len(seen["x-request-id"]) >= 16
    assert {k.lower(): v for k, v in headers.items()}["x-request-id"] == seen["x-request-id"]
    _, body, _ = get(listen, "/headers", {"X-Request-ID": "abc-123"})
    assert json.loads(body)["x-request-id"] == "abc-123"


def test_tcp_listener(processes: Processes) -> None:
    ports = start_backends(processes, ["web1", "web2"])
    admin, listen = free_port(), free_port()
    processes.node(node_config(admin, listen, [(n, p, 1) for n, p in ports.items()], mode="tcp"), admin)
    seen = Counter(get(listen)[1].decode().strip() for _ in range(20))
    assert seen == {"web1": 10, "web2": 10}


def test_sigterm_drains_in_flight_requests(processes: Processes) -> None:
    ports = start_backends(processes, ["web1"])
    admin, listen = free_port(), free_port()
    node = processes.node(node_config(admin, listen, [("web1", ports["web1"], 1)], workers=2), admin)
    result: dict[str, object] = {}

    def slow_request() -> None:
        result["response"] = get(listen, "/slow?ms=1000", timeout=10)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    node.send_signal(signal.SIGTERM)
    thread.join(timeout=10)
    assert node.wait(timeout=10) == 0
    code, body, _ = result["response"]  # type: ignore[misc]
    assert (code, body) == (200, b"web1\n")
    with pytest.raises(OSError):
        get(listen, timeout=1)


def test_worker_processes_share_the_port_and_restart(processes: Processes) -> None:
    ports = start_backends(processes, ["web1"])
    admin, listen = free_port(), free_port()
    processes.node(node_config(admin, listen, [("web1", ports["web1"], 1)], workers=2), admin)
    workers = status(admin)["node"]["workers"]
    assert len(workers) == 2 and all(w["alive"] for w in workers)
    os.kill(workers[0]["pid"], signal.SIGKILL)
    wait_for(lambda: status(admin)["node"]["worker_restarts_total"] == 1, timeout=5)
    wait_for(lambda: len(status(admin)["node"]["workers"]) == 2, timeout=5)
    for _ in range(20):
        assert get(listen)[0] == 200


def test_config_error_exits_non_zero_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[node]\nname = "x"\nworkers = 0\n[pools.app]\nbackends = [{name="a", address="127.0.0.1:1"}]\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "halb", "serve", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert f"{path}: node.workers: must be >= 1" in proc.stderr


def test_bind_conflict_exits_non_zero(processes: Processes, tmp_path: Path) -> None:
    ports = start_backends(processes, ["web1"])
    admin, listen = free_port(), free_port()
    processes.node(node_config(admin, listen, [("web1", ports["web1"], 1)]), admin)
    path = tmp_path / "second.toml"
    path.write_text(
        node_config(free_port(), free_port(), [("web1", ports["web1"], 1)]).replace(str(admin), str(admin))
    )
    clash = node_config(admin, free_port(), [("web1", ports["web1"], 1)])
    path.write_text(clash)
    proc = subprocess.run(
        [sys.executable, "-m", "halb", "serve", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert "admin" in proc.stderr


def test_halb_status_renders_table_and_json(processes: Processes) -> None:
    ports = start_backends(processes, ["web1", "web2"])
    admin, listen = free_port(), free_port()
    processes.node(node_config(admin, listen, [(n, p, 1) for n, p in ports.items()]), admin)
    for _ in range(4):
        get(listen)
    cli = [sys.executable, "-m", "halb", "status", "--admin", f"127.0.0.1:{admin}"]
    table = subprocess.run(
        cli, capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "160"}
    )
    assert table.returncode == 0, table.stderr
    for text in ("web1", "web2", "UP", "round_robin", "pool app"):
        assert text in table.stdout
    doc = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30).stdout)
    assert doc["node"]["name"] == "test"
    both = subprocess.run(
        [*cli, "--admin", f"127.0.0.1:{free_port()}", "--json"], capture_output=True, text=True, timeout=30
    )
    docs = json.loads(both.stdout)
    assert len(docs) == 2 and "error" in docs[1] and both.returncode == 0


def test_a_backup_backend_serves_only_while_the_others_are_down(processes: Processes) -> None:
    ports = {name: free_port() for name in ("web1", "sorry")}
    procs = {name: processes.backend(name, port) for name, port in ports.items()}
    admin, listen = free_port(), free_port()
    backends = [("web1", ports["web1"], 1), ("sorry", ports["sorry"], 1)]
    processes.node(node_config(admin, listen, backends, backups=("sorry",)), admin)
    assert backend_status(admin, "sorry")["backup"] is True
    shown = subprocess.run(
        [sys.executable, "-m", "halb", "status", "--admin", f"127.0.0.1:{admin}"],
        capture_output=True,
        text=True,
        timeout=10,
        env={**os.environ, "COLUMNS": "160"},
    ).stdout
    assert "sorry (backup)" in shown, shown
    assert {get(listen)[1] for _ in range(10)} == {b"web1\n"}  # the backup idles while web1 is up
    procs["web1"].kill()
    procs["web1"].wait()
    # Once the worker knows web1 is down (a request in between may still try web1 and get a 503, as
    # with HAProxy, whose backups too wait for the others to be marked down), the backup answers.
    wait_for(lambda: get(listen)[1] == b"sorry\n", timeout=5)
    assert not backend_status(admin, "web1")["healthy"]
    assert {get(listen)[1] for _ in range(10)} == {b"sorry\n"}
    processes.backend("web1", ports["web1"])
    wait_for(lambda: get(listen)[1] == b"web1\n", timeout=10)
    assert {get(listen)[1] for _ in range(10)} == {b"web1\n"}  # and hands back at once
