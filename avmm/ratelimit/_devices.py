"""One VM's rate limits: which limiter each in-process disk and NIC direction uses,
changed at run time, shown in ``GET /vms/{id}`` and ``/metrics``.

Groups. A ``[rate_limit_groups.NAME]`` of the VM's config becomes one
:class:`RateLimiter` shared by every device (direction) of that VM naming it; two VMs
that define a group of the same name in their configs are limited separately. Groups
shared by several VMs are the daemon's (:class:`SharedGroups`, made with ``PUT
/rate_limit_groups/NAME``): a device whose ``rate_limit_group`` is not defined in its
own config uses the daemon's group of that name, the same limiter for every VM. A
device's own ``rate_limit`` is a limiter of its own.

Changes (:meth:`DeviceLimits.set`). Giving a device its own limits when it has its own
limiter changes that limiter in place (the level it holds, debt included, carries over,
capped at the new size); when it was in a group or unlimited it leaves the group and gets
a new limiter, full. ``None`` removes its limit. The device's :class:`Throttle` (its
counters) is kept throughout, so the waits it recorded survive a change; the serving
thread picks the change up at its next request, and a wait in progress is at most
:data:`avmm.ratelimit.LIMITER_WAIT_SLICE_S` long, so a change is in effect within that.

Snapshots and migration streams carry the limits in effect (:meth:`DeviceLimits.in_effect`
gives the VM's config with them; avmm.state.vm_state saves it): a device's own buckets
as changed at run time, its group, the VM's groups' current buckets, and a daemon
group a device uses as a group of the VM's own of the same name with that group's
buckets (a restore elsewhere keeps the limit, no longer shared). The buckets' levels are
not saved: a restored or migrated VM starts with full buckets. An incoming VM given its
own config has that config's limits instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..errors import AvmmError
from ._bucket import RateLimitConfig, RateLimiter, Throttle
from ._shared import SharedRateLimiter

__all__ = ["DIRECTIONS", "DeviceLimits", "LimitTargetError", "SharedGroups",
           "UnknownGroupError"]

DIRECTIONS: Final = ("tx", "rx")


class LimitTargetError(AvmmError):
    """A limit change names a device that is not there, or one avmm does not serve
    (``status`` is the HTTP status the API answers with: 404 or 400)."""

    def __init__(self, message: str, *, key: str, status: int = 404) -> None:
        super().__init__(message)
        self.key = key
        self.status = status


class UnknownGroupError(AvmmError):
    """A device names a rate-limit group that neither its config nor the daemon has."""


class SharedGroups:
    """The daemon's rate-limit groups, by name, shared by every VM that names one (see
    the module docstring). Used on the event loop only; the limiters themselves are
    thread-safe. Removing a group keeps its limiter working for the VMs that use it;
    VMs built afterwards cannot name it.

    ``across_processes`` (``avmm serve --isolation process``): each group's buckets live
    in shared memory (:class:`~avmm.ratelimit.SharedRateLimiter`), which the daemon
    hands to the worker of each VM naming the group (:meth:`handout_fd`); a worker
    registers what it was handed with :meth:`adopt`.
    """

    def __init__(self, *, across_processes: bool = False) -> None:
        self.across_processes = across_processes
        self._groups: dict[str, Any] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._groups

    def names(self) -> frozenset[str]:
        return frozenset(self._groups)

    def get(self, name: str) -> Any:
        """The group's limiter (a RateLimiter or a SharedRateLimiter), or None."""
        return self._groups.get(name)

    def put(self, name: str, config: RateLimitConfig) -> tuple[Any, bool]:
        """Create group ``name`` (full buckets), or change its buckets in place; True
        if it was created. A change of a group in shared memory waits for a change of
        that group in progress, then up to :data:`~avmm.ratelimit.RECONFIGURE_LOCK_WAIT_S`
        for a worker's lock: the API changes it from a thread (:meth:`create` alone
        never waits)."""
        limiter = self._groups.get(name)
        if limiter is not None:
            limiter.reconfigure(config)
            return limiter, False
        return self.create(name, config), True

    def create(self, name: str, config: RateLimitConfig) -> Any:
        """Make group ``name`` anew (one that existed is replaced: its VMs keep it)."""
        limiter: Any
        if self.across_processes:
            limiter = SharedRateLimiter.create(config, name=name)
        else:
            limiter = RateLimiter(config, name=name)
        old = self._groups.get(name)
        self._groups[name] = limiter
        if isinstance(old, SharedRateLimiter):
            old.close()
        return limiter

    def adopt(self, name: str, limiter: Any) -> None:
        """A worker: the group ``name`` its daemon handed over (already attached)."""
        self._groups[name] = limiter

    def handout_fd(self, name: str) -> int | None:
        """A descriptor of group ``name``'s shared memory for one worker (the caller
        closes it), or None if there is no such group in shared memory."""
        limiter = self._groups.get(name)
        if not isinstance(limiter, SharedRateLimiter):
            return None
        return limiter.handout_fd()

    def remove(self, name: str) -> bool:
        limiter = self._groups.pop(name, None)
        if isinstance(limiter, SharedRateLimiter):
            limiter.close()  # the workers keep their own mappings
        return limiter is not None

    def close(self) -> None:
        """Forget every group (the daemon's end)."""
        for name in list(self._groups):
            self.remove(name)

    def to_dict(self, name: str, limiter: Any = None) -> dict[str, Any]:
        """Group ``name`` as the API shows it (``limiter``: its limiter, which a DELETE
        may have removed meanwhile)."""
        if limiter is None:
            limiter = self._groups[name]
        return {"name": name, "rate_limit": limiter.config.to_dict(),
                "tokens": limiter.levels()}

    def list(self) -> list[dict[str, Any]]:
        return [self.to_dict(name) for name in sorted(self._groups)]


@dataclass
class _Slot:
    device: Any
    #: The device attribute the serving loop reads: "throttle", "tx_throttle", ...
    attribute: str
    #: What the API and metrics call it: "blk0", "net0".
    name: str
    group: str | None = None
    throttle: Throttle | None = None
    #: The device is served by a vhost-user back-end: nothing to limit here.
    external: bool = False

    @property
    def config(self) -> RateLimitConfig | None:
        if getattr(self.device, self.attribute, None) is None or self.throttle is None:
            return None
        return self.throttle.limiter.config

    def attach(self, limiter: RateLimiter) -> None:
        if self.throttle is None:
            self.throttle = Throttle(limiter)
        else:
            self.throttle.limiter = limiter
        setattr(self.device, self.attribute, self.throttle)

    def detach(self) -> None:
        setattr(self.device, self.attribute, None)
        if self.throttle is not None:
            self.throttle.unblock()
        self.group = None

    def to_dict(self) -> dict[str, Any]:
        config = self.config
        result: dict[str, Any] = {
            "rate_limit": None if config is None else config.to_dict(),
            "rate_limit_group": self.group if config is not None else None,
        }
        if self.throttle is not None:
            result.update(self.throttle.stats())
            if config is not None:
                result["tokens"] = self.throttle.limiter.levels()
        return result


class DeviceLimits:
    """The limit slots of one VM: ``disks[i]`` and ``nets[i][direction]``.

    Build with :meth:`attach`; every method runs on the event loop (the devices' threads
    only read the attribute it sets).
    """

    def __init__(self) -> None:
        #: The VM's own groups (from its config), and the daemon's it uses.
        self.groups: dict[str, RateLimiter] = {}
        self.shared: dict[str, RateLimiter] = {}
        self._disks: list[_Slot] = []
        self._nets: list[dict[str, _Slot]] = []

    @classmethod
    def attach(cls, config: Any, disks: Sequence[Any], nets: Sequence[Any], *,
               shared: SharedGroups | None = None) -> DeviceLimits:
        """Limit ``disks`` and ``nets`` (the devices, in config order; a vhost-user one
        is any object without the throttle attribute) as ``config`` (a VmConfig) says;
        a group the config does not define comes from ``shared`` (the daemon's).

        :raises UnknownGroupError: a group is in neither.
        """
        limits = cls()
        group_configs = dict(config.rate_limit_groups)

        def limiter_for(limit: RateLimitConfig | None, group: str | None,
                        name: str) -> RateLimiter | None:
            if group is not None:
                if group in limits.groups:
                    return limits.groups[group]
                if group in group_configs:
                    limits.groups[group] = RateLimiter(group_configs[group], name=group)
                    return limits.groups[group]
                limiter = shared.get(group) if shared is not None else None
                if limiter is None:
                    raise UnknownGroupError(
                        f"{name}: rate limit group {group!r} is neither in the config's "
                        "[rate_limit_groups] nor one of the daemon's (PUT "
                        f"/rate_limit_groups/{group} creates it)")
                limits.shared[group] = limiter
                return limiter
            return None if limit is None else RateLimiter(limit, name=name)

        for index, (disk, device) in enumerate(zip(config.disks, disks, strict=True)):
            slot = _Slot(device, "throttle", f"blk{index}",
                         external=not hasattr(device, "throttle"))
            limiter = limiter_for(disk.rate_limit, disk.rate_limit_group, slot.name)
            if limiter is not None and not slot.external:
                slot.attach(limiter)
                slot.group = disk.rate_limit_group
            limits._disks.append(slot)
        for index, (net, device) in enumerate(zip(config.nets, nets, strict=True)):
            slots = {}
            for direction in DIRECTIONS:
                slot = _Slot(device, f"{direction}_throttle", f"net{index}",
                             external=not hasattr(device, f"{direction}_throttle"))
                group = getattr(net, f"{direction}_rate_limit_group")
                limiter = limiter_for(getattr(net, f"{direction}_rate_limit"), group,
                                      f"net{index}.{direction}")
                if limiter is not None and not slot.external:
                    slot.attach(limiter)
                    slot.group = group
                slots[direction] = slot
            limits._nets.append(slots)
        return limits

    def _slot(self, kind: str, index: Any, direction: str | None, key: str) -> _Slot:
        if isinstance(index, bool) or not isinstance(index, int):
            raise LimitTargetError(f"{key}: expected a device index (an integer), got "
                                   f"{index!r:.40}", key=key, status=400)
        if kind == "disk":
            count, slot = len(self._disks), None
            if 0 <= index < count:
                slot = self._disks[index]
        else:
            count = len(self._nets)
            slot = self._nets[index][direction or "tx"] if 0 <= index < count else None
        if slot is None:
            what = "disks" if kind == "disk" else "NICs"
            raise LimitTargetError(f"{key}: this VM has no {kind} {index} ({what}: {count})",
                                   key=key)
        if slot.external:
            raise LimitTargetError(f"{key}: {slot.name} is served by a vhost-user back-end; "
                                   "set its limits there (avmm backend ... --iops ...)",
                                   key=key, status=400)
        return slot

    def check(self, kind: str, index: Any, direction: str | None, key: str) -> None:
        """Raise :class:`LimitTargetError` if :meth:`set` would refuse the target (so
        that a request is checked whole before anything changes)."""
        self._slot(kind, index, direction, key)

    def set(self, kind: str, index: int, direction: str | None,
            limit: RateLimitConfig | None, *, key: str = "") -> None:
        """Give disk ``index`` (``kind`` "disk") or NIC ``index``'s ``direction`` ("tx"
        or "rx", ``kind`` "net") its own ``limit``, or none (see the module docstring)."""
        slot = self._slot(kind, index, direction, key or f"{kind}[{index}]")
        if limit is None or limit.unlimited:
            slot.detach()
            return
        current = slot.throttle.limiter if slot.throttle is not None else None
        attached = getattr(slot.device, slot.attribute) is not None
        if attached and current is not None and slot.group is None:
            current.reconfigure(limit)
            return
        slot.group = None
        slot.attach(RateLimiter(limit, name=slot.name))

    def check_group(self, name: str) -> None:
        """:class:`LimitTargetError` (404) unless ``name`` is one of this VM's groups."""
        if name not in self.groups:
            raise LimitTargetError(f"rate_limit_groups.{name}: this VM's config has no such "
                                   f"group (it has {', '.join(sorted(self.groups)) or 'none'}"
                                   "; the daemon's groups change with PUT "
                                   "/rate_limit_groups/NAME)", key=f"rate_limit_groups.{name}")

    def set_group(self, name: str, limit: RateLimitConfig) -> None:
        """Change group ``name``'s buckets in place, for every device in it."""
        self.check_group(name)
        self.groups[name].reconfigure(limit)

    def in_effect(self, config: Any, *, shared_as_own: bool = True) -> Any:
        """``config`` (the VmConfig these limits were attached from) with the limits in
        effect now in place of its own (see the module docstring): what a snapshot or
        a migration saves. ``shared_as_own=False`` leaves a daemon group a device uses
        out of the VM's groups (the device still names it), as the daemon shows the
        config: posted again to it, the device would share the group again. Before
        :meth:`attach` (nothing built), ``config`` itself."""
        if len(self._disks) != len(config.disks) or len(self._nets) != len(config.nets):
            return config
        groups = {name: (self.groups[name].config if name in self.groups else limit)
                  for name, limit in config.rate_limit_groups}

        def current(slot: _Slot) -> tuple[RateLimitConfig | None, str | None]:
            limit = slot.config
            if limit is None:
                return None, None
            if slot.group is None:
                return limit, None
            # The VM's own group, or a daemon group: saved as one of the VM's own.
            if slot.group in groups or shared_as_own:
                groups.setdefault(slot.group, limit)
            return None, slot.group

        disks = []
        for disk, slot in zip(config.disks, self._disks, strict=True):
            if not slot.external:
                limit, group = current(slot)
                disk = dataclasses.replace(disk, rate_limit=limit, rate_limit_group=group)
            disks.append(disk)
        nets = []
        for net, slots in zip(config.nets, self._nets, strict=True):
            for direction in DIRECTIONS:
                if not slots[direction].external:
                    limit, group = current(slots[direction])
                    net = dataclasses.replace(net, **{f"{direction}_rate_limit": limit,
                                                      f"{direction}_rate_limit_group": group})
            nets.append(net)
        return dataclasses.replace(config, disks=tuple(disks), nets=tuple(nets),
                                   rate_limit_groups=tuple(groups.items()))

    def to_dict(self) -> dict[str, Any]:
        """The effective limits and what they did, per device: for ``GET /vms/{id}``."""
        return {
            "disks": [{"index": index, "device": slot.name, **slot.to_dict()}
                      for index, slot in enumerate(self._disks) if not slot.external],
            "nets": [{"index": index, "device": slots["tx"].name,
                      **{direction: slots[direction].to_dict() for direction in DIRECTIONS}}
                     for index, slots in enumerate(self._nets) if not slots["tx"].external],
            "groups": {name: limiter.config.to_dict()
                       for name, limiter in sorted(self.groups.items())},
            "shared_groups": sorted(self.shared),
        }

    def wait_seconds(self) -> Iterator[tuple[str, str, float]]:
        """(device, kind, seconds waited) for every device that ever had a limit; a
        NIC's kinds are prefixed with the direction ("tx_ops")."""
        for slot in self._disks:
            if slot.throttle is not None:
                for kind, seconds in slot.throttle.wait_seconds().items():
                    yield slot.name, kind, seconds
        for slots in self._nets:
            for direction in DIRECTIONS:
                throttle = slots[direction].throttle
                if throttle is not None:
                    for kind, seconds in throttle.wait_seconds().items():
                        yield slots[direction].name, f"{direction}_{kind}", seconds
