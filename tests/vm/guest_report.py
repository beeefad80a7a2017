"""Reading the test guest's one-line reports (``avmm-testguest: <what> key=value ...``)."""

from __future__ import annotations

GUEST_PREFIX = "avmm-testguest: "


def guest_report(output: str, what: str) -> dict[str, str]:
    """The ``key=value`` words of every line ``avmm-testguest: <what> ...`` in ``output``
    merged in order (a later line's key wins; a bare word maps to ""). Raises
    AssertionError, quoting the output, when there is no such line."""
    fields: dict[str, str] | None = None
    for line in output.splitlines():
        words = line.removeprefix(GUEST_PREFIX).split()
        if line.startswith(GUEST_PREFIX) and words and words[0] == what:
            fields = fields or {}
            fields.update((key, value) for key, _, value in
                          (word.partition("=") for word in words[1:]))
    if fields is None:
        raise AssertionError(f"no {what!r} report in the guest's output: {output!r}")
    return fields
