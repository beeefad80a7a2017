"""Fixtures for the CPU-controls tests: the host's cgroup backend (a prerequisite: root
and a cgroup cpu controller, v1 or v2), and fake cgroup trees for the unit tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from avmm.cgroups import HostCgroups, detect_backend
from tests.prerequisites import require


def cgroup_cpu_problem() -> str | None:
    backend = detect_backend()
    if isinstance(backend, str):
        return f"no usable cgroup cpu controller: {backend}"
    return None


@pytest.fixture
def host_cgroups() -> HostCgroups:
    """The real backend (the test FAILS under AVMM_REQUIRE_KVM=1 if there is none)."""
    require(cgroup_cpu_problem())
    return HostCgroups(detect_backend())


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for the API's unix socket (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="avmm-cg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
