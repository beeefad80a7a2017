"""vm.toml parsing and validation (avmm.config)."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from avmm.config import (
    BootConfig,
    MachineConfig,
    SerialConfig,
    VmConfig,
    config_from_dict,
    load_config,
)
from avmm.errors import ConfigError

MINIMAL = '[boot]\nkernel = "vmlinux"\n'


@pytest.fixture
def vm_dir(tmp_path: Path) -> Path:
    """A directory with the files the configs below refer to."""
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    (tmp_path / "kerneldir").mkdir()
    return tmp_path


def write_config(directory: Path, text: str, name: str = "vm.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_config_gets_defaults(vm_dir: Path) -> None:
    path = write_config(vm_dir, MINIMAL)
    config = load_config(path)
    assert config == VmConfig(
        machine=MachineConfig(vcpus=1, memory_mib=128, cpu_profile="auto"),
        boot=BootConfig(kernel=vm_dir / "vmlinux", initrd=None, cmdline=""),
        serial=SerialConfig(mode="console", path=None),
        source=str(path),
        name=None,
    )


def test_full_config_round_trip(vm_dir: Path) -> None:
    path = write_config(
        vm_dir,
        """
        name = "web-1.test_vm"

        [machine]
        vcpus = 4
        memory_mib = 2048
        cpu_profile = "compat"

        [boot]
        kernel = "vmlinux"
        initrd = "initrd.img"
        cmdline = "console=ttyS0 quiet"

        [serial]
        mode = "file"
        path = "serial.log"
        """,
    )
    config = load_config(path)
    assert config.name == "web-1.test_vm"
    assert config.machine == MachineConfig(vcpus=4, memory_mib=2048, cpu_profile="compat")
    assert config.boot == BootConfig(
        kernel=vm_dir / "vmlinux", initrd=vm_dir / "initrd.img", cmdline="console=ttyS0 quiet"
    )
    assert config.serial == SerialConfig(mode="file", path=vm_dir / "serial.log")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.machine.vcpus = 2  # type: ignore[misc]


def test_serial_none_mode(vm_dir: Path) -> None:
    config = load_config(write_config(vm_dir, MINIMAL + '[serial]\nmode = "none"\n'))
    assert config.serial == SerialConfig(mode="none", path=None)


def test_relative_paths_are_relative_to_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinux").write_bytes(b"kernel")
    (images / "initrd.img").write_bytes(b"initrd")
    conf = tmp_path / "conf"
    (conf / "logs").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_config(
        conf,
        f"""
        [boot]
        kernel = "../images/vmlinux"
        initrd = "{images / "initrd.img"}"
        [serial]
        mode = "file"
        path = "logs/out.log"
        """,
    )
    # Loaded through a path relative to the cwd, too.
    config = load_config("../conf/vm.toml")
    assert config.boot.kernel == conf / "../images/vmlinux"
    assert config.boot.kernel.is_absolute()
    assert config.boot.kernel.resolve() == (images / "vmlinux").resolve()
    assert config.boot.initrd == images / "initrd.img"
    assert config.serial.path == conf / "logs" / "out.log"
    assert config.source == "../conf/vm.toml"
    assert load_config(path) == dataclasses.replace(config, source=str(path))


# (id, file text, expected key, distinctive part of the message)
MALFORMED = [
    ("invalid-toml", "[boot\nkernel = 1\n", None, "not valid TOML"),
    ("invalid-toml-value", MINIMAL + "[machine]\nvcpus = \n", None, "line 4, column"),
    ("unknown-top-level-table", MINIMAL + "[machin]\nvcpus = 2\n", "machin",
     "did you mean [machine]?"),
    ("unknown-top-level-table-no-match", MINIMAL + "[zzz]\n", "zzz", "known tables are"),
    ("unknown-top-level-key", MINIMAL.replace("[boot]", 'nmae = "x"\n[boot]'), "nmae",
     'did you mean "name"?'),
    ("unknown-machine-key", MINIMAL + "[machine]\nvcpu = 2\n", "machine.vcpu",
     'unknown key "vcpu" in [machine]; did you mean "vcpus"?'),
    ("key-under-wrong-header", MINIMAL + '[machine]\nname = "x"\n', "machine.name",
     "belongs at the top level"),
    ("key-in-wrong-table", MINIMAL + '[machine]\nmode = "none"\n', "machine.mode",
     "belongs in [serial]"),
    ("vcpus-string", MINIMAL + '[machine]\nvcpus = "two"\n', "machine.vcpus",
     'expected an integer from 1 to 255, got "two" (a string)'),
    ("vcpus-bool", MINIMAL + "[machine]\nvcpus = true\n", "machine.vcpus",
     "got true (a boolean)"),
    ("vcpus-float", MINIMAL + "[machine]\nvcpus = 2.0\n", "machine.vcpus", "(a float)"),
    ("vcpus-zero", MINIMAL + "[machine]\nvcpus = 0\n", "machine.vcpus",
     "from 1 to 255, got 0"),
    ("vcpus-too-many", MINIMAL + "[machine]\nvcpus = 256\n", "machine.vcpus", "got 256"),
    ("memory-too-small", MINIMAL + "[machine]\nmemory_mib = 8\n", "machine.memory_mib",
     "from 16 to 1048576 (MiB), got 8"),
    ("memory-too-large", MINIMAL + "[machine]\nmemory_mib = 1048577\n", "machine.memory_mib",
     "got 1048577"),
    ("unknown-cpu-profile", MINIMAL + '[machine]\ncpu_profile = "hots"\n',
     "machine.cpu_profile", 'expected one of "auto", "host", "compat", got "hots" (a string); '
     'did you mean "host"?'),
    ("machine-scalar", "machine = 3\n" + MINIMAL, "machine",
     "expected a table [machine], got 3 (an integer)"),
    ("boot-scalar", 'boot = "vmlinux"\n', "boot", "expected a table [boot]"),
    ("scalar-as-table", MINIMAL + "[boot.cmdline]\nx = 1\n", "boot.cmdline",
     "expected a string, got a table"),
    ("missing-boot", "[machine]\nvcpus = 1\n", "boot", "missing required table [boot]"),
    ("empty-file", "", "boot", 'add [boot] with kernel = "path/to/vmlinux"'),
    ("missing-kernel", '[boot]\ncmdline = "quiet"\n', "boot.kernel",
     'missing required key "kernel" in [boot]'),
    ("kernel-wrong-type", "[boot]\nkernel = 5\n", "boot.kernel",
     "expected a path (a string), got 5"),
    ("kernel-empty", '[boot]\nkernel = ""\n', "boot.kernel", "got an empty string"),
    ("kernel-not-found", '[boot]\nkernel = "bzImage"\n', "boot.kernel",
     "file not found: {dir}/bzImage (relative paths are relative to {dir}"),
    ("kernel-is-directory", '[boot]\nkernel = "kerneldir"\n', "boot.kernel",
     "{dir}/kerneldir is a directory"),
    ("kernel-through-a-file", '[boot]\nkernel = "vmlinux/x"\n', "boot.kernel",
     "file not found"),
    ("initrd-not-found", MINIMAL + 'initrd = "/nonexistent/initrd"\n', "boot.initrd",
     "file not found: /nonexistent/initrd"),
    ("cmdline-nul", MINIMAL + 'cmdline = "quiet\\u0000x"\n', "boot.cmdline",
     "NUL character at position 5"),
    ("cmdline-wrong-type", MINIMAL + 'cmdline = ["console=ttyS0"]\n', "boot.cmdline",
     "expected a string, got an array"),
    ("cmdline-too-long", MINIMAL + f'cmdline = "{"x" * 65536}"\n', "boot.cmdline",
     "65536 bytes, the limit is 65535"),
    ("serial-mode-unknown", MINIMAL + '[serial]\nmode = "stdio"\n', "serial.mode",
     'expected one of "console", "file", "none"'),
    ("serial-file-without-path", MINIMAL + '[serial]\nmode = "file"\n', "serial.path",
     'mode = "file" needs a path'),
    ("serial-path-with-console", MINIMAL + '[serial]\npath = "out.log"\n', "serial.path",
     'only used with mode = "file" (mode is "console")'),
    ("serial-path-with-none", MINIMAL + '[serial]\nmode = "none"\npath = "/nope/out.log"\n',
     "serial.path", '(mode is "none")'),
    ("serial-parent-missing", MINIMAL + '[serial]\nmode = "file"\npath = "logs/out.log"\n',
     "serial.path", "directory not found: {dir}/logs"),
    ("serial-path-is-directory", MINIMAL + '[serial]\nmode = "file"\npath = "kerneldir"\n',
     "serial.path", "is a directory"),
    ("name-invalid", 'name = "my vm"\n' + MINIMAL, "name",
     'expected 1 to 64 characters from A-Z a-z 0-9 . _ -'),
    ("name-too-long", f'name = "{"a" * 65}"\n' + MINIMAL, "name", "1 to 64 characters"),
    ("name-wrong-type", "name = 7\n" + MINIMAL, "name", "got 7 (an integer)"),
    ("name-dot-dot", 'name = ".."\n' + MINIMAL, "name", "not . or .."),
    ("quoted-unknown-key", MINIMAL + '[machine]\n"v cpus" = 1\n', 'machine."v cpus"',
     'unknown key "v cpus"'),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_file(vm_dir: Path, text: str, key: str | None, fragment: str) -> None:
    path = write_config(vm_dir, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    error = excinfo.value
    assert error.key == key
    assert error.path == str(path)
    assert fragment.format(dir=vm_dir) in error.reason
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    if key is not None:
        assert message.startswith(f"{path}: {key}: ")


DICT_CASES = [case for case in MALFORMED if case[2] is not None]


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [case[1:] for case in DICT_CASES],
    ids=[case[0] for case in DICT_CASES],
)
def test_malformed_dict(vm_dir: Path, text: str, key: str, fragment: str) -> None:
    data = tomllib.loads(text)
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(data, base_dir=vm_dir, source="api")
    error = excinfo.value
    assert error.key == key
    assert error.path == "api"
    assert fragment.format(dir=vm_dir) in error.reason
    assert str(error).startswith(f"api: {key}: ")
    assert "\n" not in str(error)


def test_config_from_dict_matches_load_config(vm_dir: Path) -> None:
    data = {
        "name": "vm0",
        "machine": {"vcpus": 2, "memory_mib": 256},
        "boot": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "serial": {"mode": "none"},
    }
    from_dict = config_from_dict(data, base_dir=vm_dir, source="vm.toml")
    path = write_config(
        vm_dir,
        'name = "vm0"\n[machine]\nvcpus = 2\nmemory_mib = 256\n'
        '[boot]\nkernel = "vmlinux"\ncmdline = "console=ttyS0"\n[serial]\nmode = "none"\n',
    )
    assert load_config(path) == dataclasses.replace(from_dict, source=str(path))
    assert from_dict.machine == MachineConfig(vcpus=2, memory_mib=256, cpu_profile="auto")


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ([], None, "expected a table at the top level, got an array"),
        ({"boot": {"kernel": "vmlinux", "initrd": None}}, "boot.initrd", "got null"),
        ({"boot": {"kernel": "vmlinux"}, 1: 2}, None, "keys must be strings"),
        ({"boot": {"kernel": "vmlinux", "cmdline": "a\ud800"}}, "boot.cmdline",
         "not valid Unicode"),
    ],
    ids=["not-a-mapping", "json-null", "non-string-key", "lone-surrogate"],
)  # fmt: skip
def test_dict_only_malformed(vm_dir: Path, data: object, key: str | None, fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(data, base_dir=vm_dir)  # type: ignore[arg-type]
    assert excinfo.value.key == key
    assert fragment in excinfo.value.reason
    assert str(excinfo.value).startswith("<config>")


def test_load_config_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found") as excinfo:
        load_config(tmp_path / "missing.toml")
    assert excinfo.value.key is None
    assert str(tmp_path / "missing.toml") in str(excinfo.value)


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_bytes(b'[boot]\nkernel = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8 at byte 17"):
        load_config(path)


def test_with_cmdline_appended(vm_dir: Path) -> None:
    config = load_config(write_config(vm_dir, MINIMAL))
    once = config.with_cmdline_appended("console=ttyS0")
    assert once.boot.cmdline == "console=ttyS0"
    twice = once.with_cmdline_appended("quiet panic=-1")
    assert twice.boot.cmdline == "console=ttyS0 quiet panic=-1"
    assert once.with_cmdline_appended("") == once
    assert config.boot.cmdline == ""
    assert twice.boot.kernel == config.boot.kernel
    with pytest.raises(ConfigError) as excinfo:
        config.with_cmdline_appended("bad\0word")
    assert excinfo.value.key == "boot.cmdline"
    assert excinfo.value.path == config.source


def test_hide_cpu_features_accepts_known_names_once_each(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    config = config_from_dict(
        {"machine": {"hide_cpu_features": ["x2apic", "cx16", "x2apic"]},
         "boot": {"kernel": "vmlinux"}},
        base_dir=tmp_path,
    )
    assert config.machine.hide_cpu_features == ("x2apic", "cx16")


@pytest.mark.parametrize(
    ("value", "key", "fragment"),
    [
        (["x2apc"], "machine.hide_cpu_features[0]", 'did you mean "x2apic"'),
        ("x2apic", "machine.hide_cpu_features", "expected a list of strings"),
        ([3], "machine.hide_cpu_features[0]", "expected one of"),
    ],
)
def test_hide_cpu_features_errors_name_the_entry(
    tmp_path: Path, value: object, key: str, fragment: str
) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"machine": {"hide_cpu_features": value},
                          "boot": {"kernel": "vmlinux"}}, base_dir=tmp_path, source="vm.toml")
    assert caught.value.key == key
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


# -- virtio devices -------------------------------------------------------------------


def _devices_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "vmlinux").write_bytes(b"x")
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    path = tmp_path / "vm.toml"
    path.write_text('[boot]\nkernel = "vmlinux"\n' + text)
    return path


def test_device_sections_parse(tmp_path: Path) -> None:
    path = _devices_config(tmp_path, """
[[disk]]
path = "disk.img"
[[disk]]
path = "disk.img"
readonly = true
id = "data-1"
[[net]]
tap = "avmmtap0"
mac = "52:54:00:12:34:56"
[rng]
[console]
mode = "file"
path = "console.log"
""")
    config = load_config(path)
    assert [(d.path, d.readonly, d.id) for d in config.disks] == [
        (tmp_path / "disk.img", False, None), (tmp_path / "disk.img", True, "data-1")]
    assert config.nets[0].tap == "avmmtap0"
    assert config.nets[0].mac == bytes.fromhex("525400123456")
    assert config.rng is not None
    assert config.console is not None and config.console.path == tmp_path / "console.log"


def test_device_sections_default_to_none(tmp_path: Path) -> None:
    config = load_config(_devices_config(tmp_path, ""))
    assert config.disks == () and config.nets == ()
    assert config.rng is None and config.console is None


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[[disk]]\npath = "missing.img"\n', "disk[0].path", "file not found"),
        ("[[disk]]\nreadonly = true\n", "disk[0].path", 'missing required key "path"'),
        ('[[disk]]\npath = "disk.img"\nreadonly = "yes"\n', "disk[0].readonly",
         "expected true or false"),
        ('[[disk]]\npath = "disk.img"\nid = "x' + "y" * 20 + '"\n', "disk[0].id",
         "printable ASCII"),
        ('[disk]\npath = "disk.img"\n', "disk", "expected [[disk]] tables"),
        ('[[net]]\ntap = "a-very-long-tap-name"\n', "net[0].tap", "interface name"),
        ('[[net]]\ntap = "t0"\nmac = "52:54:00:12:34"\n', "net[0].mac", "MAC address"),
        ('[[net]]\ntap = "t0"\nmac = "01:00:5e:00:00:01"\n', "net[0].mac", "multicast"),
        ('[[net]]\ntap = "t0"\n[[net]]\ntap = "t0"\n', "net[1].tap", "used twice"),
        ("[rng]\nsource = 1\n", "rng.source", "unknown key"),
        ('[console]\nmode = "socket"\n', "console.path", "needs a path"),
        ('[console]\npath = "c.log"\n', "console.path", "only used with"),
        ("[[disk]]\npath = \"disk.img\"\n" * 9, "disk", "at most 8"),
    ],
)
def test_device_section_errors_name_the_key(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_devices_config(tmp_path, text))
    assert caught.value.key == key
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


# -- vhost-user devices ------------------------------------------------------------------


@pytest.fixture
def backend_socket(tmp_path: Path) -> Iterator[Path]:
    """A listening unix socket named ``vu.sock`` in tmp_path."""
    import socket

    path = tmp_path / "vu.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        yield path


def test_vhost_user_sections_parse(tmp_path: Path, backend_socket: Path) -> None:
    path = _devices_config(tmp_path, """
[[disk]]
vhost_user = "vu.sock"
[[disk]]
path = "disk.img"
[[net]]
vhost_user = "vu.sock"
mac = "52:54:00:12:34:56"
[[vhost_user]]
socket = "vu.sock"
device_id = 26
num_queues = 2
queue_size = 128
""")
    config = load_config(path)
    assert config.disks[0].vhost_user == backend_socket and config.disks[0].path is None
    assert config.disks[1].vhost_user is None
    assert config.nets[0].vhost_user == backend_socket and config.nets[0].tap is None
    assert config.nets[0].mac == bytes.fromhex("525400123456")
    generic = config.vhost_users[0]
    assert (generic.socket, generic.device_id, generic.num_queues, generic.queue_size) == (
        backend_socket, 26, 2, 128)


def test_vhost_user_generic_defaults(tmp_path: Path, backend_socket: Path) -> None:
    config = load_config(_devices_config(
        tmp_path, '[[vhost_user]]\nsocket = "vu.sock"\ndevice_id = 4\n'))
    assert (config.vhost_users[0].num_queues, config.vhost_users[0].queue_size) == (1, 256)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[[disk]]\nvhost_user = "missing.sock"\n', "disk[0].vhost_user", "socket not found"),
        ('[[disk]]\nvhost_user = "disk.img"\n', "disk[0].vhost_user", "is not a unix socket"),
        ('[[disk]]\npath = "disk.img"\nvhost_user = "vu.sock"\n', "disk[0].vhost_user",
         "either path or vhost_user"),
        ('[[disk]]\nvhost_user = "vu.sock"\nreadonly = true\n', "disk[0].readonly",
         "cannot be set for a vhost_user disk"),
        ('[[disk]]\nvhost_user = "vu.sock"\nid = "x"\n', "disk[0].id",
         "cannot be set for a vhost_user disk"),
        ('[[net]]\nmac = "52:54:00:12:34:56"\n', "net[0].tap", 'missing required key "tap"'),
        ('[[net]]\ntap = "t0"\nvhost_user = "vu.sock"\n', "net[0].vhost_user",
         "either tap or vhost_user"),
        ('[[net]]\nvhost_user = "nope.sock"\n', "net[0].vhost_user", "socket not found"),
        ('[[vhost_user]]\ndevice_id = 4\n', "vhost_user[0].socket", 'missing required key'),
        ('[[vhost_user]]\nsocket = "vu.sock"\n', "vhost_user[0].device_id",
         "virtio device ID"),
        ('[[vhost_user]]\nsocket = "vu.sock"\ndevice_id = 0\n', "vhost_user[0].device_id",
         "expected an integer"),
        ('[[vhost_user]]\nsocket = "vu.sock"\ndevice_id = 4\nqueue_size = 100\n',
         "vhost_user[0].queue_size", "power of two"),
        ('[[vhost_user]]\nsocket = "vu.sock"\ndevice_id = 4\nnum_queues = 0\n',
         "vhost_user[0].num_queues", "expected an integer"),
        ('[vhost_user]\nsocket = "vu.sock"\n', "vhost_user", "expected [[vhost_user]] tables"),
        ('[[vhost_user]]\nsocket = "vu.sock"\ndevice_id = 4\n' * 5
         + '[[disk]]\nvhost_user = "vu.sock"\n' * 4, "disk", "at most 8"),
    ],
)
def test_vhost_user_errors_name_the_key(
    tmp_path: Path, backend_socket: Path, text: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_devices_config(tmp_path, text))
    assert caught.value.key == key
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_machine_acpi_defaults_to_true_and_parses(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    default = config_from_dict({"boot": {"kernel": "vmlinux"}}, base_dir=tmp_path)
    assert default.machine.acpi is True
    off = config_from_dict({"machine": {"acpi": False}, "boot": {"kernel": "vmlinux"}},
                           base_dir=tmp_path)
    assert off.machine.acpi is False
    path = write_config(tmp_path, MINIMAL + "[machine]\nacpi = false\n")
    assert load_config(path).machine.acpi is False


@pytest.mark.parametrize("value", ["no", 0, 1])
def test_machine_acpi_must_be_a_boolean(tmp_path: Path, value: object) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    with pytest.raises(ConfigError) as info:
        config_from_dict({"machine": {"acpi": value}, "boot": {"kernel": "vmlinux"}},
                         base_dir=tmp_path)
    assert info.value.key == "machine.acpi"
