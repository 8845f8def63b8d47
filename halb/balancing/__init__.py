"""Balancing policies: one module per algorithm, each registering itself by its config name.

How this works: importing this package imports every policy module; each module's class is decorated with
`@register`, which files it in the registry under its `name`. `make_policy(name, backends)` then builds the
policy a pool's `algorithm` names, and `policy_names()` lists them all.
"""

from __future__ import annotations

from halb.balancing import (
    consistent_hash,
    custom_load,
    ip_hash,
    least_bandwidth,
    least_connections,
    least_response_time,
    power_of_two_choices,
    random_choice,
    round_robin,
    weighted_least_connections,
    weighted_round_robin,
)
from halb.balancing.base import Context, Policy, make_policy, policy_names

__all__ = [
    "Context",
    "Policy",
    "consistent_hash",
    "custom_load",
    "ip_hash",
    "least_bandwidth",
    "least_connections",
    "least_response_time",
    "make_policy",
    "policy_names",
    "power_of_two_choices",
    "random_choice",
    "round_robin",
    "weighted_least_connections",
    "weighted_round_robin",
]
