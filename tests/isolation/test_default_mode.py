"""``avmm serve`` without ``--isolation``: process mode for a root daemon, each VM's
worker with a uid of its own from DEFAULT_UID_RANGE; none for anyone else; the daemon
says at start which mode it runs in and why."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm.api import ApiClient
from avmm.api.cli import (
    _isolation_mode,
    _process_isolation,
    add_management_commands,
    default_isolation,
)
from avmm.isolation import jail
from avmm.isolation.jail import (
    DEFAULT_UID_RANGE,
    JailError,
    UidAllocator,
    host_named_ids,
    nss_names_id,
    subordinate_ranges,
)
from avmm.isolation.worker_vm import ProcessIsolation
from tests.api.test_daemon import running_daemon
from tests.prerequisites import require
from tests.vm.helpers import TEST_GUEST

REPO = Path(__file__).resolve().parent.parent.parent
AVMM = [sys.executable, "-c", "import sys; from avmm.cli import main; sys.exit(main())"]
NOBODY = 65534


def _need_root() -> None:
    if os.geteuid() != 0:
        require("process isolation needs root (namespaces, mounts, a jail uid)")


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_management_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def _config() -> dict[str, Any]:
    return {"machine": {"memory_mib": 32, "acpi": False},
            "boot": {"kernel": str(TEST_GUEST), "cmdline": "avmm.test=echo"}}


def _ids(pid: int) -> tuple[int, int]:
    fields = {key: value.split() for key, _, value in
              (line.partition(":") for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines())}
    return int(fields["Uid"][0]), int(fields["Gid"][0])


def _serving_line(log: str) -> str:
    lines = [line for line in log.splitlines() if "serving VMs" in line]
    assert len(lines) == 1, log
    return lines[0]


# -- choosing the default (no KVM needed) ----------------------------------------------------


def test_the_default_is_process_for_root_and_none_for_anyone_else() -> None:
    assert default_isolation(0) == "process"
    for euid in (1, 1000, NOBODY):
        assert default_isolation(euid) == "none"


def test_the_mode_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert _isolation_mode(_serve_args()) == (
        "process", "the default for a daemon running as root; --isolation none for dense "
        "mode")
    assert _isolation_mode(_serve_args("--isolation", "none")) == (
        "none", "asked for with --isolation")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert _isolation_mode(_serve_args()) == (
        "none", "the default for a daemon not running as root")
    assert _isolation_mode(_serve_args("--isolation", "process")) == (
        "process", "asked for with --isolation")


def test_help_states_the_defaults() -> None:
    result = subprocess.run([*AVMM, "serve", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=REPO, check=True)
    text = " ".join(result.stdout.split())
    assert "the default when the daemon runs as root" in text
    assert "how a root daemon gets dense mode" in text
    assert "refuses" not in text  # daemon-wide rate-limit groups work in both modes
    first, last = DEFAULT_UID_RANGE
    assert f"{first}-{last}" in text


def test_the_default_uid_range_is_clear_of_users_subuids_and_signed_trouble() -> None:
    first, last = DEFAULT_UID_RANGE
    # Past useradd's subordinate ids (600100000 + 65536) and systemd-nspawn's container
    # ranges (up to 1879048191); below systemd's foreign range and 2^31.
    assert 1_879_048_191 < first <= last < 2_147_352_576
    assert last - first + 1 == 65536


def test_host_named_ids_reads_passwd_and_group(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    group = tmp_path / "group"
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\n"
                      "vm:x:2000000001:100:a user in our range:/:/bin/false\n"
                      "# a comment\n"
                      "broken line\n"
                      "+nis\n"
                      "odd:x:notanumber:1::/:\n"
                      "super:x:\u00b2:1::/:\n")  # "²".isdigit(), yet no int
    group.write_text("wheel:x:10:\nours:x:2000000003:vm\n")
    assert host_named_ids(str(passwd), str(group)) == {0, 2_000_000_001, 10, 2_000_000_003}
    assert host_named_ids(str(tmp_path / "none"), str(tmp_path / "nothing")) == frozenset()


def test_the_allocator_skips_named_ids() -> None:
    allocator = UidAllocator((100, 104), skip=[101, 103, 7, 200])
    assert allocator.skipped == {101, 103}
    assert [allocator.allocate() for _ in range(3)] == [100, 102, 104]
    with pytest.raises(JailError, match="2 of them named by the host"):
        allocator.allocate()
    allocator.release(102)
    assert allocator.allocate() == 102


def test_the_allocator_asks_nss_for_each_id_it_hands_out() -> None:
    # SSSD/LDAP users are in no file: a lookup (the daemon's is nss_names_id) is asked
    # for each id about to be handed out, and a known one is skipped.
    known = {101, 103}
    asked: list[int] = []

    def lookup(uid: int) -> bool:
        asked.append(uid)
        return uid in known

    allocator = UidAllocator((100, 104), lookup=lookup)
    assert [allocator.allocate() for _ in range(3)] == [100, 102, 104]
    assert asked == [100, 101, 102, 103, 104]
    with pytest.raises(JailError, match="2 known to NSS"):
        allocator.allocate()
    known.clear()  # the directory forgot them: asked again, handed out
    assert allocator.allocate() == 101


def test_a_uid_given_back_during_a_lookup_does_not_wait_for_it() -> None:
    """The daemon's lookup runs on its event loop (through the spawner), where ids are
    given back: the allocator holds no lock while it asks, or a VM that ends during
    another VM's allocation would deadlock the daemon."""
    import threading

    allocator = UidAllocator((100, 103))
    first = allocator.allocate()
    asking, answer = threading.Event(), threading.Event()

    def lookup(uid: int) -> bool:
        asking.set()
        assert answer.wait(10)
        return uid == 101  # someone has 101: skipped, 102 handed out

    handed: list[int] = []
    allocating = threading.Thread(target=lambda: handed.append(allocator.allocate(lookup)))
    allocating.start()
    assert asking.wait(10)
    releasing = threading.Thread(target=allocator.release, args=(first,))
    releasing.start()
    releasing.join(5)
    stuck = releasing.is_alive()
    answer.set()
    allocating.join(10)
    releasing.join(10)
    assert not stuck, "giving an id back waited for another allocation's lookup"
    assert handed == [102]
    assert allocator.allocate() == 103
    assert allocator.allocate() == 100  # given back meanwhile
    assert allocator.allocate() == 101  # asked again (no lookup now): free


def test_nss_names_id_uses_pwd_and_grp(monkeypatch: pytest.MonkeyPatch) -> None:
    assert nss_names_id(0)  # root, in every NSS
    users, groups = {2_000_000_005}, {2_000_000_007}

    def getpwuid(uid: int) -> object:
        if uid not in users:
            raise KeyError(uid)
        return object()

    def getgrgid(gid: int) -> object:
        if gid not in groups:
            raise KeyError(gid)
        return object()

    monkeypatch.setattr(jail.pwd, "getpwuid", getpwuid)
    monkeypatch.setattr(jail.grp, "getgrgid", getgrgid)
    assert nss_names_id(2_000_000_005) and nss_names_id(2_000_000_007)
    assert not nss_names_id(2_000_000_006)


def test_subordinate_ranges_are_skipped(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:2000000010:5\n# a comment\nbroken\nbob:x:3\n"
                      "1000:2000000100:0\n")
    subgid.write_text("alice:2000000013:4\ncarol:100000:65536\n")
    ranges = subordinate_ranges(str(subuid), str(subgid))
    assert ranges == ((100_000, 165_535), (2_000_000_010, 2_000_000_014),
                      (2_000_000_013, 2_000_000_016))
    assert subordinate_ranges(str(tmp_path / "no"), str(tmp_path / "ne")) == ()
    allocator = UidAllocator((2_000_000_009, 2_000_000_018), subordinate=ranges)
    assert [allocator.allocate() for _ in range(3)] == [2_000_000_009, 2_000_000_017,
                                                        2_000_000_018]
    with pytest.raises(JailError, match="delegated in /etc/subuid"):
        allocator.allocate()


async def test_the_spawner_asks_nss_for_the_daemon() -> None:
    # The daemon's seccomp filter would kill it in an NSS module (libnss_systemd calls
    # readlinkat and prctl): its lookups go to the spawner, which has no filter.
    from avmm.isolation.spawner import Spawner

    spawner = Spawner()
    async with trio.open_nursery() as nursery:
        await nursery.start(spawner.run)
        assert await spawner.names_id(0)
        assert not await spawner.names_id(DEFAULT_UID_RANGE[1])
        isolation = ProcessIsolation(uids=UidAllocator((1, 2), lookup=nss_names_id),
                                     spawner=spawner)
        with pytest.raises(JailError, match="2 known to NSS"):
            await isolation.take_ids()  # daemon and bin: both named
        nursery.cancel_scope.cancel()


async def test_ids_are_taken_off_the_event_loop() -> None:
    threads: list[bool] = []

    def lookup(uid: int) -> bool:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            threads.append(True)  # not on trio's thread
        else:
            threads.append(False)
        return False

    isolation = ProcessIsolation(uids=UidAllocator((64900, 64901), lookup=lookup))
    assert await isolation.take_ids() == (64900, 64900)
    assert threads == [True]


def test_the_default_range_skips_nss_ids_and_subordinate_ranges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_root()
    first = DEFAULT_UID_RANGE[0]
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text(f"someone:{first}:3\n")
    subgid.write_text(f"someone:{first + 4}:1\n")
    monkeypatch.setattr(jail, "HOST_SUBUID", str(subuid))
    monkeypatch.setattr(jail, "HOST_SUBGID", str(subgid))
    monkeypatch.setattr(jail, "nss_names_id", lambda uid: uid == first + 3)
    isolation = _process_isolation(_serve_args(), "process")
    assert [isolation.uids.allocate() for _ in range(2)] == [first + 5, first + 6]
    # An explicit range is the admin's choice (maybe delegated to avmm on purpose): only
    # names are skipped there.
    isolation = _process_isolation(_serve_args("--jail-uid-range", f"{first}-{first + 5}"),
                                   "process")
    assert [isolation.uids.allocate() for _ in range(3)] == [first, first + 1, first + 2]
    assert isolation.uids.allocate() == first + 4


def test_process_mode_without_jail_flags_takes_the_default_range() -> None:
    _need_root()
    isolation = _process_isolation(_serve_args(), "process")
    assert isolation.uids.range_text == "2000000000-2000065535"
    assert isolation.uids.skipped == {uid for uid in host_named_ids()
                                      if DEFAULT_UID_RANGE[0] <= uid <= DEFAULT_UID_RANGE[1]}
    # Explicit flags win.
    isolation = _process_isolation(_serve_args("--jail-uid-range", "64100-64199"), "process")
    assert isolation.uids.range_text == "64100-64199"
    isolation = _process_isolation(_serve_args("--jail-uid", "64100", "--jail-gid", "64101"),
                                   "process")
    assert (isolation.uids, isolation.uid, isolation.gid) == (None, 64100, 64101)
    with pytest.raises(JailError, match="--jail-uid and --jail-gid"):
        _process_isolation(_serve_args("--jail-uid", "64100"), "process")
    assert _process_isolation(_serve_args(), "none") is None


# -- a real daemon ---------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_root_daemon_runs_each_vm_in_a_worker_with_a_default_uid() -> None:
    _need_root()
    with tempfile.TemporaryDirectory(prefix="avmm-dm-", dir="/tmp") as name:
        directory = Path(name)
        async with running_daemon(directory, isolation=None,
                                  serve_args=["--jail-root", str(directory / "jail")]) \
                as daemon, ApiClient(daemon.socket) as api:
            vms = [await api.create_vm(_config()) for _ in range(2)]
            uids = []
            for vm in vms:
                shown = await api.get_vm(vm["id"])
                assert shown["isolation"] == "process"
                assert isinstance(shown["pid"], int) and shown["pid"] != daemon.process.pid
                uid, gid = _ids(shown["pid"])
                assert uid == gid and DEFAULT_UID_RANGE[0] <= uid <= DEFAULT_UID_RANGE[1]
                assert uid not in host_named_ids()
                uids.append(uid)
            assert len(set(uids)) == 2
            for vm in vms:
                await api.delete_vm(vm["id"])
        line = _serving_line(daemon.stderr.read_text())
    assert "isolation=process" in line and "the default for a daemon running as root" in line
    assert "2000000000-2000065535" in line


@pytest.mark.kvm
@pytest.mark.guest
async def test_isolation_none_as_root_is_dense_mode() -> None:
    _need_root()
    with tempfile.TemporaryDirectory(prefix="avmm-dm-", dir="/tmp") as name:
        async with running_daemon(Path(name), isolation="none") as daemon, \
                ApiClient(daemon.socket) as api:
            vm = await api.create_vm(_config())
            shown = await api.get_vm(vm["id"])
            assert shown["isolation"] == "none"
            assert shown["pid"] == daemon.process.pid
            await api.delete_vm(vm["id"])
            line = _serving_line(daemon.stderr.read_text())
    assert "isolation=none" in line and "asked for with --isolation" in line


async def test_a_daemon_not_running_as_root_defaults_to_none() -> None:
    """As nobody (a root test run drops every id and group with setpriv; any other
    user runs it as itself): the daemon starts in none mode and says why. No VM is
    made: /dev/kvm is usually root's or the kvm group's only; the mode a VM would get
    is what the other tests check."""
    as_root = os.geteuid() == 0
    user = NOBODY if as_root else os.geteuid()
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] \
        if as_root else []
    with tempfile.TemporaryDirectory(prefix="avmm-dm-", dir="/tmp") as name:
        directory = Path(name)
        if as_root:
            os.chown(directory, NOBODY, NOBODY)
        socket = directory / "avmm.sock"
        log = directory / "serve.log"
        with log.open("wb") as out:
            process = await trio.lowlevel.open_process(
                [*drop, *AVMM, "serve", "--socket", str(socket)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO)
        try:
            with trio.fail_after(60):
                while "serving VMs" not in log.read_text():
                    assert process.poll() is None, log.read_text()
                    await trio.sleep(0.05)
            async with ApiClient(socket) as api:
                assert await api.list_vms() == []
            assert os.stat(socket).st_uid == user
        finally:
            if process.poll() is None:
                process.terminate()
            with trio.fail_after(60):
                assert await process.wait() == 0, log.read_text()
        line = _serving_line(log.read_text())
    assert re.search(r"isolation=none\b", line), line
    assert "the default for a daemon not running as root" in line


@pytest.mark.parametrize("mode", ["none", "process"])
def test_a_dense_daemon_hands_the_gil_over_within_half_a_millisecond(
        mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In dense mode every VM's I/O threads share the daemon's interpreter: ``avmm
    serve`` shortens CPython's GIL switch interval for it; a process-mode daemon, whose
    VMs each have their own interpreter, keeps the default."""
    from avmm.api import cli
    from avmm.threads import DENSE_SWITCH_INTERVAL_S

    if mode == "process":
        _need_root()
    seen: list[tuple[float, object]] = []
    monkeypatch.setattr(cli.trio, "run", lambda _serve, isolation: seen.append(
        (sys.getswitchinterval(), isolation)))
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        assert cli._cmd_serve(_serve_args("--isolation", mode, "--socket",
                                          str(tmp_path / "avmm.sock"),
                                          "--jail-root", str(tmp_path / "jail"))) == 0
    finally:
        sys.setswitchinterval(before)
    [(interval, isolation)] = seen
    if mode == "none":
        assert (interval, isolation) == (DENSE_SWITCH_INTERVAL_S, None)
    else:
        assert interval == 0.005 and isolation is not None
