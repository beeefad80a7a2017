"""The ``vm.toml`` schema: parse and validate a VM description into frozen config objects.

A config file looks like this (everything but ``[boot]`` and its ``kernel`` is optional)::

    name = "web-1"

    [machine]
    vcpus = 1
    memory_mib = 128
    cpu_profile = "auto"      # "auto" | "host" | "compat" (auto: compat on kvm_pvm hosts)
    hide_cpu_features = []    # e.g. ["x2apic"]: hidden from CPUID on top of the profile
    acpi = true               # ACPI tables (false: virtio_mmio.device= words instead)
    cpu_weight = 100          # CPU share against other VMs (1-10000, cgroup v2 semantics)
    cpu_max_percent = 150     # CPU quota: 150 = one and a half host CPUs
    cpu_affinity = "0-1,3"    # host CPUs for the vCPU threads (or a list of integers)
    vcpu_affinity = ["0", "1"]  # host CPUs per vCPU (over cpu_affinity)

    [boot]
    kernel = "vmlinux"        # relative to the directory of vm.toml
    initrd = "initrd.img"
    cmdline = "console=ttyS0"

    [serial]
    mode = "console"          # "console" | "file" | "none"
    path = "serial.log"       # only (and then required) with mode = "file"

    [[disk]]
    path = "disk.img"
    # Token buckets (avmm.ratelimit): bytes and requests, each optional.
    rate_limit = { ops = { size = 500, refill_ms = 1000, one_time_burst = 100 } }

    [[net]]
    tap = "tap0"
    tx_rate_limit_group = "uplink"   # TX and RX are limited separately

    [rate_limit_groups.uplink]       # buckets shared by every device of this VM naming it
    bandwidth = { size = 1048576, refill_ms = 100 }

:func:`load_config` reads a TOML file; :func:`config_from_dict` validates the same schema
from any mapping (the management API posts JSON), so the file loader is a thin wrapper.
Every problem is a :class:`~avmm.errors.ConfigError` whose ``key`` is the dotted path of
the offending key and whose message says what to write instead.

The schema is declared once, as data: a :class:`_Table` lists its :class:`_Field` s, each
with a parser and a default, and builds its dataclass from the parsed values. To add a
section, write its dataclass, declare a ``_Table`` for it and add a ``_Field`` to
``_ROOT`` (an array of tables such as ``[[disk]]`` needs one more small parser that runs a
``_Table`` on each element with the key ``disk[i]``).

Config objects describe a VM; they hold no fds and do no I/O beyond checking that the
files they name are there. Building them by hand skips validation: go through
:func:`config_from_dict` for anything a person typed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar

from .arch.x86.cpuid import FEATURES as CPU_FEATURES
from .cgroups.cpulist import CpuListError, format_cpu_list, parse_cpu_list
from .errors import ConfigError
from .ratelimit import BUCKET_SIZE_MAX, REFILL_MS_MAX, BucketConfig, RateLimitConfig

__all__ = [
    "CMDLINE_MAX_BYTES",
    "CONFIG_FILE_MAX_BYTES",
    "CPU_PROFILES",
    "MEMORY_MIB_MAX",
    "MEMORY_MIB_MIN",
    "SERIAL_MODES",
    "VCPUS_MAX",
    "BootConfig",
    "CpuProfile",
    "MachineConfig",
    "SerialConfig",
    "SerialMode",
    "VhostUserConfig",
    "VmConfig",
    "check_cpu_limits",
    "config_from_dict",
    "load_config",
    "read_config_file",
]

CpuProfile = Literal["auto", "host", "compat"]
SerialMode = Literal["console", "file", "none"]

CPU_PROFILES: Final[tuple[CpuProfile, ...]] = ("auto", "host", "compat")
SERIAL_MODES: Final[tuple[SerialMode, ...]] = ("console", "file", "none")
ConsoleMode = Literal["console", "file", "socket"]
CONSOLE_MODES: Final[tuple[ConsoleMode, ...]] = ("console", "file", "socket")
#: Virtio-mmio devices avmm can place (one IRQ each, see avmm.vm).
MAX_VIRTIO_DEVICES: Final = 8
TAP_NAME_MAX: Final = 15
DISK_ID_MAX_BYTES: Final = 20

# KVM may allow fewer vCPUs than this; the VM checks KVM_CAP_MAX_VCPUS when it starts.
VCPUS_MAX: Final = 255
#: cgroup v2's cpu.weight range (avmm.cgroups).
CPU_WEIGHT_MIN: Final = 1
CPU_WEIGHT_MAX: Final = 10000
MEMORY_MIB_MIN: Final = 16
MEMORY_MIB_MAX: Final = 1024 * 1024
# The boot protocol's cmdline_size is usually smaller; the loader checks the real limit.
CMDLINE_MAX_BYTES: Final = 65535
#: The largest config accepted, from a file or over the API; a vm.toml is a few hundred
#: bytes.
CONFIG_FILE_MAX_BYTES: Final = 1 << 20
#: sun_path holds 108 bytes including the NUL.
UNIX_SOCKET_PATH_MAX: Final = 107

_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


# --------------------------------------------------------------------------- config objects


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """The virtual hardware: how many vCPUs, how much RAM, which CPUID profile."""

    vcpus: int = 1
    memory_mib: int = 128
    #: "auto" picks "compat" on a host whose KVM needs it, else "host" (avmm.cpu_profile).
    cpu_profile: CpuProfile = "auto"
    #: CPU features to hide from the guest's CPUID on top of the profile (names from
    #: ``avmm.arch.x86.cpuid.FEATURES``, e.g. "x2apic").
    hide_cpu_features: tuple[str, ...] = ()
    #: Describe the machine to the guest with ACPI tables (RSDP at 0xe0000: vCPUs in the
    #: MADT, virtio-mmio devices in the DSDT), as stock distro kernels need. False: no
    #: tables; the virtio devices go on the kernel command line as
    #: ``virtio_mmio.device=`` words instead, for minimal kernels (and avmm's test guest)
    #: that only know that path. Never both: Linux would probe each device twice.
    acpi: bool = True
    #: CPU controls (avmm.cgroups; None: not asked, and then no cgroup is made).
    #: Weight against other VMs' vCPUs, 1..10000 as cgroup v2's cpu.weight (100 when
    #: unset); on cgroup v1 it becomes cpu.shares (weight * 1024 / 100).
    cpu_weight: int | None = None
    #: Quota in percent of one host CPU (150 = 1.5 CPUs) for all vCPU threads together.
    cpu_max_percent: int | float | None = None
    #: Host CPUs every vCPU thread may run on (sorted, distinct).
    cpu_affinity: tuple[int, ...] | None = None
    #: Host CPUs per vCPU (one list per vCPU, in vCPU order), over cpu_affinity.
    vcpu_affinity: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True, slots=True)
class BootConfig:
    """What to boot. Paths are absolute (resolved against the config file's directory)
    and named existing regular files when the config was validated."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True, slots=True)
class SerialConfig:
    """Where the guest's serial port goes. ``path`` is set exactly when ``mode`` is
    ``"file"``; it is absolute and its parent directory existed at validation."""

    mode: SerialMode = "console"
    path: Path | None = None


@dataclass(frozen=True, slots=True)
class DiskConfig:
    """A virtio-blk disk backed by a raw image file (``path``) or served by a
    vhost-user-blk back-end (``vhost_user``, a unix socket); exactly one is set."""

    path: Path | None = None
    readonly: bool = False
    #: The serial the guest reads with GET_ID (at most 20 bytes); None: derived from path.
    id: str | None = None
    #: The unix socket of a vhost-user-blk back-end (capacity etc. come from it).
    vhost_user: Path | None = None
    #: Token buckets for this disk's requests (avmm.ratelimit); None: unlimited.
    rate_limit: RateLimitConfig | None = None
    #: A ``[rate_limit_groups.NAME]`` whose buckets this disk shares with the other
    #: devices of the VM that name it (never together with ``rate_limit``).
    rate_limit_group: str | None = None


@dataclass(frozen=True, slots=True)
class NetConfig:
    """A virtio-net NIC on a host tap device (created if missing), or served by a
    vhost-user-net back-end (``vhost_user``); exactly one of ``tap`` and ``vhost_user``
    is set."""

    tap: str | None = None
    #: Six bytes; None means a locally administered address derived from the VM and tap.
    mac: bytes | None = None
    #: A named network namespace (``ip netns add NAME``) that holds the tap; None: ours.
    netns: str | None = None
    #: The unix socket of a vhost-user-net back-end.
    vhost_user: Path | None = None
    #: Token buckets for frames the guest sends (TX) and receives (RX), each direction
    #: on its own; None: unlimited. ``*_rate_limit_group`` names a shared group instead.
    tx_rate_limit: RateLimitConfig | None = None
    rx_rate_limit: RateLimitConfig | None = None
    tx_rate_limit_group: str | None = None
    rx_rate_limit_group: str | None = None


@dataclass(frozen=True, slots=True)
class VhostUserConfig:
    """A generic vhost-user device (``[[vhost_user]]``): any virtio device type served by
    a back-end at ``socket``; the VMM only relays the transport."""

    socket: Path
    #: The virtio device ID the guest sees (1 net, 2 block, 4 entropy, 26 fs, ...).
    device_id: int
    num_queues: int = 1
    queue_size: int = 256


@dataclass(frozen=True, slots=True)
class RngConfig:
    """A virtio-rng device fed from the host's getrandom()."""


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """A virtio-console port, as an alternative (or addition) to the UART."""

    mode: ConsoleMode = "console"
    path: Path | None = None


@dataclass(frozen=True, slots=True)
class VmConfig:
    """A whole VM description. ``source`` names where it came from (the file name as the
    user gave it), for error messages; ``name`` is an optional label for logs."""

    machine: MachineConfig
    boot: BootConfig
    serial: SerialConfig
    source: str | None = None
    name: str | None = None
    disks: tuple[DiskConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    rng: RngConfig | None = None
    console: ConsoleConfig | None = None
    vhost_users: tuple[VhostUserConfig, ...] = ()
    #: ``[rate_limit_groups.NAME]``: buckets shared by the devices of this VM that name
    #: the group (one limiter per group per VM), as (name, config) pairs in file order.
    rate_limit_groups: tuple[tuple[str, RateLimitConfig], ...] = ()

    def with_cmdline_appended(self, extra: str) -> VmConfig:
        """Return a copy whose kernel command line has ``extra`` appended, separated by a
        space. The result is validated like ``boot.cmdline`` in a file."""
        cmdline = " ".join(part for part in (self.boot.cmdline, extra) if part)
        context = _Context(base_dir=self.boot.kernel.parent, source=self.source)
        cmdline = _CMDLINE(cmdline, "boot.cmdline", context)
        return dataclasses.replace(self, boot=dataclasses.replace(self.boot, cmdline=cmdline))


# --------------------------------------------------------------------------- entry points


def load_config(path: str | os.PathLike[str]) -> VmConfig:
    """Read and validate a ``vm.toml``. Relative paths inside it are relative to the
    file's directory, not to the current directory.

    Blocks (it reads the file and checks the paths it names): call it from a thread in
    async code.
    """
    source = os.fsdecode(path)
    file = Path(os.path.abspath(source))
    data = parse_toml(read_config_file(file, source=source), source=source)
    return config_from_dict(data, base_dir=file.parent, source=source)


def read_config_file(path: str | os.PathLike[str], *, source: str | None = None) -> bytes:
    """The bytes of a config file: a regular file of at most
    :data:`CONFIG_FILE_MAX_BYTES`. Anything else (a FIFO, /dev/zero, a directory) is a
    ConfigError, found without waiting on it or reading it."""
    file = Path(os.path.abspath(path))
    source = source if source is not None else os.fsdecode(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}", path=source) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {file}: {e.strerror}", path=source) from e
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{file} is a directory, not a config file", path=source)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{file} is not a regular file; give a vm.toml file",
                              path=source)
        limit = CONFIG_FILE_MAX_BYTES
        if info.st_size > limit:
            raise ConfigError(f"{file} is {info.st_size} bytes; a config file may have at "
                              f"most {limit}", path=source)
        raw = bytearray()
        while len(raw) <= limit:
            chunk = os.read(fd, limit + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
        if len(raw) > limit:
            raise ConfigError(f"{file} grew past {limit} bytes while it was read",
                              path=source)
        return bytes(raw)
    except OSError as e:
        raise ConfigError(f"cannot read config file {file}: {e.strerror}", path=source) from e
    finally:
        os.close(fd)


def parse_toml(raw: bytes, *, source: str | None) -> dict[str, Any]:
    """Decode and parse a TOML document; every failure (bad UTF-8, bad TOML, nesting too
    deep for the parser, an integer too long to convert) is one ConfigError line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"not valid UTF-8 at byte {e.start}; TOML files must be UTF-8", path=source
        ) from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line L, column C)".
        raise ConfigError(f"not valid TOML: {_one_line(str(e))}", path=source) from e
    except RecursionError:
        raise ConfigError("not valid TOML for avmm: arrays or tables nested too deeply",
                          path=source) from None
    except ValueError as e:
        # int() refuses more than sys.get_int_max_str_digits() digits (4300).
        raise ConfigError(f"not valid TOML for avmm: {_one_line(str(e))[:120]}",
                          path=source) from None


def config_from_dict(
    data: Mapping[str, Any], *, base_dir: Path | None, source: str | None = None,
    path_check: PathCheck | None = None, shared_groups: frozenset[str] = frozenset(),
) -> VmConfig:
    """Validate ``data`` (parsed TOML or JSON with the ``vm.toml`` schema).

    Relative paths in ``data`` are resolved against ``base_dir``; with ``base_dir=None``
    (a config posted to the management API, which has no file to be relative to) every
    path must be absolute and a relative one is a :class:`ConfigError` naming its key.
    ``source`` names the origin in error messages. ``path_check(path, key, kind)`` runs
    for every path before anything is looked up on disk (the daemon's
    :meth:`avmm.paths.PathPolicy.check`, which refuses paths outside ``--allow-path``).
    ``shared_groups`` names the rate-limit groups a device may name without the config
    defining them (the daemon's, made through its API).

    Blocks (it checks the files the config names): call it from a thread in async code.
    """
    resolved = Path(os.path.abspath(base_dir)) if base_dir is not None else None
    context = _Context(base_dir=resolved, source=source, path_check=path_check,
                       shared_groups=shared_groups)
    return _ROOT(data, "", context)


# --------------------------------------------------------------------------- schema machinery

_T = TypeVar("_T")
_Parser = Callable[[Any, str, "_Context"], Any]
#: (path, key, kind) -> None, raising a ConfigError; kind is one of
#: avmm.paths.PathKind: "file", "socket", "output", "bind", "directory".
PathCheck = Callable[[Path, str, str], None]


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


_REQUIRED: Final = _Sentinel("_REQUIRED")
# For an optional table: parse an empty table, so its own field defaults apply.
_EMPTY_TABLE: Final = _Sentinel("_EMPTY_TABLE")


@dataclass(frozen=True, slots=True)
class _Context:
    base_dir: Path | None  # None: relative paths are rejected (see config_from_dict)
    source: str | None
    path_check: PathCheck | None = None
    #: Rate-limit groups defined outside the config (the daemon's).
    shared_groups: frozenset[str] = frozenset()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.source, key=key or None)

    def check_path(self, path: Path, key: str, kind: str) -> None:
        if self.path_check is None:
            return
        try:
            self.path_check(path, key, kind)
        except ConfigError as e:
            # The same error class (PathNotAllowedError stays one), with our source.
            raise type(e)(e.reason, path=self.source, key=key) from None

    def resolve(self, value: str) -> Path:
        if self.base_dir is None:
            return Path(os.path.normpath(value))
        return self.base_dir / value

    def relative_note(self, value: str) -> str:
        if Path(value).is_absolute() or self.base_dir is None:
            return ""
        if self.source is None:
            return f" (relative paths are relative to {self.base_dir})"
        return f" (relative paths are relative to {self.base_dir}, the directory of {self.source})"


@dataclass(frozen=True, slots=True)
class _Field:
    """One key of a table: its parser, and its default (``_REQUIRED``, ``_EMPTY_TABLE``
    or a value). ``hint`` tells the user what to write when a required key is missing."""

    name: str
    parse: _Parser
    default: Any = _REQUIRED
    hint: str = ""


@dataclass(frozen=True, slots=True)
class _Table(Generic[_T]):
    """A table's schema; calling it parses one table. Unknown keys are rejected, every
    field is parsed in order, then ``build`` makes the config object (and does checks
    that involve several fields)."""

    fields: tuple[_Field, ...]
    # (parsed values with defaults, the table as given, its key, context) -> config object
    build: Callable[[dict[str, Any], Mapping[str, Any], str, _Context], _T]

    def __call__(self, value: Any, key: str, context: _Context) -> _T:
        if not isinstance(value, Mapping):
            where = f" [{key}]" if key else " at the top level"
            raise context.error(key, f"expected a table{where}, got {_describe(value)}")
        known = {field.name: field for field in self.fields}
        for name, item in value.items():
            if name not in known:
                raise self._unknown(name, item, key, context)
        values: dict[str, Any] = {}
        for field in self.fields:
            field_key = _join(key, field.name)
            if field.name in value:
                values[field.name] = field.parse(value[field.name], field_key, context)
            elif field.default is _REQUIRED:
                raise context.error(field_key, self._missing(field, key))
            elif field.default is _EMPTY_TABLE:
                values[field.name] = field.parse({}, field_key, context)
            else:
                values[field.name] = field.default
        return self.build(values, value, key, context)

    def _missing(self, field: _Field, key: str) -> str:
        if isinstance(field.parse, _Table):
            message = f"missing required table [{_join(key, field.name)}]"
        elif key:
            message = f"missing required key {_quote(field.name)} in [{key}]"
        else:
            message = f"missing required key {_quote(field.name)}"
        return f"{message}; {field.hint}" if field.hint else message

    def _unknown(self, name: object, item: Any, key: str, context: _Context) -> ConfigError:
        if not isinstance(name, str):
            return context.error(key, f"keys must be strings, got {name!r}")
        full_key = _join(key, name)
        tables = [field.name for field in self.fields
                  if isinstance(field.parse, _Table) or field.name in _TABLES_OF_TABLES]
        if not key and isinstance(item, Mapping):
            message = f"unknown table [{full_key}]"
            match = _close_matches(name, tables, n=1)
            if match:
                return context.error(full_key, f"{message}; did you mean [{match[0]}]?")
            listed = ", ".join(f"[{table}]" for table in sorted(tables))
            return context.error(full_key, f"{message}; known tables are {listed}")
        message = f"unknown key {_quote(name)}" + (f" in [{key}]" if key else "")
        match = _close_matches(name, [field.name for field in self.fields], n=1)
        if match:
            return context.error(full_key, f"{message}; did you mean {_quote(match[0])}?")
        home = _HOMES.get(name)
        if home is not None:
            # A key in the wrong table is usually one written below the wrong [header].
            return context.error(full_key, f"{message}; {_quote(name)} belongs {home}")
        listed = ", ".join(sorted(field.name for field in self.fields))
        return context.error(full_key, f"{message}; known keys are {listed}")


def _join(prefix: str, name: str) -> str:
    part = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _quote(name)
    return f"{prefix}.{part}" if prefix else part


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(value: Any) -> str:
    """``"two" (a string)``: the value as the user wrote it, and its TOML type."""
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value!r} (a float)"
    if isinstance(value, str):
        shown = _quote(value[:40]) + ("..." if len(value) > 40 else "")
        return f"{shown} (a string)"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------- value parsers


def _integer(low: int, high: int, unit: str = "") -> _Parser:
    def parse(value: Any, key: str, context: _Context) -> int:
        # bool is an int subclass; `vcpus = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise context.error(
                key, f"expected an integer from {low} to {high}{unit}, got {_describe(value)}"
            )
        return value

    return parse


def _choice(options: tuple[str, ...]) -> _Parser:
    def parse(value: Any, key: str, context: _Context) -> str:
        if isinstance(value, str) and value in options:
            return value
        listed = ", ".join(_quote(option) for option in options)
        message = f"expected one of {listed}, got {_describe(value)}"
        if isinstance(value, str):
            match = _close_matches(value, options, n=1)
            if match:
                message += f"; did you mean {_quote(match[0])}?"
        raise context.error(key, message)

    return parse


def _choices(options: tuple[str, ...]) -> _Parser:
    """A list of distinct strings, each one of ``options``."""
    one = _choice(options)

    def parse(value: Any, key: str, context: _Context) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise context.error(key, f"expected a list of strings, got {_describe(value)}")
        chosen: list[str] = []
        for index, item in enumerate(value):
            name = one(item, f"{key}[{index}]", context)
            if name not in chosen:
                chosen.append(name)
        return tuple(chosen)

    return parse


def _string(*, max_bytes: int) -> _Parser:
    def parse(value: Any, key: str, context: _Context) -> str:
        if not isinstance(value, str):
            raise context.error(key, f"expected a string, got {_describe(value)}")
        nul = value.find("\0")
        if nul >= 0:
            raise context.error(
                key, f"contains a NUL character at position {nul}; remove it (it ends a C string)"
            )
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise context.error(key, f"is not valid Unicode text at position {e.start}") from e
        if size > max_bytes:
            raise context.error(key, f"too long: {size} bytes, the limit is {max_bytes} bytes")
        return value

    return parse


def _name(value: Any, key: str, context: _Context) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or value in {".", ".."}:
        raise context.error(
            key,
            "expected 1 to 64 characters from A-Z a-z 0-9 . _ - (and not . or ..), "
            f"got {_describe(value)}",
        )
    return value


def _path(value: Any, key: str, context: _Context) -> Path:
    """A path string, resolved against the base directory; nothing checked on disk."""
    if not isinstance(value, str):
        raise context.error(key, f"expected a path (a string), got {_describe(value)}")
    if not value:
        raise context.error(key, "expected a path, got an empty string")
    if "\0" in value:
        raise context.error(key, "the path contains a NUL character")
    if context.base_dir is None and not os.path.isabs(value):
        raise context.error(key, f"relative path {_quote(value)}: this config has no file to be "
                            "relative to, so write an absolute path")
    return context.resolve(value)


def _existing_file(value: Any, key: str, context: _Context) -> Path:
    path = _path(value, key, context)
    context.check_path(path, key, "file")
    note = context.relative_note(value)
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise context.error(key, f"file not found: {path}{note}") from None
    except OSError as e:
        raise context.error(key, f"cannot access {path}: {e.strerror}{note}") from e
    if stat.S_ISDIR(info.st_mode):
        raise context.error(key, f"{path} is a directory; name a file{note}")
    if not stat.S_ISREG(info.st_mode):
        raise context.error(key, f"{path} is not a regular file{note}")
    if not os.access(path, os.R_OK):
        raise context.error(key, f"{path} is not readable by this user")
    return path


def _check_output_file(path: Path, value: str, key: str, context: _Context, *,
                       socket: bool = False) -> None:
    """The file may not exist yet, but the directory it goes in must. An existing file
    must be a regular file or a character device (/dev/null), or for a socket to be
    bound (``socket``), a socket (a stale one is replaced when the VM starts)."""
    context.check_path(path, key, "bind" if socket else "output")
    note = context.relative_note(value)
    if not path.parent.is_dir():
        raise context.error(
            key, f"directory not found: {path.parent} (for {path}); create it first{note}"
        )
    if socket and len(os.fsencode(path)) > UNIX_SOCKET_PATH_MAX:
        raise context.error(key, f"{path} is {len(os.fsencode(path))} bytes long; a unix "
                            f"socket path has at most {UNIX_SOCKET_PATH_MAX} bytes; choose "
                            f"a shorter path{note}")
    try:
        mode = path.lstat().st_mode if socket else path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise context.error(key, f"cannot access {path}: {e.strerror}{note}") from e
    if stat.S_ISDIR(mode):
        raise context.error(key, f"{path} is a directory; name a file{note}")
    if socket:
        if not stat.S_ISSOCK(mode):
            raise context.error(key, f"{path} exists and is not a socket; remove it or "
                                f"choose another path (avmm never deletes it){note}")
    elif not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
        what = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) \
            else "not a regular file"
        raise context.error(key, f"{path} is {what}; name a regular file (or a character "
                            f"device such as /dev/null){note}")


_CMDLINE: Final = _string(max_bytes=CMDLINE_MAX_BYTES)


def _boolean(value: Any, key: str, context: _Context) -> bool:
    if isinstance(value, bool):
        return value
    raise context.error(key, f"expected true or false, got {_describe(value)}")


def _array_of(table: _Table[_T], *, example: str) -> _Parser:
    """``[[name]]`` tables: a list of tables, each parsed by ``table`` with key
    ``name[i]``."""

    def parse(value: Any, key: str, context: _Context) -> tuple[_T, ...]:
        if not isinstance(value, list):
            raise context.error(
                key, f"expected [[{key}]] tables (e.g. {example}), got {_describe(value)}"
            )
        return tuple(table(item, f"{key}[{index}]", context) for index, item in enumerate(value))

    return parse


_TAP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_MAC = re.compile(r"([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2}):"
                  r"([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})")


def _tap_name(value: Any, key: str, context: _Context) -> str:
    if isinstance(value, str) and _TAP_NAME.fullmatch(value):
        return value
    raise context.error(
        key, f"expected a network interface name of 1 to {TAP_NAME_MAX} characters from "
        f"A-Z a-z 0-9 . _ -, got {_describe(value)}")


def _mac(value: Any, key: str, context: _Context) -> bytes:
    match = _MAC.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise context.error(key, f'expected a MAC address like "52:54:00:12:34:56", '
                            f"got {_describe(value)}")
    mac = bytes(int(part, 16) for part in match.groups())
    if mac[0] & 1:
        raise context.error(key, f"{value} is a multicast address; the first byte must be even")
    return mac


def _netns(value: Any, key: str, context: _Context) -> str:
    # Not "." or "..": the name is joined to /run/netns.
    if not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value)
            and value not in (".", "..")):
        raise context.error(key, f"expected a network namespace name (as in `ip netns list`), "
                            f"got {_describe(value)}")
    if not os.path.exists(f"/run/netns/{value}"):
        raise context.error(key, f"network namespace {value!r} not found (no /run/netns/{value});"
                            f" create it with `ip netns add {value}`")
    return value


def _disk_id(value: Any, key: str, context: _Context) -> str:
    if isinstance(value, str) and value.isascii() and value.isprintable() \
            and 0 < len(value) <= DISK_ID_MAX_BYTES:
        return value
    raise context.error(key, f"expected 1 to {DISK_ID_MAX_BYTES} printable ASCII characters, "
                        f"got {_describe(value)}")


def _existing_socket(value: Any, key: str, context: _Context) -> Path:
    """A unix socket a vhost-user back-end listens on: it must exist when the VM starts."""
    path = _path(value, key, context)
    context.check_path(path, key, "socket")
    note = context.relative_note(value)
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise context.error(key, f"socket not found: {path}; start the vhost-user back-end "
                            f"first{note}") from None
    except OSError as e:
        raise context.error(key, f"cannot access {path}: {e.strerror}{note}") from e
    if not stat.S_ISSOCK(info.st_mode):
        raise context.error(key, f"{path} is not a unix socket; name the socket the "
                            f"vhost-user back-end listens on{note}")
    return path


# --------------------------------------------------------------------------- the schema


def _build_serial(
    values: dict[str, Any], raw: Mapping[str, Any], key: str, context: _Context
) -> SerialConfig:
    # The path is checked on disk only here, once the mode is known, so that a path given
    # with the wrong mode is reported as that rather than as a missing directory.
    mode: SerialMode = values["mode"]
    path: Path | None = values["path"]
    path_key = _join(key, "path")
    if mode == "file":
        if path is None:
            raise context.error(path_key, 'mode = "file" needs a path, e.g. path = "serial.log"')
        _check_output_file(path, raw["path"], path_key, context)
    elif path is not None:
        raise context.error(
            path_key,
            f'path is only used with mode = "file" (mode is {_quote(mode)}); '
            'remove it or set mode = "file"',
        )
    return SerialConfig(mode=mode, path=path)


def _build_console(
    values: dict[str, Any], raw: Mapping[str, Any], key: str, context: _Context
) -> ConsoleConfig:
    mode: ConsoleMode = values["mode"]
    path: Path | None = values["path"]
    path_key = _join(key, "path")
    if mode in ("file", "socket"):
        if path is None:
            raise context.error(path_key, f"mode = {_quote(mode)} needs a path")
        _check_output_file(path, raw["path"], path_key, context, socket=mode == "socket")
    elif path is not None:
        raise context.error(path_key, f"path is only used with mode = \"file\" or \"socket\" "
                            f"(mode is {_quote(mode)}); remove it or change the mode")
    return ConsoleConfig(mode=mode, path=path)


def _cpu_max_percent(value: Any, key: str, context: _Context) -> int | float:
    limit = 100 * (os.cpu_count() or 1)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 < value <= limit or value != value):
        raise context.error(key, f"expected a number above 0 and at most {limit} (100 per "
                            f"host CPU; 150 = one and a half CPUs), got {_describe(value)}")
    return value


def _cpu_list(value: Any, key: str, context: _Context) -> tuple[int, ...]:
    try:
        return parse_cpu_list(value)
    except CpuListError as e:
        raise context.error(key, str(e)) from None


def _vcpu_affinity(value: Any, key: str, context: _Context) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or not value:
        raise context.error(key, "expected a list with one CPU list per vCPU, such as "
                            f'["0", "1"], got {_describe(value)}')
    if len(value) > VCPUS_MAX:
        raise context.error(key, f"expected at most {VCPUS_MAX} entries (one per vCPU)")
    return tuple(_cpu_list(item, f"{key}[{index}]", context)
                 for index, item in enumerate(value))


def check_cpu_limits(*, weight: Any = None, max_percent: Any = None,
                     source: str | None = None) -> None:
    """Check a run-time change of ``cpu_weight``/``cpu_max_percent`` as the config does
    (None: unchanged): a ConfigError naming ``machine.<key>`` if a value is bad."""
    context = _Context(base_dir=None, source=source)
    if weight is not None:
        _integer(CPU_WEIGHT_MIN, CPU_WEIGHT_MAX)(weight, "machine.cpu_weight", context)
    if max_percent is not None:
        _cpu_max_percent(max_percent, "machine.cpu_max_percent", context)


def _build_machine(
    values: dict[str, Any], raw: Mapping[str, Any], key: str, context: _Context
) -> MachineConfig:
    per_vcpu: tuple[tuple[int, ...], ...] | None = values["vcpu_affinity"]
    if per_vcpu is not None:
        vcpus = values["vcpus"]
        if len(per_vcpu) != vcpus:
            raise context.error(_join(key, "vcpu_affinity"), f"{len(per_vcpu)} CPU lists "
                                f"for {vcpus} vCPUs; give one per vCPU")
        common: tuple[int, ...] | None = values["cpu_affinity"]
        if common is not None:
            for index, cpus in enumerate(per_vcpu):
                outside = sorted(set(cpus) - set(common))
                if outside:
                    raise context.error(
                        f"{_join(key, 'vcpu_affinity')}[{index}]",
                        f"CPU {format_cpu_list(outside)} is outside cpu_affinity "
                        f"({format_cpu_list(common)})")
    return MachineConfig(**values)


def _build_vm(
    values: dict[str, Any], raw: Mapping[str, Any], key: str, context: _Context
) -> VmConfig:
    disks: tuple[DiskConfig, ...] = values["disk"]
    nets: tuple[NetConfig, ...] = values["net"]
    taps = [net.tap for net in nets]
    for index, tap in enumerate(taps):
        if tap is not None and tap in taps[:index]:
            raise context.error(f"net[{index}].tap", f"tap {_quote(tap)} is used twice; "
                                "each NIC needs its own tap")
    vhost_users: tuple[VhostUserConfig, ...] = values["vhost_user"]
    groups: tuple[tuple[str, RateLimitConfig], ...] = values["rate_limit_groups"]
    _check_group_names(disks, nets, {name for name, _ in groups}, context)
    count = (len(disks) + len(nets) + len(vhost_users) + (values["rng"] is not None)
             + (values["console"] is not None))
    if count > MAX_VIRTIO_DEVICES:
        raise context.error("disk", f"{count} virtio devices configured; at most "
                            f"{MAX_VIRTIO_DEVICES} are supported")
    return VmConfig(
        machine=values["machine"],
        boot=values["boot"],
        serial=values["serial"],
        source=context.source,
        name=values["name"],
        disks=disks,
        nets=nets,
        rng=values["rng"],
        console=values["console"],
        vhost_users=vhost_users,
        rate_limit_groups=groups,
    )


def _check_group_names(disks: tuple[DiskConfig, ...], nets: tuple[NetConfig, ...],
                       defined: set[str], context: _Context) -> None:
    """Every ``*rate_limit_group`` names a ``[rate_limit_groups.NAME]`` table."""
    named = [(f"disk[{index}].rate_limit_group", disk.rate_limit_group)
             for index, disk in enumerate(disks)]
    for index, net in enumerate(nets):
        named += [(f"net[{index}].tx_rate_limit_group", net.tx_rate_limit_group),
                  (f"net[{index}].rx_rate_limit_group", net.rx_rate_limit_group)]
    for key, name in named:
        if name is not None and name not in defined and name not in context.shared_groups:
            listed = ", ".join(sorted(defined)) or "none"
            raise context.error(key, f"no [rate_limit_groups.{name}] in this config "
                                f"(defined: {listed}) nor a daemon group of that name; add "
                                "it, or create it with PUT /rate_limit_groups/"
                                f"{name} (avmm serve), or remove the key")


def _build_disk(
    values: dict[str, Any], raw: Mapping[str, Any], key: str, context: _Context
) -> DiskConfig:
    if values["vhost_user"] is not None:
        if values["path"] is not None:
            raise context.error(_join(key, "vhost_user"), "a disk has either path or "
                                "vhost_user, not both; remove one")
        for name in ("readonly", "id", "rate_limit", "rate_limit_group"):
            if name in raw:
                raise context.error(_join(key, name), f"{name} cannot be set for a vhost_user "
                                    "disk: the back-end decides it (e.g. qemu-storage-daemon's "
                                    "writable=off, avmm backend blk --iops); remove it")
    elif values["path"] is None:
        raise context.error(_join(key, "path"), 'missing required key "path" in '
                            f'[{key}]; set path = "disk.img" (or vhost_user = "/path/to.sock")')
    _one_limit(raw, key, "rate_limit", "rate_limit_group", context)
    return DiskConfig(**values)


def _one_limit(raw: Mapping[str, Any], key: str, limit: str, group: str,
               context: _Context) -> None:
    if limit in raw and group in raw:
        raise context.error(_join(key, group), f"a device has either {limit} (its own "
                            f"buckets) or {group} (shared ones), not both; remove one")


def _build_vhost_user(values: dict[str, Any], key: str, context: _Context) -> VhostUserConfig:
    size = values["queue_size"]
    if size & (size - 1):
        raise context.error(_join(key, "queue_size"),
                            f"expected a power of two, got {size}")
    return VhostUserConfig(**values)


def _build_net(
    values: dict[str, Any], raw: Mapping[str, Any], key: str, context: _Context
) -> NetConfig:
    if values["vhost_user"] is not None:
        if values["tap"] is not None:
            raise context.error(_join(key, "vhost_user"), "a NIC has either tap or "
                                "vhost_user, not both; remove one")
        if values["netns"] is not None:
            raise context.error(_join(key, "netns"), "netns cannot be set for a vhost_user "
                                "NIC: the back-end opens its own tap; remove it")
        for name in _NET_LIMIT_KEYS:
            if name in raw:
                raise context.error(_join(key, name), f"{name} cannot be set for a "
                                    "vhost_user NIC: its back-end serves the queues (avmm "
                                    "backend net --tx-pps ...); remove it")
    elif values["tap"] is None:
        raise context.error(_join(key, "tap"), 'missing required key "tap" in '
                            f'[{key}]; set tap = "tap0" (or vhost_user = "/path/to.sock")')
    for direction in ("tx", "rx"):
        _one_limit(raw, key, f"{direction}_rate_limit", f"{direction}_rate_limit_group",
                   context)
    return NetConfig(**values)


#: Root keys that hold a table per name ([rate_limit_groups.NAME]), listed with the tables.
_TABLES_OF_TABLES: Final = ("rate_limit_groups",)

_NET_LIMIT_KEYS: Final = ("tx_rate_limit", "rx_rate_limit", "tx_rate_limit_group",
                          "rx_rate_limit_group")


_MACHINE_DEFAULTS: Final = MachineConfig()
_SERIAL_DEFAULTS: Final = SerialConfig()

_MACHINE: Final = _Table(
    fields=(
        _Field("vcpus", _integer(1, VCPUS_MAX), default=_MACHINE_DEFAULTS.vcpus),
        _Field(
            "memory_mib",
            _integer(MEMORY_MIB_MIN, MEMORY_MIB_MAX, " (MiB)"),
            default=_MACHINE_DEFAULTS.memory_mib,
        ),
        _Field("cpu_profile", _choice(CPU_PROFILES), default=_MACHINE_DEFAULTS.cpu_profile),
        _Field("hide_cpu_features", _choices(tuple(sorted(CPU_FEATURES))),
               default=_MACHINE_DEFAULTS.hide_cpu_features),
        _Field("acpi", _boolean, default=_MACHINE_DEFAULTS.acpi),
        _Field("cpu_weight", _integer(CPU_WEIGHT_MIN, CPU_WEIGHT_MAX), default=None),
        _Field("cpu_max_percent", _cpu_max_percent, default=None),
        _Field("cpu_affinity", _cpu_list, default=None),
        _Field("vcpu_affinity", _vcpu_affinity, default=None),
    ),
    build=_build_machine,
)

_BOOT: Final = _Table(
    fields=(
        _Field("kernel", _existing_file, hint='set kernel = "path/to/vmlinux"'),
        _Field("initrd", _existing_file, default=None),
        _Field("cmdline", _CMDLINE, default=""),
    ),
    build=lambda values, raw, key, context: BootConfig(**values),
)

_SERIAL: Final = _Table(
    fields=(
        _Field("mode", _choice(SERIAL_MODES), default=_SERIAL_DEFAULTS.mode),
        _Field("path", _path, default=None),
    ),
    build=_build_serial,
)

#: Bounds that keep the integer arithmetic of avmm.ratelimit small and catch unit
#: mistakes: a bucket of up to 1 TiB (or 2^40 requests), refilled in up to an hour.


def _build_bucket(values: dict[str, Any], raw: Mapping[str, Any], key: str,
                  context: _Context) -> BucketConfig:
    return BucketConfig(size=values["size"], refill_ms=values["refill_ms"],
                        one_time_burst=values["one_time_burst"])


_BUCKET: Final = _Table(
    fields=(
        _Field("size", _integer(1, BUCKET_SIZE_MAX),
               hint="set size = the tokens the bucket holds (bytes, or requests)"),
        _Field("refill_ms", _integer(1, REFILL_MS_MAX, " (milliseconds)"),
               hint="set refill_ms = the milliseconds to refill the bucket from empty"),
        _Field("one_time_burst", _integer(0, BUCKET_SIZE_MAX), default=0),
    ),
    build=_build_bucket,
)


def _build_rate_limit(values: dict[str, Any], raw: Mapping[str, Any], key: str,
                      context: _Context) -> RateLimitConfig | None:
    config = RateLimitConfig(bandwidth=values["bandwidth"], ops=values["ops"])
    return None if config.unlimited else config


#: ``{ bandwidth = {...}, ops = {...} }``; an empty table means unlimited (None).
RATE_LIMIT: Final = _Table(
    fields=(
        _Field("bandwidth", _BUCKET, default=None),
        _Field("ops", _BUCKET, default=None),
    ),
    build=_build_rate_limit,
)


def parse_rate_limit(value: Any, key: str, *, source: str | None = None
                     ) -> RateLimitConfig | None:
    """Validate one ``rate_limit`` value (a table, or None: unlimited) outside a config
    file (the management API's PATCH): a ConfigError names ``key``."""
    if value is None:
        return None
    return RATE_LIMIT(value, key, _Context(base_dir=None, source=source))


#: A rate-limit group's name (in a config, and in PUT /rate_limit_groups/NAME).
GROUP_NAME_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"


def _group_name(value: Any, key: str, context: _Context) -> str:
    if isinstance(value, str) and re.fullmatch(GROUP_NAME_PATTERN, value):
        return value
    raise context.error(key, "expected a group name of 1 to 64 characters from A-Z a-z 0-9 "
                        f"_ -, got {_describe(value)}")


def _rate_limit_groups(value: Any, key: str,
                       context: _Context) -> tuple[tuple[str, RateLimitConfig], ...]:
    if not isinstance(value, Mapping):
        raise context.error(key, "expected tables [rate_limit_groups.NAME] with bandwidth "
                            f"and/or ops buckets, got {_describe(value)}")
    groups = []
    for name, table in value.items():
        group_key = _join(key, str(name))
        _group_name(name, group_key, context)
        config = RATE_LIMIT(table, group_key, context)
        if config is None:
            raise context.error(group_key, "a rate-limit group needs a bandwidth or an ops "
                                "bucket")
        groups.append((name, config))
    return tuple(groups)


_DISK: Final = _Table(
    fields=(
        _Field("path", _existing_file, default=None),
        _Field("readonly", _boolean, default=False),
        _Field("id", _disk_id, default=None),
        _Field("vhost_user", _existing_socket, default=None),
        _Field("rate_limit", RATE_LIMIT, default=None),
        _Field("rate_limit_group", _group_name, default=None),
    ),
    build=_build_disk,
)

_NET: Final = _Table(
    fields=(
        _Field("tap", _tap_name, default=None),
        _Field("mac", _mac, default=None),
        _Field("netns", _netns, default=None),
        _Field("vhost_user", _existing_socket, default=None),
        _Field("tx_rate_limit", RATE_LIMIT, default=None),
        _Field("rx_rate_limit", RATE_LIMIT, default=None),
        _Field("tx_rate_limit_group", _group_name, default=None),
        _Field("rx_rate_limit_group", _group_name, default=None),
    ),
    build=_build_net,
)

_VHOST_USER: Final = _Table(
    fields=(
        _Field("socket", _existing_socket, hint='set socket = "/path/to/backend.sock"'),
        _Field("device_id", _integer(1, 0xFFFF),
               hint="set device_id to the virtio device ID (e.g. 4 for entropy)"),
        _Field("num_queues", _integer(1, 64), default=1),
        _Field("queue_size", _integer(1, 32768), default=256),
    ),
    build=lambda values, raw, key, context: _build_vhost_user(values, key, context),
)

_RNG: Final = _Table(fields=(), build=lambda values, raw, key, context: RngConfig())

_CONSOLE: Final = _Table(
    fields=(
        _Field("mode", _choice(CONSOLE_MODES), default="console"),
        _Field("path", _path, default=None),
    ),
    build=_build_console,
)

_ROOT: Final = _Table(
    fields=(
        _Field("name", _name, default=None),
        _Field("machine", _MACHINE, default=_EMPTY_TABLE),
        _Field("boot", _BOOT, hint='add [boot] with kernel = "path/to/vmlinux"'),
        _Field("serial", _SERIAL, default=_EMPTY_TABLE),
        _Field("disk", _array_of(_DISK, example='[[disk]] path = "disk.img"'), default=()),
        _Field("net", _array_of(_NET, example='[[net]] tap = "tap0"'), default=()),
        _Field("rng", _RNG, default=None),
        _Field("console", _CONSOLE, default=None),
        _Field("vhost_user", _array_of(
            _VHOST_USER, example='[[vhost_user]] socket = "fs.sock" device_id = 26'),
            default=()),
        _Field("rate_limit_groups", _rate_limit_groups, default=()),
    ),
    build=_build_vm,
)


def _homes(root: _Table[Any]) -> dict[str, str]:
    """Where each key name belongs, to redirect a key written under the wrong header."""
    homes: dict[str, str] = {}
    for field in root.fields:
        if isinstance(field.parse, _Table):
            for inner in field.parse.fields:
                homes.setdefault(inner.name, f"in [{field.name}]")
        else:
            homes.setdefault(field.name, "at the top level, above the first [table] header")
    return homes


_HOMES: Final = _homes(_ROOT)


def _close_matches(word: str, possibilities: Iterable[str], n: int) -> list[str]:
    """difflib's suggestions for a misspelt key or value, imported only when one is
    misspelt: difflib is not on a good config's path (about 0.15 MiB of RSS)."""
    import difflib

    return difflib.get_close_matches(word, possibilities, n=n)
