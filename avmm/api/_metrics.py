"""``GET /metrics``: the hosted VMs' counters in the Prometheus text exposition format 0.0.4.

Every series carries ``vm`` (the id); VM names are in ``avmm_vm_info`` only, so that a
rename never splits a counter's history. ``avmm_migration_*`` describe each VM's latest
live migration (source or destination side; kept after the VM stops), for the VMs that
have one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from ._openapi import MIGRATION_STATES, VM_STATES

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    # The exposition format's escapes for label values: backslash, double quote, newline.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in labels.items()) + "}"


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[dict[str, str], float]] = []

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.samples:
            number = repr(float(value)) if isinstance(value, float) else str(value)
            yield f"{self.name}{_labels(labels)} {number}"


def render_metrics(vms: Iterable[Any], *, cpu_usage: Mapping[str, Any] | None = None) -> str:
    """The exposition text for ``vms`` (:class:`avmm.host.HostedVm` objects);
    ``cpu_usage`` maps a VM id to its :class:`avmm.cgroups.CpuUsage` (read beforehand,
    off the event loop)."""
    cpu_usage = cpu_usage or {}
    info = _Family("avmm_vm_info", "gauge", "A VM the daemon holds (value 1), with its name.")
    state = _Family("avmm_vm_state", "gauge",
                    "1 for the state the VM is in, 0 for the others.")
    uptime = _Family("avmm_vm_uptime_seconds", "gauge",
                     "Seconds the VM has been running (frozen once it stopped).")
    exits = _Family("avmm_vcpu_exits_total", "counter",
                    "KVM_RUN exits to userspace by reason, summed over the VM's vCPUs.")
    requests = _Family("avmm_virtio_requests_total", "counter",
                       "Descriptor chains a virtio device completed.")
    transferred = _Family("avmm_virtio_bytes_total", "counter",
                          "Bytes a virtio device moved to and from guest buffers.")
    notifications = _Family("avmm_virtio_notifications_total", "counter",
                            "Queue notifications (driver kicks) a virtio device received.")
    cpu_seconds = _Family("avmm_vm_cpu_seconds_total", "counter",
                          "CPU time the VM's vCPU threads used (its cgroup's, if any).")
    throttled = _Family("avmm_vm_cpu_throttled_seconds_total", "counter",
                        "Time the VM's vCPUs were throttled by cpu_max_percent.")
    waits = _Family("avmm_ratelimit_wait_seconds_total", "counter",
                    "Seconds a device's requests waited for its rate limiter, by the bucket "
                    "that made them wait (bandwidth, ops; a NIC's carry the direction: "
                    "tx_ops, rx_bandwidth, ...).")
    migration = _MigrationFamilies()
    for vm in vms:
        used = cpu_usage.get(vm.id)
        if used is not None:
            cpu_seconds.add(float(used.cpu_seconds), vm=vm.id)
            throttled.add(float(used.throttled_seconds), vm=vm.id)
        migration.add(vm.id, vm.migration)
        metrics = vm.metrics()
        info.add(1, vm=vm.id, name=vm.name)
        current = str(metrics.state)
        for name in VM_STATES:
            state.add(int(name == current), vm=vm.id, state=name)
        if vm.uptime_s is not None:
            uptime.add(float(vm.uptime_s), vm=vm.id)
        for reason, count in sorted(metrics.vcpu_exits.items()):
            exits.add(count, vm=vm.id, reason=reason)
        for device, counters in sorted(metrics.devices.items()):
            labels = {"vm": vm.id, "device": device, "kind": counters.kind}
            requests.add(counters.requests, **labels)
            transferred.add(counters.bytes, **labels)
            notifications.add(counters.notifications, **labels)
        for device, kind, seconds in vm.rate_limit_waits():
            waits.add(float(seconds), vm=vm.id, device=device, kind=kind)
    families = (info, state, uptime, exits, requests, transferred, notifications,
                cpu_seconds, throttled, waits, *migration.families())
    return "".join(line + "\n" for family in families for line in family.lines())


class _MigrationFamilies:
    """The ``avmm_migration_*`` series, from a VM's ``migration`` (the API's dict)."""

    def __init__(self) -> None:
        self.state = _Family("avmm_migration_state", "gauge",
                             "1 for the state the VM's latest migration is in, 0 for the "
                             "others.")
        # (family, key in the progress, scale): counts of the latest migration, so
        # gauges (a new migration of the same VM starts again from 0).
        self.values = [
            (_Family("avmm_migration_round", "gauge",
                     "Pre-copy round the latest migration is in (or ended in)."),
             "round", 1.0),
            (_Family("avmm_migration_pages_sent", "gauge",
                     "4 KiB pages of guest memory the latest migration sent (or "
                     "received)."), "pages_sent", 1.0),
            (_Family("avmm_migration_pages_dirty", "gauge",
                     "Pages dirtied during the latest migration's last round."),
             "pages_dirty", 1.0),
            (_Family("avmm_migration_sent_bytes", "gauge",
                     "Bytes of migration stream sent (or received)."), "bytes_sent", 1.0),
            (_Family("avmm_migration_downtime_seconds", "gauge",
                     "Time the guest was paused for the hand-over (measured)."),
             "downtime_ms", 1e-3),
            (_Family("avmm_migration_duration_seconds", "gauge",
                     "Time the latest migration took (so far, while it runs)."),
             "total_ms", 1e-3),
        ]

    def add(self, vm_id: str, progress: Mapping[str, Any] | None) -> None:
        if progress is None:
            return
        current = progress.get("state")
        for name in MIGRATION_STATES:
            self.state.add(int(name == current), vm=vm_id, state=name)
        for family, key, scale in self.values:
            value = progress.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                family.add(value * scale if scale != 1.0 else value, vm=vm_id)

    def families(self) -> list[_Family]:
        return [self.state, *(family for family, _key, _scale in self.values)]
