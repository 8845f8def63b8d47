"""`halb lab ...`: the whole cluster on one machine, in Linux network namespaces.

How this works: a thin click layer over `halb.lab.control`; every command takes `--prefix` (default
`halb`), names hosts by their lab name (lb1, web2, redis, client, witness) and turns `LabError` into a
one-line message and exit status 1. Everything but `config` needs root.

    halb lab up [--lbs 2] [--backends 2] [--witness]      build, start, wait until every service answers
                [--no-vrrp] [--advert-interval 1.0]       (and, with VRRP, until one balancer holds the VIP)
    halb lab status [--json]                              hosts, pids, running/stopped/frozen, VIP holders
    halb lab kill|stop|start|freeze|thaw NODE             SIGKILL / SIGTERM / restart / SIGSTOP / SIGCONT
    halb lab partition lb1 --from client web1             cut traffic at the switch (no --from: from all)
    halb lab heal                                         remove every partition
    halb lab exec client -- curl -s http://10.99.0.11/    run a command inside a host's namespace
    halb lab failover --rounds 10 [--rate 20] [--json]    SIGKILL the VIP holder under traffic, time it
    halb lab config lb1 [--subnet S --vrrp-interface I]   print a balancer's generated config
    halb lab down                                         remove everything (works after a crash too)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from halb.lab import control
from halb.lab.netns import LabError
from halb.lab.topology import ADMIN_PORT, DEFAULT_PREFIX, DEFAULT_SUBNET, LISTEN_PORT, TopologyError

F = TypeVar("F", bound=Callable[..., Any])

prefix_option = click.option(
    "--prefix",
    default=DEFAULT_PREFIX,
    show_default=True,
    envvar="HALB_LAB_PREFIX",
    help="Lab name: namespaces are <prefix>-<host>, state in /run/halb-lab/<prefix>/.",
)


def lab_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (LabError, TopologyError) as exc:
            click.echo(f"halb lab: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group()
def lab() -> None:
    """The whole cluster on one machine, in Linux network namespaces (needs root)."""


@lab.command()
@prefix_option
@click.option("--lbs", default=2, show_default=True, help="Number of balancer nodes (lb1..).")
@click.option("--backends", default=2, show_default=True, help="Number of web backends (web1..).")
@click.option("--witness", is_flag=True, help="Add a `witness` host: a Raft vote, no proxy, no VIP.")
@click.option(
    "--vrrp/--no-vrrp", default=True, show_default=True, help="Run VRRP: the balancers share the VIP."
)
@click.option(
    "--advert-interval",
    type=click.FloatRange(0.01, 40.95),
    default=1.0,
    show_default=True,
    help="VRRP advert interval in seconds (whole centiseconds); failover takes about 3.5 of them.",
)
@click.option("--subnet", default=DEFAULT_SUBNET, show_default=True, help="The lab's /24.")
@click.option("--timeout", default=control.READY_TIMEOUT, show_default=True, help="Seconds to wait.")
@click.option(
    "--sentinel",
    is_flag=True,
    help="Redis HA: add a replica (redis2) and a Sentinel host; the balancers use the Sentinel.",
)
@lab_errors
def up(
    prefix: str,
    lbs: int,
    backends: int,
    witness: bool,
    vrrp: bool,
    advert_interval: float,
    subnet: str,
    timeout: float,
    sentinel: bool,
) -> None:
    """Build the lab, start every service and wait until each one answers (and one lb holds the VIP)."""
    started = time.monotonic()
    st = control.up(
        prefix,
        lbs,
        backends,
        witness,
        vrrp,
        subnet,
        timeout,
        click.echo,
        advert_interval=advert_interval,
        sentinel=sentinel,
    )
    topo = st.topology
    click.echo(f"lab {prefix} up in {time.monotonic() - started:.1f}s: subnet {topo.subnet}, VIP {topo.vip}")
    for host in topo.hosts:
        record = st.processes.get(host.name)
        service = f"pid {record.pid}" if record else "no service"
        click.echo(f"  {host.name:<8} {host.role:<8} {host.namespace:<16} {host.address:<15} {service}")
    lb1 = topo.by_role("lb")[0]
    client = topo.host("client").namespace
    click.echo("try:")
    port = "" if LISTEN_PORT == 80 else f":{LISTEN_PORT}"
    if vrrp:
        click.echo(f"  ip netns exec {client} curl http://{topo.vip}{port}/        (through the VIP)")
    click.echo(f"  ip netns exec {client} curl http://{lb1.address}{port}/")
    click.echo(f"  ip netns exec {client} halb status --admin {lb1.address}:{ADMIN_PORT}")
    click.echo(f"  halb lab status --prefix {prefix}    halb lab down --prefix {prefix}")
    click.echo(f"  logs and configs: {st.dir}")


@lab.command()
@prefix_option
@lab_errors
def down(prefix: str) -> None:
    """Stop every service and delete every namespace of the lab (idempotent, works after a crash)."""
    started = time.monotonic()
    control.down(prefix, echo=click.echo)
    click.echo(f"({time.monotonic() - started:.1f}s)")


@lab.command()
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@lab_errors
def status(prefix: str, as_json: bool) -> None:
    """Hosts, their services (running/stopped/frozen) and who holds the VIP."""
    doc = control.status(prefix)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    holders = ", ".join(doc["vip_holders"]) or "nobody"
    click.echo(f"lab {doc['prefix']} (since {doc['created']}): subnet {doc['subnet']}")
    click.echo(f"VIP {', '.join(doc['vips'])}: held by {holders}")
    _warn_holders(doc)
    for p in doc["partitions"]:
        click.echo(f"partition: {' '.join(p['a'])} | {' '.join(p['b'])}")
    click.echo(f"  {'HOST':<8} {'ROLE':<8} {'NAMESPACE':<16} {'ADDRESS':<15} {'PID':>7}  {'STATE':<8} VIP")
    for h in doc["hosts"]:
        pid = str(h["pid"]) if h["pid"] else "-"
        ns = h["namespace"] if h["namespace_exists"] else f"{h['namespace']}(gone)"
        vip = "yes" if h["holds_vip"] else ""
        line = f"  {h['name']:<8} {h['role']:<8} {ns:<16} {h['address']:<15} {pid:>7}  {h['state']:<8} {vip}"
        click.echo(line.rstrip())


def _warn_holders(doc: dict[str, Any]) -> None:
    """Two holders happen for real (a frozen master keeps its VIP until thawed; a partition): say why."""
    if len(doc["vip_holders"]) < 2:
        return
    frozen = [h["name"] for h in doc["hosts"] if h["holds_vip"] and h["state"] == "frozen"]
    why = f"{', '.join(frozen)} frozen: thaw it" if frozen else "partitioned balancers? try `halb lab heal`"
    click.echo(f"warning: {len(doc['vip_holders'])} balancers hold the VIP ({why})")


@lab.command()
@prefix_option
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1), help="Kills to make.")
@click.option("--rate", default=20.0, show_default=True, type=click.FloatRange(1, 1000), help="Requests/s.")
@click.option("--connect-timeout", default=0.25, show_default=True, help="Per request, seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (progress goes to stderr).")
@lab_errors
def failover(prefix: str, rounds: int, rate: float, connect_timeout: float, as_json: bool) -> None:
    """SIGKILL the VIP holder ROUNDS times under client traffic; time each takeover.

    Each round: kill the holder, time the first good answer through the VIP and count the failed
    requests, start the node again and wait until it is master again (it preempts).
    """
    from halb.lab import failover as runner

    def progress(line: str) -> None:
        click.echo(line, err=as_json)

    report = runner.run(prefix, rounds, rate, connect_timeout, echo=progress)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    from rich.console import Console

    Console().print(runner.render(report))


def _node_command(name: str, help_text: str, action: Callable[[str, str], str]) -> None:
    @lab.command(name=name, help=help_text)
    @prefix_option
    @click.argument("node")
    @lab_errors
    def command(prefix: str, node: str) -> None:
        click.echo(action(prefix, node))


def _kill(prefix: str, node: str) -> str:
    return f"{node} killed" if control.kill(prefix, node) else f"{node} was not running"


def _stop(prefix: str, node: str) -> str:
    return f"{node} stopped" if control.stop(prefix, node) else f"{node} was not running"


def _start(prefix: str, node: str) -> str:
    return f"{node} started (pid {control.start(prefix, node).pid})"


def _freeze(prefix: str, node: str) -> str:
    control.freeze(prefix, node, True)
    return f"{node} frozen (SIGSTOP)"


def _thaw(prefix: str, node: str) -> str:
    control.freeze(prefix, node, False)
    return f"{node} thawed (SIGCONT)"


_node_command("kill", "SIGKILL a host's service (its whole process group).", _kill)
_node_command("stop", "SIGTERM a host's service and wait for it to exit.", _stop)
_node_command("start", "Start a host's service again and wait until it answers.", _start)
_node_command("freeze", "SIGSTOP a host's service (it stays, silent: a hung node).", _freeze)
_node_command("thaw", "SIGCONT a frozen service.", _thaw)


@lab.command(
    context_settings={"ignore_unknown_options": True},
    short_help="Cut NODE... off from --from NODE... (default: all others).",
)
@prefix_option
@click.argument("words", nargs=-1, required=True)
@lab_errors
def partition(prefix: str, words: tuple[str, ...]) -> None:
    """Cut NODE... from the --from NODE... (default: from every other host), at the switch.

    Example: halb lab partition lb1 --from client web1
    """
    side_a: list[str] = []
    side_b: list[str] = []
    side = side_a
    for word in words:
        if word == "--from":
            side = side_b
            continue
        if word.startswith("--from="):
            side = side_b
            word = word.removeprefix("--from=")
        elif word.startswith("-"):
            raise click.UsageError(f"unknown option {word}")
        side.extend(w for w in word.split(",") if w)
    if not side_a:
        raise click.UsageError("name at least one node to cut off")
    if side is side_b and not side_b:
        raise click.UsageError("--from needs at least one node")
    others = control.partition_hosts(prefix, side_a, side_b)
    click.echo(f"partitioned: {' '.join(side_a)} | {' '.join(others)}")


@lab.command()
@prefix_option
@lab_errors
def heal(prefix: str) -> None:
    """Remove every partition."""
    click.echo("healed" if control.heal(prefix) else "no partition to heal")


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@prefix_option
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@lab_errors
def exec_(prefix: str, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside NODE's namespace (`sw` is the switch); its exit status is passed through.

    Example: halb lab exec client -- curl -s http://10.99.0.11/
    """
    control.require_root()
    namespace = control.namespace_of(prefix, node)
    argv = ["ip", "netns", "exec", namespace, *command]
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@lab.command()
@prefix_option
@click.argument("node")
@click.option("--lbs", default=2, show_default=True, help="When no lab is up: number of balancers.")
@click.option("--backends", default=2, show_default=True, help="When no lab is up: number of backends.")
@click.option("--witness", is_flag=True, help="When no lab is up: with a witness host.")
@click.option(
    "--vrrp/--no-vrrp", default=True, show_default=True, help="When no lab is up: with a [vrrp] section."
)
@click.option("--subnet", default=DEFAULT_SUBNET, show_default=True, help="When no lab is up: the /24.")
@click.option("--vrrp-interface", default=None, help="When no lab is up: [vrrp] interface (default eth0).")
@lab_errors
def config(
    prefix: str,
    node: str,
    lbs: int,
    backends: int,
    witness: bool,
    vrrp: bool,
    subnet: str,
    vrrp_interface: str | None,
) -> None:
    """Print balancer NODE's halb config (the running lab's, else generated from the options).

    Outside a lab (e.g. Vagrant): halb lab config lb1 --lbs 3 --subnet 192.168.56.0/24 --vrrp-interface eth1
    """
    text = control.config_text(prefix, node, lbs, backends, witness, vrrp, subnet, vrrp_interface)
    click.echo(text, nl=False)
