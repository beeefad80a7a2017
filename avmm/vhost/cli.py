"""``avmm backend {blk,rng,net}``: serve one avmm device over vhost-user until SIGINT/SIGTERM.

Wire it into ``avmm/cli.py`` with ``add_backend_commands(commands)`` where ``commands``
is the ``add_subparsers(dest="command")`` object; each sub-command sets ``handler``.
``python -m avmm.vhost.cli backend blk ...`` runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from ..errors import AvmmError, ConfigError
from ..isolation.seccomp import (
    BACKEND_PROCESS_KINDS,
    SeccompMode,
    add_seccomp_argument,
    install_process_filter,
)
from ..logs import configure_logging
from ..ratelimit import RateLimiter, Throttle
from ..ratelimit._flags import add_limit_arguments, limit_from_arguments
from ..virtio.device import VirtioDevice

log = structlog.get_logger(__name__)

__all__ = ["add_backend_commands", "main", "run_backend"]

_LEVELS = ["debug", "info", "warning", "error"]


def add_backend_commands(subparsers: Any) -> None:
    """Register ``backend blk``, ``backend rng`` and ``backend net`` on an argparse
    subparsers object."""
    backend = subparsers.add_parser("backend", help="serve a device over vhost-user")
    kinds = backend.add_subparsers(dest="backend_kind", metavar="DEVICE", required=True)

    blk = kinds.add_parser("blk", help="a virtio-blk device over a raw image")
    blk.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    blk.add_argument("--image", required=True, metavar="FILE", help="raw disk image")
    blk.add_argument("--readonly", action="store_true", help="refuse the driver's writes")
    add_limit_arguments(blk, "", ops_name="iops", ops_unit="requests", what="the disk")
    blk.set_defaults(handler=_cmd_blk)

    rng = kinds.add_parser("rng", help="a virtio-rng device fed by getrandom()")
    rng.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    rng.set_defaults(handler=_cmd_rng)

    net = kinds.add_parser("net", help="a virtio-net NIC on a host tap device")
    net.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    net.add_argument("--tap", required=True, metavar="NAME",
                     help="tap device (opened, or created, in this process's network "
                     "namespace: run under `ip netns exec NS` for another one)")
    net.add_argument("--mac", metavar="MAC", default=None,
                     help="the NIC's address in the config space (default: derived from "
                     "the tap name); a front-end may override it")
    add_limit_arguments(net, "tx-", ops_name="pps", ops_unit="frames",
                        what="frames the guest sends")
    add_limit_arguments(net, "rx-", ops_name="pps", ops_unit="frames",
                        what="frames the guest receives")
    net.set_defaults(handler=_cmd_net)

    for parser in (blk, rng, net):
        parser.add_argument(
            "--allow-unsealed-memory", action="store_true",
            help="map guest RAM that is not sealed against shrinking (F_SEAL_SHRINK); a "
            "front-end that shrinks it then crashes this back-end with SIGBUS. Only for "
            "trusted front-ends whose RAM cannot be sealed (memory-backend-file)")
        add_seccomp_argument(parser)
        parser.add_argument("--jail-root", default=None, metavar="DIR",
                            help="run in a jail at DIR/backend-<pid> holding only the "
                            "socket's directory, the image and the Python runtime (mount, "
                            "PID and IPC namespaces, pivot_root), as --uid/--gid once the "
                            "socket is bound; needs root")
        parser.add_argument("--uid", type=int, default=None, metavar="N",
                            help="with --jail-root: the unprivileged uid to run as")
        parser.add_argument("--gid", type=int, default=None, metavar="N",
                            help="with --jail-root: the unprivileged gid to run as")
        parser.add_argument("--log-format", choices=["console", "json"],
                            default=argparse.SUPPRESS)
        parser.add_argument("--log-level", choices=_LEVELS, default=argparse.SUPPRESS)


def _jail(args: argparse.Namespace, *files: tuple[str, bool],
          devices: Sequence[str] = ()) -> Any:
    """``--jail-root/--uid/--gid``: this process jails itself (see
    avmm.isolation.self_jail) with the socket's directory (writable: the socket is bound
    there) and ``files`` (path, writable); the spec, for the drop once the socket is
    bound. None without ``--jail-root``."""
    given = [flag for flag, value in (("--jail-root", args.jail_root), ("--uid", args.uid),
                                      ("--gid", args.gid)) if value is not None]
    if not given:
        return None
    if len(given) != 3:
        raise ConfigError("--jail-root, --uid and --gid go together; give all three",
                          path="avmm backend")
    import pyseccomp  # noqa: F401  (its import runs ldconfig, which the jail lacks)

    from ..isolation.jail import Bind
    from ..isolation.self_jail import jail_self, plan_self_jail

    socket_dir = os.path.dirname(os.path.abspath(args.socket))
    spec = plan_self_jail(args.jail_root, f"backend-{os.getpid()}", args.uid, args.gid,
                          binds=[Bind(socket_dir, writable=True),
                                 *(Bind(os.path.abspath(path), writable)
                                   for path, writable in files)],
                          devices=devices)
    jail_self(spec)
    return spec


def _cmd_blk(args: argparse.Namespace) -> int:
    from ..virtio.blk import LARGEST_QUEUE_SIZE, BlockDevice

    jail = _jail(args, (args.image, not args.readonly))
    # Behind vhost-user the front-end chooses the ring size: accept the largest.
    device = BlockDevice(Path(args.image), read_only=args.readonly,
                         queue_size=LARGEST_QUEUE_SIZE)
    limit = limit_from_arguments(args, "", ops_name="iops")
    if limit is not None:
        device.throttle = Throttle(RateLimiter(limit, name=device.name))
    try:
        return run_backend(device, args.socket,
                           allow_unsealed_memory=args.allow_unsealed_memory,
                           seccomp=SeccompMode(args.seccomp), jail=jail)
    finally:
        _log_limiter(device.name, device.throttle)
        device.close()


def _cmd_rng(args: argparse.Namespace) -> int:
    from ..virtio.rng import RngDevice

    jail = _jail(args)
    return run_backend(RngDevice(), args.socket,
                       allow_unsealed_memory=args.allow_unsealed_memory,
                       seccomp=SeccompMode(args.seccomp), jail=jail)


def _cmd_net(args: argparse.Namespace) -> int:
    import hashlib

    from ..tap import Tap
    from ..virtio.net import LARGEST_QUEUE_SIZE, NetDevice

    if args.mac is None:
        mac = bytes([0x02]) + hashlib.sha256(f"backend/{args.tap}".encode()).digest()[:5]
    else:
        try:
            mac = bytes.fromhex(args.mac.replace(":", ""))
        except ValueError:
            mac = b""
        if len(mac) != 6 or mac[0] & 1:
            raise AvmmError(f"--mac {args.mac!r}: expected a unicast MAC like 52:54:00:12:34:56")
    jail = _jail(args, devices=("/dev/net/tun",))
    tap = Tap.open(args.tap)
    device = None
    try:
        device = NetDevice(tap, mac=mac, name="net0", queue_size=LARGEST_QUEUE_SIZE)
        for direction in ("tx", "rx"):
            limit = limit_from_arguments(args, f"{direction}-", ops_name="pps")
            if limit is not None:
                setattr(device, f"{direction}_throttle",
                        Throttle(RateLimiter(limit, name=f"net0.{direction}")))
        return run_backend(
            device, args.socket, allow_unsealed_memory=args.allow_unsealed_memory,
            seccomp=SeccompMode(args.seccomp), jail=jail)
    finally:
        if device is not None:
            _log_limiter("net0.tx", device.tx_throttle)
            _log_limiter("net0.rx", device.rx_throttle)
        tap.close()


def _log_limiter(name: str, throttle: Throttle | None) -> None:
    """What a limited device's limiter did over the back-end's life (one line at exit,
    as ``GET /vms/{id}`` shows it for a disk avmm serves itself)."""
    if throttle is not None:
        log.info("rate limiter at exit", device=name, **throttle.stats())


def run_backend(device: VirtioDevice, socket_path: str, *,
                allow_unsealed_memory: bool = False,
                seccomp: SeccompMode = SeccompMode.OFF, jail: Any = None) -> int:
    """Serve ``device`` at ``socket_path`` until SIGINT or SIGTERM; exit status 0.
    With ``seccomp`` other than off, the back-end's filters are loaded before the first
    front-end is served (the device and its files are open by then). With ``jail`` (a
    JailSpec this process has entered), privileges are dropped to its uid/gid once the
    socket is bound, before the filters."""
    return trio.run(partial(_serve_until_signal, device, socket_path,
                            allow_unsealed_memory=allow_unsealed_memory, seccomp=seccomp,
                            jail=jail))


async def _serve_until_signal(device: VirtioDevice, socket_path: str, *,
                              allow_unsealed_memory: bool,
                              seccomp: SeccompMode = SeccompMode.OFF,
                              jail: Any = None) -> int:
    from .backend import serve_device

    if jail is None:
        install_process_filter(BACKEND_PROCESS_KINDS, seccomp)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_device,
                                        allow_unsealed_memory=allow_unsealed_memory),
                                device, socket_path)
            if jail is not None:
                # The socket is bound (as root, in the jail's writable socket directory):
                # no front-end has been served yet (nothing ran since the bind).
                from ..isolation.jail import drop_privileges

                drop_privileges(jail)
                install_process_filter(BACKEND_PROCESS_KINDS, seccomp)
            async for signum in signals:
                log.info("stopping on signal", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avmm")
    parser.add_argument("--log-format", choices=["console", "json"], default="console")
    parser.add_argument("--log-level", choices=_LEVELS, default="warning")
    add_backend_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    configure_logging(log_format=args.log_format, level=args.log_level)
    try:
        return int(args.handler(args))
    except AvmmError as e:
        print(f"avmm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
