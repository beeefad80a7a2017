"""cgroup v2's threaded subtree on the real kernel: the order the V2 backend writes in
(process into its owner cgroup, the VM's child made "threaded", a thread id into its
``cgroup.threads``, the child removed after the thread has gone) is one the kernel
accepts. On this project's hybrid machines the unified mount has no cpu controller, so
enabling it is left out here (the fake-tree tests check that it is written); the rest is
the real thing. Runs in a child process: it moves its whole process between cgroups."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.prerequisites import require

REPO = Path(__file__).resolve().parents[2]


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    from pathlib import Path
    from avmm.cgroups import backend
    from avmm.cgroups.backend import V2Backend, owner_name, read_ids

    root = Path(sys.argv[1])
    origin = Path("/proc/self/cgroup").read_text().split("0::", 1)[1].split()[0]
    backend._enable_cpu = lambda path: None  # no cpu controller on a hybrid's v2 mount
    v2 = V2Backend(root)
    owner = v2.prepare_owner(owner_name())
    dirs = v2.create_vm(owner, "vm-threaded-test")
    assert (dirs[0] / "cgroup.type").read_text().strip() == "threaded"
    assert (owner / "cgroup.type").read_text().strip() == "domain threaded"
    assert os.getpid() in read_ids(owner / "cgroup.procs")
    release = threading.Event()
    tids = []
    thread = threading.Thread(target=lambda: (tids.append(threading.get_native_id()),
                                              release.wait()))
    thread.start()
    while not tids:
        time.sleep(0.01)
    v2.add_thread(dirs, tids[0])
    assert v2.threads(dirs) == [tids[0]]
    where = Path(f"/proc/self/task/{tids[0]}/cgroup").read_text()
    assert where.strip().endswith("/vm-threaded-test"), where
    release.set()
    thread.join()
    v2.remove_vm(dirs)
    assert not dirs[0].exists()
    # Back where it came from, so that the owner can go (a crash leaves it to clean-up).
    (root / origin.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))
    v2.remove_owner(owner)
    assert not owner.exists()
    print("threaded subtree ok")
""")


def run_on_the_real_cgroup2(script: str) -> str:
    """Run ``script`` (given the cgroup2 mount as its argument) in a child process as
    root, since it moves itself between cgroups; its output. It must succeed."""
    mount = cgroup2_mount()
    require(None if mount is not None else "no cgroup2 filesystem is mounted")
    require(None if os.geteuid() == 0 else "moving processes between cgroups needs root")
    assert mount is not None
    result = subprocess.run([sys.executable, "-c", script, str(mount)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_v2_threaded_subtree_sequence_on_the_real_kernel() -> None:
    assert "threaded subtree ok" in run_on_the_real_cgroup2(SCRIPT)
