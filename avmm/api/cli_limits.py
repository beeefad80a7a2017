"""``avmm update VM-ID``: change a running VM's CPU limits and disk and NIC rate limits.

``--cpu-weight N`` and ``--cpu-max-percent P`` (``none`` removes the quota) change the
VM's ``[machine]`` CPU controls (see README, "Sharing a host").

Each flag names the device by its index in the config (``disk0`` is the first
``[[disk]]``, ``net1`` the second ``[[net]]``) and gives a rate per second: ``--disk0-iops
500``, ``--disk0-bandwidth 8M``, ``--net0-tx-pps 1000``, ``--net0-rx-bandwidth 10M``. A rate
becomes a bucket of one second's worth refilled in 1000 ms; 0 removes that bucket. The
device's other bucket is kept as it is now (the command reads the VM first);
``--disk0-unlimited`` / ``--net0-unlimited`` remove every limit of the device. The
change goes to ``PATCH /vms/{id}``; finer buckets (another refill time) go there
directly, or into the config.

Exit status: 0 done, 1 the daemon refused or is not there, 2 a bad value (argparse's
message, or the daemon's 400 naming the key).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, Final

from ..config import MAX_VIRTIO_DEVICES
from ..ratelimit._flags import per_second, rate_argument

if TYPE_CHECKING:
    from .client import ApiClient

__all__ = ["add_update_command", "update"]

EXIT_USAGE: Final = 2
#: (flag part, bucket, what the number counts), for a disk and for each NIC direction.
_DISK_FLAGS: Final = (("iops", "ops", "requests"), ("bandwidth", "bandwidth", "bytes"))
_NET_FLAGS: Final = (("pps", "ops", "frames"), ("bandwidth", "bandwidth", "bytes"))

_LAST: Final = MAX_VIRTIO_DEVICES - 1
_EPILOG: Final = f"""\
Devices are named by their index in the VM's config: disk0 is the first [[disk]],
net0 the first [[net]], up to disk{_LAST} and net{_LAST} (only index 0 is listed above).
A rate R per second is a bucket of R tokens refilled in 1000 ms; 0 removes that
bucket, and the device's other bucket stays as it is. Example:

  avmm update vm-1 --disk0-iops 500 --disk0-bandwidth 8M --net0-tx-pps 2000

The change is in effect within 100 ms. Snapshots and migration streams carry the
limits in effect when they are taken (with full buckets on the other side)."""


def add_update_command(subparsers: Any, client_command: Any) -> Any:
    """Register ``update``; returns its parser."""
    parser = subparsers.add_parser(
        "update", help="change a running VM's CPU limits and disk and NIC rate limits",
        description="Change a VM's CPU weight and quota, and the I/O rate limits of its "
                    "disks and NICs, now.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("id", metavar="VM-ID", help="VM id (from avmm ps)")
    parser.add_argument("--cpu-weight", type=int, default=None, metavar="N",
                        help="the VM's CPU weight against other VMs, 1..10000 (cgroup v2's "
                             "cpu.weight; 100 is the default)")
    parser.add_argument("--cpu-max-percent", type=_percent, default=None, metavar="P",
                        help="cap the VM's vCPUs at P percent of one host CPU (150 = 1.5 "
                             "CPUs); 'none' removes the cap")
    for index in range(MAX_VIRTIO_DEVICES):
        shown = index == 0

        def help_text(text: str, *, shown: bool = shown) -> str:
            return text if shown else argparse.SUPPRESS

        disk = f"disk{index}"
        for flag, _bucket, unit in _DISK_FLAGS:
            parser.add_argument(f"--{disk}-{flag}", type=rate_argument, default=None,
                                metavar="N" if unit != "bytes" else "BYTES",
                                help=help_text(f"limit {disk} to N {unit} per second"
                                               if unit != "bytes" else
                                               f"limit {disk} to BYTES per second (K, M, "
                                               "G: binary units)"))
            parser.add_argument(f"--{disk}-{flag}-burst", type=rate_argument, default=0,
                                metavar="N" if unit != "bytes" else "BYTES", help=help_text(
                                    f"with --{disk}-{flag}: let N {unit} through "
                                    "once, on top"))
        parser.add_argument(f"--{disk}-unlimited", action="store_true",
                            help=help_text(f"remove every limit of {disk}"))
        net = f"net{index}"
        for direction, what in (("tx", "sends"), ("rx", "receives")):
            for flag, _bucket, unit in _NET_FLAGS:
                parser.add_argument(
                    f"--{net}-{direction}-{flag}", type=rate_argument, default=None,
                    metavar="N" if unit != "bytes" else "BYTES",
                    help=help_text(f"limit what the guest {what} on {net} to N {unit} "
                                   "per second" if unit != "bytes" else
                                   f"limit what the guest {what} on {net} to BYTES per "
                                   "second"))
                parser.add_argument(
                    f"--{net}-{direction}-{flag}-burst", type=rate_argument, default=0,
                    metavar="N" if unit != "bytes" else "BYTES",
                    help=help_text(f"with --{net}-{direction}-{flag}: let N {unit} "
                                   "through once, on top"))
        parser.add_argument(f"--{net}-unlimited", action="store_true",
                            help=help_text(f"remove every limit of {net} (both directions)"))
    parser.add_argument("--json", action="store_true",
                        help="print the VM's rate_limits as the API returns them")
    parser.set_defaults(handler=client_command(update))
    return parser


def _given(args: argparse.Namespace, prefix: str,
           flags: tuple[tuple[str, str, str], ...]) -> dict[str, tuple[int, int]]:
    """bucket → (rate, burst) for the flags given under ``prefix`` ("disk0", "net0_tx")."""
    given = {}
    for flag, bucket, _unit in flags:
        rate = getattr(args, f"{prefix}_{flag}")
        if rate is not None:
            given[bucket] = (rate, getattr(args, f"{prefix}_{flag}_burst"))
    return given


def _merged(current: dict[str, Any] | None, given: dict[str, tuple[int, int]]
            ) -> dict[str, Any] | None:
    limit = dict(current or {})
    for bucket, (rate, burst) in given.items():
        config = per_second(rate, burst)
        if config is None:
            limit.pop(bucket, None)
        else:
            limit[bucket] = config.to_dict()
    return limit or None


def build_changes(args: argparse.Namespace, vm: dict[str, Any]) -> dict[str, Any]:
    """The PATCH body for the flags in ``args``, merged with ``vm``'s current limits."""
    limits = vm.get("rate_limits") or {}
    current_disks = {entry["index"]: entry for entry in limits.get("disks", [])}
    current_nets = {entry["index"]: entry for entry in limits.get("nets", [])}
    disks, nets = [], []
    for index in range(MAX_VIRTIO_DEVICES):
        given = _given(args, f"disk{index}", _DISK_FLAGS)
        if getattr(args, f"disk{index}_unlimited"):
            disks.append({"index": index, "rate_limit": None})
        elif given:
            current = current_disks.get(index, {}).get("rate_limit")
            disks.append({"index": index, "rate_limit": _merged(current, given)})
        entry: dict[str, Any] = {"index": index}
        for direction in ("tx", "rx"):
            given = _given(args, f"net{index}_{direction}", _NET_FLAGS)
            if getattr(args, f"net{index}_unlimited"):
                entry[f"{direction}_rate_limit"] = None
            elif given:
                current = current_nets.get(index, {}).get(direction, {}).get("rate_limit")
                entry[f"{direction}_rate_limit"] = _merged(current, given)
        if len(entry) > 1:
            nets.append(entry)
    changes: dict[str, Any] = {}
    machine: dict[str, Any] = {}
    if args.cpu_weight is not None:
        machine["cpu_weight"] = args.cpu_weight
    if args.cpu_max_percent is not None:
        machine["cpu_max_percent"] = None if args.cpu_max_percent == "none" \
            else args.cpu_max_percent
    if machine:
        changes["machine"] = machine
    if disks:
        changes["disks"] = disks
    if nets:
        changes["nets"] = nets
    return changes


async def update(api: ApiClient, args: argparse.Namespace) -> int:
    vm = await api.get_vm(args.id)
    changes = build_changes(args, vm)
    if not changes:
        print("avmm: nothing to change; give a limit such as --disk0-iops 500 or "
              "--cpu-weight 200 (see avmm update --help)", file=sys.stderr)
        return EXIT_USAGE
    vm = await api.update_limits(args.id, changes)
    limits = vm.get("rate_limits") or {}
    if args.json:
        print(json.dumps(limits, indent=2))
        return 0
    if "machine" in changes:
        cpu = vm.get("cpu") or {}
        cap = cpu.get("max_percent")
        print(f"cpu: weight {cpu.get('weight')}, "
              f"{'no cap' if cap is None else f'cap {cap:g} % of a CPU'}")
    for entry in limits.get("disks", []):
        print(f"{entry['device']}: {_describe(entry)}")
    for entry in limits.get("nets", []):
        print(f"{entry['device']}: tx {_describe(entry['tx'])}; "
              f"rx {_describe(entry['rx'])}")
    return 0


def _percent(text: str) -> float | str:
    """``--cpu-max-percent``: a positive number, or ``none``."""
    if text.lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or 'none')") from None
    return int(value) if value.is_integer() else value


def _bytes(count: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.4g} {unit}"
    return f"{count:g} B"


def _describe(entry: dict[str, Any]) -> str:
    limit = entry.get("rate_limit")
    if not limit:
        return "unlimited"
    parts = []
    for bucket in ("ops", "bandwidth"):
        if bucket in limit:
            config = limit[bucket]
            rate = config["size"] * 1000 / config["refill_ms"]
            if bucket == "ops":
                parts.append(f"{rate:g} ops/s (bucket {config['size']})")
            else:
                parts.append(f"{_bytes(rate)}/s (bucket {_bytes(config['size'])})")
    group = entry.get("rate_limit_group")
    return ", ".join(parts) + (f" [group {group}]" if group else "")
