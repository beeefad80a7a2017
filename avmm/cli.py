"""``avmm``: the command line.

``avmm up vm.toml`` boots a VM with its serial port on the terminal and exits with the
guest's status: 0 for a clean shutdown, ``(v << 1) | 1`` (mod 256) after a debug-exit
write of ``v``, 4 when the guest crashed, 6 on a host-side failure, 2 for a bad
command line or config file, or a file it names that cannot be booted (not a kernel, an
initrd larger than RAM, a command line longer than the kernel takes), or a snapshot
that cannot be restored. ``avmm up --restore DIR`` brings back a VM saved with
``avmm snapshot`` or ``vm.snapshot()`` instead of booting one. Every failure is one line
on stderr, never a traceback of avmm's internals.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import termios
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import trio

from .console_keys import EscapeFilter
from .errors import AvmmError, ConfigError, StateError, VmStartError, leaf_errors
from .isolation.seccomp import (
    DENSE_PROCESS_KINDS,
    SeccompMode,
    add_seccomp_argument,
    install_process_filter,
)
from .logs import configure_logging

if TYPE_CHECKING:
    from .lifecycle import VmExit

EXIT_USAGE = 2

# What a command imports is part of its start-up time (``avmm up`` pays for every module
# before the guest's first serial byte): the config schema, the VM and the subcommands'
# modules are imported where they are used, not here. tests/test_cli_imports.py keeps
# the heavy ones (the API server, HTTP, migration, rich) off ``avmm up``'s path.


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(only_up=_command_of(sys.argv[1:] if argv is None else argv) == "up")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    configure_logging(log_format=args.log_format, level=args.log_level)
    try:
        return int(args.handler(args))
    except (AvmmError, KeyboardInterrupt, BaseExceptionGroup) as e:
        # trio may hand the error up inside (nested) ExceptionGroups.
        errors = leaf_errors(e)
        if any(isinstance(error, KeyboardInterrupt) for error in errors):
            return 130
        if not all(isinstance(error, AvmmError) for error in errors):
            raise
        for error in errors:
            print(f"avmm: {error}", file=sys.stderr)
        return max(_exit_status(error) for error in errors)


def _exit_status(error: BaseException) -> int:
    """2 for bad input (the config, or a file it names that cannot be booted, or a
    snapshot that cannot be restored), 6 for a failure of the host or of avmm."""
    if isinstance(error, ConfigError | StateError):
        return EXIT_USAGE
    if isinstance(error, VmStartError) and error.bad_input:
        return EXIT_USAGE
    from .lifecycle import HOST_FAILURE_STATUS

    return HOST_FAILURE_STATUS


#: The options ``avmm`` itself takes before COMMAND that are followed by a value.
_GLOBAL_OPTIONS_WITH_VALUE = ("--log-format", "--log-level")


def _command_of(argv: Sequence[str]) -> str | None:
    """The COMMAND word of ``argv`` as argparse will find it (the first word that is
    neither an option nor the value of ``--log-format``/``--log-level``, abbreviated as
    argparse allows), or None, also when ``--help`` comes first. Only ``up`` is acted
    on (see :func:`_parser`)."""
    words = iter(argv)
    for word in words:
        if word == "--":
            return next(words, None)
        if word == "-h" or (len(word) > 2 and "--help".startswith(word)):
            return None  # the help lists every command
        if word.startswith("-"):
            if "=" not in word and len(word) > 2 and any(
                    option.startswith(word) for option in _GLOBAL_OPTIONS_WITH_VALUE):
                next(words, None)
            continue
        return word
    return None


def _parser(*, only_up: bool = False) -> argparse.ArgumentParser:
    """The whole command line; with ``only_up`` (the command is ``up``) without the
    other subcommands, whose modules ``avmm up`` has no use for."""
    parser = argparse.ArgumentParser(prog="avmm", description="An async VMM for Linux KVM.")
    parser.add_argument("--log-format", choices=["console", "json"], default="console",
                        help="log lines on stderr: human-readable or JSON (default: console)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"],
                        help="least severe log level shown (default: warning)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = commands.add_parser("up", help="boot a VM from a vm.toml (or restore one from a "
                             "snapshot), serial on this terminal")
    up.add_argument("config", nargs="?", help="path to the VM's TOML file")
    up.add_argument("--restore", metavar="DIR",
                    help="restore the VM saved in the snapshot directory DIR instead of "
                         "booting one (see README: Snapshots)")
    up.add_argument("--vhost-user", action="append", default=[], metavar="NAME=SOCKET",
                    help="with --restore: connect the vhost-user device NAME (blk0, net0, "
                         "vhost0, ...) to the back-end at SOCKET instead of the saved one "
                         "(repeatable)")
    up.add_argument("--copy-memory", action="store_true",
                    help="with --restore: copy guest RAM from the snapshot instead of "
                         "mapping it copy-on-write")
    up.add_argument("--append", default="", metavar="WORDS",
                    help="extra words for the kernel command line")
    up.add_argument("--boot-time", action="store_true",
                    help="print when the guest's /init writes the boot-time marker "
                         "(see README: Linux guests)")
    add_seccomp_argument(up)
    # Options shared by every subcommand, accepted after it as well.
    up.add_argument("--log-format", choices=["console", "json"], default=argparse.SUPPRESS)
    up.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                    default=argparse.SUPPRESS)
    up.set_defaults(handler=_cmd_up)
    if only_up:
        return parser

    from .vhost.cli import add_backend_commands

    add_backend_commands(commands)
    from .api.cli import add_management_commands

    add_management_commands(commands)
    return parser


def _cmd_up(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.restore is None):
        print("avmm up: give either a vm.toml or --restore DIR", file=sys.stderr)
        return EXIT_USAGE
    if args.restore is not None:
        if args.append:
            print("avmm up: --append cannot change a restored VM's kernel command line",
                  file=sys.stderr)
            return EXIT_USAGE
        sockets = {}
        for item in args.vhost_user:
            name, equals, socket_path = item.partition("=")
            if not equals or not name or not socket_path:
                print(f"avmm up: --vhost-user {item!r}: write NAME=SOCKET, e.g. "
                      "blk0=/run/blk.sock", file=sys.stderr)
                return EXIT_USAGE
            sockets[name] = socket_path
        vm_exit = trio.run(_run_restored, args.restore, args.copy_memory, sockets,
                           args.boot_time, SeccompMode(args.seccomp))
    else:
        if args.copy_memory or args.vhost_user:
            print("avmm up: --copy-memory and --vhost-user go with --restore",
                  file=sys.stderr)
            return EXIT_USAGE
        from .config import load_config

        config = load_config(args.config)  # before trio starts: blocking is fine here
        if args.append:
            config = config.with_cmdline_appended(args.append)
        vm_exit = trio.run(_run_up, config, args.boot_time, SeccompMode(args.seccomp))
    if vm_exit.failed:
        print(f"avmm: the VM stopped: {vm_exit}", file=sys.stderr)
    return vm_exit.exit_status & 0xFF


async def _run_up(config: object, boot_time: bool = False,
                  seccomp: SeccompMode = SeccompMode.OFF) -> VmExit:
    from .vm import VirtualMachine

    install_process_filter(DENSE_PROCESS_KINDS, seccomp)
    await _cleanup_stale_cgroups()
    async with VirtualMachine(config) as vm:  # type: ignore[arg-type]
        return await _attend(vm, boot_time)


async def _run_restored(directory: str, copy_memory: bool, sockets: dict[str, str],
                        boot_time: bool, seccomp: SeccompMode = SeccompMode.OFF) -> VmExit:
    from .vm import VirtualMachine

    install_process_filter(DENSE_PROCESS_KINDS, seccomp)
    await _cleanup_stale_cgroups()
    async with VirtualMachine.restore(directory, copy_memory=copy_memory,
                                      vhost_user=sockets) as vm:
        return await _attend(vm, boot_time)


async def _cleanup_stale_cgroups() -> None:
    """Remove the cgroups of avmm processes that crashed (see avmm.cgroups)."""
    from .cgroups import cleanup_stale

    await trio.to_thread.run_sync(cleanup_stale)


async def _attend(vm: object, boot_time: bool) -> VmExit:
    """Run the VM to its end with the console on this terminal (as its config says)."""
    from .vm import VirtualMachine

    assert isinstance(vm, VirtualMachine)
    console = vm.config.console
    interactive = vm.config.serial.mode == "console" or (
        console is not None and console.mode == "console")
    with _terminal_input_mode() if interactive else contextlib.nullcontext():
        async with trio.open_nursery() as nursery:
            if interactive:
                nursery.start_soon(_forward_stdin, vm)
            if boot_time:
                nursery.start_soon(_report_boot_time, vm)
            result = await vm.wait()
            nursery.cancel_scope.cancel()
        return result


async def _report_boot_time(vm: object) -> None:
    """One line on stderr when the guest reaches userspace (its boot-time marker)."""
    from .vm import VirtualMachine

    assert isinstance(vm, VirtualMachine)
    since_vm = await vm.wait_userspace()
    since_process = _seconds_since_process_start()
    process = f", {since_process * 1000:.1f} ms after avmm started" \
        if since_process is not None else ""
    # \r\n: the terminal may be in raw-ish input mode with the guest's output interleaved.
    sys.stderr.write(f"\r\navmm: guest userspace reached {since_vm * 1000:.1f} ms after "
                     f"the VM started{process}\r\n")
    sys.stderr.flush()


def _seconds_since_process_start() -> float | None:
    """Seconds since this process was created (the kernel's start time in
    /proc/self/stat, so interpreter start-up and imports count too), or None."""
    from .cgroups.backend import process_start_ticks

    try:
        start_ticks = process_start_ticks(os.getpid())
    except (OSError, ValueError, IndexError):
        return None
    if start_ticks is None:
        return None
    uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


async def _forward_stdin(vm: object) -> None:
    """Copy the terminal's keystrokes to the guest's serial port; Ctrl-A x stops the VM."""
    from .vm import VirtualMachine

    assert isinstance(vm, VirtualMachine)
    keys = EscapeFilter()
    while True:
        try:
            data = await trio.to_thread.run_sync(os.read, 0, 1024, abandon_on_cancel=True)
        except OSError:
            return
        if not data:
            return  # stdin closed: the guest keeps running without input
        out, leave = keys.feed(data)
        if leave:
            vm.stop()
            return
        if out:
            # With a virtio console on the terminal, keystrokes go there, not to the UART.
            console = vm.config.console
            target = vm.console if console is not None and console.mode == "console" \
                else vm.serial
            try:
                await target.send_all(out)
            except trio.ClosedResourceError:
                return


@contextlib.contextmanager
def _terminal_input_mode() -> Iterator[None]:
    """Raw-ish input while the console is attached: keystrokes go to the guest as typed
    (no line editing, no echo, Ctrl-C is a byte for the guest). Output processing stays
    on so that the guest's bare "\\n" still starts a new line."""
    if not os.isatty(0):
        yield
        return
    saved = termios.tcgetattr(0)
    mode = termios.tcgetattr(0)
    mode[0] &= ~(termios.ICRNL | termios.IXON | termios.INLCR | termios.IGNCR)
    mode[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
    mode[6][termios.VMIN] = 1
    mode[6][termios.VTIME] = 0
    termios.tcsetattr(0, termios.TCSANOW, mode)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
