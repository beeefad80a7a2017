"""The x86-64 platform layer: boot protocols, zero page, e820, page tables, GDT, CPUID.

Pure Python over :class:`avmm.memory.GuestMemory`; no KVM, no trio. The KVM layer applies
:class:`BootCpuState` to the boot vCPU and :func:`filter_cpuid`'s result to every vCPU.

The names below are imported on first use (see :mod:`avmm._lazy`): ``avmm.config`` needs
:mod:`.cpuid` only, not the boot protocols.
"""

from typing import TYPE_CHECKING

from ..._lazy import lazy_exports

if TYPE_CHECKING:
    from .boot_cpu import BootCpuState as BootCpuState
    from .boot_cpu import DescriptorTable as DescriptorTable
    from .boot_cpu import boot_cpu_state as boot_cpu_state
    from .boot_params import E820Entry as E820Entry
    from .boot_params import build_e820 as build_e820
    from .boot_params import build_zero_page as build_zero_page
    from .bzimage import BzImage as BzImage
    from .bzimage import parse_bzimage as parse_bzimage
    from .cpuid import CpuidEntry as CpuidEntry
    from .cpuid import CpuidError as CpuidError
    from .cpuid import filter_cpuid as filter_cpuid
    from .elf import ElfImage as ElfImage
    from .elf import parse_elf as parse_elf
    from .gdt import Segment as Segment
    from .gdt import decode_segment as decode_segment
    from .gdt import encode_segment as encode_segment
    from .loader import KernelLoad as KernelLoad
    from .loader import load_kernel as load_kernel
    from .loader import place_initrd as place_initrd
    from .pagetables import write_identity_map as write_identity_map

__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "BootCpuState": ".boot_cpu",
    "DescriptorTable": ".boot_cpu",
    "boot_cpu_state": ".boot_cpu",
    "E820Entry": ".boot_params",
    "build_e820": ".boot_params",
    "build_zero_page": ".boot_params",
    "BzImage": ".bzimage",
    "parse_bzimage": ".bzimage",
    "CpuidEntry": ".cpuid",
    "CpuidError": ".cpuid",
    "filter_cpuid": ".cpuid",
    "ElfImage": ".elf",
    "parse_elf": ".elf",
    "Segment": ".gdt",
    "decode_segment": ".gdt",
    "encode_segment": ".gdt",
    "KernelLoad": ".loader",
    "load_kernel": ".loader",
    "place_initrd": ".loader",
    "write_identity_map": ".pagetables",
})
