"""A hosted VM is shown ``stopped`` only together with how it ended: between the VM's
own end and the host's record of it, the API shows ``stopping`` (a client that saw
``stopped`` read ``exit`` as null in that window)."""

from __future__ import annotations

from types import SimpleNamespace

from avmm.host import HostedVm
from avmm.lifecycle import StopReason, VmExit, VmState
from tests.vm.helpers import guest_config


def test_a_vm_that_ended_is_stopping_until_the_host_recorded_its_exit() -> None:
    hosted = HostedVm("vm-1", guest_config("avmm.test=hello"), start_paused=False)
    ended = VmExit(StopReason.MIGRATED, 0, "migrated to unix:/x")
    config = hosted.config
    hosted._vm = SimpleNamespace(  # type: ignore[assignment]
        state=VmState.STOPPED, exit=ended, config=config)
    # What GET /vms/{id} shows as "state" and "exit" (HostedVm.to_dict).
    assert (hosted.state, hosted.exit) == (VmState.STOPPING, None)
    hosted._done.set()
    assert (hosted.state, hosted.exit) == (VmState.STOPPED, ended)
