"""CPU controls per VM through the host's cgroups (v2 threaded subtree or v1 ``cpu``),
and vCPU thread affinity. See :mod:`avmm.cgroups.backend` for the layout on the host and
:mod:`avmm.cgroups.vm_cpu` for a VM's life cycle."""

from .backend import (
    CFS_PERIOD_US,
    CgroupError,
    CpuUsage,
    V1Backend,
    V2Backend,
    cfs_period_us,
    detect_backend,
    quota_us,
    weight_to_shares,
)
from .cpulist import CpuListError, format_cpu_list, parse_cpu_list, usable_cpus
from .vm_cpu import (
    CpuLimits,
    HostCgroups,
    StartGate,
    VmCpu,
    cleanup_stale,
    host_cgroups,
    limits_from_machine,
)

__all__ = [
    "CFS_PERIOD_US",
    "CgroupError",
    "CpuLimits",
    "CpuListError",
    "CpuUsage",
    "HostCgroups",
    "StartGate",
    "V1Backend",
    "V2Backend",
    "VmCpu",
    "cfs_period_us",
    "cleanup_stale",
    "detect_backend",
    "format_cpu_list",
    "host_cgroups",
    "limits_from_machine",
    "parse_cpu_list",
    "quota_us",
    "usable_cpus",
    "weight_to_shares",
]
