"""The exception hierarchy: one root, a narrow subclass per failure.

Every error avmm raises on purpose is an :class:`AvmmError`. Messages are written for the
person running the VM: they say what went wrong and, where possible, what to change.
"""

from __future__ import annotations

import errno as errno_module
import os


class AvmmError(Exception):
    """Root of every error avmm raises deliberately."""


class KvmError(AvmmError):
    """An ioctl on /dev/kvm, a VM fd or a vCPU fd failed.

    Carries the ioctl's name and the errno so that callers can tell EINTR/EAGAIN from a
    real failure without parsing the message.
    """

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        name = errno_module.errorcode.get(errno, str(errno))
        message = f"{ioctl} failed: {name} ({os.strerror(errno)})"
        if detail:
            message += f": {detail}"
        super().__init__(message)


class KvmUnavailableError(AvmmError):
    """/dev/kvm is missing, unreadable, or speaks an API version we do not know."""


class GuestMemoryError(AvmmError):
    """Guest memory could not be created or mapped."""


class GuestAddressError(GuestMemoryError):
    """A guest physical address range falls (partly) outside guest RAM."""

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length
        super().__init__(
            f"guest address range 0x{address:x}..0x{address + length:x} "
            f"({length} bytes) is not inside guest RAM"
        )


class BootError(AvmmError):
    """The kernel image, initrd or command line cannot be loaded into the guest."""


class ConfigError(AvmmError):
    """A vm.toml (or an equivalent dict) is malformed.

    ``str()`` is one line naming the file and the key, fit to print as is.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        self.reason = message
        where = path or "<config>"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}")


class HostFileError(ConfigError):
    """A file, directory or socket named in a VM config cannot be used as it is: the wrong
    kind of file (a FIFO where a log file goes, a regular file where a socket is to be
    bound), too large, or gone. Bad input, as a ConfigError is: ``key`` names the key."""


class PathNotAllowedError(HostFileError):
    """A path in a config sent to the daemon resolves outside every directory that
    ``avmm serve --allow-path`` allows (the management API answers 403)."""


class VcpuError(AvmmError):
    """A vCPU stopped in a way the VM cannot continue from (failed entry, emulation
    failure, triple fault)."""


class VmStateError(AvmmError):
    """An operation was asked of a VM in a state that does not allow it."""


class StateError(AvmmError):
    """A VM's saved state cannot be written, read or restored: the common parent of
    :class:`avmm.state.SnapshotError` (the snapshot files, the machine state) and
    :class:`avmm.devices.DeviceStateError` (one device's state)."""


class VmStartError(AvmmError):
    """A VM could not be built; the message names the step that failed.

    ``error`` is the exception that made the step fail, if any; :attr:`bad_input` tells
    whether that was the user's input (a file that is not a kernel, an initrd larger
    than RAM, a path that cannot be used) rather than a failure of the host.
    """

    def __init__(self, vm: str, step: str, cause: str,
                 error: BaseException | None = None) -> None:
        self.vm = vm
        self.step = step
        self.error = error
        super().__init__(f"cannot start VM {vm!r}: {step}: {cause}")

    @property
    def bad_input(self) -> bool:
        """The config named something that cannot be booted or used: fix the input, not
        the host (``avmm up`` exits 2 for it, not 6)."""
        return isinstance(self.error, BootError | ConfigError | StateError)


class UnknownVmError(AvmmError):
    """No VM with this id is hosted here (it never existed, or it was removed)."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        super().__init__(f"no VM with id {vm_id!r} on this host; list the VMs to see "
                         "their ids")


def leaf_errors(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``, with (nested) exception groups flattened: what a
    front door reports when trio hands it an ExceptionGroup."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_errors(inner)]
    return [error]
