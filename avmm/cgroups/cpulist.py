"""Host CPU lists as the kernel writes them ("0-3,6"): parse, check, format."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Final

__all__ = ["CpuListError", "format_cpu_list", "parse_cpu_list", "usable_cpus"]

#: More host CPUs than any machine avmm runs on; bounds what a hostile list may expand to.
_CPU_MAX: Final = 8192
_RANGE: Final = re.compile(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?")


class CpuListError(ValueError):
    """A CPU list that cannot be read; the message says why (the config adds the key)."""


def usable_cpus() -> frozenset[int]:
    """The host CPUs this process may run on (what sched_setaffinity accepts)."""
    return frozenset(os.sched_getaffinity(0))


def parse_cpu_list(value: object, *, usable: Iterable[int] | None = None) -> tuple[int, ...]:
    """``"0-1,3"`` or ``[0, 1, 3]`` → ``(0, 1, 3)`` (sorted, no duplicates).

    :raises CpuListError: malformed, empty, or naming a CPU outside ``usable`` (default:
        :func:`usable_cpus`).
    """
    cpus: set[int] = set()
    allowed = usable_cpus() if usable is None else frozenset(usable)
    if isinstance(value, str):
        # Bounded before anything is expanded: a list of many wide ranges must not cost
        # the daemon seconds of CPU (the parse holds the GIL).
        if len(value) > MAX_TEXT:
            raise CpuListError(f"a CPU list of {len(value)} characters is too long (at most "
                               f"{MAX_TEXT})")
        if not value.strip():
            raise CpuListError("expected a CPU list such as \"0-1,3\", got an empty string")
        top = max(allowed, default=-1)
        for part in value.split(","):
            match = _RANGE.fullmatch(part)
            if match is None:
                raise CpuListError(f"cannot read {part.strip()!r} as a CPU or a range "
                                   "such as \"2-5\"")
            low = int(match[1])
            high = int(match[2]) if match[2] is not None else low
            if high < low or high >= _CPU_MAX:
                raise CpuListError(f"range {part.strip()!r} is backwards or too large")
            if high > top:
                beyond = format_cpu_list(range(max(low, top + 1), high + 1))
                raise CpuListError(f"CPU {beyond} is not one this host lets avmm use "
                                   f"(usable: {format_cpu_list(allowed)})")
            cpus.update(range(low, high + 1))
    elif isinstance(value, list | tuple):
        if not value:
            raise CpuListError("expected at least one CPU, got an empty list")
        if len(value) > _CPU_MAX:
            raise CpuListError(f"a list of {len(value)} CPUs is too long (at most {_CPU_MAX})")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < _CPU_MAX:
                raise CpuListError(f"expected CPU numbers (integers from 0), got {item!r}")
            cpus.add(item)
    else:
        raise CpuListError("expected a CPU list: a string such as \"0-1,3\" or a list of "
                           "integers")
    missing = sorted(cpus - allowed)
    if missing:
        raise CpuListError(f"CPU {format_cpu_list(missing)} is not one this host lets avmm "
                           f"use (usable: {format_cpu_list(allowed)})")
    return tuple(sorted(cpus))


#: The longest CPU list in text form (about a thousand CPUs or ranges).
MAX_TEXT = 4096


def format_cpu_list(cpus: Iterable[int]) -> str:
    """``(0, 1, 3)`` → ``"0-1,3"``."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        start = end = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == end + 1:
            index += 1
            end = ordered[index]
        parts.append(str(start) if start == end else f"{start}-{end}")
        index += 1
    return ",".join(parts)
