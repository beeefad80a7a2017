"""``GET /metrics``: the hosted VMs' counters in the Prometheus text exposition format 0.0.4.

Every series carries ``vm`` (the id); VM names are in ``avmm_vm_info`` only, so that a
rename never splits a counter's history.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from ._openapi import VM_STATES

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


def render_metrics(vms: Iterable[Any]) -> str:
    """The exposition text for ``vms`` (:class:`avmm.host.HostedVm` objects)."""
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
    for vm in vms:
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
    families = (info, state, uptime, exits, requests, transferred, notifications)
    return "".join(line + "\n" for family in families for line in family.lines())
