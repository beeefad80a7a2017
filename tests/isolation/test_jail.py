"""The jailer (avmm.isolation.jail): planning a VM's jail, the spec as hostile JSON, the
daemon-side directory, and processes that really enter a jail.

Everything that enters a jail runs in a subprocess (tests/isolation/jail_probe.py),
never in the pytest process: enter_jail closes fds and changes namespaces for good.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from avmm.config import (
    BootConfig,
    ConsoleConfig,
    DiskConfig,
    MachineConfig,
    NetConfig,
    SerialConfig,
    VhostUserConfig,
    VmConfig,
)
from avmm.isolation.jail import (
    BUILD_CAPABILITIES,
    Bind,
    JailError,
    JailSpec,
    UidAllocator,
    parse_uid_range,
    plan_jail,
    prepare_jail_dir,
    remove_jail,
    remove_stale_jails,
    runtime_binds,
)
from tests.prerequisites import (
    REPO,
    guest_problem,
    kvm_problem,
    net_problem,
    require,
)
from tests.vm.helpers import guest_config

#: Ids nothing on this host uses (Debian hands out system ids below 1000 and users'
#: from 1000; the range 64000-64999 is left alone).
JAIL_UID = 64_321
JAIL_GID = 64_322


def _jail_problem() -> str | None:
    if os.geteuid() != 0:
        return "entering a jail needs root (mount, PID and IPC namespaces, pivot_root)"
    if not os.path.exists("/proc/self/ns/pid"):
        return "this kernel has no PID namespaces"
    return None


# --------------------------------------------------------------------------- planning


def _config(**changes: Any) -> VmConfig:
    base = VmConfig(
        machine=MachineConfig(),
        boot=BootConfig(kernel=Path("/srv/images/vmlinux"),
                        initrd=Path("/srv/images/initrd.img")),
        serial=SerialConfig(mode="none"),
    )
    return VmConfig(**{**{f: getattr(base, f) for f in base.__slots__}, **changes})


def _without_runtime(spec: JailSpec) -> list[Bind]:
    runtime = set(runtime_binds())
    return [bind for bind in spec.binds if bind not in runtime]


def test_plan_jail_binds_exactly_what_the_vm_needs() -> None:
    config = _config(
        disks=(DiskConfig(path=Path("/srv/vms/web/root.img")),
               DiskConfig(path=Path("/srv/images/base.img"), readonly=True),
               DiskConfig(vhost_user=Path("/run/backends/blk0.sock"))),
        nets=(NetConfig(tap="tap0"),),
        console=ConsoleConfig(mode="socket", path=Path("/run/avmm/consoles/web.sock")),
        serial=SerialConfig(mode="file", path=Path("/var/log/avmm/web.log")),
    )
    spec = plan_jail(config, "vm-1a2b3c", uid=100_000, gid=100_001)
    assert spec.root == "/srv/avmm/jail/vm-1a2b3c"
    assert (spec.uid, spec.gid, spec.netns, spec.own_network, spec.max_files) \
        == (100_000, 100_001, None, True, 4096)
    assert _without_runtime(spec) == [
        Bind("/run/backends", writable=False),       # connect(2) needs no write access
        Bind("/srv/images/base.img", writable=False),
        Bind("/srv/images/initrd.img", writable=False),
        Bind("/srv/images/vmlinux", writable=False),
        Bind("/srv/vms/web/root.img", writable=True),
    ]
    # The serial log and the console socket are opened (bound) by the daemon and handed
    # over: nothing of their directories is in the jail, only empty stand-ins.
    assert spec.dirs == ("/run/avmm/consoles", "/var/log/avmm")
    # The tap too: the daemon opens it; the jail has no /dev/net/tun.
    assert spec.devices == ("/dev/kvm", "/dev/null", "/dev/urandom")
    assert set(runtime_binds()) <= set(spec.binds)
    assert [bind.path for bind in spec.binds] == sorted(bind.path for bind in spec.binds)


def test_plan_jail_drops_binds_inside_a_bind_with_the_same_access() -> None:
    config = _config(
        boot=BootConfig(kernel=Path("/srv/vm/vmlinux")),
        vhost_users=(VhostUserConfig(socket=Path("/srv/vm/fs.sock"), device_id=26),),
        disks=(DiskConfig(path=Path("/srv/vm/root.img")),
               DiskConfig(path=Path("/srv/vm/sub/base.img"), readonly=True),
               DiskConfig(path=Path("/srv/vm/root.img"), readonly=True)),
    )
    spec = plan_jail(config, "vm-1", jail_root="/var/jail", uid=5000, gid=5000)
    # /srv/vm is bound read-only (the back-end's socket is there): the kernel and the
    # read-only disk are already in it; the rw disk gets a writable mount on top.
    assert _without_runtime(spec) == [Bind("/srv/vm", writable=False),
                                      Bind("/srv/vm/root.img", writable=True)]


def test_plan_jail_network_namespaces() -> None:
    """The daemon opens each tap in its NIC's namespace and hands it over: the jail has
    no /dev/net/tun and no /run/netns file, and the worker gets an empty network
    namespace of its own instead of entering one."""
    for nets in ((NetConfig(tap="tap0", netns="blue"), NetConfig(tap="tap1", netns="blue")),
                 (NetConfig(tap="tap0", netns="blue"), NetConfig(tap="tap1")),
                 (NetConfig(tap="tap0", netns="blue"), NetConfig(tap="tap1", netns="red")),
                 (NetConfig(vhost_user=Path("/run/net/n0.sock")),)):
        spec = plan_jail(_config(nets=nets), "vm-1", uid=5000, gid=5000)
        assert spec.netns is None and spec.own_network, nets
        assert "/dev/net/tun" not in spec.devices, nets
        assert not [bind for bind in spec.binds if bind.path.startswith("/run/netns")], nets


def test_plan_jail_output_to_a_device() -> None:
    # The daemon opens it (any character device, as in none mode) and hands it over:
    # neither /dev nor the device comes into the jail for it.
    for device in ("/dev/null", "/dev/tty"):
        config = _config(serial=SerialConfig(mode="file", path=Path(device)))
        spec = plan_jail(config, "vm-1", uid=5000, gid=5000)
        assert not any(bind.path == "/dev" for bind in spec.binds)
        assert spec.devices == ("/dev/kvm", "/dev/null", "/dev/urandom")
        assert spec.dirs == ()


def test_a_jail_spec_refuses_a_bad_stand_in_directory() -> None:
    spec = plan_jail(_config(), "vm-1", uid=5000, gid=5000)
    data = spec.to_dict()
    assert JailSpec.from_dict({**data, "dirs": ["/var/log"]}).dirs == ("/var/log",)
    for dirs in (["/proc/x"], ["/dev"], ["relative"], ["/a/../b"], ["/b", "/a"], "/a"):
        with pytest.raises(JailError):
            JailSpec.from_dict({**data, "dirs": dirs})


@pytest.mark.parametrize("vm_id", ["", "..", "vm/1", "vm.1", "a" * 65, "vm 1", "é"])
def test_plan_jail_refuses_a_bad_vm_id(vm_id: str) -> None:
    with pytest.raises(JailError):
        plan_jail(_config(), vm_id, uid=5000, gid=5000)


def test_runtime_binds_cover_the_interpreter() -> None:
    import avmm

    binds = runtime_binds()
    paths = [bind.path for bind in binds]
    assert not any(bind.writable for bind in binds)
    assert paths == sorted(set(paths))

    def covered(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in paths)

    assert covered(os.path.dirname(os.__file__))  # the standard library
    assert covered(os.path.dirname(avmm.__file__))
    assert covered(sys.prefix)
    assert covered("/etc/ld.so.cache")
    import _cffi_backend

    assert covered(_cffi_backend.__file__)
    assert not any(a != b and b.startswith(a + "/") for a in paths for b in paths)


# --------------------------------------------------------------------------- the spec


def _spec_dict(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "root": "/srv/avmm/jail/vm-1", "uid": 5000, "gid": 5001,
        "binds": [{"path": "/srv/a.img", "writable": True}, {"path": "/usr/lib"}],
        "devices": ["/dev/kvm"], "netns": "/run/netns/blue", "max_files": 1024,
    }
    data.update(changes)
    return data


def test_spec_round_trips_through_json() -> None:
    spec = JailSpec.from_dict(_spec_dict())
    assert spec.binds == (Bind("/srv/a.img", True), Bind("/usr/lib", False))
    assert JailSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    planned = plan_jail(_config(), "vm-9", uid=5000, gid=5000)
    assert JailSpec.from_dict(json.loads(json.dumps(planned.to_dict()))) == planned


@pytest.mark.parametrize("changes", [
    {"root": "srv/avmm/jail/vm-1"},
    {"root": "/srv/avmm/../jail/vm-1"},
    {"root": "/srv/avmm/jail/vm-1/"},
    {"root": "/srv/avmm/jail/.."},
    {"root": "/"},
    {"binds": [{"path": "relative.img"}]},
    {"binds": [{"path": "/srv/../etc/shadow"}]},
    {"binds": [{"path": "/srv/./a.img"}]},
    {"binds": [{"path": "//srv/a.img"}]},
    {"binds": [{"path": "/srv/a\0.img"}]},
    {"binds": [{"path": "/"}]},
    {"binds": [{"path": "/proc/1/root"}]},
    {"binds": [{"path": "/dev"}]},
    {"binds": [{"path": "/srv/avmm"}]},
    {"binds": [{"path": "/srv/avmm/jail/vm-1/x"}]},
    {"binds": [{"path": "/b"}, {"path": "/a"}]},
    {"binds": [{"path": "/a"}, {"path": "/a"}]},
    {"binds": [{"path": "/a", "writable": 1}]},
    {"binds": [{"path": "/a", "mode": "rw"}]},
    {"binds": "/a"},
    {"binds": [{"path": "/a"}] * 300},
    {"uid": 0},
    {"gid": 0},
    {"uid": -1},
    {"uid": 2**32},
    {"uid": 2**32 - 1},
    {"uid": True},
    {"uid": "5000"},
    {"gid": 1.5},
    {"max_files": 10},
    {"max_files": 2**21},
    {"devices": ["/dev/sda"]},
    {"devices": ["/dev/kvm", "/dev/kvm"]},
    {"devices": "/dev/kvm"},
    {"netns": "/proc/1/ns/net"},
    {"netns": "/run/netns/.."},
    {"netns": "/run/netns/a/b"},
    {"own_network": 1},
    {"own_network": True},  # and netns: one or the other
    {"extra": 1},
], ids=lambda changes: json.dumps(changes)[:60])
def test_spec_from_dict_refuses_hostile_input(changes: dict[str, Any]) -> None:
    with pytest.raises(JailError):
        JailSpec.from_dict(_spec_dict(**changes))


def test_spec_from_dict_refuses_missing_keys_and_non_objects() -> None:
    data = _spec_dict()
    del data["uid"]
    with pytest.raises(JailError, match="missing key 'uid'"):
        JailSpec.from_dict(data)
    with pytest.raises(JailError):
        JailSpec.from_dict([])
    assert JailSpec.from_dict({k: v for k, v in _spec_dict().items()
                               if k not in {"netns", "max_files"}}).max_files == 4096


# --------------------------------------------------------------------------- uids


def test_parse_uid_range() -> None:
    assert parse_uid_range("100000-165535") == (100_000, 165_535)
    assert parse_uid_range(" 7 - 7 ") == (7, 7)
    for bad in ["", "100000", "0-10", "10-5", "1-4294967295", "a-b", "-5-10", "1-2-3"]:
        with pytest.raises(JailError):
            parse_uid_range(bad)


def test_uid_allocator_hands_out_each_uid_once() -> None:
    allocator = UidAllocator((100, 102))
    assert [allocator.allocate() for _ in range(3)] == [100, 101, 102]
    with pytest.raises(JailError, match="widen --jail-uid-range"):
        allocator.allocate()
    allocator.release(101)
    assert allocator.in_use == {100, 102}
    assert allocator.allocate() == 101
    allocator.release(100)
    allocator.release(102)
    assert allocator.allocate() == 102  # round-robin: the longest free goes first
    with pytest.raises(JailError):
        allocator.release(100)
    with pytest.raises(JailError):
        UidAllocator((0, 10))


# --------------------------------------------------------------------------- the directory


def _spec(root: Path, binds: tuple[Bind, ...] = (), **changes: Any) -> JailSpec:
    values: dict[str, Any] = {
        "root": str(root), "uid": JAIL_UID, "gid": JAIL_GID,
        "binds": tuple(sorted(set(binds), key=lambda bind: bind.path)),
        "devices": ("/dev/kvm", "/dev/null"),
    }
    values.update(changes)
    return JailSpec(**values)


def test_prepare_jail_dir_makes_a_private_directory(tmp_path: Path) -> None:
    root = tmp_path / "jail" / "nested" / "vm-1"
    prepare_jail_dir(_spec(root))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(root.parent.stat().st_mode) == 0o755
    prepare_jail_dir(_spec(root))  # an empty one left by a crash is fine
    remove_jail(str(root))
    assert not root.exists() and root.parent.is_dir()
    remove_jail(str(root))  # idempotent
    remove_jail(str(tmp_path / "gone" / "vm-1"))


def test_prepare_jail_dir_refuses_symlinks_and_leftovers(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    with pytest.raises(JailError, match="symlink"):
        prepare_jail_dir(_spec(tmp_path / "link" / "vm-1"))
    (tmp_path / "jails").mkdir()
    (tmp_path / "jails" / "vm-2").symlink_to(elsewhere)
    with pytest.raises(JailError, match="symlink"):
        prepare_jail_dir(_spec(tmp_path / "jails" / "vm-2"))
    assert os.listdir(elsewhere) == []
    (tmp_path / "jails" / "vm-3").mkdir()
    (tmp_path / "jails" / "vm-3" / "left").write_text("x")
    with pytest.raises(JailError, match="not empty"):
        prepare_jail_dir(_spec(tmp_path / "jails" / "vm-3"))
    (tmp_path / "jails" / "vm-4").write_text("a file")
    with pytest.raises(JailError, match="not a directory"):
        prepare_jail_dir(_spec(tmp_path / "jails" / "vm-4"))


def test_stale_jails_of_a_dead_daemon_are_removed_and_no_other(tmp_path: Path) -> None:
    """A daemon marks each jail it makes with its owner name; the next daemon removes
    those whose owner is gone, and leaves a live daemon's, unmarked ones, ones that
    hold anything else, and a marker that is a symlink."""
    jails = tmp_path / "jails"
    prepare_jail_dir(_spec(jails / "vm-dead"), owner="pid-1-100-1")
    prepare_jail_dir(_spec(jails / "vm-live"), owner="pid-1-200-1")
    prepare_jail_dir(_spec(jails / "vm-unmarked"))
    prepare_jail_dir(_spec(jails / "vm-full"), owner="pid-1-100-1")
    (jails / "vm-full" / "left").write_text("x")
    (jails / "vm-link").mkdir()
    (tmp_path / "owner").write_text("pid-1-100-1")
    (jails / "vm-link" / ".avmm-owner").symlink_to(tmp_path / "owner")
    (jails / "not a vm id").mkdir()
    assert (jails / "vm-dead" / ".avmm-owner").read_text() == "pid-1-100-1"
    asked: list[str] = []

    def alive(owner: str) -> bool:
        asked.append(owner)
        return owner == "pid-1-200-1"

    assert remove_stale_jails(str(jails), alive) == [str(jails / "vm-dead")]
    assert sorted(os.listdir(jails)) == ["not a vm id", "vm-full", "vm-link", "vm-live",
                                         "vm-unmarked"]
    assert (jails / "vm-full" / "left").read_text() == "x"
    assert sorted(set(asked)) == ["pid-1-100-1", "pid-1-200-1"]
    assert remove_stale_jails(str(tmp_path / "none"), alive) == []
    # A jail its daemon removes goes with its marker.
    remove_jail(str(jails / "vm-live"))
    assert not (jails / "vm-live").exists()


def test_remove_jail_removes_only_an_empty_jail_directory(tmp_path: Path) -> None:
    jails = tmp_path / "jails"
    jails.mkdir()
    (jails / "vm-1").mkdir()
    (jails / "vm-1" / "keep").write_text("x")
    with pytest.raises(JailError, match="not empty"):
        remove_jail(str(jails / "vm-1"))
    assert (jails / "vm-1" / "keep").read_text() == "x"
    target = tmp_path / "target"
    target.mkdir()
    (jails / "vm-2").symlink_to(target)
    with pytest.raises(JailError):
        remove_jail(str(jails / "vm-2"))
    assert target.is_dir() and (jails / "vm-2").is_symlink()
    (tmp_path / "via").symlink_to(jails)
    (jails / "vm-3").mkdir()
    with pytest.raises(JailError):
        remove_jail(str(tmp_path / "via" / "vm-3"))  # never through a symlink
    assert (jails / "vm-3").is_dir()
    for bad in ["/", "/vm-1", str(jails / "vm.1"), "relative/vm-1", f"{jails}/../vm-1"]:
        with pytest.raises(JailError):
            remove_jail(bad)


# --------------------------------------------------------------------------- in a jail


class Probe:
    """A jail_probe.py subprocess and its end of the kept socket."""

    def __init__(self, spec: JailSpec, mode: str, *args: str) -> None:
        ours, theirs = socket.socketpair()
        self.channel = ours
        self.channel.settimeout(60)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.isolation.jail_probe", json.dumps(spec.to_dict()),
             str(theirs.fileno()), mode, *args],
            pass_fds=[theirs.fileno()], cwd=REPO, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        theirs.close()
        self._reader = self.channel.makefile("rb")

    def report(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            self.process.wait(timeout=30)
            raise AssertionError(f"no report; exit {self.process.returncode}: "
                                 f"{self.process.stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
        return json.loads(line)  # type: ignore[no-any-return]

    def jailed_pid(self) -> int:
        """The host PID of the jailed process (the reaper's only child)."""
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    status = _status(int(name))
                except FileNotFoundError:
                    continue
                if status.get("PPid") == str(self.process.pid):
                    return int(name)
        raise AssertionError("the reaper has no child")

    def finish(self) -> int:
        """Let the probe exit; its (the reaper's) return code."""
        try:
            self.channel.sendall(b"x")
        except OSError:
            pass  # it is gone already
        try:
            self.process.communicate(timeout=60)
        finally:
            self._reader.close()
            self.channel.close()
        return self.process.returncode


def _listening(path: Path) -> socket.socket:
    if path.exists():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o777)  # the jail's uid may connect (as a back-end would arrange)
    listener.listen(4)
    return listener


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: value.strip() for key, value in
            (line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)}


@pytest.fixture
def jail_root(tmp_path: Path) -> Path:
    require(_jail_problem())
    return tmp_path / "jails" / "vm-test"


def _run_jailed(spec: JailSpec, mode: str, *args: str,
                while_running: Callable[[Probe], None] | None = None
                ) -> tuple[dict[str, Any], int]:
    prepare_jail_dir(spec)
    probe = Probe(spec, mode, *args)
    try:
        report = probe.report()
        if while_running is not None:
            while_running(probe)
    finally:
        code = probe.finish()
    remove_jail(spec.root)
    assert not os.path.exists(spec.root)
    return report, code


def test_a_jailed_process_sees_only_its_jail(tmp_path: Path, jail_root: Path) -> None:
    require(kvm_problem())
    secret = tmp_path / "secret"
    secret.write_text("the host's\n")
    secret.chmod(0o666)
    read_only = tmp_path / "shared" / "ro.txt"
    read_only.parent.mkdir()
    read_only.write_text("read me\n")
    read_only.chmod(0o666)  # writable for anyone: only the read-only mount stops it
    writable = tmp_path / "out"
    writable.mkdir()
    writable.chmod(0o777)
    backends = tmp_path / "backends"  # a vhost-user back-end's socket directory
    backends.mkdir()
    backend = backends / "blk0.sock"
    spec = _spec(jail_root, (*runtime_binds(), Bind(str(read_only)),
                             Bind(str(writable), writable=True), Bind(str(backends))))
    seen: dict[str, Any] = {}

    def from_the_host(probe: Probe) -> None:
        pid = probe.jailed_pid()
        status = _status(pid)
        seen.update(pid=pid, nspid=status["NSpid"].split(), uid=status["Uid"].split(),
                    root=sorted(os.listdir(f"/proc/{pid}/root")))
        # The back-end restarts: a new socket inode under the same name, reached through
        # the directory's bind.
        listener.close()
        with _listening(backend) as again:
            probe.channel.sendall(b"c")
            seen["reconnect"] = probe.report()["connect"]
            connection, _ = again.accept()
            with connection:
                assert connection.recv(1) == b""  # the jail connected and hung up

    os.environ["AVMM_JAIL_TEST_SECRET"] = "not for the jail"
    listener = _listening(backend)
    try:
        report, code = _run_jailed(spec, "inspect", str(secret), str(read_only),
                                   str(writable), str(backend), while_running=from_the_host)
    finally:
        del os.environ["AVMM_JAIL_TEST_SECRET"]
        listener.close()
    assert code == 0
    assert report["pid"] == 1 and report["proc_pids"] == [1]
    assert seen["nspid"] == [str(seen["pid"]), "1"] and seen["pid"] != 1
    assert seen["uid"] == [str(JAIL_UID)] * 4
    assert report["resuid"] == [JAIL_UID] * 3 and report["resgid"] == [JAIL_GID] * 3
    assert report["groups"] == []
    assert report["no_new_privs"] == "1" and report["cap_eff"] == "0000000000000000"
    assert report["dumpable"] == 0
    tops = {path.split("/")[1] for path in
            [bind.path for bind in spec.binds] + [str(tmp_path)]}
    assert report["root_entries"] == sorted(tops | {"dev", "proc", "tmp"})
    assert seen["root"] == report["root_entries"]  # /proc/PID/root from the host
    assert report["dev_entries"] == ["kvm", "null"]
    assert report["secret"] == "ENOENT"
    assert report["ro_text"] == "read me\n" and report["ro_write"] == "EROFS"
    assert report["rw_write"] == "ok"
    assert (writable / "out.txt").read_text() == "written in the jail\n"
    assert (writable / "out.txt").stat().st_uid == JAIL_UID
    assert report["root_write"] == "EROFS" and report["tmp_write"] == "ok"
    assert report["kvm_api"] == 12
    # connect(2) through a read-only bind of the socket's directory, after a restart too
    assert report["connect"] == "ok" and seen["reconnect"] == "ok"
    assert report["fds"] == [0, 1, 2, report["kept"]]
    assert report["environ"] == {}
    assert report["cwd"] == "/"


def test_a_bind_is_what_the_daemon_opened_even_if_the_path_was_swapped_since(
    tmp_path: Path, jail_root: Path,
) -> None:
    """A client that can write where the disk is swaps it for a symlink to a host file
    after the daemon's check: the jail still binds the disk the daemon opened."""
    disk = tmp_path / "disk.img"
    disk.write_text("the VM's disk")
    secret = tmp_path / "host-secret"
    secret.write_text("not the VM's")
    spec = _spec(jail_root, (*runtime_binds(), Bind(str(disk))))
    report, _code = _run_jailed(spec, "swapped", str(disk), str(secret))
    assert report == {"error": None, "content": "the VM's disk"}, report


def test_the_builder_keeps_only_the_capabilities_it_needs(jail_root: Path) -> None:
    """Between enter_jail and drop_privileges (the VM's build, as root): no mount, no
    device nodes, but /dev/kvm (owned by the jail's uid) still opens."""
    require(kvm_problem())
    spec = _spec(jail_root, runtime_binds(), devices=("/dev/kvm",))
    report, code = _run_jailed(spec, "narrow")
    assert code == 0
    kept = sum(1 << cap for cap in BUILD_CAPABILITIES)
    assert int(report["CapEff"], 16) == kept and int(report["CapBnd"], 16) == kept, report
    # CAP_DAC_OVERRIDE, CAP_SETGID, CAP_SETUID; not CAP_NET_ADMIN (12): the daemon opens
    # the taps.
    assert kept == (1 << 1) | (1 << 6) | (1 << 7), report
    assert int(report["CapInh"], 16) == 0
    assert report["mount"] == "EPERM" and report["mknod"] == "EPERM", report
    assert report["kvm"] == "ok", report


def test_the_reaper_exits_with_the_jailed_process_code(jail_root: Path) -> None:
    spec = _spec(jail_root, runtime_binds(), devices=())
    report, code = _run_jailed(spec, "exit", "3")
    assert (report, code) == ({}, 3)


def test_the_reaper_dies_of_the_signal_that_killed_the_jailed_process(jail_root: Path) -> None:
    spec = _spec(jail_root, runtime_binds(), devices=())
    _, code = _run_jailed(spec, "wait",
                               while_running=lambda probe: os.kill(probe.jailed_pid(),
                                                                   signal.SIGKILL))
    assert code == -signal.SIGKILL


def test_the_reaper_dies_of_sigsys_when_a_seccomp_filter_kills(jail_root: Path) -> None:
    spec = _spec(jail_root, runtime_binds(), devices=())
    _, code = _run_jailed(spec, "sigsys")
    assert code == -signal.SIGSYS


def test_killing_the_reaper_kills_the_jailed_process(jail_root: Path) -> None:
    spec = _spec(jail_root, runtime_binds(), devices=())
    jailed: list[int] = []

    def kill_the_reaper(probe: Probe) -> None:
        jailed.append(probe.jailed_pid())
        probe.process.kill()
        probe.process.wait(timeout=30)
        # The jailed process dies of PDEATHSIG; its socket end closes with it.
        probe.channel.settimeout(30)
        assert probe.channel.recv(1) == b""

    _, code = _run_jailed(spec, "wait", while_running=kill_the_reaper)
    assert code == -signal.SIGKILL
    # A dying process closes its files before it becomes a zombie: its socket end may
    # close while /proc still shows it running for a moment. Dead within 10 s, not
    # at once (a process that outlived its reaper would stay "S" or "R").
    deadline = time.monotonic() + 10
    while True:
        try:
            state = _status(jailed[0])["State"]
        except FileNotFoundError:
            state = "gone"
        if state == "gone" or state.startswith(("Z", "X")) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert state == "gone" or state.startswith(("Z", "X")), state  # dead, maybe not reaped


def test_enter_jail_refuses_a_process_with_threads(tmp_path: Path) -> None:
    code = (
        "import threading, sys\n"
        "from avmm.isolation.jail import JailError, JailSpec, enter_jail\n"
        "event = threading.Event()\n"
        "threading.Thread(target=event.wait).start()\n"
        f"spec = JailSpec(root={str(tmp_path / 'vm-1')!r}, uid=5000, gid=5000, binds=(),"
        " devices=())\n"
        "try:\n"
        "    enter_jail(spec)\n"
        "except JailError as e:\n"
        "    print(e)\n"
        "finally:\n"
        "    event.set()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "single-threaded process (2 threads run)" in result.stdout


def test_a_jailed_process_enters_the_network_namespace(tmp_path: Path,
                                                        jail_root: Path) -> None:
    """A spec's netns is entered (plan_jail names none any more: the daemon opens a VM's
    taps, so a worker's jail has no /dev/net/tun and it stays in the daemon's namespace;
    the mechanism stays, tested with a spec that names one)."""
    require(net_problem())
    name = f"avmm-jail-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        config = _config(boot=BootConfig(kernel=Path(sys.executable)),
                         nets=(NetConfig(tap="avmmjail0", netns=name),))
        planned = plan_jail(config, "vm-test", jail_root=str(jail_root.parent),
                            uid=JAIL_UID, gid=JAIL_GID)
        assert planned.netns is None
        planned = dataclasses.replace(planned, netns=f"/run/netns/{name}",
                                      own_network=False)
        namespace = os.stat(f"/run/netns/{name}").st_ino
        code = (
            "import os, sys\n"
            "from avmm.isolation.jail import JailSpec, enter_jail\n"
            "import json\n"
            "enter_jail(JailSpec.from_dict(json.loads(sys.argv[1])))\n"
            "print(os.stat('/proc/self/ns/net').st_ino, os.path.exists('/dev/net'),"
            " os.path.exists(sys.argv[2]))\n"
        )
        prepare_jail_dir(planned)
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps(planned.to_dict()), planned.netns or ""],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        remove_jail(planned.root)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)
    assert result.returncode == 0, result.stderr
    words = result.stdout.splitlines()[-1].split(maxsplit=2)
    assert words == [str(namespace), "False", "False"]


@pytest.mark.kvm
@pytest.mark.guest
def test_a_vm_runs_in_the_jail_after_privileges_are_dropped(jail_root: Path) -> None:
    """Jail, drop to an unprivileged uid, load the seccomp filter in kill mode, then boot
    the test guest: every module avmm imports late and every library it loads must be
    inside the runtime binds."""
    require(kvm_problem())
    require(guest_problem())
    spec = plan_jail(guest_config("avmm.test=hello"), jail_root.name,
                     jail_root=str(jail_root.parent), uid=JAIL_UID, gid=JAIL_GID)
    report, code = _run_jailed(spec, "vm")
    assert "avmm-testguest: hello\n" in report["serial"], report
    assert report["reason"] == "RESET"
    assert code == 0

