"""``avmm serve --isolation process``: each VM in a jailed worker process, driven
through the same API as in ``none`` mode; a worker's death is its VM's crash only."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm import StopReason
from avmm.api import ApiClient
from avmm.api.client import ApiError
from avmm.errors import VmStateError
from avmm.lifecycle import VmState
from tests.api.test_daemon import Daemon, avmm, running_daemon
from tests.prerequisites import require
from tests.vm.helpers import TEST_GUEST

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

UIDS = (64100, 64199)


def _need_root() -> None:
    if os.geteuid() != 0:
        require("process isolation needs root (namespaces, mounts, a jail uid)")


@asynccontextmanager
async def process_daemon(*serve_args: str) -> AsyncIterator[tuple[Daemon, ApiClient, Path]]:
    """A daemon in process mode (``serve_args``: more of its flags); its jail root's
    parent is a scratch directory of the test's."""
    _need_root()
    with tempfile.TemporaryDirectory(prefix="avmm-pm-", dir="/tmp") as name:
        socket_dir = Path(name)
        jail_root = socket_dir / "jail"
        async with running_daemon(socket_dir, isolation="process", serve_args=[
                "--jail-root", str(jail_root),
                "--jail-uid-range", f"{UIDS[0]}-{UIDS[1]}", *serve_args]) as daemon, \
                ApiClient(daemon.socket) as api:
            yield daemon, api, jail_root


def _config(scenario: str) -> dict[str, Any]:
    return {"machine": {"memory_mib": 32, "acpi": False},
            "boot": {"kernel": str(TEST_GUEST), "cmdline": f"avmm.test={scenario}"}}


def _status(pid: int, task: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status"
    lines = Path(path).read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


#: What a worker of a VM with no devices holds open: stdin/stdout on /dev/null, stderr
#: the daemon's pipe, the channel and trio's wake-up sockets, epoll, /dev/kvm, the VM and
#: vCPU fds, guest RAM's memfd, eventfds. No regular file of the host, no directory.
WORKER_FDS = re.compile(r"/dev/null|/dev/kvm|pipe:\[\d+\]|socket:\[\d+\]"
                        r"|anon_inode:(\[eventpoll\]|\[eventfd\]|kvm-vm|kvm-vcpu:\d+)"
                        r"|/memfd:avmm-.* \(deleted\)")


def _check_worker_fds(pid: int) -> None:
    links = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert all(WORKER_FDS.fullmatch(link) for link in links.values()), links


async def _until_stopped(api: ApiClient, vm_id: str) -> dict[str, Any]:
    with trio.fail_after(60):
        while (vm := await api.get_vm(vm_id))["state"] != "stopped":
            await trio.sleep(0.05)
    return vm


async def _echo(api: ApiClient, vm_id: str, text: str) -> bytes:
    """Type ``text`` into the echo guest and read until it has echoed it."""
    output = bytearray()
    async with api.console(vm_id) as chunks:
        await api.send_console(vm_id, f"{text}\n".encode())
        with trio.fail_after(30):
            async for chunk in chunks:
                output += chunk
                if f"echo {text}".encode() in output:
                    break
    return bytes(output)


async def _echo_here(vm: Any, text: str) -> None:
    """Type ``text`` into a VM of a Host in this process (the echo guest) and wait for
    its echo."""
    async with vm.subscribe_console() as output:
        await vm.send_console(f"{text}\n".encode())
        seen = b""
        with trio.fail_after(30):
            async for chunk in output:
                seen += chunk
                if f"echo {text}".encode() in seen:
                    return


async def test_a_vm_in_a_worker_is_jailed_filtered_and_driven_as_in_none_mode() -> None:
    async with process_daemon() as (daemon, api, jail_root):
        secret = jail_root.parent / "secret.txt"
        secret.write_text("not for the guest")
        vm = await api.create_vm(_config("echo"))
        vm_id, pid = vm["id"], vm["pid"]
        assert vm["isolation"] == "process"
        assert isinstance(pid, int) and pid != daemon.process.pid
        assert (await api.get_vm(vm_id))["pid"] == pid

        # Unprivileged, no new privileges, every thread under a seccomp filter.
        status = _status(pid)
        uids = {int(value) for value in status["Uid"].split()}
        gids = {int(value) for value in status["Gid"].split()}
        assert len(uids) == 1 and UIDS[0] <= uids.pop() <= UIDS[1], status["Uid"]
        assert len(gids) == 1 and UIDS[0] <= gids.pop() <= UIDS[1], status["Gid"]
        assert status["NoNewPrivs"] == "1"
        tasks = [int(task) for task in os.listdir(f"/proc/{pid}/task")]
        assert len(tasks) >= 2  # the event loop and the vCPU at least
        # vcpu_threads are host thread ids (the worker's own namespace numbers them
        # from 1), named as avmm names its vCPU threads.
        vcpu_threads = (await api.get_vm(vm_id))["vcpu_threads"]
        assert len(vcpu_threads) == 1 and vcpu_threads[0] in tasks, (vcpu_threads, tasks)
        assert Path(f"/proc/{pid}/task/{vcpu_threads[0]}/comm").read_text().startswith(
            "avmm-vcpu")
        for task in tasks:
            assert _status(pid, task)["Seccomp"] == "2", task
        # Its root is the jail: what the VM needs is there, the rest of the host is not.
        root = Path(f"/proc/{pid}/root")
        assert (root / TEST_GUEST.relative_to("/")).is_file()
        assert (root / "dev/kvm").exists()
        assert not (root / secret.relative_to("/")).exists()
        top = set(os.listdir(root))
        assert {"dev", "proc"} <= top and not top & {"boot", "home", "var", "opt"}, top
        assert (jail_root / vm_id).is_dir()
        # Its fds are only what a VM with no devices needs (see WORKER_FDS).
        _check_worker_fds(pid)
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"

        # The same API as in none mode.
        assert (await api.pause(vm_id))["state"] == "paused"
        # A snapshot: the worker is handed the two files and closes them once written
        # (no regular file, no directory of the host stays open in it).
        taken = await api.snapshot(vm_id, jail_root.parent / "snap")
        assert taken["path"] == str(jail_root.parent / "snap"), taken
        _check_worker_fds(pid)
        assert (await api.resume(vm_id))["state"] == "running"
        output = await _echo(api, vm_id, "through the worker")
        assert b"avmm-testguest: echo through the worker" in output
        metrics = await api.metrics()
        assert f'avmm_vm_state{{vm="{vm_id}",state="running"}} 1' in metrics
        listed = {entry["id"]: entry for entry in await api.list_vms()}
        assert listed[vm_id]["pid"] == pid and listed[vm_id]["isolation"] == "process"

        await api.send_console(vm_id, b"quit\n")
        vm = await _until_stopped(api, vm_id)
        assert vm["exit"]["reason"] == "reset", vm["exit"]
        assert not (jail_root / vm_id).exists()  # the jail went with the worker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        log = daemon.stderr.read_text()
        assert "SIGSYS" not in log and "Traceback" not in log, log
        # The worker's log lines reach the daemon's stderr marked as the worker's only
        # (its stderr is a pipe the daemon reads; its stdout is /dev/null).
        worker_lines = [line for line in log.splitlines() if vm_id in line
                        and "vm started" in line]
        assert worker_lines and all(line.startswith(f"[worker {vm_id}] ")
                                    for line in worker_lines), worker_lines


async def test_a_killed_worker_is_its_vms_crash_and_the_neighbour_runs_on() -> None:
    async with process_daemon() as (_daemon, api, jail_root):
        victim = await api.create_vm(_config("echo"))
        neighbour = await api.create_vm(_config("echo"))
        os.kill(victim["pid"], signal.SIGKILL)
        vm = await _until_stopped(api, victim["id"])
        assert vm["exit"]["reason"] == "crash", vm["exit"]
        assert "SIGKILL" in vm["exit"]["detail"], vm["exit"]
        assert not (jail_root / victim["id"]).exists()
        # The daemon and the other VM go on.
        output = await _echo(api, neighbour["id"], "still here")
        assert b"echo still here" in output
        assert (await api.get_vm(neighbour["id"]))["state"] == "running"
        await api.delete_vm(neighbour["id"])
        assert not (jail_root / neighbour["id"]).exists()


async def test_what_process_mode_cannot_do_yet_is_refused_with_the_way_out() -> None:
    async with process_daemon() as (_daemon, api, jail_root):
        vm = await api.create_vm(_config("echo"))
        # (An incoming VM given no config is no longer refused: see
        # test_process_receive.py.) A build failure in the worker comes back as the
        # API's usual answer.
        not_a_kernel = jail_root.parent / "kernel.bin"
        not_a_kernel.write_bytes(b"\x7fELF but not really" * 100)
        bad = _config("echo")
        bad["boot"]["kernel"] = str(not_a_kernel)
        with pytest.raises(ApiError) as failed:
            await api.create_vm(bad)
        assert failed.value.status == 422, failed.value
        assert "kernel" in str(failed.value), failed.value
        assert [entry["id"] for entry in await api.list_vms()] == [vm["id"]]


async def test_a_workers_serial_file_and_console_socket_are_opened_by_the_daemon() -> None:
    """The daemon opens the serial log and binds the console socket (none mode's checks)
    and hands their fds over: the worker writes and serves them, its jail holds nothing
    of their directory, and the socket's file goes when the VM is deleted."""
    async with process_daemon() as (_daemon, api, jail_root):
        scratch = jail_root.parent
        log, sock = scratch / "serial.log", scratch / "console.sock"
        config = {**_config("console"), "serial": {"mode": "file", "path": str(log)},
                  "console": {"mode": "socket", "path": str(sock)}}
        vm = await api.create_vm(config)
        vm_id, pid = vm["id"], vm["pid"]
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        # The directory is an empty stand-in in the jail (the config names it).
        assert list((Path(f"/proc/{pid}/root") / scratch.relative_to("/")).iterdir()) == []
        # Its fds: a VM's (see WORKER_FDS; the console's listening socket is a socket) and
        # the serial log; no directory.
        extra = [fd for fd in os.listdir(f"/proc/{pid}/fd")
                 if not WORKER_FDS.fullmatch(os.readlink(f"/proc/{pid}/fd/{fd}"))]
        assert [os.stat(f"/proc/{pid}/fd/{fd}")[1:3] for fd in extra] \
            == [log.stat()[1:3]], [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in extra]

        client = await trio.open_unix_socket(str(sock))
        seen = b""
        with trio.fail_after(60):
            async with client:
                for expected, typed in ((b"console hello\n", b"through the socket\n"),
                                        (b"console echo through the socket\n", b"quit\n"),
                                        (b"console bye\n", None)):
                    while expected not in seen:
                        chunk = await client.receive_some()
                        assert chunk, seen
                        seen += chunk
                    if typed is not None:
                        await client.send_all(typed)
        vm = await _until_stopped(api, vm_id)
        assert vm["exit"]["reason"] == "reset", vm["exit"]
        text = log.read_text()
        assert "avmm-testguest: console0 ready" in text, text
        assert "avmm-testguest: console0 echoed=1" in text, text
        await api.delete_vm(vm_id)
        assert not sock.exists()
        assert not (jail_root / vm_id).exists()


async def test_a_workers_bad_output_paths_are_400_naming_the_key() -> None:
    async with process_daemon() as (_daemon, api, jail_root):
        scratch = jail_root.parent
        fifo = scratch / "fifo"
        os.mkfifo(fifo)
        precious = scratch / "precious"
        precious.write_text("keep me\n")
        for key, section in (
                ("serial.path", {"serial": {"mode": "file", "path": str(fifo)}}),
                ("console.path", {"console": {"mode": "file", "path": str(fifo)}}),
                ("console.path", {"console": {"mode": "socket", "path": str(precious)}}),
                ("console.path", {"console": {"mode": "socket",
                                              "path": str(scratch / ("s" * 110))}})):
            with trio.fail_after(30), pytest.raises(ApiError) as refused:
                await api.create_vm({**_config("echo"), **section})
            assert (refused.value.status, refused.value.detail["key"]) == (400, key), \
                refused.value
        assert precious.read_text() == "keep me\n"
        assert await api.list_vms() == []


async def test_jail_flags_without_process_isolation_are_refused(tmp_path: Path) -> None:
    result = await avmm("serve", "--isolation", "none", "--jail-uid", "5",
                        socket=tmp_path / "avmm.sock")
    assert result.returncode != 0
    assert b"--jail-uid applies to --isolation process only" in result.stderr


async def test_a_worker_its_filter_kills_is_its_vms_crash_and_the_neighbour_runs_on(
    tmp_path: Path,
) -> None:
    """A real seccomp kill: the test worker program execve()s on request, which the
    worker's filter (kill mode) answers with SIGSYS for the whole worker."""
    from avmm.host import Host
    from avmm.isolation.jail import UidAllocator
    from avmm.isolation.seccomp import SeccompMode
    from avmm.isolation.worker_vm import ProcessIsolation
    from tests.vm.helpers import guest_config

    _need_root()
    isolation = ProcessIsolation(jail_root=str(tmp_path / "jail"), uids=UidAllocator(UIDS),
                                 seccomp=SeccompMode.KILL,
                                 worker_module="tests.isolation.trip_worker",
                                 module_path=str(Path(__file__).resolve().parents[2]))
    async with Host(isolation=isolation) as host:
        victim = await host.create(guest_config("avmm.test=echo"))
        neighbour = await host.create(guest_config("avmm.test=echo"))
        with pytest.raises(VmStateError):
            await victim._call("trip")  # no answer: the worker is dead
        result = await victim.wait()
        assert result.reason is StopReason.CRASH, result
        assert "killed by SIGSYS" in result.detail, result
        assert not (tmp_path / "jail" / victim.id).exists()
        await _echo_here(neighbour, "after the trip")
        assert neighbour.state is VmState.RUNNING
        await neighbour.stop()


async def _run_to_end(api: ApiClient, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    vm = await api.create_vm(config)
    output = bytearray()
    async with api.console(vm["id"]) as chunks:
        with trio.fail_after(60):
            async for chunk in chunks:
                output += chunk
    return await _until_stopped(api, vm["id"]), output.decode(errors="replace")


async def test_device_workloads_run_in_jailed_workers_with_filters_in_kill_mode(
    tmp_path: Path,
) -> None:
    """A disk, a vhost-user disk (avmm's back-end, jailed too) and a tap NIC in a
    network namespace, each through the daemon in process mode: the guest's checks pass
    and no worker is killed by its filter."""
    from tests.prerequisites import net_problem
    from tests.vhost.test_frontend import avmm_backend
    from tests.virtio_guest_support import echoing_tap, expected_pattern

    sectors = 2048
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(sectors * 512))
    vu_disk = tmp_path / "vu-disk.img"
    vu_disk.write_bytes(bytes(sectors * 512))
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    sock = sockets / "blk.sock"
    async with process_daemon() as (daemon, api, _jail_root):
        config = _config("blk-write avmm.seed=3")
        config["disk"] = [{"path": str(disk)}]
        vm, output = await _run_to_end(api, config)
        assert f"blk0 written={sectors} verify=ok" in output, (output, vm["exit"])
        assert disk.read_bytes() == expected_pattern(3, sectors)

        with avmm_backend("blk", sock, "--image", str(vu_disk), "--jail-root",
                          str(tmp_path / "backend-jail"), "--uid", "64460", "--gid", "64460"):
            config = _config("blk-write avmm.seed=4")
            config["disk"] = [{"vhost_user": str(sock)}]
            vm, output = await _run_to_end(api, config)
        assert f"blk0 written={sectors} verify=ok" in output, (output, vm["exit"])
        assert vu_disk.read_bytes() == expected_pattern(4, sectors)

        require(net_problem())
        with echoing_tap() as (namespace, _echoer):
            config = _config("net-echo avmm.n=20")
            config["net"] = [{"tap": namespace.tap, "mac": "52:54:00:ab:cd:ef",
                              "netns": namespace.netns}]
            vm, output = await _run_to_end(api, config)
        assert "net0 echoed=20" in output, (output, vm["exit"])
        log = daemon.stderr.read_text()
        assert "SIGSYS" not in log and "crashed" not in log, log[-3000:]


async def test_cpu_controls_of_a_vm_in_a_worker_are_applied_by_the_daemon() -> None:
    """The worker's jail holds no cgroup tree: the daemon makes the VM's cgroup, puts
    the whole worker in it, pins its vCPU thread, changes it on PATCH and removes it."""
    from tests.cgroups.conftest import cgroup_cpu_problem

    require(cgroup_cpu_problem())
    async with process_daemon() as (_daemon, api, _jail_root):
        config = _config("count avmm.n=100000000000000")
        config["machine"].update(cpu_weight=300, cpu_max_percent=50, cpu_affinity="0")
        vm = await api.create_vm(config)
        vm = await api.get_vm(vm["id"])
        cpu = vm["cpu"]
        assert cpu["weight"] == 300 and cpu["max_percent"] == 50, cpu
        assert vm["config"]["machine"]["cpu_weight"] == 300
        cgroup = Path(cpu["cgroup"])
        members = {int(tid) for tid in (cgroup / "tasks").read_text().split()}
        worker_threads = {int(tid) for tid in os.listdir(f"/proc/{vm['pid']}/task")}
        assert worker_threads <= members, (worker_threads, members)
        vcpu, = vm["vcpu_threads"]
        assert os.sched_getaffinity(vcpu) == {0}
        updated = await api.update_limits(vm["id"], {"machine": {"cpu_weight": 200}})
        assert updated["cpu"]["weight"] == 200
        assert (cgroup / "cpu.shares").read_text().strip() == str(updated["cpu"]["cpu_shares"])
        with trio.fail_after(10):
            while (await api.get_vm(vm["id"]))["cpu"].get("cpu_seconds", 0) <= 0:
                await trio.sleep(0.1)
        await api.delete_vm(vm["id"])
        assert not cgroup.exists()


async def test_a_snapshot_restores_into_a_worker_that_keeps_no_host_directory(
    tmp_path: Path,
) -> None:
    """A snapshot written by a dense VM restores into a jailed worker: the daemon opens
    and checks it and hands the directory's fd over, and the worker closes it before
    its guest runs. (Snapshots taken in process mode: test_process_snapshot.py.)"""
    from avmm import VirtualMachine
    from tests.vm.helpers import guest_config

    target = tmp_path / "snap"
    async with VirtualMachine(guest_config("avmm.test=echo", memory_mib=32)) as dense:
        output = bytearray()
        await dense.serial.send_all(b"before\n")
        with trio.fail_after(30):
            async for chunk in dense.serial:
                output += chunk
                if b"echo before" in output:
                    break
        await dense.pause()
        await dense.snapshot(target)
        dense.stop()
    async with process_daemon() as (daemon, api, _jail_root):
        restored = await api.restore_vm(target)
        assert restored["isolation"] == "process" and restored["state"] == "running"
        pid = restored["pid"]
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not [link for link in links if link.startswith(str(tmp_path))], links
        assert b"echo in its worker" in await _echo(api, restored["id"], "in its worker")
        assert "SIGSYS" not in daemon.stderr.read_text()


async def test_the_workers_die_with_their_daemon() -> None:
    """SIGKILL of the daemon: its spawner sees the socket close and exits, each reaper
    dies of its parent-death signal, each jailed worker of its own; no guest outlives
    the daemon that was to manage it."""
    async with process_daemon() as (daemon, api, _jail_root):
        vms = [await api.create_vm(_config("echo")) for _ in range(2)]
        pids = [vm["pid"] for vm in vms]
        daemon.process.kill()
        await daemon.process.wait()
        with trio.fail_after(20):
            while any(_alive(pid) for pid in pids):
                await trio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_a_vm_in_a_worker_migrates_out_over_the_daemons_connection(
    tmp_path: Path,
) -> None:
    """The worker makes no IP sockets and its jail holds no destination socket: the
    daemon connects and hands the connection over; the guest goes on at the destination
    (here a dense Host in this process) and its worker ends with reason migrated."""
    from avmm.host import Host

    listen = f"unix:{tmp_path / 'mig.sock'}"
    async with process_daemon() as (_daemon, api, _jail_root), Host() as destination:
        incoming = await destination.receive(listen)
        vm = await api.create_vm(_config("echo"))
        assert b"echo before" in await _echo(api, vm["id"], "before")
        started = await api.migrate(vm["id"], listen)
        assert started["migration"] is not None, started
        source = await _until_stopped(api, vm["id"])
        assert source["exit"]["reason"] == "migrated", source
        assert source["migration"]["state"] == "completed", source["migration"]
        with trio.fail_after(30):
            await incoming.vm.wait_state(VmState.RUNNING)
        await _echo_here(incoming, "after the move")
        await incoming.stop()


async def test_a_vm_migrates_into_a_jailed_worker(tmp_path: Path) -> None:
    """The daemon listens and hands the listening socket to the worker; the worker
    builds the machine from the stream's config, drops its privileges before the first
    page, and the guest goes on in the jail."""
    from avmm.host import Host

    listen = f"unix:{tmp_path / 'in.sock'}"
    async with process_daemon() as (daemon, api, jail_root), Host() as source_host:
        incoming = await api.receive_vm(listen, config=_config("echo"))
        assert incoming["state"] == "incoming" and incoming["isolation"] == "process"
        source = await source_host.create(guest_config_echo())
        await source.migrate(listen)
        assert (await source.wait()).reason is StopReason.MIGRATED
        with trio.fail_after(30):
            while (await api.get_vm(incoming["id"]))["state"] != "running":
                await trio.sleep(0.05)
        vm = await api.get_vm(incoming["id"])
        assert vm["migration"]["state"] == "completed", vm["migration"]
        status = _status(vm["pid"])
        assert status["NoNewPrivs"] == "1" and status["Uid"].split()[0] != "0"
        assert b"echo landed in a jail" in await _echo(api, incoming["id"],
                                                       "landed in a jail")
        assert not (tmp_path / "in.sock").exists()  # accepted: the listener is gone
        await api.delete_vm(incoming["id"])
        assert not (jail_root / incoming["id"]).exists()
        assert "SIGSYS" not in daemon.stderr.read_text()


def guest_config_echo() -> Any:
    from tests.vm.helpers import guest_config

    return guest_config("avmm.test=echo", memory_mib=32)


def _links(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass  # closed meanwhile
    return links


async def test_a_workers_taps_are_opened_by_the_daemon() -> None:
    """The daemon opens each tap in its NIC's network namespace (two namespaces here,
    and one tap the open creates) and hands the fds over: the worker holds the taps,
    its jail has no /dev/net/tun, CAP_NET_ADMIN is not even in its bounding set, and it
    stays in the daemon's network namespace; the daemon keeps no copy, and a tap the
    daemon created goes with the worker."""
    from tests.prerequisites import net_problem
    from tests.virtio_guest_support import TapNamespace

    require(net_problem())
    with TapNamespace("avmmpm0") as blue, TapNamespace("avmmpm1") as red:
        async with process_daemon() as (daemon, api, _jail_root):
            config = _config("echo")
            config["net"] = [{"tap": blue.tap, "netns": blue.netns},
                             {"tap": "avmmpmnew", "netns": red.netns}]
            vm = await api.create_vm(config)
            vm_id, pid = vm["id"], vm["pid"]
            # Its fds: a VM's (see WORKER_FDS) and the two taps.
            extra = [link for link in _links(pid) if not WORKER_FDS.fullmatch(link)]
            assert extra == ["/dev/net/tun", "/dev/net/tun"], extra
            assert not (Path(f"/proc/{pid}/root") / "dev/net").exists()
            assert not (Path(f"/proc/{pid}/root") / "run/netns").exists()
            status = _status(pid)
            assert int(status["CapEff"], 16) == 0, status["CapEff"]
            assert not int(status["CapBnd"], 16) & (1 << 12), status["CapBnd"]  # NET_ADMIN
            # A network namespace of its own, with nothing in it: not the daemon's, not
            # its taps' (their fds work from anywhere).
            own = os.stat(f"/proc/{pid}/ns/net").st_ino
            assert own not in {os.stat(f"/proc/{daemon.process.pid}/ns/net").st_ino,
                               os.stat(f"/run/netns/{blue.netns}").st_ino,
                               os.stat(f"/run/netns/{red.netns}").st_ino}
            links = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link"],
                                   check=True, capture_output=True, text=True).stdout
            assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
            assert "/dev/net/tun" not in _links(daemon.process.pid)
            assert "avmmpmnew" in _ip_links(red.netns)
            assert b"echo with two taps" in await _echo(api, vm_id, "with two taps")
            await api.delete_vm(vm_id)
            assert "avmmpmnew" not in _ip_links(red.netns)
            assert blue.tap in _ip_links(blue.netns)
            assert "SIGSYS" not in daemon.stderr.read_text()


def _ip_links(netns: str) -> str:
    return subprocess.run(["ip", "-n", netns, "-o", "link"], check=True,
                          capture_output=True, text=True, timeout=30).stdout


async def test_a_workers_bad_tap_fails_as_in_none_mode_and_the_daemon_keeps_no_fd(
    tmp_path: Path,
) -> None:
    """Not a tap, a busy tap, a namespace that does not exist (next to a good tap in
    another namespace): the answer of a daemon in none mode, word for word (422 naming
    the build step, or 400 naming the key); the daemon in process mode holds no more
    fds than before, and starts no worker."""
    from avmm.netns import call_in_netns
    from avmm.tap import Tap
    from tests.prerequisites import net_problem
    from tests.virtio_guest_support import TapNamespace

    require(net_problem())

    def bad_configs(netns: str, other: str) -> list[dict[str, Any]]:
        configs = []
        for net in ({"tap": "lo", "netns": netns}, {"tap": "avmmpmbusy", "netns": netns},
                    {"tap": "avmmpm3", "netns": "avmm-no-such-ns"}):
            config = {**_config("echo"), "name": "badtap",
                      "serial": {"mode": "file", "path": str(tmp_path / "serial.log")}}
            config["net"] = [{"tap": "avmmpmok", "netns": other}, net]
            configs.append(config)
        return configs

    async def answers(api: ApiClient) -> list[tuple[int, Any, str]]:
        seen = []
        for config in bad_configs(blue.netns, red.netns):
            with trio.fail_after(30), pytest.raises(ApiError) as failed:
                await api.create_vm(config)
            seen.append((failed.value.status, failed.value.detail, str(failed.value)))
        return seen

    with TapNamespace("avmmpm2") as blue, TapNamespace("avmmpm4") as red:
        busy = call_in_netns(blue.netns, lambda: Tap.open("avmmpmbusy"))
        try:
            (tmp_path / "none").mkdir()
            async with running_daemon(tmp_path / "none", isolation="none") as none_daemon, \
                    ApiClient(none_daemon.socket) as none_api:
                expected = await answers(none_api)
            assert [(status, detail) for status, detail, _ in expected] == [
                (422, {"step": "opening tap 'lo' for net1"}),
                (422, {"step": "opening tap 'avmmpmbusy' for net1"}),
                (400, {"key": "net[1].netns", "reason": expected[2][1]["reason"]})], expected
            async with process_daemon() as (daemon, api, jail_root):
                await answers(api)  # anything the daemon opens once, on first use
                before = _links(daemon.process.pid)
                assert await answers(api) == expected
                assert sorted(_links(daemon.process.pid)) == sorted(before)
                assert "/dev/net/tun" not in before
                assert await api.list_vms() == []
                assert not jail_root.exists() or list(jail_root.iterdir()) == []
            # The taps the daemons created are gone, the busy one is still this test's.
            assert "avmmpmok" not in _ip_links(red.netns)
        finally:
            busy.close()
