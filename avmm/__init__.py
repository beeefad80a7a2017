"""avmm: an async, event-driven virtual machine monitor for Linux KVM, built on trio.

The public API is what this module re-exports; everything else may change. The names are
imported on first use (see :mod:`avmm._lazy`): ``import avmm.cli`` or ``avmm --help``
does not import the VM, and ``avmm up`` imports only what its config needs.
"""

from typing import TYPE_CHECKING

from ._lazy import import_structlog_without_rich, lazy_exports

# Before any avmm module imports structlog (each does, at the top): see the function.
import_structlog_without_rich()

if TYPE_CHECKING:
    from .config import VmConfig as VmConfig
    from .config import config_from_dict as config_from_dict
    from .config import load_config as load_config
    from .errors import AvmmError as AvmmError
    from .errors import ConfigError as ConfigError
    from .errors import KvmError as KvmError
    from .errors import VmStartError as VmStartError
    from .host import Host as Host
    from .lifecycle import StopReason as StopReason
    from .lifecycle import VmExit as VmExit
    from .lifecycle import VmState as VmState
    from .logs import configure_logging as configure_logging
    from .ratelimit import BucketConfig as BucketConfig
    from .ratelimit import RateLimitConfig as RateLimitConfig
    from .vm import VirtualMachine as VirtualMachine

__version__ = "0.1.0"

__all__ = [
    "AvmmError",
    "BucketConfig",
    "ConfigError",
    "Host",
    "KvmError",
    "RateLimitConfig",
    "StopReason",
    "VirtualMachine",
    "VmConfig",
    "VmExit",
    "VmStartError",
    "VmState",
    "config_from_dict",
    "configure_logging",
    "load_config",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "VmConfig": ".config",
    "config_from_dict": ".config",
    "load_config": ".config",
    "AvmmError": ".errors",
    "ConfigError": ".errors",
    "KvmError": ".errors",
    "VmStartError": ".errors",
    "Host": ".host",
    "StopReason": ".lifecycle",
    "VmExit": ".lifecycle",
    "VmState": ".lifecycle",
    "configure_logging": ".logs",
    "BucketConfig": ".ratelimit",
    "RateLimitConfig": ".ratelimit",
    "VirtualMachine": ".vm",
})
