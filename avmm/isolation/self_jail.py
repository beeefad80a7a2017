"""A command-line process that jails itself (``avmm backend ... --jail-root DIR --uid N
--gid N``), with the same jailer as the daemon's VM workers (:mod:`avmm.isolation.jail`).

Three processes result, as the user sees one:

- the **supervisor** (the PID the user started): stays on the host, passes SIGTERM,
  SIGINT and SIGHUP on, waits, removes the jail directory (which only a process outside
  the jail's mount namespace can) and exits the way the back-end did;
- the jailer's **reaper**, outside the new PID namespace;
- the **back-end**, PID 1 of that namespace, in its root, which drops to the uid/gid once
  its socket is bound (:func:`drop_privileges`, called by the caller).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence

from .jail import (
    Bind,
    JailError,
    JailSpec,
    enter_jail,
    narrow_capabilities,
    prepare_jail_dir,
    remove_jail,
    runtime_binds,
)

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def plan_self_jail(jail_root: str, name: str, uid: int, gid: int, *,
                   binds: Sequence[Bind], devices: Sequence[str] = ()) -> JailSpec:
    """The jail at ``jail_root/name``: the Python runtime and ``binds``, read-only unless
    a bind says otherwise (the spec checks every field as the worker's does)."""
    return JailSpec.from_dict({
        "root": os.path.join(os.path.abspath(jail_root), name),
        "uid": uid, "gid": gid,
        "binds": [{"path": bind.path, "writable": bind.writable}
                  for bind in sorted({*runtime_binds(), *binds},
                                     key=lambda bind: (bind.path, bind.writable))],
        "devices": list(devices), "netns": None, "max_files": 4096,
    })


def jail_self(spec: JailSpec) -> None:
    """Shut this process into ``spec``'s jail (see the module docstring). Returns in the
    jailed process; the supervisor never returns (it exits with the back-end's status).

    :raises JailError: the jail cannot be made (nothing is left behind).
    """
    if os.geteuid() != 0:
        raise JailError("--jail-root needs root (the jailer makes namespaces and mounts, "
                        "then drops to --uid/--gid)")
    prepare_jail_dir(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        remove_jail(spec.root)
        raise
    if pid != 0:
        _supervise(pid, spec.root)  # never returns
    enter_jail(spec)
    narrow_capabilities()


def _supervise(child: int, root: str) -> None:
    code = 1
    try:
        def forward(number: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, number)

        for number in _FORWARDED:
            signal.signal(number, forward)
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
        with contextlib.suppress(JailError, OSError):
            remove_jail(root)
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            with contextlib.suppress(OSError, ValueError):
                signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            code = 128 + number
        else:
            code = os.waitstatus_to_exitcode(status)
    finally:
        os._exit(code)
