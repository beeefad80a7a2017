#!/usr/bin/env python3
"""Derive the seccomp allow-lists (avmm/isolation/syscalls.py) from what avmm calls.

Runs the guest workloads of tests/isolation/scenarios.py (hello, blk-write, console,
net-echo, vhost-user-blk) with ``--seccomp log`` under ``strace -f``, and prints per
thread kind the syscalls (and ioctl requests) made after that thread came under its
filter:

- a thread that loaded a kind filter is named ``avmm-<kind>`` first
  (``prctl(PR_SET_NAME, "avmm-vcpu")`` in the trace); its calls after its ``seccomp()``
  count for that kind;
- the process filter is loaded with TSYNC: every thread's calls after it count for the
  process's union (``vmm`` for ``avmm up``, ``backend`` for ``avmm backend``).

Then it prints what each list lacks (must be added, or the workload dies in kill mode)
and what it allows that no workload used (review: keep only with a reason written next
to it). Needs root, /dev/kvm, strace; run it from the repository root:

    sudo .venv/bin/python scripts/seccomp_derive.py [SCENARIO ...]
"""

from __future__ import annotations

import collections
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from avmm.isolation.seccomp import (  # noqa: E402
    BACKEND_PROCESS_KINDS,
    DAEMON_PROCESS_KINDS,
    DENSE_PROCESS_KINDS,
)
from avmm.isolation.syscalls import ALLOWED, IOCTLS, ThreadKind  # noqa: E402
from tests.isolation.scenarios import SCENARIOS  # noqa: E402

_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_NAME = re.compile(r'prctl\(PR_SET_NAME, "avmm-(\w+)"')
_IOCTL = re.compile(r"^\d+, ([A-Z][A-Z0-9_]+|_IOC\([^)]*\)|0x[0-9a-f]+)")


def parse(trace: Path, process_label: str,
          seen: dict[str, set[str]], ioctls: dict[str, set[str]]) -> None:
    """Add the calls in one strace -f output file to ``seen``/``ioctls`` per label."""
    names: dict[str, str] = {}          # tid -> kind value, once named
    kind_filtered: set[str] = set()     # tids under their kind's filter
    process_filtered = False
    for line in trace.read_text(errors="replace").splitlines():
        match = _CALL.match(line)
        if not match:
            continue
        tid, call, rest = match.groups()
        labels = []
        if process_filtered:
            labels.append(process_label)
        if tid in kind_filtered:
            labels.append(names[tid])
        for label in labels:
            seen[label].add(call)
            if call == "ioctl" and (request := _IOCTL.match(rest)):
                ioctls[label].add(request.group(1))
        if call == "prctl" and (named := _NAME.search(line)):
            names[tid] = named.group(1)
        elif call == "seccomp" and "SECCOMP_SET_MODE_FILTER" in rest and "= 0" in rest:
            if "TSYNC" in rest:
                process_filtered = True
            elif tid in names:
                kind_filtered.add(tid)


def main(argv: list[str]) -> int:
    chosen = argv or list(SCENARIOS)
    seen: dict[str, set[str]] = collections.defaultdict(set)
    ioctls: dict[str, set[str]] = collections.defaultdict(set)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        for name in chosen:
            traces: dict[str, Path] = {}

            def wrap(label: str, name: str = name, traces: dict[str, Path] = traces
                     ) -> list[str]:
                traces[label] = directory / f"{name}.{label}.strace"
                return ["strace", "-f", "-qq", "-s", "48", "-o", str(traces[label])]

            outcome = SCENARIOS[name](directory, "log", wrap)
            print(f"{name}: {outcome.problems or 'ok'}", file=sys.stderr)
            for label, trace in traces.items():
                process = label if label in ("backend", "daemon") else "vmm"
                parse(trace, "daemon" if label.startswith("daemon") else process, seen,
                      ioctls)
    union = {"vmm": DENSE_PROCESS_KINDS, "backend": BACKEND_PROCESS_KINDS,
             "daemon": DAEMON_PROCESS_KINDS}
    for label in sorted(seen):
        kinds = union.get(label) or {ThreadKind(label)}
        allowed = set().union(*(ALLOWED[kind] for kind in kinds)) | {"ioctl"}
        requests = set().union(*(IOCTLS[kind] for kind in kinds))
        print(f"== {label}: {len(seen[label])} syscalls")
        print("   used:   ", " ".join(sorted(seen[label])))
        print("   ioctls: ", " ".join(sorted(ioctls[label])))
        print("   MISSING:", " ".join(sorted(seen[label] - allowed)) or "-")
        print("   unused: ", " ".join(sorted(allowed - seen[label])) or "-")
        print("   MISSING ioctls:", " ".join(sorted(ioctls[label] - requests)) or "-")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
