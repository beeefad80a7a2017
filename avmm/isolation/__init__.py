"""Isolation (README, "Isolation and security"): seccomp filters per thread kind
(``seccomp``, ``syscalls``), the jailer (``jail``, ``self_jail``), and per-VM worker
processes for ``avmm serve --isolation process`` (``worker``, ``worker_vm``, their
``channel``, and the ``spawner`` that starts them)."""

from .seccomp import SECCOMP_MODES as SECCOMP_MODES
from .seccomp import SeccompError as SeccompError
from .seccomp import SeccompMode as SeccompMode
from .seccomp import build_filter as build_filter
from .seccomp import install_process_filter as install_process_filter
from .seccomp import install_thread_filter as install_thread_filter
from .seccomp import thread_filter_mode as thread_filter_mode
from .syscalls import ThreadKind as ThreadKind
