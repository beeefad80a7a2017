"""``avmm up`` with CPU controls as a real process: under the seccomp filters (the
cgroup work runs in the event loop's helper threads, the vCPU threads only wait), and
after a crash (kill -9) the next ``avmm up`` removes the cgroup the dead one left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avmm.cgroups import detect_backend
from avmm.cgroups.backend import pid_namespace
from tests.cgroups.conftest import cgroup_cpu_problem
from tests.prerequisites import require
from tests.vm.helpers import TEST_GUEST

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

AVMM = [sys.executable, "-m", "avmm.cli"]
REPO = Path(__file__).resolve().parents[2]


def toml(path: Path, cmdline: str) -> Path:
    cpu = min(os.sched_getaffinity(0))
    path.write_text(f'[machine]\nmemory_mib = 32\nacpi = false\ncpu_weight = 200\n'
                    f'cpu_max_percent = 90\ncpu_affinity = "{cpu}"\n'
                    f'[boot]\nkernel = "{TEST_GUEST}"\ncmdline = "console=ttyS0 {cmdline}"\n')
    return path


def test_cpu_controls_under_seccomp_kill_mode(tmp_path: Path) -> None:
    require(cgroup_cpu_problem())
    config = toml(tmp_path / "vm.toml", "avmm.test=count avmm.n=1000000")
    result = subprocess.run([*AVMM, "up", str(config), "--seccomp", "kill"],
                            capture_output=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert b"avmm-testguest: count done n=1000000" in result.stdout


def test_the_cgroup_of_a_killed_avmm_is_removed_by_the_next_start(tmp_path: Path) -> None:
    require(cgroup_cpu_problem())
    backend = detect_backend()
    assert not isinstance(backend, str)
    spinning = toml(tmp_path / "spin.toml", "avmm.test=count avmm.n=100000000000000")
    crashed = subprocess.Popen([*AVMM, "up", str(spinning)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        owner = None
        deadline = time.monotonic() + 120
        while owner is None and time.monotonic() < deadline:
            owner = next((path for path in backend.owner_dirs()
                          if path.name.startswith(f"pid-{pid_namespace()}-{crashed.pid}-")
                          and (path / "vm-vm1").exists()), None)
            time.sleep(0.05)
        assert owner is not None, "the VM's cgroup never appeared"
    finally:
        crashed.send_signal(signal.SIGKILL)
        crashed.wait()
    # The crash left the cgroup behind (nothing removed it)...
    assert (owner / "vm-vm1").exists()
    # ...and the next avmm up removes it before its own VM starts.
    quick = toml(tmp_path / "quick.toml", "avmm.test=hello")
    result = subprocess.run([*AVMM, "up", str(quick)], capture_output=True, timeout=180,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not owner.exists()
