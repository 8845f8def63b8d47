"""The [cluster] table: every key's errors name the file, the key and the problem; the witness shape; and
the generator's [cluster] tables for the lab (and Vagrant)."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from halb.cluster_config import ClusterSpec, node_config, witness_config
from halb.config import parse
from halb.config_model import HostPort
from halb.errors import ConfigError
from halb.lab.topology import build

BALANCER = {
    "node": {"name": "lb1", "admin": "127.0.0.1:9901"},
    "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "pool": "app"}],
    "pools": {"app": {"backends": [{"name": "a", "address": "127.0.0.1:9001"}]}},
}
CLUSTER = {
    "address": "10.0.0.1:7000",
    "peers": ["10.0.0.2:7000", "10.0.0.3:7000"],
    "secret": "0123456789abcdef-secret",
    "token": "0123456789abcdef-token",
    "data_dir": "/var/lib/halb/lb1",
}


def doc(**cluster: Any) -> dict[str, Any]:
    table = {**CLUSTER, **cluster}
    return {**BALANCER, "cluster": {k: v for k, v in table.items() if v is not None}}


def test_cluster_table_loads_with_defaults() -> None:
    config = parse(doc(), "lb1.toml")
    c = config.cluster
    assert c is not None
    assert c.address == HostPort("10.0.0.1", 7000)
    assert c.peers == (HostPort("10.0.0.2", 7000), HostPort("10.0.0.3", 7000))
    assert (c.role, c.lease_duration, c.data_dir) == ("balancer", 2.0, "/var/lib/halb/lb1")
    assert "secret" not in repr(c) and CLUSTER["secret"] not in repr(config)  # never in a log line
    assert parse(BALANCER).cluster is None  # optional


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        ({"address": None}, "cluster.address", "is required"),
        ({"address": "10.0.0.1"}, "cluster.address", "HOST:PORT"),
        ({"address": "lb1.example:7000"}, "cluster.address", "must be an IP address"),
        ({"peers": "10.0.0.2:7000"}, "cluster.peers", "array of strings"),
        ({"peers": ["10.0.0.1:7000"]}, "cluster.peers[0]", "own cluster.address"),
        ({"peers": ["10.0.0.2:7000", "10.0.0.2:7000"]}, "cluster.peers[1]", "listed twice"),
        ({"peers": ["10.0.0.2:99999"]}, "cluster.peers[0]", "outside 1..65535"),
        ({"secret": None}, "cluster.secret", "is required"),
        ({"secret": "short"}, "cluster.secret", "at least 16"),
        ({"token": None}, "cluster.token", "is required"),
        ({"token": "short"}, "cluster.token", "at least 16"),
        ({"token": CLUSTER["secret"]}, "cluster.token", "must differ"),
        ({"data_dir": None}, "cluster.data_dir", "is required"),
        ({"data_dir": "var/lib/halb"}, "cluster.data_dir", "absolute"),
        ({"data_dir": "/etc/hostname"}, "cluster.data_dir", "not a directory"),
        ({"role": "leader"}, "cluster.role", "'balancer', 'witness'"),
        ({"lease_duration": 0.2}, "cluster.lease_duration", ">= 1.0"),
        ({"lease_duration": "2s"}, "cluster.lease_duration", "number of seconds"),
        ({"tocken": "x"}, "cluster.tocken", "unknown key"),
        ({"address": "127.0.0.1:9901"}, "cluster.address", "also node.admin"),
        ({"address": "127.0.0.1:8080"}, "listeners[0].bind", "also cluster.address"),
    ],
)
def test_every_key_error_names_file_key_and_problem(change: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(doc(**change), "lb1.toml")
    assert info.value.file == "lb1.toml"
    assert info.value.key == key
    assert problem in info.value.problem


def test_a_witness_needs_no_listeners_pools_or_vrrp() -> None:
    witness = {"node": {"name": "w"}, "cluster": {**CLUSTER, "role": "witness"}}
    config = parse(witness, "w.toml")
    assert config.cluster is not None and config.cluster.is_witness
    assert (config.listeners, config.pools, config.vrrp) == ((), {}, None)
    for key, value in [
        ("listeners", BALANCER["listeners"]),
        ("pools", BALANCER["pools"]),
        ("vrrp", {"interface": "eth0", "vrid": 1, "virtual_ips": ["10.0.0.100"]}),
    ]:
        with pytest.raises(ConfigError) as info:
            parse({**witness, key: value}, "w.toml")
        assert info.value.key == key and "witness" in info.value.problem
    with pytest.raises(ConfigError) as info:  # a balancer still needs its pools
        parse({"node": {"name": "lb1"}, "cluster": CLUSTER}, "lb1.toml")
    assert info.value.key == "pools"


def test_generated_cluster_tables_form_one_cluster_with_the_witness() -> None:
    spec = build("halb", lbs=2, backends=2, witness=True).cluster_spec()
    configs = {n: parse(tomllib.loads(node_config(spec, n)), n) for n in ("lb1", "lb2", "witness")}
    members = {n: c.cluster for n, c in configs.items()}
    assert all(m is not None for m in members.values())
    addresses = {n: m.address for n, m in members.items() if m is not None}
    assert addresses == {
        "lb1": HostPort("10.99.0.11", 7000),
        "lb2": HostPort("10.99.0.12", 7000),
        "witness": HostPort("10.99.0.240", 7000),
    }
    for name, member in members.items():
        assert member is not None
        assert set(member.peers) == set(addresses.values()) - {addresses[name]}
        assert member.secret == spec.secret and member.token == spec.token
        assert member.data_dir == f"/var/lib/halb/{name}"
    assert members["witness"] is not None and members["witness"].role == "witness"
    assert configs["witness"].listeners == () and configs["witness"].vrrp is None
    assert configs["lb1"].vrrp is not None and configs["lb1"].pools
    assert witness_config(spec) == node_config(spec, "witness")


def test_generator_without_cluster_or_witness() -> None:
    spec = build("halb", lbs=1, backends=1).cluster_spec()
    solo = parse(tomllib.loads(node_config(spec, "lb1")), "lb1").cluster
    assert solo is not None and solo.peers == ()  # a one-member cluster
    off = ClusterSpec(lbs=spec.lbs, backends=spec.backends, vip=spec.vip, cluster=False)
    assert "cluster" not in tomllib.loads(node_config(off, "lb1"))
    with pytest.raises(KeyError, match="no witness"):
        witness_config(spec)


def test_the_lab_runs_halb_serve_on_the_witness(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from halb.lab import control, processes

    topo = build("halb", lbs=2, backends=1, witness=True)
    argv = processes.service_argv(topo.host("witness"), tmp_path / "witness.toml")
    assert argv is not None and argv[-4:] == ["serve", str(tmp_path / "witness.toml"), "--log-level", "INFO"]
    assert processes.service_argv(topo.host("client"), None) is None
    monkeypatch.setenv("HALB_LAB_RUN", str(tmp_path / "run"))
    spec = control.lab_spec(topo, vrrp=True)
    assert spec.data_dir == str(tmp_path / "run" / "halb" / "raft")  # gone with `halb lab down`
    text = control.config_text("halb", "witness", 2, 1, True, True)  # no lab up: for hosts outside it
    witness = parse(tomllib.loads(text), "witness").cluster
    assert witness is not None and witness.role == "witness" and witness.data_dir == "/var/lib/halb/witness"
