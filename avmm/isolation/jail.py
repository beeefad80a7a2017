"""The jailer: the steps that shut a per-VM worker process into a root of its own
(issue 14, item 2).

Who calls what, in order:

1. The daemon (root) plans the jail with :func:`plan_jail` (pure: it reads the VM's
   config and the running interpreter, nothing on disk), makes the empty jail directory
   with :func:`prepare_jail_dir` and sends the :class:`JailSpec` to the worker as JSON
   (:meth:`JailSpec.to_dict`; the worker reads it back with :meth:`JailSpec.from_dict`,
   which checks it as hostile input).
2. The worker, still root and still single-threaded, with everything imported that it
   needs (``pyseccomp`` included: its import runs ``ldconfig``, which the jail does not
   hold), calls :func:`enter_jail`. Afterwards it is PID 1 of a new PID namespace, its
   root is a tmpfs holding only the bind mounts the VM needs, its environment is empty
   and only fds 0, 1, 2 and the ones it asked to keep are open.
3. It builds the VM (as root inside the jail: /dev/kvm, disks, back-end sockets; the
   daemon opened its outputs and taps and handed them over), then calls
   :func:`drop_privileges` before any vCPU thread starts, then loads its seccomp filters.
4. Once the worker has exited, the daemon calls :func:`remove_jail`.

The mounts live in the worker's own mount namespace, so the host never sees them: when
the worker exits, the kernel takes them down, and the host is left with the empty
directory that :func:`prepare_jail_dir` made.

Inside the jail, every path is where it is on the host (a disk at ``/srv/vm/a.img`` is at
``/srv/vm/a.img`` in the jail too), so the VM's config is used unchanged. The layout::

    /                 tmpfs (1 MiB), read-only once built; holds only mount points
    /dev              tmpfs with the device nodes of the spec (owned by the jail's uid),
                      read-only once built
    /proc             a fresh proc: the new PID namespace's processes only
    /tmp              tmpfs (16 MiB) owned by the jail's uid, mode 0700
    <each bind>       the host path, read-only unless the bind is writable; always
                      nosuid and nodev; not recursive (a mount below a bound directory
                      on the host stays out of the jail, so nothing unplanned appears
                      and nothing below a read-only bind stays writable)
    <each dir>        an empty directory of the root tmpfs, where the host has the
                      directory of an output the daemon opened (the worker is handed its
                      fd; the config it checks again names the directory)

Everything that talks to the kernel goes through libc by ctypes, and every return is
checked: a failure is a :class:`JailError` that names the step and the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import os
import pwd
import re
import resource
import signal
import stat
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog

from ..errors import AvmmError

if TYPE_CHECKING:
    from ..config import VmConfig

log = structlog.get_logger(__name__)

__all__ = [
    "DEFAULT_JAIL_ROOT",
    "DEFAULT_UID_RANGE",
    "Bind",
    "JailError",
    "JailSpec",
    "UidAllocator",
    "become_child_subreaper",
    "drop_privileges",
    "enter_jail",
    "file_size_limit",
    "host_named_ids",
    "nss_names_id",
    "parse_uid_range",
    "plan_jail",
    "prepare_jail_dir",
    "remove_jail",
    "remove_stale_jails",
    "runtime_binds",
    "subordinate_ranges",
]

DEFAULT_JAIL_ROOT: Final = "/srv/avmm/jail"
#: In a VM's jail directory on the host: the daemon that made it (its owner name, as
#: avmm.cgroups names a process: PID namespace, PID, start time), so that the next
#: daemon can tell a jail whose daemon was killed from another live daemon's. The
#: worker never sees it: its root tmpfs is mounted over the directory.
JAIL_OWNER_FILE: Final = ".avmm-owner"
#: An owner name is short; anything longer is not one.
_OWNER_MAX_BYTES: Final = 128
#: What a VM id (the last component of a jail's root) may look like: the daemon's ids
#: (``vm-1a2b3c``) and anything like them; never "." or "..".
VM_ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"
_VM_ID_RE: Final = re.compile(VM_ID_PATTERN)
#: ``ip netns`` names (as avmm.config accepts them).
_NETNS_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
NETNS_DIR: Final = "/run/netns"

#: The device nodes a jail may hold; anything else in a spec is refused.
ALLOWED_DEVICES: Final = frozenset({
    "/dev/kvm", "/dev/net/tun", "/dev/vhost-net", "/dev/vhost-vsock",
    "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
})
#: Made in every jail: what libraries open without asking (/dev/null, /dev/urandom).
_BASE_DEVICES: Final = ("/dev/null", "/dev/urandom")
#: Paths a bind may not name: the jail makes its own (and "/" would be the host).
_RESERVED: Final = ("/dev", "/proc")

_PATH_MAX: Final = 4096
_MAX_BINDS: Final = 256
#: A uid or gid of the jail: 0 (root) and 0xFFFFFFFF ((uid_t) -1, "unchanged") are never
#: valid; 0xFFFFFFFE is the last one.
_ID_MAX: Final = 0xFFFF_FFFE
_MAX_FILES_MIN: Final = 64
#: fs.nr_open's default: RLIMIT_NOFILE cannot go above it.
_MAX_FILES_MAX: Final = 1 << 20
#: The largest RLIMIT_FSIZE a spec may ask for (a file of 2^62 bytes is no limit).
_MAX_FILE_BYTES: Final = 1 << 62

_ROOT_TMPFS: Final = "mode=0755,size=1m,nr_inodes=4096"
_DEV_TMPFS: Final = "mode=0755,size=64k,nr_inodes=64"
_TMP_TMPFS_SIZE: Final = "16m"
#: Where the old root hangs during pivot_root (inside the new root, then removed).
_OLD_ROOT: Final = ".old-root"


class JailError(AvmmError):
    """A jail could not be planned, built, entered or removed; the message names the
    step and the path."""


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True, slots=True)
class Bind:
    """A host path mounted at the same path inside the jail."""

    path: str
    writable: bool = False


@dataclass(frozen=True, slots=True)
class JailSpec:
    """Everything :func:`enter_jail` and :func:`drop_privileges` need, checked when
    made (the same checks whether it comes from :func:`plan_jail` or from JSON)."""

    #: The per-VM jail directory, ``<jail_root>/<vm_id>``.
    root: str
    uid: int
    gid: int
    #: Sorted by path, no duplicates: parents are mounted before what lies below them.
    binds: tuple[Bind, ...]
    #: Device nodes to make inside the jail (from :data:`ALLOWED_DEVICES`).
    devices: tuple[str, ...]
    #: A network namespace file to enter (``/run/netns/NAME``), or None.
    netns: str | None = None
    #: Unshare a network namespace of its own instead (empty: a loopback that is down),
    #: so that the process reaches no network and no abstract unix socket of the host.
    own_network: bool = False
    #: RLIMIT_NOFILE.
    max_files: int = 4096
    #: Empty directories made in the root (sorted, no duplicates): stand-ins for the
    #: host directories of the VM's output files and console socket, which the daemon
    #: opens and hands over (nothing of the host directory is in the jail).
    dirs: tuple[str, ...] = ()
    #: RLIMIT_FSIZE (bytes), or None to leave it as it is: the largest file the
    #: process may write to, through any fd it holds (see :func:`file_size_limit`).
    max_file_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_path(self.root, "root")
        if self.root == "/" or not _VM_ID_RE.fullmatch(os.path.basename(self.root)):
            raise JailError(f"jail root {self.root!r} must end in a VM id "
                            f"({VM_ID_PATTERN})")
        for name in ("uid", "gid"):
            _check_int(getattr(self, name), name, 1, _ID_MAX)
        _check_int(self.max_files, "max_files", _MAX_FILES_MIN, _MAX_FILES_MAX)
        if self.max_file_bytes is not None:
            _check_int(self.max_file_bytes, "max_file_bytes", 1, _MAX_FILE_BYTES)
        if not isinstance(self.binds, tuple) or len(self.binds) > _MAX_BINDS:
            raise JailError(f"binds must be a tuple of at most {_MAX_BINDS} Bind")
        seen: set[str] = set()
        for index, bind in enumerate(self.binds):
            key = f"binds[{index}]"
            if not isinstance(bind, Bind):
                raise JailError(f"{key} is not a Bind")
            _check_path(bind.path, f"{key}.path")
            if bind.path == "/" or any(_within(bind.path, reserved) for reserved in _RESERVED):
                raise JailError(f"{key}.path {bind.path!r} is made by the jail itself; "
                                "bind something else")
            if _within(bind.path, self.root) or _within(self.root, bind.path):
                raise JailError(f"{key}.path {bind.path!r} overlaps the jail root")
            if not isinstance(bind.writable, bool):
                raise JailError(f"{key}.writable must be true or false")
            if bind.path in seen:
                raise JailError(f"{key}.path {bind.path!r} is bound twice")
            seen.add(bind.path)
        if [bind.path for bind in self.binds] != sorted(seen):
            raise JailError("binds must be sorted by path")
        if not isinstance(self.dirs, tuple) or len(self.dirs) > _MAX_BINDS \
                or list(self.dirs) != sorted(set(self.dirs)):
            raise JailError(f"dirs must be a sorted tuple of at most {_MAX_BINDS} paths "
                            "without duplicates")
        for index, path in enumerate(self.dirs):
            _check_path(path, f"dirs[{index}]")
            if path == "/" or any(_within(path, reserved) for reserved in _RESERVED):
                raise JailError(f"dirs[{index}] {path!r} is made by the jail itself")
        if not isinstance(self.devices, tuple) or len(set(self.devices)) != len(self.devices):
            raise JailError("devices must be a tuple without duplicates")
        for device in self.devices:
            if device not in ALLOWED_DEVICES:
                raise JailError(f"device {device!r} is not one a jail may hold (one of "
                                f"{', '.join(sorted(ALLOWED_DEVICES))})")
        if not isinstance(self.own_network, bool):
            raise JailError("own_network must be true or false")
        if self.own_network and self.netns is not None:
            raise JailError("a jail enters netns or makes its own network namespace "
                            "(own_network), not both")
        if self.netns is not None:
            _check_path(self.netns, "netns")
            if (os.path.dirname(self.netns) != NETNS_DIR
                    or not _NETNS_NAME_RE.fullmatch(os.path.basename(self.netns))
                    or os.path.basename(self.netns) in {".", ".."}):
                raise JailError(f"netns {self.netns!r} must be {NETNS_DIR}/NAME")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data; :meth:`from_dict` reads it back."""
        return {
            "root": self.root,
            "uid": self.uid,
            "gid": self.gid,
            "binds": [{"path": bind.path, "writable": bind.writable} for bind in self.binds],
            "devices": list(self.devices),
            "netns": self.netns,
            "own_network": self.own_network,
            "max_files": self.max_files,
            "dirs": list(self.dirs),
            "max_file_bytes": self.max_file_bytes,
        }

    @classmethod
    def from_dict(cls, data: Any) -> JailSpec:
        """A spec from (hostile) JSON-able data: unknown keys, wrong types, relative or
        unnormalised paths, ``..``, uid/gid 0 and out-of-range numbers are refused."""
        _check_keys(data, "jail spec", required={"root", "uid", "gid", "binds", "devices"},
                    optional={"netns", "own_network", "max_files", "dirs",
                              "max_file_bytes"})
        binds = data["binds"]
        if not isinstance(binds, list):
            raise JailError("jail spec: binds must be a list")
        parsed: list[Bind] = []
        for index, item in enumerate(binds[:_MAX_BINDS + 1]):
            _check_keys(item, f"binds[{index}]", required={"path"}, optional={"writable"})
            writable = item.get("writable", False)
            if not isinstance(writable, bool):
                raise JailError(f"binds[{index}].writable must be true or false")
            parsed.append(Bind(path=item["path"], writable=writable))
        devices = data["devices"]
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise JailError("jail spec: devices must be a list of paths")
        dirs = data.get("dirs", [])
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise JailError("jail spec: dirs must be a list of paths")
        return cls(root=data["root"], uid=data["uid"], gid=data["gid"], binds=tuple(parsed),
                   devices=tuple(devices), netns=data.get("netns"),
                   own_network=data.get("own_network", False),
                   max_files=data.get("max_files", 4096), dirs=tuple(dirs),
                   max_file_bytes=data.get("max_file_bytes"))


def _check_keys(data: Any, what: str, *, required: set[str], optional: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise JailError(f"{what} must be an object")
    unknown = set(data) - required - optional
    if unknown:
        raise JailError(f"{what}: unknown key {sorted(map(str, unknown))[0]!r}")
    missing = required - set(data)
    if missing:
        raise JailError(f"{what}: missing key {sorted(missing)[0]!r}")


def _check_int(value: Any, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise JailError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def _check_path(path: Any, name: str) -> None:
    """An absolute, normalised path without "." or ".." components."""
    if not isinstance(path, str) or not path:
        raise JailError(f"{name} must be a path (a non-empty string)")
    if "\0" in path or len(path.encode(errors="surrogateescape")) > _PATH_MAX:
        raise JailError(f"{name} must be a path without NUL of at most {_PATH_MAX} bytes")
    if (not path.startswith("/") or path.startswith("//") or os.path.normpath(path) != path
            or any(part in {".", ".."} for part in path.split("/"))):
        raise JailError(f"{name} {path!r} must be an absolute, normalised path "
                        "(no '.', '..', '//' or trailing '/')")


def _within(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or lies below it (both normalised and absolute)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


# --------------------------------------------------------------------------- planning


def plan_jail(config: VmConfig, vm_id: str, *, jail_root: str = DEFAULT_JAIL_ROOT,
              uid: int, gid: int, max_file_bytes: int | None = None,
              boot_files: bool = True) -> JailSpec:
    """What the VM of ``config`` needs inside its jail, plus :func:`runtime_binds`.

    Kernel and initrd read-only (unless ``boot_files`` is false: a VM that comes in by
    a migration stream with its config never reads them, and they need not exist on
    this host); disk images with the config's access; the *directory*
    of each vhost-user socket (a back-end that restarts makes a new socket inode, which a
    bind of the file would not show), read-only (connect(2) needs no write access to the
    mount); ``/dev/kvm`` always. Serial/console output files and a console socket are
    not in the jail: the daemon opens (binds) them and hands their fds over; their
    directories are empty stand-ins (``dirs``), for the worker's own check of its config
    (an output in ``/dev`` needs none). Nor are taps: the daemon opens each in its NIC's
    network namespace and hands its fd over, so the jail has neither ``/dev/net/tun``
    nor a ``/run/netns`` file. The worker needs no network at all (it makes no IP
    socket; the daemon makes a migration's connections and hands them over): it gets
    an empty network namespace of its own (``own_network``), with no way to the host's
    networks or its abstract unix sockets.
    """
    if not isinstance(vm_id, str) or not _VM_ID_RE.fullmatch(vm_id):
        raise JailError(f"VM id {vm_id!r} cannot name a jail: use letters, digits, '-' "
                        f"and '_' (at most 64)")
    _check_path(jail_root, "jail root")
    wanted: dict[str, bool] = {}
    devices = {"/dev/kvm", *_BASE_DEVICES}
    dirs: set[str] = set()

    def bind(path: str | os.PathLike[str], writable: bool) -> None:
        text = os.fspath(path)
        wanted[text] = wanted.get(text, False) or writable

    def output(path: str | os.PathLike[str]) -> None:
        parent = os.path.dirname(os.fspath(path))
        if parent != "/" and not any(_within(parent, reserved) for reserved in _RESERVED):
            dirs.add(parent)

    if boot_files:
        bind(config.boot.kernel, False)
        if config.boot.initrd is not None:
            bind(config.boot.initrd, False)
    for disk in config.disks:
        if disk.path is not None:
            bind(disk.path, not disk.readonly)
        if disk.vhost_user is not None:
            bind(os.path.dirname(disk.vhost_user), False)
    for net in config.nets:
        if net.vhost_user is not None:
            bind(os.path.dirname(net.vhost_user), False)
    for generic in config.vhost_users:
        bind(os.path.dirname(generic.socket), False)
    if config.serial.mode == "file" and config.serial.path is not None:
        output(config.serial.path)
    if config.console is not None and config.console.path is not None:
        output(config.console.path)
    for runtime in runtime_binds():
        wanted.setdefault(runtime.path, False)
    return JailSpec(
        root=os.path.join(jail_root, vm_id), uid=uid, gid=gid,
        binds=_minimal_binds(Bind(path, writable) for path, writable in wanted.items()),
        devices=tuple(sorted(devices)),
        own_network=True,
        dirs=tuple(sorted(dirs)),
        max_file_bytes=max_file_bytes)


def file_size_limit(config: VmConfig, disk_bytes: Iterable[int] = ()) -> int:
    """RLIMIT_FSIZE for the worker of ``config``'s VM: the largest file it writes for a
    legitimate reason. Its guest RAM (a snapshot's memory file, written through the fd
    the daemon hands it; its own RAM memfd), a snapshot's state file (at most
    :data:`~avmm.state.format.MAX_STATE_FILE_BYTES`), its disk images (``disk_bytes``,
    their sizes: the guest's writes stay inside them). Anything else it writes, the
    serial/console output file above all, stops growing there: a write past it fails
    with EFBIG (SIGXFSZ is ignored), and the host's disk does not fill up."""
    from ..state.format import MAX_STATE_FILE_BYTES

    return max(config.machine.memory_mib << 20, MAX_STATE_FILE_BYTES, *disk_bytes)


def _minimal_binds(binds: Iterable[Bind]) -> tuple[Bind, ...]:
    """Sorted by path, one per path (writable wins), without a bind that lies below
    another one with the same access. A read-only bind below a writable one stays (a
    read-only disk image in a directory that is writable for a log file): the mount on
    top keeps it read-only, and a mount point cannot be removed or renamed."""
    merged: dict[str, bool] = {}
    for bind in binds:
        path = os.path.normpath(bind.path)
        merged[path] = merged.get(path, False) or bind.writable
    kept: list[Bind] = []
    for path in sorted(merged):
        writable = merged[path]
        if any(_within(path, outer.path) and outer.writable == writable for outer in kept):
            continue
        kept.append(Bind(path, writable))
    return tuple(kept)


def runtime_binds() -> tuple[Bind, ...]:
    """Read-only binds the running Python needs after pivot_root: modules imported late
    and the shared libraries they load (``ctypes``' libc, libseccomp, cffi's ``.so``
    files).

    - the standard library and ``lib-dynload`` (``sys.path`` entries under
      ``sys.base_prefix``);
    - a virtual environment's ``sys.prefix`` (its site-packages), or without one the
      site-packages directories;
    - the ``avmm`` package's own directory (an editable install keeps it outside
      site-packages);
    - ``/usr/lib``, ``/lib``, ``/lib64``, ``/usr/lib64`` (a symlink such as Debian's
      ``/lib -> usr/lib`` is bound as the directory it names, so paths from the loader's
      cache work) and ``/etc/ld.so.cache``.

    Only paths that exist now; sorted, without nested duplicates.
    """
    paths: set[str] = set()
    base = os.path.realpath(sys.base_prefix)
    for entry in sys.path:
        if entry and os.path.isabs(entry) and _within(os.path.realpath(entry), base) \
                and os.path.isdir(entry):
            paths.add(os.path.abspath(entry))
    paths.add(os.path.dirname(os.__file__))
    if sys.prefix != sys.base_prefix:
        paths.add(os.path.abspath(sys.prefix))
    else:
        for name in ("purelib", "platlib"):
            paths.add(sysconfig.get_path(name))
    import avmm

    paths.add(os.path.dirname(os.path.abspath(avmm.__file__)))
    for system in ("/usr/lib", "/lib", "/lib64", "/usr/lib64", "/etc/ld.so.cache"):
        paths.add(system)
    return _minimal_binds(Bind(path) for path in paths if os.path.exists(path))


# --------------------------------------------------------------------------- libc


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS: Final = 0x0002_0000
CLONE_NEWIPC: Final = 0x0800_0000
CLONE_NEWPID: Final = 0x2000_0000
CLONE_NEWNET: Final = 0x4000_0000
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 0x2
SYS_PIVOT_ROOT: Final = 155  # x86-64
PR_SET_PDEATHSIG: Final = 1
PR_SET_DUMPABLE: Final = 4
PR_SET_NO_NEW_PRIVS: Final = 38
PR_SET_CHILD_SUBREAPER: Final = 36


def _fail(step: str, path: str | None, number: int | None = None) -> JailError:
    number = ctypes.get_errno() if number is None else number
    where = f" {path}" if path else ""
    name = errno.errorcode.get(number, str(number))
    return JailError(f"jail: {step}{where} failed: {name} ({os.strerror(number)})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None, step: str, shown: str | None = None) -> None:
    def c(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    if _libc.mount(c(source), c(target), c(fstype), flags, c(data)) != 0:
        raise _fail(step, shown or target)


def _prctl(option: int, value: int, step: str) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        raise _fail(step, None)


# --------------------------------------------------------------------------- daemon side


def prepare_jail_dir(spec: JailSpec, owner: str | None = None) -> None:
    """Make ``spec.root`` (daemon side, root): missing ancestors 0755 (as ``mkdir -p``
    would, so the usual tools can walk to it), the jail directory itself 0700 and owned
    by root (only the worker's own mount namespace ever puts anything there; the host
    needs no one else to look in), holding :data:`JAIL_OWNER_FILE` with ``owner`` if
    given. Refused: a symlink anywhere on the way, a root that exists and is not an
    empty directory owned by this user."""
    parts = spec.root.strip("/").split("/")
    dirfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(parts):
            last = depth == len(parts) - 1
            shown = "/" + "/".join(parts[:depth + 1])
            try:
                os.mkdir(name, 0o700 if last else 0o755, dir_fd=dirfd)
                created = True
            except FileExistsError:
                created = False
            except OSError as e:
                raise _fail("making the jail directory", shown, e.errno) from e
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=dirfd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise JailError(f"jail: {shown} is not a directory (a symlink or a "
                                    "file); remove it or choose another --jail-root") from e
                raise _fail("opening the jail directory", shown, e.errno) from e
            os.close(dirfd)
            dirfd = child
            if created:
                # mkdir honours the umask; the modes above are meant as written.
                os.fchmod(dirfd, 0o700 if last else 0o755)
        info = os.fstat(dirfd)
        if info.st_uid != os.geteuid():
            raise JailError(f"jail: {spec.root} belongs to uid {info.st_uid}, not to this "
                            "user; remove it")
        if os.listdir(dirfd):
            raise JailError(f"jail: {spec.root} exists and is not empty; remove what is "
                            "left in it (another VM's jail?)")
        if owner is not None:
            try:
                fd = os.open(JAIL_OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
                try:
                    os.write(fd, owner.encode())
                finally:
                    os.close(fd)
            except OSError as e:
                raise _fail("marking the jail directory", spec.root, e.errno) from e
    finally:
        os.close(dirfd)


def remove_jail(root: str) -> None:
    """Remove the jail directory of a worker that has exited (daemon side): only the
    (empty) directory itself, never following a symlink; gone already is fine. Refused:
    a path that does not end in a VM id below at least one directory, and a directory
    that is not empty (then nothing is removed)."""
    _check_path(root, "jail root")
    parts = root.strip("/").split("/")
    if len(parts) < 2 or not _VM_ID_RE.fullmatch(parts[-1]):
        raise JailError(f"jail: refusing to remove {root!r}: not <jail root>/<VM id>")
    try:
        dirfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:  # pragma: no cover - "/" is always there
        raise _fail("opening", "/", e.errno) from e
    try:
        for depth, name in enumerate(parts[:-1]):
            try:
                child = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=dirfd)
            except FileNotFoundError:
                return
            except OSError as e:
                shown = "/" + "/".join(parts[:depth + 1])
                raise _fail("walking to the jail directory", shown, e.errno) from e
            os.close(dirfd)
            dirfd = child
        _remove_owner_file(dirfd, parts[-1], root)
        try:
            os.rmdir(parts[-1], dir_fd=dirfd)
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                raise JailError(f"jail: {root} is not empty (is the worker still running?); "
                                "left as it is") from e
            raise _fail("removing the jail directory", root, e.errno) from e
    finally:
        os.close(dirfd)
    log.debug("jail removed", root=root)


def _remove_owner_file(parent_fd: int, name: str, root: str) -> None:
    try:
        jail = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        raise _fail("opening the jail directory", root, e.errno) from e
    try:
        os.unlink(JAIL_OWNER_FILE, dir_fd=jail)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _fail("removing the jail's owner file", root, e.errno) from e
    finally:
        os.close(jail)


def _jail_owner(parent_fd: int, name: str) -> str | None:
    """The owner written in jail ``name``'s owner file, or None (none, unreadable, a
    symlink, or not an owner name's size)."""
    try:
        jail = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=parent_fd)
    except OSError:
        return None
    try:
        fd = os.open(JAIL_OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, dir_fd=jail)
    except OSError:
        return None
    finally:
        os.close(jail)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _OWNER_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > _OWNER_MAX_BYTES:
        return None
    return data.decode("ascii", errors="replace")


def remove_stale_jails(jail_root: str, alive: Callable[[str], bool]) -> list[str]:
    """Remove the jail directories under ``jail_root`` whose daemon is gone (daemon
    side, at start): those whose owner file names a process ``alive`` says no longer
    runs (a daemon killed before it could remove them). A directory without an owner
    file, or another live daemon's, is left alone; so is one that holds anything else
    (:func:`remove_jail` refuses it). Returns the roots removed."""
    _check_path(jail_root, "jail root")
    try:
        dirfd = os.open(jail_root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                        | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise _fail("opening the jail root", jail_root, e.errno) from e
    removed: list[str] = []
    try:
        for name in os.listdir(dirfd):
            if not _VM_ID_RE.fullmatch(name):
                continue
            owner = _jail_owner(dirfd, name)
            if owner is None or alive(owner):
                continue
            root = jail_root.rstrip("/") + "/" + name
            try:
                remove_jail(root)
            except JailError as e:
                log.warning("a stale jail was left", root=root, reason=str(e))
                continue
            removed.append(root)
            log.info("stale jail removed", root=root, owner=owner)
    finally:
        os.close(dirfd)
    return removed


# --------------------------------------------------------------------------- worker side

#: What a jailed worker still needs while it builds its VM as root: open files and
#: device nodes it does not own (disks, the jail's /dev/kvm, back-end sockets:
#: CAP_DAC_OVERRIDE), and drop to the jail's ids (CAP_SETUID, CAP_SETGID). Not
#: CAP_NET_ADMIN (the daemon opens the taps; the ioctls on an attached tap's fd need no
#: capability), CAP_SYS_ADMIN (mount, setns, ...), CAP_MKNOD, CAP_DAC_READ_SEARCH
#: (open_by_handle_at), CAP_SYS_PTRACE, CAP_SYS_MODULE, ...
BUILD_CAPABILITIES: Final = frozenset({1, 6, 7})  # DAC_OVERRIDE, SETGID, SETUID
_CAP_SETPCAP = 8
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = 126
_CAP_LAST = 63


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def narrow_capabilities(keep: frozenset[int] = BUILD_CAPABILITIES) -> None:
    """Right after :func:`enter_jail`, before the VM is built: every capability but
    ``keep`` leaves the bounding set and the effective and permitted sets (none is
    inheritable), so the root process that builds the VM cannot mount, make device
    nodes or open files by handle; :func:`drop_privileges` later clears the rest."""
    for cap in range(_CAP_LAST + 1):
        if cap in keep or cap == _CAP_SETPCAP:
            continue  # SETPCAP last: it is what allows dropping from the bounding set
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                break  # past the kernel's last capability
            raise _fail("dropping a capability from the bounding set", str(cap))
    if _libc.prctl(_PR_CAPBSET_DROP, _CAP_SETPCAP, 0, 0, 0) != 0:
        raise _fail("dropping CAP_SETPCAP from the bounding set", None)
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0),
                          _CapData(mask >> 32, mask >> 32, 0))
    if _libc.syscall(_SYS_CAPSET, ctypes.byref(header), data) != 0:
        raise _fail("narrowing the capabilities", None)



def enter_jail(spec: JailSpec, *, keep_fds: Sequence[int] = (),
               bind_fds: Mapping[str, int] | None = None) -> None:
    """Shut the calling process into the jail of ``spec`` (worker side, as root, before
    any thread exists). Returns in a new process, PID 1 of a new PID namespace; the
    process that called it stays behind as a reaper that waits for it and then exits the
    same way (the same exit code, or killed by the same signal), and never returns. The
    daemon signals the reaper: SIGKILL kills both (the child has PDEATHSIG), SIGTERM,
    SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are passed on (PID 1 gets only the
    signals it has handlers for).

    Order: close every fd but 0, 1, 2 and ``keep_fds``; clear the environment (nothing
    kept: the worker never runs a program, Python read its locale at start, and the
    daemon's environment may hold secrets); open the network namespace; unshare mount,
    IPC and PID namespaces (and the network one, with ``own_network``); make every
    mount private (so nothing propagates back to the host); fork; build the root (see
    the module docstring); pivot_root into it; enter the network namespace.
    ``bind_fds`` maps a bind's path to an O_PATH fd of what is to be bound there (the
    daemon opened it through its path policy): that is bound, not what the path leads
    to by then; the fds are closed once the root is built."""
    if threading.active_count() != 1:
        raise JailError(f"jail: enter_jail needs a single-threaded process "
                        f"({threading.active_count()} threads run)")
    if os.geteuid() != 0:
        raise JailError("jail: enter_jail needs root (the worker drops privileges later)")
    sources = dict(bind_fds or {})
    keep = sorted(set(keep_fds) | set(sources.values()))
    for fd in keep:
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 3:
            raise JailError(f"jail: keep_fds must be fds above 2, got {fd!r}")
        try:
            os.fstat(fd)
        except OSError as e:
            raise _fail("checking the fd to keep", str(fd), e.errno) from e
    _close_fds_except(keep)
    os.environ.clear()
    parent = os.getppid()
    netns_fd = None
    if spec.netns is not None:
        try:
            netns_fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _fail("opening the network namespace", spec.netns, e.errno) from e
    try:
        own_network = CLONE_NEWNET if spec.own_network else 0
        if _libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | own_network) != 0:
            raise _fail("unshare (mount, IPC, PID" + (", network" if own_network else "")
                        + " namespaces)", None)
        # New mounts in a namespace copied from a shared one would be seen by the host:
        # make every mount private before the first mount (the reaper shares this
        # namespace, so it is done once, before the fork).
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None, "making mounts private")
        liveness_read, liveness_write = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as e:
            os.close(liveness_read)
            os.close(liveness_write)
            raise _fail("fork into the PID namespace", None, e.errno) from e
        if pid != 0:
            os.close(liveness_read)
            _reap(pid, keep, netns_fd, parent)  # never returns
        os.close(liveness_write)
        _liveness.fd = liveness_read
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "setting the parent-death signal")
        _check_reaper_alive(keep_open=True)
        _build_root(spec, sources)
        for fd in sources.values():
            os.close(fd)
        _pivot(spec.root)
        if netns_fd is not None and _libc.setns(netns_fd, CLONE_NEWNET) != 0:
            raise _fail("entering the network namespace", spec.netns)
    finally:
        if netns_fd is not None:
            os.close(netns_fd)
    log.debug("jail entered", root=spec.root, netns=spec.netns)


class _Liveness:
    #: The read end of a pipe whose write end the reaper holds (in the jailed process
    #: only): EOF on it means the reaper is gone. Closed by drop_privileges.
    fd: int | None = None


_liveness = _Liveness()


def _check_reaper_alive(*, keep_open: bool) -> None:
    """Exit at once if the reaper died before PDEATHSIG was armed (then nothing else
    would end this process)."""
    fd = _liveness.fd
    if fd is None:
        return
    os.set_blocking(fd, False)
    try:
        gone = os.read(fd, 1) == b""
    except BlockingIOError:
        gone = False
    if not keep_open:
        os.close(fd)
        _liveness.fd = None
    if gone:
        os._exit(128 + signal.SIGKILL)


def _close_fds_except(keep: Sequence[int]) -> None:
    low = 3
    for fd in [*keep, None]:
        high = (fd if fd is not None else _fd_limit())
        if high > low:
            os.closerange(low, high)
        if fd is not None:
            low = fd + 1


def _fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(soft, hard)
    return limit if limit != resource.RLIM_INFINITY else 1 << 20


_FORWARDED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                             signal.SIGUSR1, signal.SIGUSR2)


def _reap(child: int, keep: Sequence[int], netns_fd: int | None, parent: int) -> None:
    """The reaper: wait for ``child`` and end the same way. Never returns.

    It never reaps ``child`` (waitid with WNOWAIT): the jailed process stays a zombie,
    its PID taken, until the reaper has exited and whoever inherits it reaps it. The
    daemon's spawner is a child subreaper and does so only when the daemon lets it
    (see avmm.isolation.spawner): until then, a PID the daemon read of this process
    (to put it in its VM's cgroup) cannot name another process."""
    code = 1
    try:
        for fd in [*keep, *([netns_fd] if netns_fd is not None else [])]:
            os.close(fd)

        def forward(number: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, number)

        for number in _FORWARDED_SIGNALS:
            signal.signal(number, forward)
        # Whoever started the reaper (the daemon's spawner, a back-end's supervisor)
        # takes it down by dying: the jailed process follows (its own parent-death
        # signal), so nothing in the jail outlives the daemon.
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "setting the reaper's parent-death signal")
        if os.getppid() != parent:
            os.kill(child, signal.SIGKILL)
        ended = os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
        assert ended is not None  # no WNOHANG
        if ended.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            number = ended.si_status
            # Die of the same signal, without a core file of the reaper.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
            with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler
                signal.signal(number, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
            os.kill(os.getpid(), number)
            code = 128 + number  # a signal whose default is not to terminate
        else:
            code = ended.si_status
    finally:
        os._exit(code)


def _build_root(spec: JailSpec, bind_fds: Mapping[str, int] | None = None) -> None:
    """Mount the jail's tmpfs root, its /tmp, the binds, /dev and /proc (in the child,
    in the new namespaces)."""
    root = spec.root
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, _ROOT_TMPFS, "mounting the root tmpfs")
    old_umask = os.umask(0)
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        target = _mount_point(rootfd, "/tmp", directory=True, create=True)
        with _closing(target):
            _mount("tmpfs", _fd_path(target), "tmpfs", MS_NOSUID | MS_NODEV,
                   f"mode=0700,uid={spec.uid},gid={spec.gid},size={_TMP_TMPFS_SIZE}",
                   "mounting /tmp", shown=f"{root}/tmp")
        for path in spec.dirs:
            # Before the binds: one that is bound over (an output in a bound directory)
            # is hidden by the host's own.
            os.close(_mount_point(rootfd, path, directory=True, create=True))
        bound: list[str] = []
        for bind in spec.binds:
            _bind(rootfd, root, bind, create=not any(_within(bind.path, b) for b in bound),
                  source_fd=(bind_fds or {}).get(bind.path))
            bound.append(bind.path)
        target = _mount_point(rootfd, "/dev", directory=True, create=True)
        with _closing(target):
            _mount("tmpfs", _fd_path(target), "tmpfs", MS_NOSUID | MS_NOEXEC, _DEV_TMPFS,
                   "mounting /dev", shown=f"{root}/dev")
        for device in spec.devices:
            _make_device(rootfd, root, device, spec.uid, spec.gid)
        _mount(None, f"{root}/dev", None,
               MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC, None,
               "making /dev read-only", shown=f"{root}/dev")
        target = _mount_point(rootfd, "/proc", directory=True, create=True)
        with _closing(target):
            # subset=pid: the processes only (the worker's own /proc/self), none of
            # /proc/sys, /proc/sysrq-trigger and the like, which root could write to
            # while the VM is built.
            _mount("proc", _fd_path(target), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "subset=pid",
                   "mounting /proc", shown=f"{root}/proc")
        os.mkdir(_OLD_ROOT, 0o700, dir_fd=rootfd)
    except OSError as e:
        raise _fail("building the jail", root, e.errno) from e
    finally:
        os.close(rootfd)
        os.umask(old_umask)


@contextlib.contextmanager
def _closing(fd: int) -> Any:
    try:
        yield fd
    finally:
        os.close(fd)


def _fd_path(fd: int) -> str:
    # The mount point as the fd that was opened without following symlinks: mount(2)
    # resolves it to exactly that directory or file.
    return f"/proc/self/fd/{fd}"


def _mount_point(rootfd: int, path: str, *, directory: bool, create: bool) -> int:
    """An O_PATH fd of ``path`` below the jail root, walked one component at a time
    without following a symlink; missing components made (directories 0755, a final
    file 0644, empty) only where ``create`` (not inside a bind, which is host storage)."""
    parts = path.strip("/").split("/")
    dirfd = os.dup(rootfd)
    try:
        for index, name in enumerate(parts):
            last = index == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
            if not last or directory:
                flags |= os.O_DIRECTORY
            try:
                child = os.open(name, flags, dir_fd=dirfd)
            except FileNotFoundError:
                if not create:
                    raise
                if not last or directory:
                    os.mkdir(name, 0o755, dir_fd=dirfd)
                else:
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o644, dir_fd=dirfd))
                child = os.open(name, flags, dir_fd=dirfd)
            os.close(dirfd)
            dirfd = child
        mode = os.fstat(dirfd).st_mode
        if stat.S_ISLNK(mode) or (stat.S_ISDIR(mode) != directory):
            raise OSError(errno.ENOTDIR if directory else errno.EISDIR, "wrong kind of file")
        return dirfd
    except BaseException:
        os.close(dirfd)
        raise


def _bind(rootfd: int, root: str, bind: Bind, *, create: bool,
          source_fd: int | None = None) -> None:
    """Bind ``bind.path`` at the same path in the jail. With ``source_fd`` (an O_PATH fd
    the daemon opened through its path policy, before this process had a mount
    namespace of its own, so not a mount source here): the file it names, found by
    its canonical path, and checked once bound to be that same file (device and
    inode): a component swapped for a symlink since the daemon's check fails the jail
    instead of binding something else."""
    expected = None
    source = bind.path
    if source_fd is not None:
        try:
            expected = os.fstat(source_fd)
            source = os.readlink(f"/proc/self/fd/{source_fd}")
        except OSError as e:
            raise _fail("finding what to bind", bind.path, e.errno) from e
    try:
        info = os.stat(source)
    except OSError as e:
        raise _fail("finding what to bind", bind.path, e.errno) from e
    directory = stat.S_ISDIR(info.st_mode)
    try:
        target = _mount_point(rootfd, bind.path, directory=directory, create=create)
    except OSError as e:
        raise _fail("making the mount point", f"{root}{bind.path}", e.errno) from e
    with _closing(target):
        where = _fd_path(target)
        _mount(source, where, None, MS_BIND, None, "bind-mounting", shown=bind.path)
        # A bind takes the flags of the mount it copies; these are the jail's own. The
        # source's noexec is kept (only root could lift it, and the jail need not).
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
        if not bind.writable:
            flags |= MS_RDONLY
        if os.statvfs(source).f_flag & os.ST_NOEXEC:
            flags |= MS_NOEXEC
        # The fd names what lies under the new mount: walk to the mount's root again.
        try:
            mounted = _mount_point(rootfd, bind.path, directory=directory, create=False)
        except OSError as e:
            raise _fail("reopening the bind", f"{root}{bind.path}", e.errno) from e
        with _closing(mounted):
            if expected is not None:
                bound = os.fstat(mounted)
                if (bound.st_dev, bound.st_ino) != (expected.st_dev, expected.st_ino):
                    raise JailError(f"jail: {bind.path} changed while the jail was made "
                                    "(a symlink swapped in after the daemon's check?)")
            _mount(None, _fd_path(mounted), None, flags, None,
                   "making the bind read-only" if not bind.writable else "remounting the bind",
                   shown=bind.path)


def _make_device(rootfd: int, root: str, device: str, uid: int, gid: int) -> None:
    try:
        info = os.stat(device)
    except OSError as e:
        raise _fail("finding the device", device, e.errno) from e
    if not stat.S_ISCHR(info.st_mode):
        raise JailError(f"jail: {device} is not a character device on this host")
    parent = _mount_point(rootfd, os.path.dirname(device), directory=True, create=True)
    with _closing(parent):
        name = os.path.basename(device)
        try:
            os.mknod(name, stat.S_IFCHR | 0o660, info.st_rdev, dir_fd=parent)
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        except OSError as e:
            raise _fail("making the device node", f"{root}{device}", e.errno) from e


def _pivot(root: str) -> None:
    new, old = os.fsencode(root), os.fsencode(f"{root}/{_OLD_ROOT}")
    if _libc.syscall(SYS_PIVOT_ROOT, ctypes.c_char_p(new), ctypes.c_char_p(old)) != 0:
        raise _fail("pivot_root into", root)
    os.chdir("/")
    if _libc.umount2(f"/{_OLD_ROOT}".encode(), MNT_DETACH) != 0:
        raise _fail("detaching the old root", f"/{_OLD_ROOT}")
    try:
        os.rmdir(f"/{_OLD_ROOT}")
    except OSError as e:
        raise _fail("removing the old root's mount point", f"/{_OLD_ROOT}", e.errno) from e
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None,
           "making the jail's root read-only", shown="/")


def become_child_subreaper() -> None:
    """Orphans below this process are reparented to it, not to init (the worker
    spawner holds its workers' jailed processes so: see avmm.isolation.spawner)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1, "becoming a child subreaper")


def drop_privileges(spec: JailSpec) -> None:
    """Give up root for good (worker side, in the jail, after the VM is built and
    before any vCPU thread runs; other threads may exist). In order: RLIMIT_NOFILE =
    ``spec.max_files``, RLIMIT_CORE = 0, RLIMIT_FSIZE = ``spec.max_file_bytes`` (with
    SIGXFSZ ignored; call it on the main thread), no supplementary groups, gid then uid (real,
    effective and saved: glibc applies them to every thread), checked; then
    PR_SET_NO_NEW_PRIVS on the calling thread (a seccomp filter loaded with TSYNC
    spreads it to the others) and PR_SET_DUMPABLE 0 (no core, no ptrace by the uid's
    other processes).

    Call it on the thread that called :func:`enter_jail`: changing uids disarms the
    parent-death signal on every thread, and it is armed again on the calling thread
    only, so it lapses when that thread exits (a trio worker thread does, once idle);
    then a SIGKILL of the reaper would leave the jailed process running until its
    channel closes.

    RLIMIT_NPROC is left alone: it counts every process and thread of
    a uid on the host, so with a uid shared by several VMs one would starve the others,
    and the worker's own thread count is fixed by its code, not by the guest."""
    if spec.uid == 0 or spec.gid == 0:  # pragma: no cover - JailSpec refuses it
        raise JailError("jail: refusing to 'drop' to uid or gid 0")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (spec.max_files, spec.max_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if spec.max_file_bytes is not None:
            # A write past the limit fails with EFBIG instead of killing the process
            # (SIGXFSZ's default): the VM says which output stopped, and goes on.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE,
                               (spec.max_file_bytes, spec.max_file_bytes))
    except (OSError, ValueError) as e:
        raise JailError(f"jail: setting the resource limits failed: {e}") from e
    try:
        os.setgroups([])
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
    except OSError as e:
        raise _fail("dropping to the jail's uid/gid", f"{spec.uid}:{spec.gid}", e.errno) from e
    if (os.getresuid() != (spec.uid,) * 3 or os.getresgid() != (spec.gid,) * 3
            or os.getgroups()):
        raise JailError(f"jail: still uids {os.getresuid()}, gids {os.getresgid()} after "
                        f"dropping to {spec.uid}:{spec.gid}")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "setting no_new_privs")
    _prctl(PR_SET_DUMPABLE, 0, "clearing the dumpable flag")
    # A change of credentials disarms the parent-death signal: arm it again, then make
    # sure the reaper did not die in between.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "setting the parent-death signal")
    _check_reaper_alive(keep_open=False)
    log.debug("privileges dropped", uid=spec.uid, gid=spec.gid, max_files=spec.max_files,
              max_file_bytes=spec.max_file_bytes)


# --------------------------------------------------------------------------- uids


def parse_uid_range(text: str) -> tuple[int, int]:
    """``"100000-165535"`` → ``(100000, 165535)`` (both included; 1 to 4294967294)."""
    match = re.fullmatch(r"\s*(\d{1,10})\s*-\s*(\d{1,10})\s*", text)
    if match is None:
        raise JailError(f"uid range {text!r}: write FIRST-LAST, e.g. 100000-165535")
    first, last = int(match.group(1)), int(match.group(2))
    if not 1 <= first <= last <= _ID_MAX:
        raise JailError(f"uid range {text!r}: need 1 <= FIRST <= LAST <= {_ID_MAX}")
    return first, last


#: The uids (and gids, the same numbers) ``avmm serve --isolation process`` hands its
#: workers when no --jail-uid/--jail-gid/--jail-uid-range says otherwise: 65536 of them,
#: high up, where nothing else on a usual host lives. Below 60000 are system and human
#: users (login.defs' UID_MIN..UID_MAX); 60001-65535 holds systemd-homed and DynamicUser
#: ids and nobody; useradd's subordinate ids (/etc/subuid, /etc/subgid) start at 100000
#: and end by 600100000 + 65536; systemd-nspawn's container ranges end at 1879048191;
#: systemd's "foreign" range starts at 2147352576, and from 2^31 on, code that keeps a uid
#: in a signed int goes wrong. 2000000000 lies in the gap, and reads as ours in ``ps``.
#: It is not everyone's gap: SSSD's AD id-mapping slices can reach it, and an admin may
#: delegate subordinate ids there; so each id is checked as it is handed out (NSS:
#: :func:`nss_names_id`) and the subordinate ranges are skipped
#: (:func:`subordinate_ranges`).
DEFAULT_UID_RANGE: Final = (2_000_000_000, 2_000_065_535)
HOST_PASSWD: Final = "/etc/passwd"
HOST_GROUP: Final = "/etc/group"
HOST_SUBUID: Final = "/etc/subuid"
HOST_SUBGID: Final = "/etc/subgid"


def host_named_ids(passwd: str = HOST_PASSWD, group: str = HOST_GROUP) -> frozenset[int]:
    """The uids that ``passwd`` names and the gids that ``group`` names, in one set: a
    jail's uid is also its gid, so a number either file names belongs to someone else.

    Reads the two files only (blocking: call it at start, off the event loop); users and
    groups known through NSS only (LDAP, sssd), which cannot be enumerated cheaply, are
    looked up one id at a time as the ids are handed out (:func:`nss_names_id`). A
    missing file names nothing; a malformed line is skipped.
    """
    named: set[int] = set()
    for path in (passwd, group):
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                for line in file:
                    fields = line.split(":")
                    # ASCII digits only: "²".isdigit() is true and int() refuses it.
                    if len(fields) >= 3 and re.fullmatch(r"[0-9]{1,10}", fields[2].strip()):
                        named.add(int(fields[2]))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise JailError(f"reading {path} (to skip the ids it names) failed: "
                            f"{os.strerror(e.errno or 0)}") from e
    return frozenset(named)


def subordinate_ranges(subuid: str | None = None, subgid: str | None = None,
                       ) -> tuple[tuple[int, int], ...]:
    """The subordinate id ranges that ``subuid`` and ``subgid`` (default
    :data:`HOST_SUBUID`, :data:`HOST_SUBGID`) delegate (``name:FIRST:COUNT`` lines), as
    inclusive ``(first, last)`` pairs, sorted: a user's containers map their ids there, so
    a jail's uid (also its gid) must lie in neither. Blocking (call it at start); a
    missing file delegates nothing; a malformed line is skipped."""
    ranges: set[tuple[int, int]] = set()
    for path in (subuid or HOST_SUBUID, subgid or HOST_SUBGID):
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                for line in file:
                    fields = line.strip().split(":")
                    if len(fields) != 3 or not all(
                            re.fullmatch(r"[0-9]{1,10}", field) for field in fields[1:]):
                        continue
                    first, count = int(fields[1]), int(fields[2])
                    if count > 0:
                        ranges.add((first, first + count - 1))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise JailError(f"reading {path} (to skip the ids it delegates) failed: "
                            f"{os.strerror(e.errno or 0)}") from e
    return tuple(sorted(ranges))


def nss_names_id(number: int) -> bool:
    """Whether NSS (files, sssd, LDAP, systemd's userdb, ...) knows ``number`` as a user
    or a group: ``pwd.getpwuid`` / ``grp.getgrgid``. Blocking (a directory service may
    take its time): call it from a thread, never on the event loop. A lookup that fails
    for another reason than "not found" counts as known (the id is skipped)."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(number)
        except KeyError:
            continue
        except (OSError, OverflowError):
            return True
        return True
    return False


class UidAllocator:
    """Hands out one uid per VM from an inclusive range (the gid is the same number)
    and takes it back. Round-robin: a uid just given back is the last to be reused.
    Never handed out: the numbers in ``skip`` (see :func:`host_named_ids`), those inside
    one of the ``subordinate`` ranges (see :func:`subordinate_ranges`), and those that
    ``lookup`` says someone else has (:func:`nss_names_id` for the daemon), asked each
    time an id is about to be handed out.

    With a ``lookup``, :meth:`allocate` blocks: call it from a thread (the daemon's
    :meth:`avmm.isolation.worker_vm.ProcessIsolation.take_ids` does)."""

    def __init__(self, uid_range: tuple[int, int], skip: Iterable[int] = (), *,
                 subordinate: Iterable[tuple[int, int]] = (),
                 lookup: Callable[[int], bool] | None = None) -> None:
        first, last = uid_range
        if not 1 <= first <= last <= _ID_MAX:
            raise JailError(f"uid range {first}-{last}: need 1 <= FIRST <= LAST <= {_ID_MAX}")
        self._first, self._last = first, last
        self._skip = frozenset(uid for uid in skip if first <= uid <= last)
        self._subordinate = tuple(sorted((max(low, first), min(high, last))
                                         for low, high in subordinate
                                         if low <= last and high >= first))
        self._lookup = lookup
        self._next = first
        self._taken: set[int] = set()
        self._lock = threading.Lock()

    def _subordinate_end(self, uid: int) -> int | None:
        """The last id of the subordinate range ``uid`` lies in, or None."""
        for low, high in self._subordinate:
            if low <= uid <= high:
                return high
        return None

    @property
    def looks_up(self) -> bool:
        """Whether each id is looked up (NSS) before it is handed out."""
        return self._lookup is not None

    def allocate(self, lookup: Callable[[int], bool] | None = None) -> int:
        """The next free uid. ``lookup``, if given, is asked instead of the one this
        allocator was made with (the daemon asks NSS through its spawner: see
        :meth:`avmm.isolation.worker_vm.ProcessIsolation.take_ids`).

        The lock is never held while ``lookup`` runs: a candidate is reserved under it,
        looked up without it, then kept or given back. (The daemon's lookup needs its
        event loop, where :meth:`release` runs: holding the lock across it deadlocked
        the daemon when a VM ended during another's allocation.)"""
        lookup = lookup if lookup is not None else self._lookup
        size = self._last - self._first + 1
        tried, known = 0, 0
        with self._lock:
            candidate = self._next
        while tried < size:
            with self._lock:
                reserved = None
                while tried < size and reserved is None:
                    end = self._subordinate_end(candidate)
                    if end is not None:  # the whole delegated range at once
                        tried += end - candidate + 1
                        candidate = self._first if end == self._last else end + 1
                        continue
                    tried += 1
                    if candidate not in self._taken and candidate not in self._skip:
                        reserved = candidate
                        self._taken.add(reserved)
                    candidate = self._first if candidate == self._last else candidate + 1
            if reserved is None:
                break
            try:
                someone_has_it = lookup is not None and lookup(reserved)
            except BaseException:
                self.release(reserved)
                raise
            if not someone_has_it:
                with self._lock:
                    self._next = self._first if reserved == self._last else reserved + 1
                return reserved
            self.release(reserved)
            known += 1
            log.warning("a jail uid is known to NSS; skipped", uid=reserved)
        skipped = f" ({len(self._skip)} of them named by the host's users and " \
            "groups)" if self._skip else ""
        others = [f"{count} {what}" for count, what in (
            (known, "known to NSS (pwd/grp)"),
            (sum(high - low + 1 for low, high in self._subordinate),
             "delegated in /etc/subuid or /etc/subgid")) if count]
        raise JailError(f"every uid of {self._first}-{self._last} is in use"
                        f"{skipped}{' or ' + ', '.join(others) if others else ''}; "
                        "widen --jail-uid-range")

    def release(self, uid: int) -> None:
        with self._lock:
            if uid not in self._taken:
                raise JailError(f"uid {uid} was not handed out")
            self._taken.remove(uid)

    @property
    def range_text(self) -> str:
        """``"FIRST-LAST"``, as --jail-uid-range spells it."""
        return f"{self._first}-{self._last}"

    @property
    def skipped(self) -> frozenset[int]:
        """The numbers of the range that are never handed out."""
        return self._skip

    @property
    def in_use(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._taken)
