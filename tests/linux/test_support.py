"""The helpers that read a Linux guest's console (no guest is booted here)."""

from __future__ import annotations

from tests.linux.support import linux_lines


def test_a_kernel_message_inside_a_line_is_taken_out_and_the_line_joined() -> None:
    # As a jailed worker's run printed it (make test-linux): the kernel's report of the
    # child's fault landed inside the line the child had written just before.
    text = ("avmm-linux: syscall-fault ordinary pid=75 exit=75\r\n"
            "avmm-linux: sysc[   61.778056] traps: avmm-syscall-fa[76] general protection "
            "fault ip:40145c sp:7ffc9aecf860 error:0 in avmm-syscall-fault[401000+1000]\r\n"
            "all-fault genuine returned ret=76 flags=0x202\r\n"
            "avmm-linux: syscall-fault genuine pid=76 signal=11\r\n"
            "[   61.911009] avmm-syscall-fa[77]: segfault at ffffffff81400040\r\n"
            "avmm-linux: exit=0\r\n")
    assert linux_lines(text) == [
        "avmm-linux: syscall-fault ordinary pid=75 exit=75",
        "avmm-linux: syscall-fault genuine returned ret=76 flags=0x202",
        "avmm-linux: syscall-fault genuine pid=76 signal=11",
        "avmm-linux: exit=0",
    ]


def test_lines_without_kernel_messages_are_kept_as_they_are() -> None:
    text = "[    0.000000] Linux version 6.1\navmm-linux: ready\navmm-linux: cpus=2\n"
    assert linux_lines(text) == ["avmm-linux: ready", "avmm-linux: cpus=2"]
