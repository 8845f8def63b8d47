"""Prometheus exposition of a node's status document (prometheus-client, collected at scrape time)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        doc = self._status()
        node = doc["node"]["name"]
        up = GaugeMetricFamily(
            "halb_backend_up", "1 if the backend passes its health checks", labels=["node", "pool", "backend"]
        )
        weight = GaugeMetricFamily(
            "halb_backend_weight", "Configured weight", labels=["node", "pool", "backend"]
        )
        draining = GaugeMetricFamily(
            "halb_backend_draining", "1 while draining", labels=["node", "pool", "backend"]
        )
        active = GaugeMetricFamily(
            "halb_backend_active_connections",
            "In-flight requests (HTTP) or open connections (TCP)",
            labels=["node", "pool", "backend"],
        )
        requests = CounterMetricFamily(
            "halb_backend_requests", "Requests completed", labels=["node", "pool", "backend"]
        )
        failures = CounterMetricFamily(
            "halb_backend_connect_failures",
            "Failed connects to the backend",
            labels=["node", "pool", "backend"],
        )
        sent = CounterMetricFamily(
            "halb_backend_sent_bytes", "Bytes sent to the backend", labels=["node", "pool", "backend"]
        )
        received = CounterMetricFamily(
            "halb_backend_received_bytes",
            "Bytes received from the backend",
            labels=["node", "pool", "backend"],
        )
        rt = GaugeMetricFamily(
            "halb_backend_response_time_ewma_seconds",
            "EWMA of the response time",
            labels=["node", "pool", "backend"],
        )
        bw = GaugeMetricFamily(
            "halb_backend_bandwidth_bytes_per_second",
            "Decaying average throughput",
            labels=["node", "pool", "backend"],
        )
        healthy = GaugeMetricFamily(
            "halb_pool_healthy_backends", "Backends able to take traffic", labels=["node", "pool"]
        )
        no_backend = CounterMetricFamily(
            "halb_pool_no_backend",
            "Requests answered 503 because no backend was available",
            labels=["node", "pool"],
        )
        for pool in doc["pools"]:
            p = pool["name"]
            healthy.add_metric([node, p], pool["healthy_backends"])
            no_backend.add_metric([node, p], pool["no_backend_total"])
            for b in pool["backends"]:
                labels = [node, p, b["name"]]
                up.add_metric(labels, 1 if b["healthy"] else 0)
                weight.add_metric(labels, b["weight"])
                draining.add_metric(labels, 1 if b["draining"] else 0)
                active.add_metric(labels, b["active_connections"])
                requests.add_metric(labels, b["requests_total"])
                failures.add_metric(labels, b["connect_failures_total"])
                sent.add_metric(labels, b["bytes"]["to_backend"])
                received.add_metric(labels, b["bytes"]["from_backend"])
                if b["response_time_ewma_ms"] is not None:
                    rt.add_metric(labels, b["response_time_ewma_ms"] / 1000)
                bw.add_metric(labels, b["bandwidth_bytes_per_second"])
        yield from (
            up,
            weight,
            draining,
            active,
            requests,
            failures,
            sent,
            received,
            rt,
            bw,
            healthy,
            no_backend,
        )

        listener_families: dict[str, Metric] = {}
        for listener in doc["listeners"]:
            for key, value in listener.items():
                if key in ("name", "bind", "mode", "pool") or not isinstance(value, int | float):
                    continue
                if isinstance(value, bool):
                    continue
                if key.endswith("_total"):
                    family = listener_families.setdefault(
                        key,
                        CounterMetricFamily(
                            f"halb_listener_{key[: -len('_total')]}", key, labels=["node", "listener"]
                        ),
                    )
                else:
                    family = listener_families.setdefault(
                        key, GaugeMetricFamily(f"halb_listener_{key}", key, labels=["node", "listener"])
                    )
                family.add_metric([node, listener["name"]], value)
        yield from listener_families.values()

        info = GaugeMetricFamily("halb_node_info", "Node identity", labels=["node", "version", "state"])
        info.add_metric([node, doc["node"]["version"], doc["node"]["state"]], 1)
        yield info
        restarts = CounterMetricFamily(
            "halb_worker_restarts", "Proxy workers restarted after dying", labels=["node"]
        )
        restarts.add_metric([node], doc["node"]["worker_restarts_total"])
        yield restarts


def render(status: Callable[[], dict[str, Any]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return generate_latest(registry)
