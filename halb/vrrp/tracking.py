"""VRRP tracking, keepalived's ``track_script`` with a weight, as a pure class.

How this works: the composition root (``halb.node``) names each thing that must be fine for this node to
serve -- ``pool:app`` ("the listener's pool has an available backend"), ``listener:web`` ("a local TCP
connect to the listener succeeds") -- and reports each one's state with :meth:`Tracking.set`. While every
check is fine the effective priority is the configured one; while any fails it is ``priority - weight``,
never below 1 (the VRRP driver then calls ``VrrpMachine.set_priority``: a MASTER advertises the lower
priority at once and a BACKUP with a higher priority takes over after its Master_Down_Timer).

The weight must exceed the priority gap: with lb1 at 150 and lb2 at 140, lb1 only hands the VIP over if
``150 - weight < 140``, i.e. ``weight > 10`` (keepalived's rule for ``weight`` on a tracked script). With
``weight = 0`` a failing check means FAULT instead, as in keepalived: the instance resigns completely
(priority-0 advert, VIPs dropped) until every check is fine again.

A check reported with ``fault=True`` means FAULT when it fails whatever the weight: the link of the VRRP
interface (``interface:eth0``, ``halb.vrrp.link``), as keepalived puts an instance whose interface is down
in FAULT.

Checks nobody has reported yet count as fine.
"""

from __future__ import annotations

__all__ = ["Tracking"]


class Tracking:
    def __init__(self, base_priority: int, weight: int) -> None:
        if not 1 <= base_priority <= 255:
            raise ValueError(f"base_priority must be 1..255, got {base_priority}")
        if not 0 <= weight <= 254:
            raise ValueError(f"weight must be 0..254, got {weight}")
        self.base_priority = base_priority
        self.weight = weight
        self._checks: dict[str, bool] = {}
        self._fault_checks: set[str] = set()  # failing means FAULT, whatever the weight

    def set(self, check: str, ok: bool, *, fault: bool = False) -> bool:
        """Record one check's state; True when "can serve" or FAULT (and so the priority) changed."""
        before = (self.ok, self.fault)
        self._checks[check] = ok
        if fault:
            self._fault_checks.add(check)
        return (self.ok, self.fault) != before

    @property
    def ok(self) -> bool:
        return all(self._checks.values())

    @property
    def failing(self) -> list[str]:
        return sorted(name for name, ok in self._checks.items() if not ok)

    @property
    def checks(self) -> dict[str, bool]:
        return dict(self._checks)

    @property
    def fault(self) -> bool:
        """keepalived's FAULT state: weight 0 and something fails, or a fault check fails."""
        if self.weight == 0:
            return not self.ok
        return any(not self._checks[check] for check in self._fault_checks)

    @property
    def effective_priority(self) -> int:
        if self.ok or self.weight == 0:
            return self.base_priority
        return max(1, self.base_priority - self.weight)
