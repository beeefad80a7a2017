"""The state model: a VM's state as plain versioned data, the snapshot file format, and
restore. See DESIGN.md, "State, snapshot and migration".

* :mod:`.vcpu`, :mod:`.platform`, :mod:`.machine`: the KVM state of vCPUs and of the VM
  (irqchip, PIT, kvmclock) as dataclasses, saved and restored in the order KVM needs.
* :mod:`.codec`: the strict, self-describing binary encoding of such dataclasses.
* :mod:`.format`: the state file (magic, versions, sections, SHA-256).
* :mod:`.memory_file`: guest RAM as a sparse file, mapped back copy-on-write or copied.
* :mod:`.snapshot`: the snapshot directory, written atomically.

Nothing here imports trio: every function blocks, and async callers run it in a thread.

The names below are imported on first use (see :mod:`avmm._lazy`): a VM that boots needs
the codec (:mod:`.codec`, for its devices' state classes), not the snapshot writer.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._errors import SnapshotError as SnapshotError
    from ._errors import StateCompatibilityError as StateCompatibilityError
    from .machine import MachineState as MachineState
    from .machine import check_machine_restorable as check_machine_restorable
    from .machine import prepare_restore as prepare_restore
    from .machine import restore_machine as restore_machine
    from .machine import save_machine as save_machine
    from .memory_file import MemoryImage as MemoryImage
    from .memory_file import is_memfd_backed as is_memfd_backed
    from .platform import VmPlatformState as VmPlatformState
    from .platform import restore_platform as restore_platform
    from .platform import save_platform as save_platform
    from .snapshot import PartialSnapshot as PartialSnapshot
    from .snapshot import Snapshot as Snapshot
    from .snapshot import SnapshotFiles as SnapshotFiles
    from .snapshot import SnapshotInfo as SnapshotInfo
    from .snapshot import load_memory as load_memory
    from .snapshot import others_can_change_memory as others_can_change_memory
    from .snapshot import read_snapshot as read_snapshot
    from .snapshot import write_snapshot as write_snapshot
    from .snapshot import write_snapshot_files as write_snapshot_files
    from .vcpu import VcpuState as VcpuState
    from .vcpu import check_vcpu_restorable as check_vcpu_restorable
    from .vcpu import restore_vcpu as restore_vcpu
    from .vcpu import save_vcpu as save_vcpu

__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "SnapshotError": "._errors",
    "StateCompatibilityError": "._errors",
    "MachineState": ".machine",
    "check_machine_restorable": ".machine",
    "prepare_restore": ".machine",
    "restore_machine": ".machine",
    "save_machine": ".machine",
    "MemoryImage": ".memory_file",
    "is_memfd_backed": ".memory_file",
    "VmPlatformState": ".platform",
    "restore_platform": ".platform",
    "save_platform": ".platform",
    "PartialSnapshot": ".snapshot",
    "Snapshot": ".snapshot",
    "SnapshotFiles": ".snapshot",
    "SnapshotInfo": ".snapshot",
    "load_memory": ".snapshot",
    "others_can_change_memory": ".snapshot",
    "read_snapshot": ".snapshot",
    "write_snapshot": ".snapshot",
    "write_snapshot_files": ".snapshot",
    "VcpuState": ".vcpu",
    "check_vcpu_restorable": ".vcpu",
    "restore_vcpu": ".vcpu",
    "save_vcpu": ".vcpu",
})
