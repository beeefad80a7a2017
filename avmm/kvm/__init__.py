"""The KVM binding: ``Kvm`` → ``Vm`` → ``Vcpu``, one method per ioctl.

Struct layouts and ioctl numbers come from ``<linux/kvm.h>`` through cffi (API mode,
compiled at install). This package knows nothing about devices, config files or trio.
"""

from . import exits as exits
from .system import CpuidEntry as CpuidEntry
from .system import Kvm as Kvm
from .vcpu import Vcpu as Vcpu
from .vcpu import install_kick_handler as install_kick_handler
from .vm import Vm as Vm
