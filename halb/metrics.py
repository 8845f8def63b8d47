"""Prometheus exposition of a node's status document (prometheus-client, collected at scrape time)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from halb import state_report

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# Listener counters kept by label in the status document -> (metric name, label, help).
LABELLED_LISTENER_COUNTERS = {
    "responses": ("halb_listener_responses", "code_class", "Responses sent to clients, by status class"),
    "bad_requests": (
        "halb_listener_bad_requests",
        "reason",
        "Client requests refused as malformed, too large, too slow or smuggling-shaped, by reason",
    ),
    "rejected": (
        "halb_listener_rejected_connections",
        "limit",
        "Client connections refused by a limit, the allow/deny lists or a bad PROXY header, by limit",
    ),
}


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
                if isinstance(value, dict) and key in LABELLED_LISTENER_COUNTERS:
                    name, label, help_text = LABELLED_LISTENER_COUNTERS[key]
                    family = listener_families.setdefault(
                        key, CounterMetricFamily(name, help_text, labels=["node", "listener", label])
                    )
                    for label_value, count in sorted(value.items()):
                        family.add_metric([node, listener["name"], str(label_value)], count)
                    continue
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
        access_log = doc.get("access_log")
        if access_log is not None:
            for key, help_text in (
                ("lines_total", "Access log lines written"),
                ("dropped_lines_total", "Access log lines lost (the file could not be opened or written)"),
            ):
                family = CounterMetricFamily(
                    f"halb_access_log_{key[: -len('_total')]}", help_text, labels=["node"]
                )
                family.add_metric([node], access_log[key])
                yield family
        yield from _vrrp_metrics(node, doc.get("vrrp"))
        yield from state_report.metrics(node, doc.get("state"))  # [state]: degraded, fallbacks, 429s


VRRP_STATES = ("MASTER", "BACKUP", "FAULT", "STOP", "INIT")


def _vrrp_metrics(node: str, vrrp: dict[str, Any] | None) -> Iterator[Metric]:
    """One set of series per VRRP instance of `doc["vrrp"]["instances"]` (nothing without [vrrp])."""
    if not vrrp:
        return
    labels = ["node", "instance", "vrid"]
    state = GaugeMetricFamily(
        "halb_vrrp_state", "1 for the instance's current VRRP state", labels=[*labels, "state"]
    )
    master = GaugeMetricFamily("halb_vrrp_master", "1 while this node is the VRRP master", labels=labels)
    priority = GaugeMetricFamily("halb_vrrp_priority", "Effective (tracked) VRRP priority", labels=labels)
    base = GaugeMetricFamily("halb_vrrp_base_priority", "Configured VRRP priority", labels=labels)
    held = GaugeMetricFamily("halb_vrrp_vips_held", "Virtual addresses on the interface", labels=labels)
    age = GaugeMetricFamily(
        "halb_vrrp_last_advert_age_seconds", "Seconds since the last advert from a peer", labels=labels
    )
    sent = CounterMetricFamily("halb_vrrp_adverts_sent", "VRRP adverts sent", labels=labels)
    received = CounterMetricFamily(
        "halb_vrrp_adverts_received", "Valid VRRP adverts received from peers", labels=labels
    )
    rx_errors = CounterMetricFamily(
        "halb_vrrp_rx_errors", "Received VRRP packets dropped, by reason", labels=[*labels, "reason"]
    )
    transitions = CounterMetricFamily("halb_vrrp_transitions", "VRRP state changes", labels=labels)
    for inst in vrrp.get("instances", []):
        values = [node, str(inst["name"]), str(inst["vrid"])]
        for name in VRRP_STATES:
            state.add_metric([*values, name], 1 if inst["state"] == name else 0)
        master.add_metric(values, 1 if inst["state"] == "MASTER" else 0)
        priority.add_metric(values, inst["priority"])
        base.add_metric(values, inst["base_priority"])
        held.add_metric(values, len(inst["vips_held"]))
        if inst.get("last_advert"):
            age.add_metric(values, inst["last_advert"]["at_seconds_ago"])
        sent.add_metric(values, inst["adverts_sent"])
        received.add_metric(values, inst["adverts_received"])
        for reason, count in sorted(inst["rx_errors"].items()):
            rx_errors.add_metric([*values, reason], count)
        transitions.add_metric(values, inst["transitions"])
    yield from (state, master, priority, base, held, age, sent, received, rx_errors, transitions)


def render(status: Callable[[], dict[str, Any]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return generate_latest(registry)
