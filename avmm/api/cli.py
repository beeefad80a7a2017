"""``avmm serve`` and the commands that talk to it: ``ps``, ``run``, ``pause``, ``resume``,
``stop``, ``rm``, ``console``, ``snapshot``, ``receive``, ``migrate`` (those two in
:mod:`avmm.api.cli_migration`), ``update`` (:mod:`avmm.api.cli_limits`).

Wire it into ``avmm/cli.py`` with ``add_management_commands(commands)``, where
``commands`` is the ``add_subparsers(dest="command")`` object; each sub-command sets
``handler``. Client commands find the daemon through ``--socket``, else ``AVMM_SOCKET``,
else ``$XDG_RUNTIME_DIR/avmm.sock``, else ``/run/avmm.sock``.

Exit status of the client commands: 0 done, 1 the daemon refused (the message is its
error) or is not there, 2 a bad command line or config (``avmm run``; ``avmm snapshot``
exits 1 for every refusal, as pause and resume do). ``avmm serve``
exits 0 after a clean shutdown and 1, with one line on stderr, when it cannot start.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..console_keys import EscapeFilter
from ..errors import AvmmError, leaf_errors
from ..isolation.seccomp import SeccompMode, add_seccomp_argument

if TYPE_CHECKING:
    from .client import ApiClient

__all__ = ["add_management_commands"]

_LEVELS = ["debug", "info", "warning", "error"]
EXIT_REFUSED = 1
EXIT_USAGE = 2
#: avmm.isolation.jail.DEFAULT_UID_RANGE, spelt out here so that building the parser
#: imports no jailer (a test checks that the two agree).
_DEFAULT_UID_RANGE_TEXT = "2000000000-2000065535"



def add_management_commands(subparsers: Any) -> None:
    """Register ``serve``, ``ps``, ``run``, ``pause``, ``resume``, ``stop``, ``rm``,
    ``console``, ``snapshot``, ``receive`` and ``migrate`` on an argparse subparsers
    object."""
    socket_help = ("the daemon's unix socket (default: $AVMM_SOCKET, else "
                   "$XDG_RUNTIME_DIR/avmm.sock, else /run/avmm.sock)")
    parsers = []

    serve = subparsers.add_parser("serve", help="host VMs behind a REST API on a unix socket")
    serve.add_argument("--socket", type=Path, default=None, metavar="PATH", help=socket_help)
    serve.add_argument("--group", default=None, metavar="GROUP",
                       help="let this group use the socket too (mode 0660 instead of 0600); "
                            "needs --allow-path or --allow-any-path")
    serve.add_argument("--allow-path", action="append", type=Path, default=None,
                       metavar="DIR", dest="allow_path",
                       help="the files of a VM config (kernel, initrd, disks, log files, "
                            "sockets) must resolve inside DIR (repeatable); others are "
                            "refused with 403")
    serve.add_argument("--allow-any-path", action="store_true",
                       help="with --group: let group members name any file the daemon's "
                            "user can open")
    add_seccomp_argument(serve)
    serve.add_argument("--isolation", choices=["none", "process"], default=None,
                       help="process: each VM in a jailed worker process of its own "
                            "(needs root; the default when the daemon runs as root); "
                            "none: every VM in this process (dense, fast churn; the "
                            "default otherwise, and how a root daemon gets dense mode)")
    serve.add_argument("--jail-root", default="/srv/avmm/jail", metavar="DIR",
                       help="with --isolation process: each VM's jail is DIR/<vm-id> "
                            "(default /srv/avmm/jail)")
    serve.add_argument("--jail-uid", type=int, default=None, metavar="UID",
                       help="with --isolation process: the unprivileged uid every worker "
                            "runs as (with --jail-gid)")
    serve.add_argument("--jail-gid", type=int, default=None, metavar="GID",
                       help="with --isolation process: the unprivileged gid every worker "
                            "runs as (with --jail-uid)")
    serve.add_argument("--jail-uid-range", default=None, metavar="FIRST-LAST",
                       help="with --isolation process: one uid (and the same gid) per VM "
                            "from this range, skipping ids that /etc/passwd or /etc/group "
                            "name (default, when no --jail-uid/--jail-gid is given either: "
                            f"{_DEFAULT_UID_RANGE_TEXT})")
    serve.set_defaults(handler=_cmd_serve)
    parsers.append(serve)

    ps = subparsers.add_parser("ps", help="list the daemon's VMs")
    ps.add_argument("--json", action="store_true", help="print the API's JSON instead")
    ps.set_defaults(handler=_client_command(_ps))
    parsers.append(ps)

    run = subparsers.add_parser("run", help="create and start a VM in the daemon from a vm.toml")
    run.add_argument("config", type=Path, help="path to the VM's TOML file (relative paths "
                     "in it are relative to its directory)")
    run.set_defaults(handler=_client_command(_run))
    parsers.append(run)

    for name, text in (("pause", "pause VMs (vCPUs leave KVM_RUN and wait)"),
                       ("resume", "resume paused VMs"),
                       ("stop", "stop VMs (they stay listed until rm)"),
                       ("rm", "stop VMs and forget them")):
        action = subparsers.add_parser(name, help=text)
        action.add_argument("ids", nargs="+", metavar="ID", help="VM id (from avmm ps)")
        action.set_defaults(handler=_client_command(_vm_action), action=name)
        parsers.append(action)

    console = subparsers.add_parser(
        "console", help="attach this terminal to a VM's serial console (Ctrl-A x detaches)")
    console.add_argument("id", metavar="ID", help="VM id (from avmm ps)")
    console.set_defaults(handler=_client_command(_console))
    parsers.append(console)

    snapshot = subparsers.add_parser(
        "snapshot", help="write a VM's state and memory to a new directory (pauses it; "
                         "it stays paused unless --resume)")
    snapshot.add_argument("id", metavar="ID", help="VM id (from avmm ps)")
    snapshot.add_argument("dir", metavar="DIR",
                          help="the snapshot directory to create, on the daemon's machine "
                               "(relative: to this directory); its parent must exist")
    snapshot.add_argument("--resume", action="store_true",
                          help="resume the VM once the snapshot is written")
    snapshot.set_defaults(handler=_client_command(_snapshot))
    parsers.append(snapshot)

    from .cli_limits import add_update_command
    from .cli_migration import add_migration_commands

    parsers.extend(add_migration_commands(subparsers, _client_command))
    parsers.append(add_update_command(subparsers, _client_command))

    for parser in parsers:
        if parser is not serve:
            parser.add_argument("--socket", type=Path, default=None, metavar="PATH",
                                help=socket_help)
        # Options shared by every subcommand, accepted after it as well.
        parser.add_argument("--log-format", choices=["console", "json"],
                            default=argparse.SUPPRESS)
        parser.add_argument("--log-level", choices=_LEVELS, default=argparse.SUPPRESS)


def _socket(args: argparse.Namespace) -> Path:
    from .client import default_socket_path

    return args.socket if args.socket is not None else default_socket_path()


# -- the daemon ----------------------------------------------------------------------------


def default_isolation(euid: int) -> str:
    """``--isolation``'s value when the command line gives none: ``process`` for a
    daemon that runs as root (it can jail its VMs, so it does), ``none`` otherwise (an
    unprivileged daemon cannot make the jail)."""
    return "process" if euid == 0 else "none"


def _isolation_mode(args: argparse.Namespace) -> tuple[str, str]:
    """The mode ``avmm serve`` runs in, and why (for the log line at start)."""
    if args.isolation is not None:
        return args.isolation, "asked for with --isolation"
    euid = os.geteuid()
    mode = default_isolation(euid)
    return mode, ("the default for a daemon running as root; --isolation none for dense "
                  "mode" if euid == 0 else "the default for a daemon not running as root")


def _process_isolation(args: argparse.Namespace, mode: str) -> Any:
    """``--isolation process`` and its jail flags as a ProcessIsolation (None for
    ``none``, where the jail flags are refused: they would do nothing). Without
    --jail-uid/--jail-gid/--jail-uid-range, each VM gets a uid of
    :data:`~avmm.isolation.jail.DEFAULT_UID_RANGE`; a range skips the ids that the
    host's /etc/passwd and /etc/group name (read here, before the event loop runs)."""
    jail_flags = [flag for flag, value in (("--jail-uid", args.jail_uid),
                                           ("--jail-gid", args.jail_gid),
                                           ("--jail-uid-range", args.jail_uid_range))
                  if value is not None]
    if mode == "none":
        if jail_flags:
            from ._server import DaemonError

            raise DaemonError(f"{jail_flags[0]} applies to --isolation process only")
        return None
    from ..isolation.jail import (
        DEFAULT_UID_RANGE,
        UidAllocator,
        host_named_ids,
        nss_names_id,
        parse_uid_range,
        subordinate_ranges,
    )
    from ..isolation.worker_vm import ProcessIsolation
    from ._server import DaemonError

    if os.geteuid() != 0:
        raise DaemonError("--isolation process needs root (the jailer makes namespaces, "
                          "mounts and drops to --jail-uid); run as root or use "
                          "--isolation none")
    if args.jail_uid_range is not None and (args.jail_uid is not None
                                            or args.jail_gid is not None):
        raise DaemonError("--jail-uid-range and --jail-uid/--jail-gid contradict each "
                          "other; give one")
    uids = None
    if args.jail_uid_range is not None:
        # A range the admin chose may be one delegated to avmm's jails in /etc/subuid
        # on purpose: only names (files and NSS) are skipped there.
        uids = UidAllocator(parse_uid_range(args.jail_uid_range), skip=host_named_ids(),
                            lookup=nss_names_id)
    elif args.jail_uid is None and args.jail_gid is None:
        uids = UidAllocator(DEFAULT_UID_RANGE, skip=host_named_ids(),
                            subordinate=subordinate_ranges(), lookup=nss_names_id)
    return ProcessIsolation(jail_root=args.jail_root, uid=args.jail_uid,
                            gid=args.jail_gid, uids=uids,
                            seccomp=SeccompMode(args.seccomp),
                            log_level=getattr(args, "log_level", "warning"),
                            log_format=getattr(args, "log_format", "console"))


def _jail_ids(isolation: Any) -> str | None:
    if isolation is None:
        return None
    if isolation.uids is not None:
        return f"{isolation.uids.range_text} (one per VM, uid = gid)"
    return f"{isolation.uid}:{isolation.gid}"


def _cmd_serve(args: argparse.Namespace) -> int:
    from ._server import run_daemon

    mode, why = _isolation_mode(args)

    async def serve(isolation: Any) -> None:
        import structlog

        async with trio.open_nursery() as nursery:
            path = await nursery.start(functools.partial(
                run_daemon, _socket(args), group=args.group, allow_paths=args.allow_path,
                allow_any_path=args.allow_any_path, seccomp=SeccompMode(args.seccomp),
                isolation=isolation))
            # Loud (a warning shows at every log level but error): which mode holds the
            # VMs decides what a guest that escapes its VMM reaches, and the default
            # depends on who started the daemon.
            structlog.get_logger(__name__).warning(
                "serving VMs", isolation=mode, why=why, socket=str(path),
                jail_ids=_jail_ids(isolation))

    try:
        isolation = _process_isolation(args, mode)
        if isolation is None:
            from ..threads import share_the_interpreter_between_vms

            # Every VM's device threads share this interpreter: a busy one must not
            # keep a quiet one's I/O thread waiting for the GIL 5 ms at a time.
            share_the_interpreter_between_vms()
        trio.run(serve, isolation)
    except BaseException as e:
        # trio hands start-up failures up inside ExceptionGroups; a person wants the
        # one line that says what to fix.
        errors = leaf_errors(e)
        if errors and all(isinstance(error, AvmmError) for error in errors):
            for error in errors:
                print(f"avmm: {error}", file=sys.stderr)
            return EXIT_REFUSED
        if errors and all(isinstance(error, KeyboardInterrupt) for error in errors):
            return 130
        raise
    return 0


# -- client commands -------------------------------------------------------------------------

_Command = Callable[["ApiClient", argparse.Namespace], Awaitable[int]]


def _client_command(command: _Command) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from .client import ApiClient, ApiError, DaemonUnreachableError

        async def main() -> int:
            async with ApiClient(_socket(args)) as api:
                return await command(api, args)

        try:
            return trio.run(main)
        except ApiError as e:
            print(f"avmm: {e.message}", file=sys.stderr)
            return EXIT_USAGE if e.status == 400 else EXIT_REFUSED
        except DaemonUnreachableError as e:
            print(f"avmm: {e}", file=sys.stderr)
            return EXIT_REFUSED

    return handler


async def _ps(api: ApiClient, args: argparse.Namespace) -> int:
    vms = await api.list_vms()
    if args.json:
        print(json.dumps(vms, indent=2))
        return 0
    rows = [("ID", "NAME", "STATE", "PID", "UPTIME", "EXIT")]
    for vm in vms:
        pid = vm.get("pid")
        rows.append((vm["id"], vm["name"], vm["state"],
                     str(pid) if isinstance(pid, int) else "-",
                     _duration(vm.get("uptime_s")), _exit_text(vm.get("exit"))))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())
    return 0


async def _run(api: ApiClient, args: argparse.Namespace) -> int:
    from ..config import read_config_file
    from ..errors import ConfigError

    path: Path = args.config
    try:
        # A worker thread, capped and regular files only: never a FIFO or /dev/zero.
        text = await trio.to_thread.run_sync(read_config_file, path)
    except ConfigError as e:
        print(f"avmm: {e}", file=sys.stderr)
        return EXIT_USAGE
    vm = await api.create_vm(toml=text, base_dir=path.resolve().parent)
    print(vm["id"])
    return 0


async def _vm_action(api: ApiClient, args: argparse.Namespace) -> int:
    from .client import ApiError

    status = 0
    for vm_id in args.ids:
        try:
            if args.action == "rm":
                await api.delete_vm(vm_id)
            else:
                vm = await getattr(api, args.action)(vm_id)
                if args.action == "stop" and vm.get("exit"):
                    print(f"{vm_id}: {_exit_text(vm['exit'])}")
        except ApiError as e:
            # One bad id must not leave the others untouched.
            print(f"avmm: {e.message}", file=sys.stderr)
            status = EXIT_REFUSED
    return status


async def _snapshot(api: ApiClient, args: argparse.Namespace) -> int:
    from .client import ApiError

    vm_id: str = args.id
    # A relative path can only mean this shell's directory, wherever the daemon runs.
    directory = os.path.abspath(args.dir)
    try:
        vm = await api.get_vm(vm_id)
        paused_here = False
        if vm["state"] == "running":
            await api.pause(vm_id)
            paused_here = True
        try:
            info = await api.snapshot(vm_id, directory)
        except BaseException:
            # A VM that was running before is not left paused by a failed snapshot.
            if paused_here or args.resume:
                with trio.CancelScope(shield=True):
                    await _resume_quietly(api, vm_id)
            raise
        if args.resume:
            await api.resume(vm_id)
    except ApiError as e:
        print(f"avmm: {e.message}", file=sys.stderr)
        return EXIT_REFUSED
    state = "resumed" if args.resume else "left paused"
    print(f"{info['path']}: state {_size(info['bytes_state'])}, memory "
          f"{_size(info['bytes_memory'])}, {info['duration_ms']:.1f} ms; {vm_id} {state}")
    return 0


async def _resume_quietly(api: ApiClient, vm_id: str) -> None:
    from .client import ApiError, DaemonUnreachableError

    try:
        await api.resume(vm_id)
    except (ApiError, DaemonUnreachableError) as e:
        print(f"avmm: could not resume {vm_id}: {e}", file=sys.stderr)


def _size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit}"
    return f"{size} bytes"


async def _console(api: ApiClient, args: argparse.Namespace) -> int:
    from ..cli import _terminal_input_mode

    vm_id: str = args.id
    stopped = False
    async with api.console(vm_id) as output:
        sys.stderr.write(f"avmm: attached to {vm_id}; Ctrl-A x detaches (the VM keeps "
                         "running)\r\n")
        sys.stderr.flush()
        with _terminal_input_mode():
            async with trio.open_nursery() as nursery:

                async def forward_input() -> None:
                    await _forward_keys(api, vm_id)
                    nursery.cancel_scope.cancel()  # detached

                nursery.start_soon(forward_input)
                async for chunk in output:
                    _write_all(1, chunk)
                stopped = True  # the stream ended: the VM has stopped
                nursery.cancel_scope.cancel()
    if stopped:
        vm = await api.get_vm(vm_id)
        sys.stderr.write(f"\r\navmm: {vm_id} stopped: {_exit_text(vm.get('exit'))}\r\n")
    else:
        sys.stderr.write(f"\r\navmm: detached from {vm_id}\r\n")
    return 0


async def _forward_keys(api: ApiClient, vm_id: str) -> None:
    """Keystrokes to the guest until Ctrl-A x (or the end of stdin)."""
    keys = EscapeFilter()
    while True:
        data = await trio.to_thread.run_sync(os.read, 0, 1024, abandon_on_cancel=True)
        if not data:
            await trio.sleep_forever()  # stdin closed: keep showing the output
        out, leave = keys.feed(data)
        if out:
            await api.send_console(vm_id, out)
        if leave:
            return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _exit_text(vm_exit: dict[str, Any] | None) -> str:
    if not vm_exit:
        return "-"
    text = f"{vm_exit['reason']} (status {vm_exit['exit_status']})"
    if vm_exit.get("detail"):
        text += f": {vm_exit['detail']}"
    return text

