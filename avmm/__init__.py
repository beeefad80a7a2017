"""avmm: an async, event-driven virtual machine monitor for Linux KVM, built on trio.

The public API is what this module re-exports; everything else may change.
"""

from .config import VmConfig as VmConfig
from .config import config_from_dict as config_from_dict
from .config import load_config as load_config
from .errors import AvmmError as AvmmError
from .errors import ConfigError as ConfigError
from .errors import KvmError as KvmError
from .errors import VmStartError as VmStartError
from .lifecycle import StopReason as StopReason
from .lifecycle import VmExit as VmExit
from .lifecycle import VmState as VmState
from .logs import configure_logging as configure_logging
from .ratelimit import BucketConfig as BucketConfig
from .ratelimit import RateLimitConfig as RateLimitConfig
from .vm import VirtualMachine as VirtualMachine

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Host (avmm.host) on first use: most programs never need it.
    if name == "Host":
        from .host import Host

        return Host
    raise AttributeError(f"module 'avmm' has no attribute {name!r}")
