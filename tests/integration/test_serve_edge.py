"""`halb serve` at the front door: bad input and limits show in /status and /metrics; TLS with SIGHUP."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest

from tests.certs import make_cert, peer_common_name
from tests.conftest import Processes, free_port
from tests.integration.test_serve import status, wait_for

pytestmark = pytest.mark.integration


def config(admin: int, listen: int, backend: int, listener: str = "", pool: str = "", node: str = "") -> str:
    return f"""
[node]
name = "edge"
admin = "127.0.0.1:{admin}"
workers = 1
drain_timeout = 2.0
{node}

[[listeners]]
name = "web"
bind = "127.0.0.1:{listen}"
pool = "app"
header_timeout = 0.5
max_request_line = 512
max_header_bytes = 2048
{listener}

[pools.app]
backends = [{{ name = "web1", address = "127.0.0.1:{backend}" }}]
health = {{ kind = "tcp", interval = 0.2, timeout = 0.1 }}
{pool}
"""


def exchange(port: int, data: bytes, *, shut: bool = False, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the proxy closes; the answer (possibly empty)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


def metrics(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as r:
        return r.read().decode()


def web(admin: int) -> dict:  # type: ignore[type-arg]
    return next(lc for lc in status(admin)["listeners"] if lc["name"] == "web")


def test_bad_input_and_limits_are_counted_in_status_and_metrics(processes: Processes) -> None:
    backend, admin, listen = free_port(), free_port(), free_port()
    processes.backend("web1", backend)
    processes.node(config(admin, listen, backend, listener="maxconn_per_ip = 3"), admin)

    assert exchange(listen, b"GET / HTTP/1.1\r\nHost: t\r\n").startswith(b"HTTP/1.1 408 ")  # slowloris
    assert exchange(listen, b"GET /" + b"a" * 600 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414 ")
    big = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 3000 + b"\r\n\r\n"
    assert exchange(listen, big).startswith(b"HTTP/1.1 431 ")
    smuggle = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc"
    assert exchange(listen, smuggle).startswith(b"HTTP/1.1 400 ")
    assert exchange(listen, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(listen, b"GET / HTTP/1.1\r\nHo", shut=True).startswith(b"HTTP/1.1 400 ")

    held = [socket.create_connection(("127.0.0.1", listen), timeout=5) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        answer = exchange(listen, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"maxconn_per_ip" in answer
    finally:
        for sock in held:
            sock.close()

    def counted() -> bool:
        lc = web(admin)
        return (
            lc.get("rejected", {}).get("maxconn_per_ip") == 1
            and sum(lc.get("bad_requests", {}).values()) >= 6
        )

    wait_for(counted, timeout=10)
    lc = web(admin)
    assert lc["bad_requests"] == {
        "timeout": 1,
        "line_too_long": 1,
        "head_too_large": 1,
        "smuggling": 1,
        "bad_request_line": 1,
        "incomplete": 1,
    }
    text = metrics(admin)
    for reason in (
        "timeout",
        "line_too_long",
        "head_too_large",
        "smuggling",
        "bad_request_line",
        "incomplete",
    ):
        assert f'halb_listener_bad_requests_total{{listener="web",node="edge",reason="{reason}"}} 1.0' in text
    assert (
        'halb_listener_rejected_connections_total{limit="maxconn_per_ip",listener="web",node="edge"} 1.0'
        in text
    )
    assert 'halb_listener_responses_total{code_class="4xx",listener="web",node="edge"} 6.0' in text
    assert "halb_listener_connections_limit{" in text


def test_backend_maxconn_queue_shows_in_metrics(processes: Processes) -> None:
    backend, admin, listen = free_port(), free_port(), free_port()
    processes.backend("web1", backend, "--delay", "2.0")
    processes.node(
        config(admin, listen, backend, pool="maxconn = 1\nmaxqueue = 1\nqueue_timeout = 1.0"), admin
    )
    socks: list[socket.socket] = []

    def send() -> None:  # (a connection is opened only when used: an idle one times out after 0.5 s)
        sock = socket.create_connection(("127.0.0.1", listen), timeout=5)
        socks.append(sock)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")

    try:
        # In order: the first is served (2 s), the second queues (1 s, then 503), the third finds it full.
        send()
        wait_for(lambda: web(admin).get("in_flight") == 1, timeout=5)
        send()
        wait_for(lambda: web(admin).get("queued") == 1, timeout=5)
        send()
        answers = [sock.recv(4096) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert answers[0].startswith(b"HTTP/1.1 200 ")
    assert answers[1].startswith(b"HTTP/1.1 503 ") and b"queue timeout" in answers[1]
    assert answers[2].startswith(b"HTTP/1.1 503 ") and b"queue is full" in answers[2]
    wait_for(lambda: web(admin).get("queue_full_total") == 1 == web(admin).get("queue_timeouts_total"), 5)
    lc = web(admin)
    assert lc["queue_timeouts_total"] == 1 and lc["queued_total"] == 1
    text = metrics(admin)
    assert 'halb_listener_queue_timeouts_total{listener="web",node="edge"} 1.0' in text
    assert 'halb_listener_queue_full_total{listener="web",node="edge"} 1.0' in text


def test_tls_listener_reloads_its_certificate_on_sighup(processes: Processes, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    old_cert, old_key = make_cert(tmp_path, "old-cert")
    new_cert, new_key = make_cert(tmp_path, "new-cert")
    cert, key = live / "tls.crt", live / "tls.key"
    cert.write_bytes(old_cert.read_bytes())
    key.write_bytes(old_key.read_bytes())
    ctx = ssl.create_default_context(cadata=old_cert.read_text() + new_cert.read_text())

    backend, admin, listen = free_port(), free_port(), free_port()
    processes.backend("web1", backend)
    node = processes.node(
        config(admin, listen, backend, listener=f'tls = {{ cert = "{cert}", key = "{key}" }}'), admin
    )

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", listen), timeout=5)
        return ctx.wrap_socket(raw, server_hostname="localhost")

    def get(sock: ssl.SSLSocket, path: str) -> bytes:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        return sock.recv(65536)

    def cn(sock: ssl.SSLSocket) -> str:
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return peer_common_name(der)

    kept = connect()
    try:
        assert cn(kept) == "old-cert"
        assert get(kept, "/1").startswith(b"HTTP/1.1 200 ")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        os.kill(node.pid, signal.SIGHUP)

        def new_cert_served() -> bool:
            with connect() as sock:
                return cn(sock) == "new-cert"

        wait_for(new_cert_served, timeout=10)
        assert get(kept, "/2").startswith(b"HTTP/1.1 200 ")  # the old connection survived the reload
        assert node.poll() is None
        wait_for(lambda: web(admin).get("tls_reloads_total") == 1, timeout=5)
        with connect() as sock:
            response = get(sock, "/3")
        assert response.startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", listen), timeout=5) as plain:  # no TLS: fails
            plain.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert plain.recv(100) == b""
        wait_for(lambda: web(admin).get("tls_handshake_failures_total") == 1, timeout=5)
        assert 'halb_listener_tls_handshake_failures_total{listener="web",node="edge"} 1.0' in metrics(admin)
    finally:
        kept.close()


def test_access_log_is_shared_by_the_workers_and_reopened_on_sighup(
    processes: Processes, tmp_path: Path
) -> None:
    """Both workers append to the one file (each holds it open; all lines land whole), and after a
    rotation and SIGHUP both write to the new file."""
    log_path = tmp_path / "access.log"
    backend, admin, listen = free_port(), free_port(), free_port()
    processes.backend("web1", backend)
    text = config(admin, listen, backend, node=f'access_log = "{log_path}"')
    node = processes.node(text.replace("workers = 1", "workers = 2"), admin)

    def get(path: str) -> bytes:
        return exchange(listen, f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())

    def logged(path: Path) -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    workers = [str(w["pid"]) for w in status(admin)["node"]["workers"]]
    assert len(workers) == 2 and all(writes_to(pid, log_path) for pid in workers)
    for i in range(6):  # spread over both workers by the kernel (SO_REUSEPORT)
        assert get(f"/before/{i}").startswith(b"HTTP/1.1 200 ")
    wait_for(lambda: len(logged(log_path)) == 6, timeout=5)  # written within a second
    assert all(" web app/web1 " in line and '"GET /before/' in line for line in logged(log_path))
    wait_for(lambda: status(admin).get("access_log", {}).get("lines_total") == 6, timeout=5)
    assert status(admin)["access_log"] == {"path": str(log_path), "lines_total": 6, "dropped_lines_total": 0}
    assert 'halb_access_log_lines_total{node="edge"} 6.0' in metrics(admin)

    rotated = tmp_path / "access.log.1"
    log_path.rename(rotated)  # logrotate, then its postrotate: kill -HUP
    os.kill(node.pid, signal.SIGHUP)

    wait_for(lambda: all(writes_to(pid, log_path) for pid in workers), timeout=5)  # the new inode
    for i in range(4):
        assert get(f"/after/{i}").startswith(b"HTTP/1.1 200 ")
    wait_for(lambda: len(logged(log_path)) == 4, timeout=5)
    assert all('"GET /after/' in line for line in logged(log_path))
    assert len(logged(rotated)) == 6


def writes_to(pid: str, path: Path) -> bool:
    """Process `pid` has `path` open (its current inode: a renamed file shows under its new name)."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False
