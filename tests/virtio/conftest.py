"""Fixtures of the virtqueue and device tests: both inner loops of virtio-net (net_path)
and virtio-blk (blk_path), and a real tap with an AF_PACKET socket on its kernel side
(tap, wire)."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from avmm.tap import Tap
from tests.prerequisites import net_problem, require

from .inner_loops import blk_path, net_path
from .test_net import Wire

__all__ = ["blk_path", "net_path", "tap", "wire"]

_names = itertools.count()


@pytest.fixture
def tap() -> Iterator[Tap]:
    require(net_problem())
    with Tap.open(f"avn{os.getpid() % 100000}n{next(_names)}") as tap:
        # Up, and quiet: no IPv6, so the kernel sends no frames of its own.
        Path(f"/proc/sys/net/ipv6/conf/{tap.name}/disable_ipv6").write_text("1")
        subprocess.run(["ip", "link", "set", tap.name, "up"], check=True)
        yield tap


@pytest.fixture
def wire(tap: Tap) -> Iterator[Wire]:
    wire = Wire(tap)
    yield wire
    wire.close()
