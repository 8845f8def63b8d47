"""The `halb` command line: serve, check, status, backends, config, vip release, demo-backend, lab."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys

import click

from halb import __version__
from halb.errors import ConfigError


@click.group()
@click.version_option(__version__, prog_name="halb")
def main() -> None:
    """halb: a high-availability load-balancer cluster."""


def _load_or_exit(path: str):  # type: ignore[no-untyped-def]
    from halb.config import load

    try:
        return load(path)
    except ConfigError as exc:
        click.echo(f"halb: config error: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--log-level", default="WARNING", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
def serve(config_path: str, log_level: str) -> None:
    """Run a node: proxy workers, health checks and the admin API, until SIGTERM."""
    config = _load_or_exit(config_path)
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s {config.node.name} %(levelname)s %(name)s: %(message)s",
    )
    from halb.node import Node

    async def run() -> int:
        return await Node(config, log_level=log_level).run()

    sys.exit(asyncio.run(run()))


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
def check(config_path: str) -> None:
    """Validate a configuration file and exit (0 = valid, 2 = invalid)."""
    config = _load_or_exit(config_path)
    backends = sum(len(p.backends) for p in config.pools.values())
    cluster = ""
    if config.cluster is not None:
        c = config.cluster
        cluster = f", cluster member {c.address} ({c.role}, {len(c.peers)} peer(s))"
    click.echo(
        f"{config_path}: valid: node {config.node.name}, {len(config.listeners)} listener(s), "
        f"{len(config.pools)} pool(s), {backends} backend(s){cluster}"
    )


@main.command()
@click.option(
    "--admin",
    "admins",
    multiple=True,
    default=["127.0.0.1:9901"],
    show_default=True,
    help="HOST:PORT of a node's admin API; repeat to show several nodes side by side.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status documents as JSON.")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for each node.")
def status(admins: tuple[str, ...], as_json: bool, timeout: float) -> None:
    """Show nodes' listeners, pools and backends (exit 1 if no node answers).

    With --json: one node prints its status object; several print a JSON list of them.
    """
    from concurrent.futures import ThreadPoolExecutor

    from halb.status_view import fetch_status, render

    with ThreadPoolExecutor(max_workers=min(len(admins), 16)) as pool:
        docs = list(pool.map(lambda a: fetch_status(a, timeout), admins))
    if as_json:
        click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        render(docs)
    if all("error" in d for d in docs):
        sys.exit(1)


@main.command("demo-backend")
@click.argument("name")
@click.option("--listen", default="127.0.0.1:9001", show_default=True, help="HOST:PORT to listen on.")
@click.option("--load", type=float, default=None, help="Report this CPU load on /load (custom_load agent).")
@click.option("--delay", type=float, default=0.0, help="Seconds to wait before answering.")
def demo_backend(name: str, listen: str, load: float | None, delay: float) -> None:
    """A tiny HTTP backend that answers with its NAME (for demos, tests and the lab)."""
    from halb.config import parse_host_port
    from halb.demo_backend import DemoBackend

    address = parse_host_port(listen)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(DemoBackend(name, address.host, address.port, load, delay).serve_forever())


@main.group()
def vip() -> None:
    """Virtual addresses of the [vrrp] section, outside a running node."""


@vip.command("release")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
def vip_release(config_path: str) -> None:
    """Remove the configured VIPs from the [vrrp] interface (idempotent).

    Meant as the service manager's ExecStopPost: whatever way `halb serve` ended (SIGKILL included),
    the node stops answering for the VIPs. With the VIP lease ([cluster], vip_lease) and `halb serve`
    stopped: first the kernel fence is closed, then the VIPs go, the fence's nft tables are deleted,
    and a live member (cluster.admin_peers) is asked to release this node's lease, so a peer takes the
    VIP over at once (at most ~1.5 s; a failure is reported, the lease then simply expires). Exit 0 when
    no VIP is left (also without [vrrp]), 1 on a netlink error, 2 on a config error.
    """
    config = _load_or_exit(config_path)
    if config.vrrp is None:
        click.echo(f"{config_path}: no [vrrp] section, nothing to release")
        return
    cluster = config.cluster
    if cluster is None or cluster.is_witness or not cluster.vip_lease:
        release_vips(config.vrrp.interface, config.vrrp.virtual_ips)
        return
    from halb.cluster.handoff import node_stopped, release_via_peers
    from halb.vrrp.fence import FenceError, release_fence_sync

    with node_stopped(cluster.data_dir) as stopped:
        if not stopped:
            click.echo(f"halb serve still runs ({cluster.data_dir} is locked): its lease and fence stay")
            release_vips(config.vrrp.interface, config.vrrp.virtual_ips)
            return
        with contextlib.suppress(FenceError):  # no tables: nothing was open
            release_fence_sync(close_only=True)
        release_vips(config.vrrp.interface, config.vrrp.virtual_ips)  # exits 1 if a VIP may be left
        admins = [str(a) for a in cluster.admin_peers]
        outcome = release_via_peers(admins, cluster.token, config.node.name)
        click.echo(outcome.describe(config.node.name), err=outcome.released is None)
        try:
            release_fence_sync()  # the tables go last: the element is gone already, the takeover waits not
        except FenceError as exc:
            click.echo(f"halb vip release: fence: {exc}", err=True)


def release_vips(interface: str, virtual_ips: tuple[str, ...]) -> None:
    """`halb vip release` proper (the lab's supervisor calls it in-process)."""
    from halb.vrrp.vip import VipError, release_stale

    try:
        removed = asyncio.run(release_stale(interface, virtual_ips))  # plain asyncio: pyroute2 needs it
    except VipError as exc:
        click.echo(f"halb vip release: {exc}", err=True)
        sys.exit(1)
    if removed:
        click.echo(f"released {', '.join(removed)} from {interface}")
    else:
        click.echo(f"no VIP of {', '.join(virtual_ips)} was on {interface}")


# --- the cluster's shared configuration, through any node's admin API --------------------------------
admin_option = click.option(
    "--admin",
    default="127.0.0.1:9901",
    show_default=True,
    envvar="HALB_ADMIN",
    help="HOST:PORT of any cluster node's admin API (env HALB_ADMIN).",
)
token_option = click.option(
    "--token",
    envvar="HALB_TOKEN",
    default=None,
    help="The cluster.token, for changes (env HALB_TOKEN).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")


def _call(admin: str, method: str, path: str, body: dict | None = None, token: str | None = None):  # type: ignore[no-untyped-def,type-arg]
    from halb.admin_client import AdminError, request

    try:
        return request(admin, method, path, body, token)
    except AdminError as exc:
        click.echo(f"halb: {exc}", err=True)
        sys.exit(1)


def _changed(doc: dict, as_json: bool) -> None:  # type: ignore[type-arg]
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    result = doc.get("result", {})
    backend = result.get("backend")
    what = f"backend {backend['name']} ({backend['address']}, weight {backend['weight']}" if backend else ""
    if backend:
        what += ", draining)" if backend.get("draining") else ")"
    click.echo(
        f"pool {result.get('pool')}: {what or 'changed'}; configuration version {result.get('version')} "
        f"(committed via {doc.get('node')})"
    )


@main.group()
def backends() -> None:
    """Backends of the cluster's shared configuration (needs [cluster]; changes need the token)."""


@backends.command("list")
@admin_option
@click.option("--pool", default=None, help="Only this pool.")
@json_option
def backends_list(admin: str, pool: str | None, as_json: bool) -> None:
    """List every pool's backends as the cluster has them."""
    doc = _call(admin, "GET", "/api/config")
    pools = {k: v for k, v in doc.get("pools", {}).items() if pool is None or k == pool}
    if pool is not None and not pools:
        click.echo(f"halb: no pool {pool!r} (pools: {', '.join(sorted(doc.get('pools', {})))})", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(pools, indent=2))
        return
    from halb.status_view import render_shared_pools

    render_shared_pools(pools, doc.get("version"))


@backends.command("add")
@click.argument("pool")
@click.argument("name")
@click.argument("address", metavar="HOST:PORT")
@click.option("--weight", type=click.IntRange(0, 256), default=1, show_default=True)
@click.option("--drain", "draining", is_flag=True, help="Add it draining (no new traffic).")
@click.option("--agent", default=None, metavar="HOST:PORT", help="custom_load agent address.")
@admin_option
@token_option
@json_option
def backends_add(
    pool: str,
    name: str,
    address: str,
    weight: int,
    draining: bool,
    agent: str | None,
    admin: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Add backend NAME at HOST:PORT to POOL (every node applies it within a second)."""
    body = {"name": name, "address": address, "weight": weight, "draining": draining}
    if agent:
        body["agent"] = agent
    _changed(_call(admin, "POST", f"/api/pools/{pool}/backends", body, token), as_json)


@backends.command("remove")
@click.argument("pool")
@click.argument("name")
@admin_option
@token_option
@json_option
def backends_remove(pool: str, name: str, admin: str, token: str | None, as_json: bool) -> None:
    """Remove backend NAME from POOL (the last one cannot go: drain it instead)."""
    _changed(_call(admin, "DELETE", f"/api/pools/{pool}/backends/{name}", None, token), as_json)


def _set_backend(pool: str, name: str, fields: dict, admin: str, token: str | None, as_json: bool) -> None:  # type: ignore[type-arg]
    _changed(_call(admin, "PUT", f"/api/pools/{pool}/backends/{name}", fields, token), as_json)


@backends.command("drain")
@click.argument("pool")
@click.argument("name")
@admin_option
@token_option
@json_option
def backends_drain(pool: str, name: str, admin: str, token: str | None, as_json: bool) -> None:
    """Stop sending NEW traffic to NAME (existing connections finish)."""
    _set_backend(pool, name, {"draining": True}, admin, token, as_json)


@backends.command("undrain")
@click.argument("pool")
@click.argument("name")
@admin_option
@token_option
@json_option
def backends_undrain(pool: str, name: str, admin: str, token: str | None, as_json: bool) -> None:
    """Send traffic to NAME again."""
    _set_backend(pool, name, {"draining": False}, admin, token, as_json)


@backends.command("weight")
@click.argument("pool")
@click.argument("name")
@click.argument("weight", type=click.IntRange(0, 256))
@admin_option
@token_option
@json_option
def backends_weight(pool: str, name: str, weight: int, admin: str, token: str | None, as_json: bool) -> None:
    """Set NAME's weight (0..256; 0 takes no new traffic)."""
    _set_backend(pool, name, {"weight": weight}, admin, token, as_json)


@main.group("config")
def config_group() -> None:
    """The cluster's shared configuration."""


@config_group.command("show")
@admin_option
@json_option
def config_show(admin: str, as_json: bool) -> None:
    """Print the shared configuration (pools, backends), members and leases as a node has them."""
    doc = _call(admin, "GET", "/api/config")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    from halb.status_view import render_shared_config

    render_shared_config(doc)


from halb.lab.cli import lab  # noqa: E402

main.add_command(lab)
