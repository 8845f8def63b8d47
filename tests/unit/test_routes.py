"""Content switching: which pool a request goes to (halb.proxy.routes.Router), pure."""

from __future__ import annotations

from halb.config_model import BackendConfig, HealthConfig, HostPort, PoolConfig, RouteConfig
from halb.pool import Pool
from halb.proxy.http_codec import parse_request_head
from halb.proxy.routes import PoolRoute, Router


def route_to(name: str) -> PoolRoute:
    backend = BackendConfig(f"{name}-1", HostPort("127.0.0.1", 9000))
    return PoolRoute(Pool(PoolConfig(name=name, backends=(backend,), health=HealthConfig(kind="none"))))


APP, API, STATIC, V2 = route_to("app"), route_to("api"), route_to("static"), route_to("v2")
ROUTER = Router(
    APP,
    [
        (RouteConfig(pool="api", host="api.example.com"), API),
        (RouteConfig(pool="static", path_prefix="/static/"), STATIC),
        (RouteConfig(pool="v2", host="*.example.org", path_prefix="/v2/"), V2),
    ],
)


def pool_for(target: str, host: str | None) -> str:
    head = f"GET {target} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "") + "\r\n"
    minor_head = head if host is not None else head.replace("HTTP/1.1", "HTTP/1.0")
    return ROUTER.route(parse_request_head(minor_head.encode())).pool.name


def test_host_matches_exactly_without_case_or_port() -> None:
    assert pool_for("/", "api.example.com") == "api"
    assert pool_for("/x?y=1", "API.Example.COM:8443") == "api"
    assert pool_for("/", "www.api.example.com") == "app"  # exact, not a suffix
    assert pool_for("/", "api.example.com.evil") == "app"


def test_path_prefix_on_the_path_without_query_and_first_match_wins() -> None:
    assert pool_for("/static/logo.png", "www.example.com") == "static"
    assert pool_for("/static", "www.example.com") == "app"  # "/static/" is the prefix
    assert pool_for("/img?u=/static/", "www.example.com") == "app"  # the query is not the path
    assert pool_for("/static/x", "api.example.com") == "api"  # the api route comes first
    assert pool_for("http://www.example.com/static/x", "www.example.com") == "static"  # absolute form


def test_wildcard_host_and_path_both_have_to_hold() -> None:
    assert pool_for("/v2/items", "shop.example.org") == "v2"
    assert pool_for("/v2/items", "a.b.example.org:80") == "v2"
    assert pool_for("/v1/items", "shop.example.org") == "app"
    assert pool_for("/v2/items", "example.org") == "app"  # "*.example.org" means a name below it


def test_no_host_goes_to_the_default_and_a_router_without_routes_is_the_default() -> None:
    assert pool_for("/static/x", None) == "static"  # (HTTP/1.0 without Host: only path routes apply)
    assert pool_for("/", None) == "app"
    plain = Router(APP)
    assert plain.route(parse_request_head(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")) is APP
