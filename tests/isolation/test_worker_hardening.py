"""What a hostile worker could do to the host through what the daemon hands it, and
what keeps it from it: a file size limit on everything it writes (RLIMIT_FSIZE)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avmm.config import SerialConfig
from avmm.host import Host
from avmm.isolation.jail import UidAllocator
from avmm.isolation.worker_vm import ProcessIsolation
from avmm.lifecycle import VmState
from tests.isolation.test_process_mode import UIDS, _echo_here
from tests.prerequisites import require
from tests.vm.helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


def _need_root() -> None:
    if os.geteuid() != 0:
        require("process isolation needs root (namespaces, mounts, a jail uid)")


def _isolation(tmp_path: Path, **settings: object) -> ProcessIsolation:
    return ProcessIsolation(jail_root=str(tmp_path / "jail"), uids=UidAllocator(UIDS),
                            **settings)  # type: ignore[arg-type]


# -- RLIMIT_FSIZE --------------------------------------------------------------------------


async def test_a_workers_serial_file_stops_growing_at_its_file_size_limit(
    tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    """A guest that writes without end to its serial log fills no disk: the worker's
    RLIMIT_FSIZE stops the file at the bound (EFBIG, SIGXFSZ ignored), the worker says
    so once, and the guest runs on."""
    _need_root()
    limit = 100
    (tmp_path / "out").mkdir()
    log = tmp_path / "out" / "serial.log"
    async with Host(isolation=_isolation(tmp_path, max_file_bytes=limit)) as host:
        vm = await host.create(guest_config("avmm.test=echo",
                                            serial=SerialConfig("file", log)))
        assert vm.pid is not None
        limits = Path(f"/proc/{vm.pid}/limits").read_text()
        assert f"Max file size             {limit}                  {limit}" in limits, \
            limits
        for text in ("a" * 80, "b" * 80):
            await _echo_here(vm, text)
        assert log.stat().st_size == limit
        assert vm.state is VmState.RUNNING
        await vm.stop()
    assert "reached the file size limit" in capfd.readouterr().err


def test_the_file_size_limit_covers_what_a_vm_writes_legitimately() -> None:
    from avmm.isolation.jail import file_size_limit
    from avmm.state.format import MAX_STATE_FILE_BYTES

    config = guest_config("avmm.test=echo", memory_mib=512)
    assert file_size_limit(config) == 512 << 20  # a snapshot's memory file
    assert file_size_limit(config, [3 << 30, 1 << 20]) == 3 << 30  # the largest disk
    assert file_size_limit(guest_config("x", memory_mib=16)) == MAX_STATE_FILE_BYTES
