"""``GET /metrics`` against a real VM (the endpoint tests use a fake host): the counters
that reach the HTTP client are the VM's own, they move while the guest works and freeze
once it has stopped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from avmm.api import ApiClient, serve_api
from avmm.host import Host
from tests.vm.helpers import TEST_GUEST

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

_SAMPLE = re.compile(r'^([a-z_]+)\{([^}]*)\} (\S+)$')
_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Series:
    """Samples of the exposition text by (metric name, labels)."""
    samples: Series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(_LABEL.findall(match.group(2)))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def value(samples: Series, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def exits(samples: Series, vm_id: str, reason: str) -> float:
    """A vCPU exit counter; a reason not seen yet has no series (it counts as 0)."""
    return samples.get(("avmm_vcpu_exits_total",
                        frozenset({"vm": vm_id, "reason": reason}.items())), 0.0)


def blk(samples: Series, metric: str, vm_id: str) -> float:
    return value(samples, metric, vm=vm_id, device="blk0", kind="blk")


COUNTERS = ("avmm_virtio_requests_total", "avmm_virtio_bytes_total",
            "avmm_virtio_notifications_total")


async def test_metrics_of_a_running_vm_move_between_scrapes_and_freeze_once_stopped(
        socket_dir: Path) -> None:
    image = socket_dir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    config = {"machine": {"memory_mib": 32, "acpi": False},
              "boot": {"kernel": str(TEST_GUEST),
                       "cmdline": "avmm.test=blk-bench avmm.rw=read avmm.n=1000000000"},
              "disk": [{"path": str(image)}]}
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, socket_dir / "avmm.sock")
        async with ApiClient(path) as api:
            vm_id = (await api.create_vm(config))["id"]
            hosted = host.get(vm_id)

            first = parse_metrics(await api.metrics())
            assert value(first, "avmm_vm_info", vm=vm_id, name=vm_id) == 1
            assert value(first, "avmm_vm_state", vm=vm_id, state="running") == 1
            # Between two scrapes the guest keeps reading its disk: every virtio counter
            # and the uptime must move on (polled: a loaded host may starve the guest).
            with trio.fail_after(60):
                while True:
                    await trio.sleep(0.1)
                    second = parse_metrics(await api.metrics())
                    for name in COUNTERS:
                        assert blk(second, name, vm_id) >= blk(first, name, vm_id)
                    if all(blk(second, name, vm_id) > blk(first, name, vm_id)
                           for name in COUNTERS):
                        break
            assert (value(second, "avmm_vm_uptime_seconds", vm=vm_id)
                    > value(first, "avmm_vm_uptime_seconds", vm=vm_id))
            # The guest's device set-up writes exit to avmm and are counted (it is done
            # by the time its disk is being read); after it, its notifications go
            # through KVM's ioeventfds without an exit, so the count need not move
            # between the scrapes (the first may come before or after the set-up), only
            # never go back.
            assert exits(second, vm_id, "MmioWrite") > 0
            assert exits(second, vm_id, "MmioWrite") >= exits(first, vm_id, "MmioWrite")

            await api.stop(vm_id)
            stopped = parse_metrics(await api.metrics())
            await trio.sleep(0.05)
            again = parse_metrics(await api.metrics())
            nursery.cancel_scope.cancel()
    # Stopped: one scrape equals the next (uptime frozen), and both are what the VM
    # itself counted.
    assert stopped == again
    assert value(stopped, "avmm_vm_state", vm=vm_id, state="stopped") == 1
    device = hosted.metrics().devices["blk0"]
    assert blk(stopped, "avmm_virtio_requests_total", vm_id) == device.requests > 0
    assert blk(stopped, "avmm_virtio_bytes_total", vm_id) == device.bytes
    assert blk(stopped, "avmm_virtio_notifications_total", vm_id) == device.notifications
    assert value(stopped, "avmm_vm_uptime_seconds", vm=vm_id) == hosted.uptime_s
