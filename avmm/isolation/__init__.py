"""Isolation: seccomp filters per thread kind (the jailer and per-VM workers of issue 14
come later; see README, Isolation and security)."""

from .seccomp import SECCOMP_MODES as SECCOMP_MODES
from .seccomp import SeccompError as SeccompError
from .seccomp import SeccompMode as SeccompMode
from .seccomp import build_filter as build_filter
from .seccomp import install_process_filter as install_process_filter
from .seccomp import install_thread_filter as install_thread_filter
from .seccomp import thread_filter_mode as thread_filter_mode
from .syscalls import ThreadKind as ThreadKind
