"""The limit and TLS keys of the configuration: defaults, HAProxy-like shapes, and precise errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from halb.config import load
from halb.errors import ConfigError
from tests.certs import make_cert


def config(tmp_path: Path, node: str = "", listener: str = "", pool: str = "", backend: str = "") -> Path:
    path = tmp_path / "halb.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [node]
            name = "lb1"
            {node}

            [[listeners]]
            name = "web"
            bind = "127.0.0.1:8443"
            pool = "app"
            {listener}

            [pools.app]
            backends = [{{ name = "a", address = "127.0.0.1:9001" {backend} }}]
            {pool}
            """
        )
    )
    return path


def error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    return str(info.value)


def test_defaults_mean_no_limit_and_no_tls(tmp_path: Path) -> None:
    cfg = load(config(tmp_path))
    assert cfg.node.maxconn == 0
    (lc,) = cfg.listeners
    assert (lc.maxconn, lc.maxconn_per_ip, lc.tls, lc.accept_proxy) == (0, 0, None, False)
    pool = cfg.pools["app"]
    assert (pool.maxconn, pool.maxqueue, pool.queue_timeout) == (0, 1024, None)
    assert pool.effective_queue_timeout == pool.connect_timeout
    assert pool.backends[0].maxconn is None


def test_limit_keys(tmp_path: Path) -> None:
    cfg = load(
        config(
            tmp_path,
            node="maxconn = 20000",
            listener="maxconn = 5000\nmaxconn_per_ip = 50\naccept_proxy = true",
            pool="maxconn = 100\nmaxqueue = 10\nqueue_timeout = 1.5",
            backend=", maxconn = 7",
        )
    )
    assert cfg.pools["app"].backends[0].backup is False
    assert cfg.node.maxconn == 20000
    assert (cfg.listeners[0].maxconn, cfg.listeners[0].maxconn_per_ip) == (5000, 50)
    assert cfg.listeners[0].accept_proxy is True
    pool = cfg.pools["app"]
    assert (pool.maxconn, pool.maxqueue, pool.effective_queue_timeout) == (100, 10, 1.5)
    assert pool.backends[0].maxconn == 7


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"node": "maxconn = -1"}, "node.maxconn: must be >= 0"),
        ({"listener": "maxconn_per_ip = 1.5"}, "listeners[0].maxconn_per_ip: expected an integer"),
        ({"pool": "queue_timeout = 0"}, "pools.app.queue_timeout: must be >= 0.001"),
        ({"backend": ', maxconn = "x"'}, "pools.app.backends[0].maxconn: expected an integer"),
        ({"listener": "max_conn = 3"}, "listeners[0].max_conn: unknown key"),
        ({"listener": 'accept_proxy = "v2"'}, "listeners[0].accept_proxy: expected true or false"),
        ({"backend": ", backup = 1"}, "pools.app.backends[0].backup: expected true or false"),
        ({"backend": ", backup = true"}, "pools.app.backends: every backend is a backup"),
    ],
)
def test_limit_errors_name_file_key_and_problem(tmp_path: Path, kw: dict[str, str], expected: str) -> None:
    message = error(config(tmp_path, **kw))
    assert "halb.toml" in message and expected in message


def test_tls_table(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "site")
    cfg = load(config(tmp_path, listener=f'tls = {{ cert = "{cert}", key = "{key}", min_version = "1.3" }}'))
    tls = cfg.listeners[0].tls
    assert tls is not None and (tls.cert, tls.key, tls.min_version) == (str(cert), str(key), "1.3")


def test_tls_errors_name_the_key(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "site")
    other_cert, other_key = make_cert(tmp_path, "other")

    def tls(text: str) -> str:
        return error(config(tmp_path, listener=f"tls = {{ {text} }}"))

    assert "listeners[0].tls.cert: is required" in tls(f'key = "{key}"')
    assert "listeners[0].tls.cert: must be an absolute path" in tls(f'cert = "site.crt", key = "{key}"')
    assert "does not exist" in tls(f'cert = "{tmp_path}/nope.crt", key = "{key}"')
    assert "listeners[0].tls.key: " in tls(f'cert = "{cert}", key = "{other_key}"')
    assert "does not match" in tls(f'cert = "{cert}", key = "{other_key}"')
    assert "listeners[0].tls.cert: " in tls(f'cert = "{key}", key = "{key}"')
    assert "listeners[0].tls.min_version: must be one of" in tls(
        f'cert = "{cert}", key = "{key}", min_version = "1.0"'
    )
    assert "listeners[0].tls.ciphers: " in tls(f'cert = "{cert}", key = "{key}", ciphers = "NOPE"')
    assert "listeners[0].tls.extra: unknown key" in tls(f'cert = "{cert}", key = "{key}", extra = 1')
    assert other_cert.exists()


def test_access_log_and_tunnel_timeout_keys(tmp_path: Path) -> None:
    cfg = load(config(tmp_path))
    assert (cfg.node.access_log, cfg.listeners[0].tunnel_timeout) == ("", 3600.0)
    log_path = tmp_path / "access.log"
    cfg = load(config(tmp_path, node=f'access_log = "{log_path}"', listener="tunnel_timeout = 30"))
    assert (cfg.node.access_log, cfg.listeners[0].tunnel_timeout) == (str(log_path), 30.0)
    assert load(config(tmp_path, node='access_log = "-"')).node.access_log == "-"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"access.log"', 'must be an absolute path or "-"'),
        ('"/nonexistent-dir/access.log"', "directory /nonexistent-dir does not exist"),
        ("1", "expected a string"),
    ],
)
def test_access_log_errors_name_the_key(tmp_path: Path, value: str, problem: str) -> None:
    message = error(config(tmp_path, node=f"access_log = {value}"))
    assert "halb.toml: node.access_log: " in message and problem in message


def test_send_proxy_is_for_pools_of_tcp_listeners(tmp_path: Path) -> None:
    cfg = load(config(tmp_path, listener='mode = "tcp"', pool='send_proxy = "v2"'))
    assert cfg.pools["app"].send_proxy == "v2"
    assert load(config(tmp_path)).pools["app"].send_proxy == ""
    message = error(config(tmp_path, pool='send_proxy = "v1"'))  # an HTTP listener uses the pool
    assert "listeners[0].pool: pool 'app' has send_proxy, which only TCP listeners can use" in message
    message = error(config(tmp_path, listener='mode = "tcp"', pool='send_proxy = "v3"'))
    assert "pools.app.send_proxy: must be one of '', 'v1', 'v2', got 'v3'" in message


def test_allow_and_deny_networks(tmp_path: Path) -> None:
    cfg = load(config(tmp_path, listener='allow = ["10.0.0.0/8", "2001:db8::/32"]\ndeny = ["10.6.6.6"]'))
    assert cfg.listeners[0].allow == ("10.0.0.0/8", "2001:db8::/32")
    assert cfg.listeners[0].deny == ("10.6.6.6",)
    message = error(config(tmp_path, listener='deny = ["10.0.0.0/8", "10.0.0.300"]'))
    assert "listeners[0].deny[1]: '10.0.0.300' is not an IP address or network" in message


def test_redirect_to_https_is_for_plain_http_listeners(tmp_path: Path) -> None:
    cfg = load(config(tmp_path, listener="redirect_to_https = true\nhttps_port = 8443"))
    assert (cfg.listeners[0].redirect_to_https, cfg.listeners[0].https_port) == (True, 8443)
    message = error(config(tmp_path, listener='mode = "tcp"\nredirect_to_https = true'))
    assert "listeners[0].redirect_to_https: is for plain HTTP listeners" in message
    message = error(config(tmp_path, listener="redirect_to_https = 1"))
    assert "listeners[0].redirect_to_https: expected true or false" in message


def two_pools(tmp_path: Path, listener: str) -> Path:
    path = config(tmp_path, listener=listener)
    api = '\n[pools.api]\nbackends = [{ name = "b", address = "127.0.0.1:9002" }]\n'
    path.write_text(path.read_text() + api)
    return path


def test_routes(tmp_path: Path) -> None:
    cfg = load(
        two_pools(
            tmp_path,
            'routes = [{ host = "api.example.com", pool = "api" }, '
            '{ host = "*.example.org", path_prefix = "/v2/", pool = "api" }]',
        )
    )
    lc = cfg.listeners[0]
    assert [(r.pool, r.host, r.path_prefix) for r in lc.routes] == [
        ("api", "api.example.com", ""),
        ("api", "*.example.org", "/v2/"),
    ]
    assert lc.pools == ("app", "api")


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ('[{ host = "a.example.com", pool = "nope" }]', "listeners[0].routes[0].pool: no pool named 'nope'"),
        ('[{ pool = "api" }]', "listeners[0].routes[0]: a route needs host, path_prefix or both"),
        ('[{ host = "https://a.example.com", pool = "api" }]', "listeners[0].routes[0].host: "),
        ('[{ host = "a.example.com:80", pool = "api" }]', "listeners[0].routes[0].host: "),
        ('[{ path_prefix = "api/", pool = "api" }]', "listeners[0].routes[0].path_prefix: must start with /"),
        ('[{ path_prefix = "/a b", pool = "api" }]', "listeners[0].routes[0].path_prefix: "),
        ('[{ host = "a.example.com", pool = "api", w = 2 }]', "listeners[0].routes[0].w: unknown key"),
    ],
)
def test_route_errors_name_the_key(tmp_path: Path, routes: str, expected: str) -> None:
    assert expected in error(two_pools(tmp_path, f"routes = {routes}"))


def test_a_routed_pool_cannot_send_proxy(tmp_path: Path) -> None:
    path = two_pools(tmp_path, 'routes = [{ host = "a.example.com", pool = "api" }]')
    path.write_text(path.read_text() + 'send_proxy = "v1"\n')  # (into [pools.api], the last table)
    expected = "listeners[0].routes[0].pool: pool 'api' has send_proxy, which only TCP listeners can use"
    assert expected in error(path)


def test_routes_are_for_http_listeners(tmp_path: Path) -> None:
    message = error(two_pools(tmp_path, 'mode = "tcp"\nroutes = [{ host = "a.example.com", pool = "api" }]'))
    assert "listeners[0].routes: routes choose a pool by host and path: HTTP listeners only" in message


def test_response_headers(tmp_path: Path) -> None:
    hsts = 'response_headers = { "Strict-Transport-Security" = "max-age=600" }'
    cfg = load(config(tmp_path, listener=hsts))
    assert cfg.listeners[0].response_headers == (("Strict-Transport-Security", "max-age=600"),)
    for table, problem in (
        ('{ "Bad Name" = "x" }', "listeners[0].response_headers.Bad Name: is not a valid header name"),
        ('{ "Content-Length" = "1" }', "listeners[0].response_headers.Content-Length: is set by the proxy"),
        ('{ "X-A" = "a\\nb" }', "listeners[0].response_headers.X-A: the value has a control character"),
        ('{ "X-A" = 1 }', "listeners[0].response_headers.X-A: expected a string"),
    ):
        assert problem in error(config(tmp_path, listener=f"response_headers = {table}"))
    message = error(config(tmp_path, listener='mode = "tcp"\nresponse_headers = { "X-A" = "1" }'))
    assert "listeners[0].response_headers: HTTP listeners only" in message
