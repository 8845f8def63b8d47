"""The VRRPv3 state machine of RFC 5798 section 6.4 (kept in RFC 9568), as a pure class.

Theory of operation
===================

:class:`VrrpMachine` holds the protocol state of one virtual router (one VRID) on one host. It does no
I/O and never reads a clock: the driver feeds it *events*, each carrying ``now`` (seconds, float, from
any monotonic clock, never going backwards), and every event method returns a list of *actions* for the
driver to carry out **in list order**. Between events the driver keeps exactly one timer armed at
:meth:`VrrpMachine.next_deadline` (``None``: no timer), re-reading it after every call, and calls
:meth:`VrrpMachine.timer_fired` when it expires. Calling ``timer_fired`` early or twice is harmless
(it does nothing before the deadline), so a driver may also simply poll it.

States
------

``INITIALIZE``
    Not participating: before :meth:`~VrrpMachine.startup` and after :meth:`~VrrpMachine.shutdown`.
    No timer, VIPs not held.
``BACKUP``
    Monitoring the Master. The timer is the *Master_Down_Timer*; VIPs not held.
``MASTER``
    Forwarding for the virtual router. The timer is the *Adver_Timer*; VIPs held.

Timers (RFC 5798 section 6.1)
-----------------------------

* ``Advertisement_Interval`` = ``config.advert_interval`` (sent in adverts, in centiseconds).
* ``Master_Adver_Interval``: the interval learned from the Master's adverts while in BACKUP (reset to
  our own ``Advertisement_Interval`` on startup).
* ``Skew_Time = ((256 - priority) * Master_Adver_Interval) / 256`` (the current, possibly tracked
  priority; keepalived uses the effective priority too).
* ``Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time``.

Transition table
----------------

"advert" means an advert for our VRID with a non-zero Max Adver Int whose source is not our own
``primary_ip`` (anything else is ignored in every state: adverts looped back to us, other VRIDs, and a
zero interval, which would shrink Master_Down_Interval to Skew_Time). "Greater" addresses compare as
32-bit numbers. ``P`` is our current priority, ``p`` the advert's; "owner" means ``P == 255``.

=========== ================================= =========================================== ===========
state       event                             actions                                     next state
=========== ================================= =========================================== ===========
INITIALIZE  startup, owner                    SendAdvert(P), AddVips, SendGarp,           MASTER
                                              StateChanged; Adver_Timer
INITIALIZE  startup, not owner                StateChanged; Master_Adver_Interval :=      BACKUP
                                              own interval; Master_Down_Timer
INITIALIZE  shutdown / advert / timer         none (explicit no-op: not participating)    INITIALIZE
INITIALIZE  set_priority                      none; the priority is used from startup     INITIALIZE
BACKUP      startup                           none (explicit no-op: already running)      BACKUP
BACKUP      shutdown                          StateChanged; timer cancelled               INITIALIZE
BACKUP      Master_Down_Timer fires           SendAdvert(P), AddVips, SendGarp,           MASTER
                                              StateChanged; Adver_Timer
BACKUP      advert p == 0                     none; Master_Down_Timer := Skew_Time        BACKUP
BACKUP      advert p >= P, or preempt off     none; Master_Adver_Interval := advert's;    BACKUP
            (and not owner), or inside the    Master_Down_Timer := Master_Down_Interval
            preempt delay
BACKUP      advert 0 < p < P, preempting      none; advert discarded, the timer keeps     BACKUP
                                              running, so we take over when it fires
BACKUP      set_priority                      none; if raised, the timer is pulled in by  BACKUP
                                              the drop in Skew_Time (keepalived)
MASTER      startup                           none (explicit no-op: already running)      MASTER
MASTER      shutdown                          SendAdvert(0), RemoveVips, StateChanged     INITIALIZE
MASTER      Adver_Timer fires                 SendAdvert(P); Adver_Timer                  MASTER
MASTER      advert p == 0                     SendAdvert(P); Adver_Timer reset            MASTER
MASTER      advert p > P, or p == P and the   RemoveVips, StateChanged;                   BACKUP
            sender's address is greater       Master_Adver_Interval := advert's;
                                              Master_Down_Timer
MASTER      advert p < P, or p == P and the   SendAdvert(P) (keepalived; RFC: discard)    MASTER
            sender's address is lower         + SendGarp at most once a second (a split
                                              brain is ending: the client may still map
                                              the VIP to the other node's MAC), or none
                                              if reassert_on_lower_priority=False
MASTER      set_priority (changed)            SendAdvert(new P) at once; Adver_Timer      MASTER
MASTER      resign (not in the RFC)           SendAdvert(0), RemoveVips, StateChanged;    BACKUP
                                              Master_Down_Timer
BACKUP/INIT resign                            none                                        same
=========== ================================= =========================================== ===========

``resign`` is halb's, for the VIP lease (``halb.vrrp.lease_gate``): a MASTER that may no longer hold the
addresses leaves MASTER the way a stopping one does (a priority-0 advert, so a backup takes over after
Skew_Time), but stays in the protocol as BACKUP, with its own advert interval as Master_Adver_Interval.

What the driver does with each action
-------------------------------------

:class:`SendAdvert`
    ``codec.encode(action.advert, src_ip=primary_ip)`` and send it (raw socket, IP protocol 112,
    TTL 255, to 224.0.0.18). ``action.priority`` is 0 for the shutdown advert.
:class:`AddVips` / :class:`RemoveVips`
    Add / remove ``action.addresses`` on the interface (netlink). Failures are the driver's to report.
:class:`SendGarp`
    Gratuitous ARP for each of ``action.addresses`` (keepalived also repeats them later:
    ``garp_master_delay``/``garp_master_repeat``; that schedule is the driver's business).
:class:`StateChanged`
    Log, update metrics, run notify hooks. ``reason`` is a :class:`TransitionReason`.

Where this follows keepalived rather than the letter of RFC 5798
---------------------------------------------------------------

* Master receiving a lower-priority advert (or an equal-priority one from a lower address): RFC 5798
  section 6.4.3 says discard; keepalived's ``vrrp_state_master_rx`` sends an advert at once ("forcing
  new election") unless ``lower_prio_no_advert`` is set. We do the same; ``reassert_on_lower_priority``
  (default ``True``) is the inverse of ``lower_prio_no_advert``. It does not reset the Adver_Timer.
* ``preempt_delay`` (not in the RFC) uses keepalived's ``vrrp_state_backup`` semantics ("seconds after
  startup or seeing a lower priority master until preemption"): a preempt deadline is set at startup;
  an advert with ``p >= P`` clears it; a lower-priority advert starts it if it is clear; while it is in
  the future lower-priority adverts are accepted like any other (they reset Master_Down_Timer); after
  it, they are discarded and we take over when Master_Down_Timer fires. Leaving MASTER clears it too.
  The owner (``P == 255``) ignores the delay, as it ignores ``preempt = False`` (RFC 5798 section
  6.1, Preempt_Mode: the router owning the address always preempts, whatever the flag).
* Tracking (:meth:`VrrpMachine.set_priority`): a MASTER advertises a changed priority immediately
  instead of at the next Adver_Timer (keepalived waits for the timer). A BACKUP raised above the
  Master's priority takes over exactly as RFC/keepalived do: the Master's now-lower adverts are
  discarded and the Master_Down_Timer fires; there is no instant takeover. keepalived clamps tracked
  priorities to 1..254 and never changes an owner's; here the caller decides (1..255 accepted).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from halb.vrrp.codec import Advert

__all__ = [
    "Action",
    "AddVips",
    "RemoveVips",
    "SendAdvert",
    "SendGarp",
    "State",
    "StateChanged",
    "TransitionReason",
    "VrrpConfig",
    "VrrpMachine",
]

OWNER_PRIORITY = 255
# A MASTER hearing a lower-priority advert (a split brain ending) re-sends GARP at most this often.
REASSERT_GARP_INTERVAL = 1.0


class State(Enum):
    """RFC 5798 section 6.4 states."""

    INITIALIZE = "initialize"
    BACKUP = "backup"
    MASTER = "master"


class TransitionReason(StrEnum):
    """Why a :class:`StateChanged` happened (stable tokens for logs and metrics)."""

    OWNER_STARTUP = "owner_startup"  # INITIALIZE -> MASTER, priority 255
    STARTUP = "startup"  # INITIALIZE -> BACKUP
    MASTER_DOWN = "master_down_timer"  # BACKUP -> MASTER
    HIGHER_PRIORITY = "higher_priority_advert"  # MASTER -> BACKUP
    SHUTDOWN = "shutdown"  # BACKUP/MASTER -> INITIALIZE
    RESIGNED = "resigned"  # MASTER -> BACKUP: told to give mastership up (halb: the VIP lease was lost)


@dataclass(frozen=True, slots=True)
class SendAdvert:
    """Send this advertisement now."""

    advert: Advert

    @property
    def priority(self) -> int:
        return self.advert.priority


@dataclass(frozen=True, slots=True)
class AddVips:
    """Configure the virtual addresses on the interface."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RemoveVips:
    """Remove the virtual addresses from the interface."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SendGarp:
    """Broadcast gratuitous ARP for the virtual addresses."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The machine moved from ``old`` to ``new``."""

    old: State
    new: State
    reason: TransitionReason


Action = SendAdvert | AddVips | RemoveVips | SendGarp | StateChanged


@dataclass(frozen=True, slots=True)
class VrrpConfig:
    """Static configuration of one virtual router instance.

    ``advert_interval`` is in seconds and must be a whole number of centiseconds in 0.01..40.95 (the
    12-bit field). ``priority`` 255 means address owner. ``preempt_delay`` is in seconds (keepalived allows
    0..1000). ``accept_mode`` is carried for the driver and does not affect the state machine.
    """

    vrid: int
    priority: int
    primary_ip: str
    virtual_ips: tuple[str, ...]
    advert_interval: float = 1.0
    preempt: bool = True
    preempt_delay: float = 0.0
    accept_mode: bool = False
    reassert_on_lower_priority: bool = True
    _advert_interval_cs: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.virtual_ips, tuple):
            object.__setattr__(self, "virtual_ips", tuple(self.virtual_ips))
        _check_int("vrid", self.vrid, 1, 255)
        _check_int("priority", self.priority, 1, OWNER_PRIORITY)
        ipaddress.IPv4Address(self.primary_ip)
        for vip in self.virtual_ips:
            ipaddress.IPv4Address(vip)
        if len(self.virtual_ips) > 255:
            raise ValueError("at most 255 virtual addresses fit in an advert")
        interval = float(self.advert_interval)
        centis = round(interval * 100) if math.isfinite(interval) else -1
        if not 1 <= centis <= 0x0FFF or not math.isclose(centis / 100, interval, abs_tol=1e-9):
            raise ValueError(
                f"advert_interval must be a whole number of centiseconds in 0.01..40.95 s, "
                f"got {self.advert_interval!r}"
            )
        object.__setattr__(self, "_advert_interval_cs", centis)
        delay = float(self.preempt_delay)
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"preempt_delay must be >= 0 seconds, got {self.preempt_delay!r}")

    @property
    def advert_interval_cs(self) -> int:
        """Advertisement_Interval in centiseconds, as sent on the wire."""
        return self._advert_interval_cs


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")


class VrrpMachine:
    """One VRRPv3 virtual router instance; see the module docstring for the full contract."""

    def __init__(self, config: VrrpConfig) -> None:
        self.config = config
        self._state = State.INITIALIZE
        self._priority = config.priority
        self._master_adver_interval = config.advert_interval_cs / 100
        self._deadline: float | None = None
        self._preempt_until: float | None = None
        self._last_reassert_garp: float | None = None
        self._master_ip: str | None = None
        self._own_address = int(ipaddress.IPv4Address(config.primary_ip))

    # ----------------------------------------------------------------- read-only view

    @property
    def state(self) -> State:
        return self._state

    @property
    def priority(self) -> int:
        """Current (possibly tracked) priority."""
        return self._priority

    @property
    def master_adver_interval(self) -> float:
        """Master_Adver_Interval in seconds."""
        return self._master_adver_interval

    @property
    def skew_time(self) -> float:
        return ((256 - self._priority) * self._master_adver_interval) / 256

    @property
    def master_down_interval(self) -> float:
        return 3 * self._master_adver_interval + self.skew_time

    @property
    def master_ip(self) -> str | None:
        """Source address of the last advert accepted from a Master while BACKUP (for status pages)."""
        return self._master_ip

    @property
    def preempt_until(self) -> float | None:
        """keepalived-style preempt-delay deadline, ``None`` when not running (see module docstring)."""
        return self._preempt_until

    def next_deadline(self) -> float | None:
        """When the driver must call :meth:`timer_fired` next; ``None`` means no timer."""
        return self._deadline

    # ----------------------------------------------------------------- events

    def startup(self, now: float) -> list[Action]:
        """RFC 5798 6.4.1. No-op unless INITIALIZE."""
        if self._state is not State.INITIALIZE:
            return []
        self._master_adver_interval = self.config.advert_interval_cs / 100
        self._master_ip = None
        self._preempt_until = now + self.config.preempt_delay if self.config.preempt_delay > 0 else None
        if self._priority == OWNER_PRIORITY:
            return self._become_master(now, TransitionReason.OWNER_STARTUP)
        self._state = State.BACKUP
        self._deadline = now + self.master_down_interval
        return [StateChanged(State.INITIALIZE, State.BACKUP, TransitionReason.STARTUP)]

    def shutdown(self, now: float) -> list[Action]:
        """RFC 5798 6.4.2/6.4.3 Shutdown. No-op in INITIALIZE."""
        old = self._state
        if old is State.INITIALIZE:
            return []
        self._state = State.INITIALIZE
        self._deadline = None
        self._preempt_until = None
        self._master_ip = None
        changed = StateChanged(old, State.INITIALIZE, TransitionReason.SHUTDOWN)
        if old is State.MASTER:
            return [SendAdvert(self._advert(0)), RemoveVips(self.config.virtual_ips), changed]
        return [changed]

    def resign(self, now: float) -> list[Action]:
        """Give mastership up but keep running (see the transition table). No-op unless MASTER."""
        if self._state is not State.MASTER:
            return []
        self._state = State.BACKUP
        self._preempt_until = None
        self._master_ip = None
        self._master_adver_interval = self._own_interval
        self._deadline = now + self.master_down_interval
        return [
            SendAdvert(self._advert(0)),
            RemoveVips(self.config.virtual_ips),
            StateChanged(State.MASTER, State.BACKUP, TransitionReason.RESIGNED),
        ]

    def timer_fired(self, now: float) -> list[Action]:
        """The single timer expired. Does nothing if there is no deadline or ``now`` is before it."""
        if self._deadline is None or now < self._deadline:
            return []
        if self._state is State.BACKUP:
            return self._become_master(now, TransitionReason.MASTER_DOWN)
        # MASTER: Adver_Timer.
        self._deadline = now + self._own_interval
        return [SendAdvert(self._advert(self._priority))]

    def advert_received(self, now: float, advert: Advert, src_ip: str) -> list[Action]:
        """An advert that passed :func:`halb.vrrp.codec.decode`, with the IPv4 source it came from."""
        if self._state is State.INITIALIZE or not self._is_relevant(advert, src_ip):
            return []
        if self._state is State.BACKUP:
            return self._backup_rx(now, advert, src_ip)
        return self._master_rx(now, advert, src_ip)

    def set_priority(self, now: float, new_priority: int) -> list[Action]:
        """Tracking changed the effective priority (1..255)."""
        _check_int("priority", new_priority, 1, OWNER_PRIORITY)
        old_priority = self._priority
        if new_priority == old_priority:
            return []
        old_down = self.master_down_interval
        self._priority = new_priority
        if self._state is State.MASTER:
            self._deadline = now + self._own_interval
            return [SendAdvert(self._advert(new_priority))]
        if self._state is State.BACKUP and new_priority > old_priority and self._deadline is not None:
            # keepalived vrrp_set_effective_priority: pull the down timer in by the shrink in Skew_Time.
            self._deadline -= old_down - self.master_down_interval
        return []

    # ----------------------------------------------------------------- internals

    @property
    def _own_interval(self) -> float:
        return self.config.advert_interval_cs / 100

    @property
    def _preempting(self) -> bool:
        return self.config.preempt or self._priority == OWNER_PRIORITY

    def _advert(self, priority: int) -> Advert:
        return Advert(
            vrid=self.config.vrid,
            priority=priority,
            max_advert_interval_cs=self.config.advert_interval_cs,
            addresses=self.config.virtual_ips,
        )

    def _is_relevant(self, advert: Advert, src_ip: str) -> bool:
        if advert.vrid != self.config.vrid or advert.version != 3 or advert.type != 1:
            return False
        if advert.max_advert_interval_cs == 0:
            return False
        try:
            return int(ipaddress.IPv4Address(src_ip)) != self._own_address
        except ValueError:
            return False

    def _become_master(self, now: float, reason: TransitionReason) -> list[Action]:
        old = self._state
        self._state = State.MASTER
        self._deadline = now + self._own_interval
        vips = self.config.virtual_ips
        return [
            SendAdvert(self._advert(self._priority)),
            AddVips(vips),
            SendGarp(vips),
            StateChanged(old, State.MASTER, reason),
        ]

    def _learn_master(self, now: float, advert: Advert, src_ip: str) -> None:
        self._master_adver_interval = advert.max_advert_interval_cs / 100
        self._master_ip = src_ip
        self._deadline = now + self.master_down_interval

    def _backup_rx(self, now: float, advert: Advert, src_ip: str) -> list[Action]:
        p = advert.priority
        if p == 0:
            # The Master resigned: take over after Skew_Time unless a higher-priority Backup speaks first.
            self._deadline = now + self.skew_time
            return []
        accept = not self._preempting or p >= self._priority
        if p >= self._priority:
            self._preempt_until = None
        elif self._preempting and self.config.preempt_delay > 0 and self._priority != OWNER_PRIORITY:
            if self._preempt_until is None:
                self._preempt_until = now + self.config.preempt_delay
            if now < self._preempt_until:
                accept = True
        if accept:
            self._learn_master(now, advert, src_ip)
        # else: discard; Master_Down_Timer keeps running and we preempt when it fires.
        return []

    def _master_rx(self, now: float, advert: Advert, src_ip: str) -> list[Action]:
        p = advert.priority
        if p == 0:
            self._deadline = now + self._own_interval
            return [SendAdvert(self._advert(self._priority))]
        sender = int(ipaddress.IPv4Address(src_ip))
        if p > self._priority or (p == self._priority and sender > self._own_address):
            self._state = State.BACKUP
            self._preempt_until = None
            self._learn_master(now, advert, src_ip)
            return [
                RemoveVips(self.config.virtual_ips),
                StateChanged(State.MASTER, State.BACKUP, TransitionReason.HIGHER_PRIORITY),
            ]
        if not self.config.reassert_on_lower_priority:
            return []
        actions: list[Action] = [SendAdvert(self._advert(self._priority))]
        # Only a node that believes it is MASTER sends adverts, so this ends a split brain (a healed
        # partition): the other master now steps down, but the client may still map the VIP to its MAC.
        # Re-announce with GARP, at most once per REASSERT_GARP_INTERVAL while the other keeps advertising.
        last = self._last_reassert_garp
        if last is None or now - last >= REASSERT_GARP_INTERVAL:
            self._last_reassert_garp = now
            actions.append(SendGarp(self.config.virtual_ips))
        return actions
