"""Network namespaces, the lab's bridge and its veth cables, driven through the `ip` command.

How this works: every change is one `ip` invocation (`run`, check=True), and a failure raises `LabError`
with the command line and ip's own message. Nothing here touches the root namespace: namespaces are made
with `ip netns add`, the bridge `br0` is created *inside* the switch namespace, and each veth pair is
created inside the switch namespace with its peer moved straight into the host namespace in the same
command (`ip -n SW link add v-web1 type veth peer name eth0 netns LAB-web1`), so no interface ever exists
in the root namespace, not even for a moment.

`in_netns(ns, fn)` runs a Python callable in a thread that has joined the namespace (`setns(2)` only
changes the calling thread), which is how the lab talks to its hosts without spawning `curl`.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import shlex
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from halb.lab.topology import BRIDGE, HOST_IF, Host

T = TypeVar("T")
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

# Inside balancer namespaces only: let the proxy bind the VIP before it arrives, and answer ARP only for
# addresses on the interface asked about, from the best local source (the usual VIP settings).
LB_SYSCTLS = {
    "net.ipv4.ip_nonlocal_bind": "1",
    "net.ipv4.conf.all.arp_ignore": "1",
    "net.ipv4.conf.all.arp_announce": "2",
}


class LabError(RuntimeError):
    """Something the lab could not do; the message says what and why."""


def run(
    argv: Sequence[str], check: bool = True, timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; with check=True a non-zero exit raises LabError."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
        )
    except FileNotFoundError:
        raise LabError(f"{argv[0]!r} is not installed (needed for: {shlex.join(argv)})") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f}s") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip() or "no output"
        raise LabError(f"`{shlex.join(argv)}` failed (exit {result.returncode}): {detail}")
    return result


# --- namespaces ---------------------------------------------------------------------------------------
def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def exists(namespace: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, namespace))


def add_namespace(namespace: str) -> None:
    run(["ip", "netns", "add", namespace])
    run(["ip", "-n", namespace, "link", "set", "lo", "up"])


def delete_namespace(namespace: str) -> bool:
    """Delete a namespace (its interfaces go with it); False if it did not exist."""
    if not exists(namespace):
        return False
    run(["ip", "netns", "delete", namespace])
    return True


def pids(namespace: str) -> list[int]:
    """Every process whose network namespace is this one."""
    if not exists(namespace):
        return []
    out = run(["ip", "netns", "pids", namespace], check=False).stdout
    return [int(word) for word in out.split() if word.isdigit()]


def sysctl(namespace: str, settings: dict[str, str]) -> None:
    run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


# --- the switch and the cables ------------------------------------------------------------------------
def add_bridge(switch_ns: str) -> None:
    run(["ip", "-n", switch_ns, "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0"])
    run(["ip", "-n", switch_ns, "link", "set", BRIDGE, "up"])


def add_cable(switch_ns: str, host: Host, prefix_len: int) -> None:
    """A veth pair: `eth0` with the host's address in its namespace, `v-<host>` on the bridge."""
    run(
        [
            "ip", "-n", switch_ns, "link", "add", host.port, "type", "veth",
            "peer", "name", HOST_IF, "netns", host.namespace,
        ]
    )  # fmt: skip
    run(["ip", "-n", switch_ns, "link", "set", host.port, "master", BRIDGE, "up"])
    run(["ip", "-n", host.namespace, "addr", "add", f"{host.address}/{prefix_len}", "dev", HOST_IF])
    run(["ip", "-n", host.namespace, "link", "set", HOST_IF, "up"])


def ipv4_addresses(namespace: str, device: str | None = None) -> list[str]:
    """IPv4 addresses (without prefix length) in a namespace, from `ip -n NS -4 -o addr show`."""
    argv = ["ip", "-n", namespace, "-4", "-o", "addr", "show"]
    if device:
        argv += ["dev", device]
    result = run(argv, check=False)
    if result.returncode != 0:
        return []
    found = []
    for line in result.stdout.splitlines():
        words = line.split()
        if "inet" in words:
            found.append(words[words.index("inet") + 1].split("/")[0])
    return found


def link_mac(namespace: str, device: str = HOST_IF) -> str | None:
    """The MAC address of `device` in `namespace`, None if there is no such link."""
    result = run(["ip", "-n", namespace, "-j", "link", "show", device], check=False)
    with contextlib.suppress(ValueError, IndexError, KeyError):
        return str(json.loads(result.stdout)[0]["address"])
    return None


# --- Python inside a namespace ------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def join_netns(namespace: str) -> None:
    """Move the calling thread into `namespace`'s network stack (setns(2) changes only this thread)."""
    path = os.path.join(NETNS_DIR, namespace)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise LabError(f"setns({path}): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def in_netns(namespace: str, fn: Callable[..., T], *args: object, timeout: float = 30.0) -> T:
    """Call fn(*args) in a fresh thread that has joined `namespace`'s network stack; return its result."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            join_netns(namespace)
            box["result"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LabError(f"call inside namespace {namespace} did not finish within {timeout:.0f}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


# --- small probes, meant to run through in_netns ------------------------------------------------------
def http_get(host: str, port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of one GET; raises OSError when nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")
