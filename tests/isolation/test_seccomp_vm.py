"""Real VMs under the filters: ``avmm up --seccomp kill`` (and ``avmm backend``) run the
test guest's workloads to the end with every thread filtered, and no SIGSYS."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.isolation.scenarios import AVMM, REPO, SCENARIOS, vm_toml
from tests.prerequisites import net_problem, require

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_workload_completes_with_filters_in_kill_mode(tmp_path: Path, name: str) -> None:
    if name == "net-echo":
        require(net_problem())
    outcome = SCENARIOS[name](tmp_path, "kill")
    assert not outcome.problems, (outcome.problems, outcome.stderr[-3000:])


def _status(pid: int, tid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.mark.parametrize("flags", [[], ["--seccomp", "kill"]], ids=["default", "kill"])
def test_every_thread_is_filtered_and_the_vcpu_stacks_its_own_filter(
        tmp_path: Path, flags: list[str]) -> None:
    """``Seccomp: 2`` (filter mode) and NoNewPrivs on every thread; the vCPU thread
    (named avmm-vcpu) holds one filter more than the process's. Kill is the default."""
    config = tmp_path / "count.toml"
    config.write_text(vm_toml("avmm.test=count avmm.n=100000000000000", serial="none"))
    vmm = subprocess.Popen([*AVMM, "up", str(config), *flags],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        names: dict[int, str] = {}
        statuses: dict[int, dict[str, str]] = {}
        # The vCPU thread takes its name, then builds and loads its own filter: a look
        # between the two (a moment, longer on a loaded host) sees one filter. Looked at
        # again until it has both, or the deadline says it never got its own.
        while not any(name == "avmm-vcpu" and statuses.get(tid, {}).get("Seccomp_filters",
                                                                        "").strip() == "2"
                      for tid, name in names.items()):
            assert vmm.poll() is None, vmm.communicate()[1]
            assert time.monotonic() < deadline, (names, statuses)
            time.sleep(0.1)
            names = {}
            for tid in os.listdir(f"/proc/{vmm.pid}/task"):
                try:
                    names[int(tid)] = Path(f"/proc/{vmm.pid}/task/{tid}/comm").read_text()\
                        .strip()
                except FileNotFoundError:
                    pass  # a helper thread that just ended
            statuses = {}
            for tid in names:
                with contextlib.suppress(FileNotFoundError):  # ended meanwhile
                    statuses[tid] = _status(vmm.pid, tid)
    finally:
        vmm.kill()
        vmm.communicate(timeout=30)
    assert all(status["Seccomp"].strip() == "2" for status in statuses.values()), statuses
    assert all(status["NoNewPrivs"].strip() == "1" for status in statuses.values())
    filters = {tid: int(status["Seccomp_filters"]) for tid, status in statuses.items()}
    vcpu = next(tid for tid, name in names.items() if name == "avmm-vcpu")
    assert filters[vmm.pid] == 1, filters  # the event-loop thread: the process's union
    assert filters[vcpu] == 2, filters     # ... and the vCPU's own list on top
    assert vmm.returncode == -9


def test_seccomp_off_loads_no_filter_and_says_so(tmp_path: Path) -> None:
    config = tmp_path / "hello.toml"
    config.write_text(vm_toml("avmm.test=hello"))
    result = subprocess.run([*AVMM, "up", str(config), "--seccomp", "off"],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "avmm-testguest: hello" in result.stdout
    assert re.search(r"seccomp filters are off", result.stderr), result.stderr



@pytest.mark.parametrize(("flags", "filtered"), [([], True), (["--seccomp", "off"], False)],
                         ids=["default", "off"])
def test_avmm_serve_loads_the_daemon_filter_by_default(tmp_path: Path, flags: list[str],
                                                       filtered: bool) -> None:
    """``avmm serve`` runs under the daemon's filter (kill mode) from before it serves
    its first request, on every thread; ``--seccomp off`` loads none and says so. (The
    ``serve`` scenario above drives a filtered daemon through a VM's whole life.)"""
    sock = tmp_path / "api.sock"
    daemon = subprocess.Popen([*AVMM, "serve", "--socket", str(sock), *flags],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, cwd=REPO, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert daemon.poll() is None, daemon.communicate()[1]
            assert time.monotonic() < deadline, "avmm serve did not start"
            time.sleep(0.05)
        # A request answered: the filter must hold by then (it is loaded before the
        # daemon accepts its first connection).
        listing = subprocess.run([*AVMM, "ps", "--socket", str(sock)], capture_output=True,
                                 text=True, timeout=60, cwd=REPO, check=False)
        assert listing.returncode == 0, listing.stderr
        statuses = [_status(daemon.pid, int(tid))
                    for tid in os.listdir(f"/proc/{daemon.pid}/task")]
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    expected = "2" if filtered else "0"
    assert all(status["Seccomp"].strip() == expected for status in statuses), statuses
    assert ("seccomp filters are off" in err) is not filtered, err
