"""One VM of ``avmm serve --isolation process``, in a process of its own:
``python -m avmm.isolation.worker --channel-fd N``, started by the daemon
(:mod:`avmm.isolation.worker_vm`) with one end of a :mod:`~avmm.isolation.channel`.

The order, Firecracker's jailer's where it applies:

1. Everything the worker will run is imported first (nothing is imported from files
   after the jail, and the seccomp filter is loaded before the guest runs).
2. The daemon's start message: the VM id, its config (the ``vm.toml`` schema as JSON),
   the jail, the seccomp mode, the logging settings.
3. :func:`avmm.isolation.jail.enter_jail`: inherited fds closed, environment cleared,
   new mount, IPC, PID and network namespaces (the worker is PID 1 of its own; a reaper
   parent outside mirrors its exit; its network namespace is empty), the per-VM root
   bind-mounted and pivoted into.
4. The VM is built, as root inside the jail (/dev/kvm, disks and back-end sockets are
   opened while the process can still open them; only what the jail holds can be; the
   serial/console output file, the console socket and the NICs' taps came open with the
   start message: their directories are not in the jail, nor is /dev/net/tun, and the
   worker has no CAP_NET_ADMIN and no network: under its filter it can make unix
   sockets only, in a network namespace of its own with nothing in it). The daemon-wide
   rate-limit groups the VM names came as memfds with the start message too, and are
   mapped first (:class:`avmm.ratelimit.SharedRateLimiter`): the VM's devices find them
   as a VM of none mode finds the daemon's groups.
   An incoming VM given no config comes with the connection its daemon accepted and
   the stream's opening the daemon read (to plan the jail): its destination reads those
   bytes again first, and builds only if its own reading of the config is the one the
   jail was planned from (:meth:`_Worker.adjust_incoming`).
5. Before any vCPU or device thread exists (the VM's ``after_build`` hook):
   :func:`~avmm.isolation.jail.drop_privileges` (rlimits, the jail's uid/gid, no new
   privileges), then the seccomp filter for the VMM's thread kinds, on every thread.
6. The guest runs; the worker answers the daemon's requests (pause, resume, stop,
   console input, describe, limits, a snapshot into two files the daemon made, a
   migration over a connection it made) and sends events (status on every state change,
   console output) until the VM has stopped, then sends its final status and exits 0.

Whatever goes wrong before the VM runs is sent as a ``failed`` event (the daemon turns
it into the API's error) and the worker exits 1. The daemon treats every message from
here as untrusted (this process runs the guest's device models).
"""

from __future__ import annotations

import argparse
import array
import base64
import binascii
import contextlib
import dataclasses
import os
import re
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import pyseccomp  # noqa: F401  (its import runs ldconfig: before the jail, which has none)
import structlog
import trio

# Imported up front: nothing may be imported from files once the jail is entered.
from ..api._app import daemon_config
from ..api._limits import parse_limits_update
from ..config import GROUP_NAME_PATTERN, config_from_dict
from ..errors import AvmmError
from ..host import Host, HostedVm, config_to_dict
from ..lifecycle import VmMetrics, VmState
from ..logs import configure_logging
from ..migration import source as _migration_source  # noqa: F401  (loaded before the jail)
from ..migration.transport import Accepted, parse_address
from ..paths import BoundSocket, PathPolicy
from ..ratelimit import SharedRateLimiter
from ..state import SnapshotFiles
from ..vm import VirtualMachine, import_state_model  # noqa: F401  (before the jail)
from .channel import (
    MAX_MESSAGE,
    Channel,
    ChannelError,
    close_fds,
    decode,
    encode,
    error_payload,
)
from .jail import JailSpec, drop_privileges, enter_jail, narrow_capabilities
from .seccomp import DENSE_PROCESS_KINDS, SeccompMode, install_process_filter
from .syscalls import WORKER_REFUSED_IOCTLS

# The modules a VM imports when it first snapshots, restores or migrates (avmm.vm
# imports them on first use, which a jailed worker cannot do).
import_state_model()

log = structlog.get_logger(__name__)

#: The most fds the start message may carry (a snapshot directory or a migration's
#: listening socket, the outputs and taps, the daemon-wide rate-limit groups' shared
#: memory, the binds' sources).
START_FDS_MAX = 80
#: The most daemon-wide rate-limit groups the start message may hand over
#: (avmm.isolation.worker_vm.MAX_SHARED_GROUPS).
GROUPS_MAX = 16
#: The outputs the daemon may open for the VM (the config keys of their paths).
OUTPUT_KEYS = ("serial.path", "console.path")
#: The config key of a NIC's tap, which the daemon opens for the VM too.
_TAP_KEY = re.compile(r"net\[(0|[1-9][0-9]?)\]\.tap")
#: Console output is sent in chunks of at most this many bytes (base64 in JSON, well
#: under the channel's message limit).
CONSOLE_CHUNK = 32 * 1024


@dataclasses.dataclass(frozen=True)
class StartRequest:
    """The daemon's first message, checked."""

    vm_id: str
    config: dict[str, Any]
    start: bool
    seccomp: SeccompMode
    jail: JailSpec | None
    #: A restore: the snapshot's path (for messages), copy_memory, vhost_user sockets;
    #: its directory's fd came with the message.
    restore: dict[str, Any] | None
    #: The binds whose sources came as fds with the message (after the snapshot's).
    bind_paths: tuple[str, ...]
    #: An incoming migration: where it listens (for messages) and the accept timeout;
    #: the listening socket came with the message (after the snapshot's fd). Or, for a
    #: VM given no config, the connection the daemon accepted, and ``received``: the
    #: bytes it read of it (the stream's header and CONFIG frame).
    incoming: dict[str, Any] | None
    #: The outputs whose fds came with the message (after the listening socket's), by
    #: config key: the serial/console output file, the console's listening socket, the
    #: NICs' taps (``net[N].tap``).
    outputs: tuple[str, ...]
    #: The daemon-wide rate-limit groups whose shared memory came as fds with the
    #: message (after the outputs'), by name.
    groups: tuple[str, ...]
    log_level: str
    log_format: str


def parse_start(message: dict[str, Any]) -> StartRequest:
    """:raises ChannelError: the message is not a well-formed start request."""
    try:
        if message.get("op") != "start":
            raise ValueError("the first message is not 'start'")
        vm_id = message["vm_id"]
        config = message["config"]
        start = message["start"]
        if not isinstance(vm_id, str) or not isinstance(config, dict) \
                or not isinstance(start, bool):
            raise ValueError("vm_id, config or start has the wrong type")
        jail = message.get("jail")
        restore = message.get("restore")
        if restore is not None and not (
                isinstance(restore, dict) and isinstance(restore.get("path"), str)
                and isinstance(restore.get("copy_memory"), bool)
                and isinstance(restore.get("vhost_user"), dict)
                and all(isinstance(k, str) and isinstance(v, str)
                        for k, v in restore["vhost_user"].items())):
            raise ValueError("restore has the wrong shape")
        incoming = message.get("incoming")
        if incoming is not None and not (
                isinstance(incoming, dict) and isinstance(incoming.get("listen"), str)
                and (incoming.get("accept_timeout_s") is None
                     or isinstance(incoming.get("accept_timeout_s"), int | float))
                and isinstance(incoming.get("received", ""), str)):
            raise ValueError("incoming has the wrong shape")
        if incoming is not None and "received" in incoming:
            try:
                incoming = {**incoming, "received": base64.b64decode(
                    incoming["received"], validate=True)}
            except binascii.Error:
                raise ValueError("incoming.received is not base64") from None
        outputs = message.get("outputs", [])
        if not isinstance(outputs, list) or len(set(outputs)) != len(outputs) \
                or not all(isinstance(key, str) and (key in OUTPUT_KEYS
                                                     or _TAP_KEY.fullmatch(key))
                           for key in outputs):
            raise ValueError("outputs has the wrong shape")
        groups = message.get("rate_limit_groups", [])
        if not isinstance(groups, list) or len(groups) > GROUPS_MAX \
                or len(set(groups)) != len(groups) \
                or not all(isinstance(name, str)
                           and re.fullmatch(GROUP_NAME_PATTERN, name) for name in groups):
            raise ValueError("rate_limit_groups has the wrong shape")
        bind_paths = message.get("bind_fds", [])
        if not isinstance(bind_paths, list) \
                or len(bind_paths) > START_FDS_MAX - 2 - len(outputs) - len(groups) \
                or not all(isinstance(path, str) for path in bind_paths):
            raise ValueError("bind_fds has the wrong shape")
        level = message.get("log_level", "warning")
        log_format = message.get("log_format", "console")
        if level not in ("debug", "info", "warning", "error") \
                or log_format not in ("console", "json"):
            raise ValueError("bad logging settings")
        return StartRequest(
            vm_id=vm_id, config=config, start=start,
            seccomp=SeccompMode(message.get("seccomp", "off")),
            jail=None if jail is None else JailSpec.from_dict(jail),
            restore=restore, bind_paths=tuple(bind_paths), incoming=incoming,
            outputs=tuple(outputs), groups=tuple(groups),
            log_level=level, log_format=log_format)
    except (KeyError, ValueError, AvmmError) as e:
        raise ChannelError(f"a bad start message: {e}") from None


def metrics_to_dict(metrics: VmMetrics) -> dict[str, Any]:
    return {"state": metrics.state.value, "vcpu_exits": dict(metrics.vcpu_exits),
            "devices": {name: dataclasses.asdict(counters)
                        for name, counters in metrics.devices.items()}}


def status(hosted: HostedVm) -> dict[str, Any]:
    """What the daemon shows of the VM: the API's dict, counters, limiter waits."""
    return {"vm": hosted.to_dict(), "metrics": metrics_to_dict(hosted.metrics()),
            "rate_limit_waits": [list(wait) for wait in hosted.rate_limit_waits()]}


class _Worker:
    def __init__(self, channel: Channel, request: StartRequest,
                 snapshot_fd: int | None = None, incoming_fd: int | None = None,
                 output_fds: dict[str, int] | None = None,
                 group_fds: dict[str, int] | None = None) -> None:
        self.channel = channel
        self.request = request
        self.snapshot_fd = snapshot_fd
        #: The listening socket, or the connection the daemon accepted (incoming).
        self.incoming_fd = incoming_fd
        self.output_fds = dict(output_fds or {})
        #: The daemon-wide rate-limit groups' shared memory, by name (each fd taken over
        #: by its SharedRateLimiter in run()).
        self.group_fds = dict(group_fds or {})
        self.policy = PathPolicy()
        self.hosted: HostedVm | None = None

    def adjust_restored(self, config: Any) -> Any:
        """A restored VM's saved config as its worker builds it (see worker_config),
        which must be the one the daemon checked and planned the jail from (it came in
        the start message): the snapshot is read again here, and whoever can write in
        its directory could have changed it since (a disk path through this process's
        /proc/self/fd would lead out of the jail)."""
        from ..state import SnapshotError

        adjusted = self._if_checked(daemon_config(config))
        if adjusted is None:
            raise SnapshotError(f"{self.request.restore and self.request.restore['path']}: "
                                "the snapshot changed after the daemon checked it; "
                                "restore it again")
        return adjusted

    def adjust_incoming(self, config: Any) -> Any:
        """An incoming VM given no config: the config this worker read from the stream
        itself, as its worker builds it (see worker_config). The daemon planned the jail
        from its own reading of the same bytes, sent in the start message; this worker
        builds only from its own, and only if the two are the same VM.

        :raises MigrationError: they differ.
        """
        from ..migration.errors import MigrationError

        adjusted = self._if_checked(config)
        if adjusted is None:
            raise MigrationError("the streamed config is not the one the daemon planned "
                                 "the VM's jail from")
        return adjusted

    def _if_checked(self, config: Any) -> Any:
        """``config`` as this worker builds it (see worker_config; an ``auto`` CPU
        profile as the daemon resolved it: this jail has no /sys to tell), if that is
        the config of the start message, which the daemon checked and planned the jail
        from; else None."""
        from .worker_vm import worker_config

        adjusted = worker_config(config)
        checked = dict(self.request.config)
        if config.machine.cpu_profile == "auto":
            adjusted = dataclasses.replace(adjusted, machine=dataclasses.replace(
                adjusted.machine, cpu_profile=checked["machine"]["cpu_profile"]))
        return adjusted if config_to_dict(adjusted) == checked else None

    def after_build(self) -> None:
        """Between the build and the first thread of the VM: the privileges go, the
        filter comes (see the module docstring, step 5)."""
        if self.snapshot_fd is not None:
            # The restore has read the snapshot: no directory of the host stays open
            # here once the guest runs (openat with ".." walks out of a jail).
            os.close(self.snapshot_fd)
            self.snapshot_fd = None
        self.policy.close()  # an output the VM did not take
        if self.request.jail is not None:
            drop_privileges(self.request.jail)
        install_process_filter(DENSE_PROCESS_KINDS, self.request.seccomp,
                               refused_ioctls=WORKER_REFUSED_IOCTLS)

    async def run(self) -> None:
        request = self.request
        incoming = request.incoming
        # A VM given no config builds from the stream's (adjust_incoming checks it).
        streamed = incoming is not None and "received" in incoming
        try:
            config = None if streamed else await trio.to_thread.run_sync(
                lambda: config_from_dict(request.config, base_dir=None,
                                         source="the daemon's config",
                                         shared_groups=frozenset(request.groups)))
            # The daemon checked every path against its --allow-path; here the jail
            # holds only what the VM needs (an allowed directory itself is not in it),
            # and the outputs come open (their directories are not in it either).
            policy = self.policy = PathPolicy(opened=self._outputs())
        except (AvmmError, OSError) as e:
            await self.channel.send({"event": "failed", "error": error_payload(e)})
            return
        async with Host() as host:
            try:
                self._adopt_groups(host)
            except AvmmError as e:
                await self.channel.send({"event": "failed", "error": error_payload(e)})
                return
            try:
                # Paused before its first instruction: the daemon places the vCPU
                # threads (cgroup, affinity) first, then resumes it if it is to run.
                if incoming is not None:
                    assert self.incoming_fd is not None
                    sock = socket.socket(fileno=self.incoming_fd)
                    listening: socket.socket | Accepted = sock
                    if streamed:
                        listening = Accepted(parse_address(incoming["listen"], listen=True),
                                             sock, incoming["received"])
                    hosted = await host.receive(
                        incoming["listen"], config=config, start=request.start,
                        paths=policy, accept_timeout_s=incoming["accept_timeout_s"],
                        vm_id=request.vm_id, listening=listening,
                        after_build=self.after_build,
                        adjust_config=self.adjust_incoming if streamed else None)
                elif request.restore is not None:
                    restore = request.restore
                    hosted = await host.restore(
                        restore["path"], start=False, copy_memory=restore["copy_memory"],
                        vhost_user=restore["vhost_user"], paths=policy,
                        adjust_config=self.adjust_restored, vm_id=request.vm_id,
                        dir_fd=self.snapshot_fd, after_build=self.after_build)
                else:
                    hosted = await host.create(config, start=False, paths=policy,
                                               vm_id=request.vm_id,
                                               after_build=self.after_build)
            except AvmmError as e:
                await self.channel.send({"event": "failed", "error": error_payload(e)})
                return
            except Exception as e:  # a bug: the daemon still gets one line, then a 500
                log.exception("the VM could not be started in its worker")
                await self.channel.send({"event": "failed", "error": {
                    "type": "AvmmError", "message": f"{type(e).__name__}: {e}"}})
                return
            self.hosted = hosted
            # Each vCPU thread has started (and parked) once it has a thread id (an
            # incoming VM has none until its hand-over).
            with trio.move_on_after(10):
                while request.incoming is None \
                        and len(hosted.vm.vcpu_threads) < hosted.vm.config.machine.vcpus:
                    await trio.sleep(0.001)
            await self.channel.send({"event": "started", "status": status(hosted)})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._console)
                nursery.start_soon(self._status_changes)
                nursery.start_soon(self._requests, nursery.cancel_scope)
                await hosted.wait()
                # Let the console's last bytes go out before the final status.
                await trio.sleep(0)
                nursery.cancel_scope.cancel()
            await self.channel.send({"event": "exited", "status": status(hosted)})

    def _adopt_groups(self, host: Host) -> None:
        """The daemon-wide rate-limit groups the VM names, as the daemon handed them
        over (their shared memory mapped here): the VM's build finds them in the host's
        groups, as a VM of none mode finds the daemon's.

        :raises SharedLimiterError: one cannot be mapped (the rest are closed).
        """
        fds, self.group_fds = self.group_fds, {}
        try:
            while fds:
                name, fd = fds.popitem()
                host.rate_limit_groups.adopt(name, SharedRateLimiter.attach(fd, name=name))
        except BaseException:
            close_fds(list(fds.values()))
            raise

    def _outputs(self) -> dict[str, int | BoundSocket]:
        """The handed-over outputs as the VM's build takes them from its path policy:
        the console's listening socket as a BoundSocket (its file is the daemon's to
        remove), an output file or a tap as its fd."""
        outputs: dict[str, int | BoundSocket] = {}
        fds, self.output_fds = self.output_fds, {}
        console = self.request.config.get("console")
        try:
            for key, fd in list(fds.items()):
                if key == "console.path" and isinstance(console, dict) \
                        and console.get("mode") == "socket" \
                        and isinstance(console.get("path"), str):
                    outputs[key] = BoundSocket.handed_over(socket.socket(fileno=fd),
                                                           Path(console["path"]))
                else:
                    outputs[key] = fd
                del fds[key]
        except BaseException:
            close_fds(list(fds.values()))
            PathPolicy(opened=outputs).close()
            raise
        return outputs

    async def _console(self) -> None:
        assert self.hosted is not None
        async with self.hosted.subscribe_console() as subscription:
            async for chunk in subscription:
                for start in range(0, len(chunk), CONSOLE_CHUNK):
                    piece = chunk[start:start + CONSOLE_CHUNK]
                    await self.channel.send({"event": "console",
                                             "data": base64.b64encode(piece).decode()})

    async def _status_changes(self) -> None:
        """A status event at each change of the VM's state (the daemon's list and
        state answers come from the latest one)."""
        hosted = self.hosted
        assert hosted is not None
        vm = hosted.vm
        while True:
            current = vm.state
            await vm.wait_state(*(state for state in VmState if state is not current))
            await self.channel.send({"event": "status", "status": status(hosted)})
            if vm.state is VmState.STOPPED:
                return

    async def _requests(self, cancel_scope: trio.CancelScope) -> None:
        hosted = self.hosted
        assert hosted is not None
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    message, fds = await self.channel.receive_with_fds()
                except ChannelError as e:
                    # The daemon is gone: nobody is left to run this VM for.
                    log.warning("the daemon's channel is gone; stopping the VM",
                                reason=str(e))
                    hosted.request_stop("the daemon went away")
                    return
                nursery.start_soon(self._answer, message, fds)

    async def _answer(self, message: dict[str, Any], fds: list[int]) -> None:
        request_id = message.get("id")
        op = message.get("op")
        try:
            result = await self._do(op, message, fds)
        except AvmmError as e:
            reply: dict[str, Any] = {"id": request_id, "error": error_payload(e)}
        except Exception as e:  # a bug here must not end the VM: the daemon gets a 500
            log.exception("worker request failed", op=op)
            reply = {"id": request_id, "error": {"type": "AvmmError",
                                                 "message": f"{type(e).__name__}: {e}"}}
        else:
            reply = {"id": request_id, "result": result}
        finally:
            close_fds(fds)
        await self.channel.send(reply)

    async def _do(self, op: object, message: dict[str, Any], fds: list[int]) -> Any:
        hosted = self.hosted
        assert hosted is not None
        if op == "migrate":
            # Over the connection the daemon made (the worker makes no IP sockets).
            to, downtime_ms = message.get("to"), message.get("downtime_ms")
            if len(fds) != 1 or not isinstance(to, str) or not isinstance(downtime_ms, int):
                raise AvmmError("migrate needs to, downtime_ms and the connection's fd")
            connection = socket.socket(fileno=os.dup(fds[0]))
            try:
                await hosted.start_migration(to, downtime_ms=downtime_ms,
                                             connected=connection)
            except BaseException:
                connection.close()
                raise
            return status(hosted)
        if op == "describe":
            return status(hosted)
        if op == "snapshot":
            # Into the two files the daemon made (it owns their directory: the worker is
            # never handed one); _answer closes them, written or not.
            path = message.get("path")
            if not isinstance(path, str):
                raise AvmmError("snapshot needs the path (for messages)")
            info = await hosted.snapshot_into(snapshot_files(fds), path)
            return {**status(hosted), "snapshot": {"bytes_state": info.bytes_state,
                                                   "bytes_memory": info.bytes_memory}}
        if op == "pause":
            await hosted.pause()
        elif op == "resume":
            await hosted.resume()
        elif op == "stop":
            detail = message.get("detail")
            hosted.request_stop(detail if isinstance(detail, str) else "stopped by the host")
        elif op == "console_input":
            data = message.get("data")
            if not isinstance(data, str):
                raise AvmmError("console_input needs data")
            await hosted.send_console(base64.b64decode(data, validate=True))
        elif op == "update_limits":
            await hosted.update_limits(parse_limits_update(message.get("limits")))
        else:
            raise AvmmError(f"unknown request {op!r:.40}")
        return status(hosted)


def snapshot_files(fds: list[int]) -> SnapshotFiles:
    """A snapshot request's fds as the files to write: exactly two (state, then memory),
    both regular files.

    :raises AvmmError: anything else came.
    """
    if len(fds) != 2 or not all(stat.S_ISREG(os.fstat(fd).st_mode) for fd in fds):
        raise AvmmError("snapshot needs two fds, of the state and memory files")
    return SnapshotFiles(state_fd=fds[0], memory_fd=fds[1])


def _read_start(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The daemon's first message and its fds (a restore's snapshot directory)."""
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE + 1,
                                             socket.CMSG_SPACE(START_FDS_MAX * 4))
    fds: list[int] = []
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
    if len(data) > MAX_MESSAGE or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        raise ChannelError("the start message is over the size limit")
    try:
        return decode(data), fds
    except ChannelError:
        close_fds(fds)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avmm-worker", description=__doc__.split("\n")[0])
    parser.add_argument("--channel-fd", type=int, required=True)
    args = parser.parse_args(argv)
    return run_worker(args.channel_fd)


def run_worker(channel_fd: int) -> int:
    """The worker on its end of the channel (a fresh process, or one forked from the
    spawner with these modules loaded); its exit status."""
    sock = socket.socket(fileno=channel_fd)
    try:
        message, fds = _read_start(sock)
        request = parse_start(message)
        first_output = (request.restore is not None) + (request.incoming is not None)
        first_group = first_output + len(request.outputs)
        own = first_group + len(request.groups)
        if len(fds) != own + len(request.bind_paths):
            close_fds(fds)
            raise ChannelError("the start message came with the wrong fds")
        bind_fds = dict(zip(request.bind_paths, fds[own:], strict=True))
        output_fds = dict(zip(request.outputs, fds[first_output:first_group], strict=True))
        group_fds = dict(zip(request.groups, fds[first_group:own], strict=True))
        fds = fds[:own]
    except ChannelError as e:
        with contextlib.suppress(OSError):  # the daemon may be gone already
            sock.send(encode({"event": "failed", "error": error_payload(e)}))
        return 1
    configure_logging(log_format=request.log_format,  # type: ignore[arg-type]
                      level=request.log_level)
    structlog.contextvars.bind_contextvars(vm=request.vm_id)
    if request.jail is not None:
        try:
            enter_jail(request.jail, keep_fds=(sock.fileno(), *fds), bind_fds=bind_fds)
            narrow_capabilities()
        except AvmmError as e:
            with contextlib.suppress(OSError):
                sock.send(encode({"event": "failed", "error": error_payload(e)}))
            return 1
    try:
        snapshot_fd = fds[0] if request.restore is not None else None
        incoming_fd = fds[first_output - 1] if request.incoming is not None else None
        trio.run(_Worker(Channel(sock), request, snapshot_fd, incoming_fd,
                         output_fds, group_fds).run)
    except ChannelError as e:
        log.warning("worker channel failed", reason=str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
