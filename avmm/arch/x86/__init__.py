"""The x86-64 platform layer: boot protocols, zero page, e820, page tables, GDT, CPUID.

Pure Python over :class:`avmm.memory.GuestMemory`; no KVM, no trio. The KVM layer applies
:class:`BootCpuState` to the boot vCPU and :func:`filter_cpuid`'s result to every vCPU.
"""

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
