"""``PATCH /vms/{id}``: the body that changes a VM's limits at run time, validated whole.

Body: ``{"disks": [{"index": 0, "rate_limit": {...} | null}], "nets": [{"index": 0,
"tx_rate_limit": ..., "rx_rate_limit": ...}], "rate_limit_groups": {"NAME": {...}},
"machine": {...}}``. Every bucket is checked by avmm.config's rate-limit table, so a bad
value is the same 400 as in a config file, with ``detail.key`` naming it (for example
``disks[0].rate_limit.ops.size``). ``machine`` (CPU limits) is the extension point for
the cgroup controls: :meth:`avmm.host.HostedVm.update_limits` passes it to the VM's
``set_cpu_limits`` where the build has one, and refuses it with a 400 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from ..config import parse_rate_limit
from ..ratelimit import RateLimitConfig
from ._errors import HttpError

__all__ = ["LIMITS_BODY_MAX", "LimitChange", "LimitsUpdate", "parse_limits_update"]

#: The largest PATCH body: a few dozen buckets.
LIMITS_BODY_MAX: Final = 64 << 10
#: The most device entries (and groups) one request may change.
ENTRIES_MAX: Final = 64
_TOP_KEYS: Final = ("disks", "nets", "rate_limit_groups", "machine")
_DISK_KEYS: Final = ("index", "rate_limit")
_NET_KEYS: Final = ("index", "tx_rate_limit", "rx_rate_limit")


@dataclass(frozen=True)
class LimitChange:
    """Device ``index`` of ``kind`` ("disk" or "net"; ``direction`` "tx"/"rx" for a
    NIC) gets ``limit`` (None: unlimited). ``key`` names it in errors."""

    kind: str
    index: int
    direction: str | None
    limit: RateLimitConfig | None
    key: str


@dataclass(frozen=True)
class LimitsUpdate:
    changes: list[LimitChange] = field(default_factory=list)
    groups: list[tuple[str, RateLimitConfig]] = field(default_factory=list)
    #: The ``machine`` object as sent (CPU limits), for the VM's ``set_cpu_limits``.
    machine: dict[str, Any] | None = None
    #: The body as sent (a VM in a worker process parses it again there).
    source: dict[str, Any] | None = None


def parse_limits_update(data: Any) -> LimitsUpdate:
    """Validate a PATCH body; an HttpError 400 (or a ConfigError, which the API turns
    into one) names the first bad key."""
    if not isinstance(data, dict):
        raise HttpError(400, "the body must be a JSON object with disks, nets, "
                        "rate_limit_groups or machine", {"key": None})
    for key in data:
        if key not in _TOP_KEYS:
            raise HttpError(400, f"unknown key {key!r:.60}; PATCH /vms/{{id}} takes "
                            + ", ".join(_TOP_KEYS), {"key": key})
    update = LimitsUpdate(source=data)
    for entry, item in enumerate(_entries(data, "disks")):
        key = f"disks[{entry}]"
        index = _index(item, key, _DISK_KEYS)
        if "rate_limit" in item:
            update.changes.append(LimitChange(
                "disk", index, None,
                parse_rate_limit(item["rate_limit"], f"{key}.rate_limit",
                                 source="request body"), f"{key}.rate_limit"))
    for entry, item in enumerate(_entries(data, "nets")):
        key = f"nets[{entry}]"
        index = _index(item, key, _NET_KEYS)
        for direction in ("tx", "rx"):
            name = f"{direction}_rate_limit"
            if name in item:
                update.changes.append(LimitChange(
                    "net", index, direction,
                    parse_rate_limit(item[name], f"{key}.{name}", source="request body"),
                    f"{key}.{name}"))
    groups = data.get("rate_limit_groups")
    if groups is not None:
        if not isinstance(groups, dict) or len(groups) > ENTRIES_MAX:
            raise HttpError(400, "rate_limit_groups must be an object of at most "
                            f"{ENTRIES_MAX} NAME: buckets entries",
                            {"key": "rate_limit_groups"})
        for name, value in groups.items():
            key = f"rate_limit_groups.{name}"
            limit = parse_rate_limit(value, key, source="request body")
            if limit is None:
                raise HttpError(400, f"{key}: a group needs a bandwidth or an ops bucket",
                                {"key": key})
            update.groups.append((name, limit))
    machine = data.get("machine")
    if machine is not None:
        if not isinstance(machine, dict):
            raise HttpError(400, "machine must be an object", {"key": "machine"})
        update = LimitsUpdate(update.changes, update.groups, machine, source=data)
    return update


def _entries(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > ENTRIES_MAX:
        raise HttpError(400, f"{name} must be a list of at most {ENTRIES_MAX} objects",
                        {"key": name})
    for entry, item in enumerate(value):
        if not isinstance(item, dict):
            raise HttpError(400, f"{name}[{entry}] must be an object with an index",
                            {"key": f"{name}[{entry}]"})
    return value


def _index(item: dict[str, Any], key: str, keys: tuple[str, ...]) -> int:
    for name in item:
        if name not in keys:
            raise HttpError(400, f"{key}: unknown key {name!r:.60}; known keys are "
                            + ", ".join(keys), {"key": f"{key}.{name}"})
    index = item.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise HttpError(400, f"{key}.index: expected the device's index (an integer from "
                        f"0), got {index!r:.40}", {"key": f"{key}.index"})
    return index
