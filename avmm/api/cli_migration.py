"""``avmm receive`` and ``avmm migrate``: live migration between two daemons.

``avmm receive --listen ADDR [--config vm.toml] [--accept-timeout SECONDS]`` asks the
daemon for a VM that listens for one migration stream and prints its id. ``avmm migrate
VM-ID --to ADDR`` begins the migration, follows it (a progress bar on a terminal, one
line per round otherwise, on stderr) and prints the measured downtime on stdout. A
relative ``unix:`` path means this shell's directory, as with ``avmm snapshot``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import trio

if TYPE_CHECKING:
    from .client import ApiClient

__all__ = ["ProgressView", "add_migration_commands", "migrate", "receive"]

EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
PAGE_SIZE: Final = 4096
#: How often a migration's progress is asked for.
POLL_INTERVAL_S: Final = 0.25
_BAR_WIDTH: Final = 24
_ENDED: Final = ("completed", "failed", "unconfirmed")


def add_migration_commands(subparsers: Any, client_command: Any) -> list[Any]:
    """Register ``receive`` and ``migrate``; returns their parsers (for the options
    every client command shares)."""
    receive_parser = subparsers.add_parser(
        "receive", help="have the daemon listen for a VM coming in by live migration "
                        "(prints the new VM's id)")
    receive_parser.add_argument("--listen", required=True, metavar="ADDR",
                                help="unix:/path (a socket, mode 0600) or tcp:HOST:PORT "
                                     "(trusted networks only: the stream is not "
                                     "authenticated)")
    receive_parser.add_argument("--config", type=Path, default=None, metavar="VM.TOML",
                                help="build the VM from this config instead of the one "
                                     "in the stream (same devices, this host's paths); "
                                     "without it, in either --isolation mode, the "
                                     "stream's config is used")
    receive_parser.add_argument("--paused", action="store_true",
                                help="leave the VM paused after the hand-over")
    receive_parser.add_argument("--accept-timeout", type=_seconds, default=None,
                                metavar="SECONDS",
                                help="end the VM (failed) if no source has connected by "
                                     "then (default: wait until it is stopped)")
    receive_parser.set_defaults(handler=client_command(receive))

    migrate_parser = subparsers.add_parser(
        "migrate", help="live-migrate a running VM to a daemon that receives it")
    migrate_parser.add_argument("id", metavar="VM-ID", help="VM id (from avmm ps)")
    migrate_parser.add_argument("--to", required=True, metavar="ADDR",
                                help="the destination: unix:/path or tcp:HOST:PORT (from "
                                     "avmm receive --listen)")
    migrate_parser.add_argument("--downtime-ms", type=int, default=None, metavar="N",
                                help="the pause the guest may see (default: 300)")
    migrate_parser.set_defaults(handler=client_command(migrate))
    return [receive_parser, migrate_parser]


def _seconds(value: str) -> float:
    """A positive, finite number of seconds (argparse names the option on error)."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give a positive number of seconds")
    return seconds


def _address(value: str) -> str:
    """A relative ``unix:`` path made absolute against this shell's directory."""
    if value.startswith("unix:") and not value[len("unix:"):].startswith("/"):
        return "unix:" + os.path.abspath(value[len("unix:"):])
    return value


async def receive(api: ApiClient, args: argparse.Namespace) -> int:
    from ..config import read_config_file
    from ..errors import ConfigError

    config: dict[str, Any] | None = None
    base_dir: Path | None = None
    if args.config is not None:
        path: Path = args.config
        try:
            # A worker thread, capped and regular files only (as avmm run).
            data = await trio.to_thread.run_sync(read_config_file, path)
            config = tomllib.loads(data.decode("utf-8"))
        except ConfigError as e:
            print(f"avmm: {e}", file=sys.stderr)
            return EXIT_USAGE
        except UnicodeDecodeError as e:
            print(f"avmm: {path}: not valid UTF-8 (byte {e.start})", file=sys.stderr)
            return EXIT_USAGE
        except tomllib.TOMLDecodeError as e:
            print(f"avmm: {path}: not valid TOML: {' '.join(str(e).split())}",
                  file=sys.stderr)
            return EXIT_USAGE
        base_dir = path.resolve().parent
    vm = await api.receive_vm(_address(args.listen), config=config, base_dir=base_dir,
                              start=not args.paused, accept_timeout_s=args.accept_timeout)
    print(vm["id"])
    return 0


@dataclass
class ProgressView:
    """Turns successive ``migration`` objects into what the user sees: a bar redrawn in
    place on a terminal, else one line each time the round or the state changes."""

    out: TextIO
    tty: bool
    total_pages: int | None = None
    _last_key: tuple[Any, ...] | None = None
    _round_started: dict[int, tuple[float, int]] = field(default_factory=dict)
    _dirty_rate: float | None = None
    _drawn = False

    def show(self, migration: dict[str, Any]) -> None:
        state = migration.get("state") or "setup"
        rounds = migration.get("round")
        self._track_dirty_rate(migration)
        text = self._text(migration)
        if self.tty:
            self.out.write("\r\x1b[K" + self._bar(migration) + " " + text)
            self._drawn = True
        else:
            key = (state, rounds)
            if key == self._last_key:
                return
            self._last_key = key
            self.out.write(text + "\n")
        self.out.flush()

    def end(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()

    def _track_dirty_rate(self, migration: dict[str, Any]) -> None:
        # The engine's own figure if it gives one; else the pages dirtied in the last
        # round over that round's length, from the times rounds were seen to begin.
        rate = migration.get("dirty_rate_bytes_s")
        if isinstance(rate, int | float) and not isinstance(rate, bool):
            self._dirty_rate = float(rate)
            return
        rounds, total_ms, dirty = (migration.get("round"), migration.get("total_ms"),
                                   migration.get("pages_dirty"))
        if not isinstance(rounds, int) or not isinstance(total_ms, int | float):
            return
        if rounds not in self._round_started:
            self._round_started[rounds] = (float(total_ms), dirty or 0)
            previous = self._round_started.get(rounds - 1)
            if previous is not None and isinstance(dirty, int):
                elapsed_s = (float(total_ms) - previous[0]) / 1000
                if elapsed_s > 0:
                    self._dirty_rate = dirty * PAGE_SIZE / elapsed_s

    def _fraction(self, migration: dict[str, Any]) -> float:
        if migration.get("state") == "completed":
            return 1.0
        total = self.total_pages
        sent, dirty = migration.get("pages_sent") or 0, migration.get("pages_dirty") or 0
        if not total:
            return 0.0
        if not migration.get("round"):
            return min(sent, total) / total  # the first full pass
        return max(0.0, 1.0 - dirty / total)  # later rounds: what is still dirty

    def _bar(self, migration: dict[str, Any]) -> str:
        filled = round(self._fraction(migration) * _BAR_WIDTH)
        return "[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "]"

    def _text(self, migration: dict[str, Any]) -> str:
        parts = [str(migration.get("state") or "setup")]
        if migration.get("round") is not None:
            parts.append(f"round {migration['round']}")
        sent = migration.get("bytes_sent")
        if sent is not None:
            parts.append(f"{sent / 1e6:.1f} MB sent")
        if migration.get("pages_dirty") is not None:
            parts.append(f"{migration['pages_dirty']} pages dirty")
        if self._dirty_rate is not None:
            parts.append(f"dirty rate {self._dirty_rate / 1e6:.1f} MB/s")
        return ", ".join(parts)


async def migrate(api: ApiClient, args: argparse.Namespace) -> int:
    vm_id: str = args.id
    to = _address(args.to)
    vm = await api.migrate(vm_id, to, downtime_ms=args.downtime_ms)
    memory_mib = ((vm.get("config") or {}).get("machine") or {}).get("memory_mib")
    view = ProgressView(sys.stderr, tty=sys.stderr.isatty(),
                        total_pages=memory_mib * 256 if isinstance(memory_mib, int) else None)
    started = time.monotonic()
    try:
        while True:
            migration = vm.get("migration") or {}
            if migration:
                view.show(migration)
            if migration.get("state") in _ENDED or vm.get("state") == "stopped":
                break
            await trio.sleep(POLL_INTERVAL_S)
            vm = await api.get_vm(vm_id)
    finally:
        view.end()
    return _report(vm_id, to, vm, time.monotonic() - started)


def _report(vm_id: str, to: str, vm: dict[str, Any], waited_s: float) -> int:
    migration = vm.get("migration") or {}
    if migration.get("state") == "completed":
        downtime = migration.get("downtime_ms")
        total = migration.get("total_ms")
        sent = migration.get("bytes_sent")
        print(f"{vm_id} migrated to {to}: downtime "
              + (f"{downtime:.1f} ms" if downtime is not None else "unknown")
              + ", total " + (f"{total:.0f} ms" if total is not None
                              else f"{waited_s * 1000:.0f} ms")
              + (f", {sent / 1e6:.1f} MB sent" if sent is not None else "")
              + (f", last round {migration['round']}"
                 if isinstance(migration.get("round"), int) else ""))
        return 0
    if migration.get("state") == "failed":
        print(f"avmm: migration of {vm_id} to {to} failed: "
              f"{migration.get('error') or 'no reason given'}; it keeps running here",
              file=sys.stderr)
        return EXIT_REFUSED
    if migration.get("state") == "unconfirmed":
        print(f"avmm: migration of {vm_id} to {to}: {migration.get('error') or 'unconfirmed'}",
              file=sys.stderr)
        return EXIT_REFUSED
    vm_exit = vm.get("exit") or {}
    print(f"avmm: {vm_id} stopped during its migration to {to} "
          f"({vm_exit.get('reason', 'unknown')}: {vm_exit.get('detail', '')})",
          file=sys.stderr)
    return EXIT_REFUSED
