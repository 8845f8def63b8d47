"""The lab's pure parts: topology, generated node configs, partition rules, root check (no namespaces)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from halb.cluster_config import BackendSpec, ClusterSpec, NodeSpec, all_node_configs, node_config
from halb.config import parse
from halb.lab import control, partition
from halb.lab.cli import lab
from halb.lab.netns import LabError
from halb.lab.topology import Topology, TopologyError, build


def test_topology_names_and_addresses() -> None:
    topo = build("halb", lbs=3, backends=2, witness=True)
    assert [h.name for h in topo.hosts] == ["lb1", "lb2", "lb3", "web1", "web2", "redis", "witness", "client"]
    assert topo.host("lb1").namespace == "halb-lb1"
    assert topo.host("lb1").address == "10.99.0.11"
    assert topo.host("web2").address == "10.99.0.52"
    assert topo.host("client").port == "v-client"
    assert topo.switch_namespace == "halb-sw"
    assert topo.namespaces[0] == "halb-sw"
    assert topo.vip == "10.99.0.100"
    addresses = [h.address for h in topo.hosts] + [topo.vip]
    assert len(set(addresses)) == len(addresses)
    assert all(len(h.port) <= 15 for h in topo.hosts)  # IFNAMSIZ
    assert Topology.from_dict(topo.to_dict()) == topo


def test_topology_without_witness_and_other_subnet() -> None:
    topo = build("ht1", lbs=1, backends=1, subnet="10.98.7.0/24")
    assert [h.name for h in topo.hosts] == ["lb1", "web1", "redis", "client"]
    assert topo.host("redis").address == "10.98.7.200"
    with pytest.raises(TopologyError, match="no host 'lb2'"):
        topo.host("lb2")


@pytest.mark.parametrize("prefix", ["", "Halb", "ha-lb", "1lab", "a" * 13, "x y"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(TopologyError, match="prefix"):
        build(prefix)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(TopologyError, match="--lbs"):
        build(lbs=0)
    with pytest.raises(TopologyError, match="--backends"):
        build(backends=50)
    with pytest.raises(TopologyError, match="/24"):
        build(subnet="10.0.0.0/16")


def test_every_generated_config_loads_today() -> None:
    spec = build("halb", lbs=3, backends=3, witness=True).cluster_spec()
    configs = all_node_configs(spec)
    assert sorted(configs) == ["lb1", "lb2", "lb3"]
    for name, text in configs.items():
        config = parse(tomllib.loads(text), f"<{name}>")
        assert config.node.name == name
        assert str(config.node.admin) == f"{spec.lb(name).address}:9901"
        (listener,) = config.listeners
        assert (str(listener.bind), listener.pool, listener.mode) == ("0.0.0.0:80", "app", "http")
        pool = config.pools["app"]
        assert [b.name for b in pool.backends] == ["web1", "web2", "web3"]
        assert str(pool.backends[0].address) == "10.99.0.51:80"
        assert (pool.health.kind, pool.health.path) == ("http", "/healthz")
        assert (pool.health.interval, pool.health.timeout) == (0.5, 0.3)
        assert config.vrrp is not None  # VRRP is on by default
        assert (config.vrrp.interface, config.vrrp.vrid) == ("eth0", 51)
        assert config.vrrp.priority == spec.priority(name)
        assert config.vrrp.virtual_ips == ("10.99.0.100/32",)


def test_vrrp_section_unless_switched_off() -> None:
    spec = ClusterSpec(
        lbs=(NodeSpec("a", "192.168.56.11"), NodeSpec("b", "192.168.56.12")),
        backends=(BackendSpec("w", "192.168.56.21", 8080),),
        vip="192.168.56.100",
        vrrp=True,
        algorithm="least_connections",
    )
    docs = {n: tomllib.loads(node_config(spec, n)) for n in ("a", "b")}
    assert docs["a"]["vrrp"] == {
        "interface": "eth0",
        "vrid": 51,
        "priority": 150,
        "advert_interval": 1.0,
        "virtual_ips": ["192.168.56.100"],
    }
    assert docs["b"]["vrrp"]["priority"] == 140
    assert docs["a"]["pools"]["app"]["algorithm"] == "least_connections"
    assert docs["a"]["pools"]["app"]["backends"][0]["address"] == "192.168.56.21:8080"
    off = dataclasses.replace(spec, vrrp=False)
    assert "vrrp" not in tomllib.loads(node_config(off, "a"))


def test_cluster_spec_validation() -> None:
    lb = NodeSpec("lb1", "10.0.0.1")
    web = BackendSpec("web1", "10.0.0.2")
    with pytest.raises(ValueError, match="duplicate"):
        ClusterSpec(lbs=(lb, NodeSpec("lb1", "10.0.0.3")), backends=(web,), vip="10.0.0.9")
    with pytest.raises(ValueError):
        ClusterSpec(lbs=(lb,), backends=(web,), vip="not-an-ip")
    with pytest.raises(KeyError, match="no balancer node named 'web1'"):
        node_config(ClusterSpec(lbs=(lb,), backends=(web,), vip="10.0.0.9"), "web1")


def test_partition_rules_cut_both_directions() -> None:
    assert partition.rules(["v-lb1"], ["v-client", "v-web1"]) == [
        'add rule bridge halb_lab forward iifname "v-lb1" oifname "v-client" counter drop',
        'add rule bridge halb_lab forward iifname "v-client" oifname "v-lb1" counter drop',
        'add rule bridge halb_lab forward iifname "v-lb1" oifname "v-web1" counter drop',
        'add rule bridge halb_lab forward iifname "v-web1" oifname "v-lb1" counter drop',
    ]
    with pytest.raises(LabError, match="both sides"):
        partition.rules(["v-lb1"], ["v-lb1"])


def test_refuses_to_run_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control.os, "geteuid", lambda: 1000)
    for args in (["up", "--prefix", "nobody"], ["down"], ["status"], ["kill", "lb1"], ["heal"]):
        result = CliRunner().invoke(lab, args)
        assert result.exit_code == 1, (args, result.output)
        assert "halb lab needs root" in result.output


def test_config_command_needs_no_lab_and_no_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HALB_LAB_RUN", "/nonexistent/halb-lab")
    monkeypatch.setattr(control.os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(lab, ["config", "lb2", "--lbs", "3", "--backends", "1"])
    assert result.exit_code == 0, result.output
    config = parse(tomllib.loads(result.output))
    assert config.node.name == "lb2"
    assert [b.name for b in config.pools["app"].backends] == ["web1"]
    result = CliRunner().invoke(lab, ["config", "client"])
    assert result.exit_code == 1
    assert "only balancers" in result.output


def test_supervisor_reports_the_service_pid_and_passes_its_status_on(tmp_path: Path) -> None:
    pid_file = tmp_path / "svc.pid"
    argv = [sys.executable, "-m", "halb.lab.supervise", "--pid-file", str(pid_file), "--"]
    done = subprocess.run([*argv, "sh", "-c", "exit 3"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert "service pid" in done.stdout and "status 3" in done.stdout
    pid, starttime = (int(x) for x in pid_file.read_text().split())
    assert pid > 0 and starttime > 0
    # a SIGKILLed service: the supervisor survives it (own session) and reports 128 + 9
    proc = subprocess.Popen([*argv, "sleep", "30"], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not pid_file.exists() or pid_file.read_text().split()[0] == str(pid):
        assert time.monotonic() < deadline, "no pid file"
        time.sleep(0.01)
    os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 137 and "signal 9" in out


def test_vip_release_without_a_vrrp_section_or_with_a_bad_config(tmp_path: Path) -> None:
    from halb.cli import main

    spec = build("halb", lbs=1, backends=1).cluster_spec()
    path = tmp_path / "lb1.toml"
    path.write_text(node_config(dataclasses.replace(spec, vrrp=False), "lb1"))
    result = CliRunner().invoke(main, ["vip", "release", str(path)])
    assert result.exit_code == 0 and "no [vrrp] section" in result.output
    path.write_text("[node]\n")
    result = CliRunner().invoke(main, ["vip", "release", str(path)])
    assert result.exit_code == 2 and "config error" in result.output
