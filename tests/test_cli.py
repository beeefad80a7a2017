"""`avmm up` from the outside: exit statuses, messages, the console, log formats."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avmm.cli import main
from tests.vm.helpers import host_profile_words

REPO = Path(__file__).resolve().parent.parent
AVMM = [sys.executable, "-m", "avmm.cli"]
HELLO = REPO / "examples" / "hello.toml"
GUEST = REPO / "build" / "guest" / "testguest.elf"


def avmm(*args: str, timeout: float = 60, stdin: int | None = subprocess.DEVNULL,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AVMM, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=stdin, cwd=REPO)


# -- booting the example --------------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.guest
def test_up_hello_prints_the_greeting_and_exits_zero() -> None:
    result = avmm("up", str(HELLO))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "avmm-testguest: hello",
        f"avmm-testguest: cmdline: {host_profile_words()}console=ttyS0 avmm.test=hello",
    ]


@pytest.mark.kvm
@pytest.mark.guest
def test_up_count_a_billion_iterations_finishes() -> None:
    # Ring 3 runs natively, so 10^9 iterations take about a second; the timeout only
    # guards against a hang.
    result = avmm("up", str(HELLO), "--append", "avmm.test=count avmm.n=1000000000",
                  timeout=120)
    assert result.returncode == 0, result.stderr
    assert "avmm-testguest: count done n=1000000000" in result.stdout


@pytest.mark.kvm
@pytest.mark.guest
def test_up_exits_with_the_debug_exit_status() -> None:
    result = avmm("up", str(HELLO), "--append", "avmm.test=does-not-exist")
    assert result.returncode == (2 << 1) | 1
    assert "unknown scenario does-not-exist" in result.stdout


@pytest.mark.kvm
def test_up_reports_a_crashed_guest_on_one_line(tmp_path: Path) -> None:
    from tests.vm.helpers import tiny_elf

    kernel = tiny_elf(tmp_path / "ud2.elf", b"\x0f\x0b")
    config = tmp_path / "vm.toml"
    config.write_text(f'[boot]\nkernel = "{kernel}"\n[serial]\nmode = "none"\n')
    result = avmm("up", str(config))
    assert result.returncode == 4
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("avmm: the VM stopped: triple-fault")
    assert "rip=0x100000" in last and "0f 0b" in last


# mov al, 123 ; mov dx, 0x440 ; out dx, al     (the boot-time marker)
BOOT_MARKER = bytes.fromhex("b07b 66ba4004 ee")
# mov dx, 0x501 ; xor eax, eax ; out dx, al ; hlt   (debug-exit 0: status 1)
DEBUG_EXIT_0 = bytes.fromhex("66ba0105 31c0 ee f4")
# mov al, 0x34 ; mov dx, 0x600 ; out dx, al   (ACPI sleep control: SLP_EN | S5), then
# mov al, 0x21 ; mov dx, 0x501 ; out dx, al ; hlt   (debug-exit 0x21: status 67), which
# only runs if the power-off write did not end the VM
ACPI_POWEROFF = bytes.fromhex("b034 66ba0006 ee  b021 66ba0105 ee f4")
PAST_POWEROFF_STATUS = (0x21 << 1) | 1


@pytest.mark.kvm
def test_up_boot_time_prints_when_the_marker_arrives(tmp_path: Path) -> None:
    from tests.vm.helpers import tiny_elf

    kernel = tiny_elf(tmp_path / "marker.elf", BOOT_MARKER + DEBUG_EXIT_0)
    config = tmp_path / "vm.toml"
    config.write_text(f'[boot]\nkernel = "{kernel}"\n[serial]\nmode = "none"\n')
    result = avmm("up", "--boot-time", str(config))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if "userspace reached" in line]
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(r"\s*avmm: guest userspace reached \d+\.\d ms after the VM started, "
                        r"\d+\.\d ms after avmm started\s*", lines[0]), lines[0]
    # Without the flag nothing is printed.
    assert "userspace reached" not in avmm("up", str(config)).stderr


@pytest.mark.kvm
def test_up_exits_zero_when_the_guest_powers_off_through_acpi(tmp_path: Path) -> None:
    from tests.vm.helpers import tiny_elf

    kernel = tiny_elf(tmp_path / "off.elf", ACPI_POWEROFF)
    config = tmp_path / "vm.toml"
    config.write_text(f'[boot]\nkernel = "{kernel}"\n[serial]\nmode = "none"\n')
    result = avmm("--log-format", "json", "--log-level", "info", "up", str(config))
    assert result.returncode == 0, result.stderr
    stopped = [json.loads(line) for line in result.stderr.splitlines()
               if '"vm stopped"' in line]
    assert stopped and stopped[0]["reason"] == "poweroff"
    # With acpi = false there are no sleep registers: the write is ignored and the guest
    # goes on to its next instruction, which reports through the debug-exit port that it
    # got past the power-off.
    config.write_text(f'[machine]\nacpi = false\n[boot]\nkernel = "{kernel}"\n'
                      f'[serial]\nmode = "none"\n')
    result = avmm("--log-format", "json", "--log-level", "info", "up", str(config))
    assert result.returncode == PAST_POWEROFF_STATUS, result.stderr
    stopped = [json.loads(line) for line in result.stderr.splitlines()
               if '"vm stopped"' in line]
    assert stopped and stopped[0]["reason"] == "debug-exit"


# mov eax, 0xd8000000 ; jmp rax   (ring 0 jumps into MMIO space: KVM cannot emulate that)
JUMP_INTO_MMIO = bytes.fromhex("b8000000d8 ffe0")


@pytest.mark.kvm
def test_up_exits_4_with_one_line_on_an_emulation_failure(tmp_path: Path) -> None:
    from tests.vm.helpers import tiny_elf

    kernel = tiny_elf(tmp_path / "jump.elf", JUMP_INTO_MMIO)
    config = tmp_path / "vm.toml"
    config.write_text(f'[boot]\nkernel = "{kernel}"\n[serial]\nmode = "none"\n')
    result = avmm("up", str(config))
    assert result.returncode == 4, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("avmm: the VM stopped: internal-error")
    assert "emulation failure" in last and "rip=0xd8000000" in last


@pytest.mark.kvm
@pytest.mark.guest
def test_up_exits_6_with_one_line_when_kvm_refuses() -> None:
    """A host-side failure: in a private mount namespace /dev/kvm is /dev/null, which
    answers KVM's first ioctl with ENOTTY."""
    from tests.prerequisites import require

    require(None if os.geteuid() == 0 else "a private mount namespace needs root")
    require(None if shutil.which("unshare") else "unshare (util-linux) is not installed")
    script = ('mount --bind /dev/null /dev/kvm && exec "$0" -m avmm.cli up "$1"')
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
         sys.executable, str(HELLO)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=REPO)
    assert result.returncode == 6, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("avmm: ") and "/dev/kvm" in lines[0]
    assert "Traceback" not in result.stderr


def console_lines(inputs: list[str]) -> str:
    """What the test guest's ``console`` scenario says on the virtio console."""
    lines = ["hello", *(f"echo {line}" for line in inputs), "bye"]
    return "".join(f"avmm-testguest: console {line}\n" for line in lines)


@pytest.mark.kvm
@pytest.mark.guest
def test_up_with_the_virtio_console_in_console_mode_uses_stdin_and_stdout(
        tmp_path: Path) -> None:
    """``[console] mode = "console"``: the guest's virtio-console output is avmm's
    stdout, and avmm's stdin goes to the console (not to the UART, here silent)."""
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nacpi = false\n[boot]\nkernel = "{GUEST}"\n'
                      f'cmdline = "avmm.test=console"\n[serial]\nmode = "none"\n'
                      f'[console]\nmode = "console"\n')
    inputs = ["typed on stdin", "another line"]
    result = subprocess.run([*AVMM, "up", str(config)], capture_output=True, timeout=60,
                            input="".join(f"{line}\n" for line in [*inputs, "quit"]).encode(),
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == console_lines(inputs)


@pytest.mark.kvm
@pytest.mark.guest
def test_log_format_json_writes_json_lines_on_stderr() -> None:
    result = avmm("--log-format", "json", "--log-level", "info", "up", str(HELLO))
    assert result.returncode == 0
    records = [json.loads(line) for line in result.stderr.splitlines()]
    events = {record["event"] for record in records}
    assert {"vm started", "vm stopped"} <= events
    stopped = next(r for r in records if r["event"] == "vm stopped")
    assert stopped["vm"] == "hello"
    assert stopped["reason"] == "reset"


@pytest.mark.kvm
@pytest.mark.guest
def test_ctrl_a_x_on_the_console_stops_the_vm_and_restores_the_terminal() -> None:
    pid, fd = pty.fork()
    if pid == 0:  # child: avmm on a terminal, running a guest that would count for hours
        os.chdir(REPO)
        os.execv(sys.executable, [*AVMM, "up", str(HELLO), "--append",
                                  "avmm.test=count avmm.n=100000000000000"])
    import termios

    try:
        # Wait for it to start and switch the terminal mode (a loaded host can take
        # seconds; a fixed sleep raced with it).
        deadline = time.monotonic() + 30
        while termios.tcgetattr(fd)[3] & termios.ECHO and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    os.read(fd, 4096)
                except OSError:
                    pass
        attrs_running = termios.tcgetattr(fd)
        os.write(fd, b"\x01x")
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            select.select([fd], [], [], 0.1)
            try:
                os.read(fd, 4096)
            except OSError:
                pass
        else:
            os.kill(pid, 9)
            pytest.fail("avmm did not stop on Ctrl-A x")
        assert status is not None and os.waitstatus_to_exitcode(status) == 0
        # While the console ran, the terminal had no echo and no line editing.
        assert not attrs_running[3] & termios.ECHO
        assert not attrs_running[3] & termios.ICANON
    finally:
        os.close(fd)


# -- bad input ------------------------------------------------------------------------

def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vm.toml"
    path.write_text(text)
    return path


KERNEL_LINE = f'kernel = "{GUEST}"'

BAD_CONFIGS = [
    ("syntax", "[machine\nvcpus = 1\n", "not valid TOML"),
    ("unknown table", f"[boot]\n{KERNEL_LINE}\n[machin]\n", "machin"),
    ("unknown key", f"[machine]\nvcpu = 2\n[boot]\n{KERNEL_LINE}\n", "machine.vcpu"),
    ("vcpus string", f'[machine]\nvcpus = "two"\n[boot]\n{KERNEL_LINE}\n', "machine.vcpus"),
    ("vcpus bool", f"[machine]\nvcpus = true\n[boot]\n{KERNEL_LINE}\n", "machine.vcpus"),
    ("vcpus zero", f"[machine]\nvcpus = 0\n[boot]\n{KERNEL_LINE}\n", "machine.vcpus"),
    ("memory", f"[machine]\nmemory_mib = 4\n[boot]\n{KERNEL_LINE}\n", "machine.memory_mib"),
    ("profile", f'[machine]\ncpu_profile = "fast"\n[boot]\n{KERNEL_LINE}\n',
     "machine.cpu_profile"),
    ("no boot", "[machine]\nvcpus = 1\n", "boot"),
    ("no kernel", "[boot]\ncmdline = \"x\"\n", "boot.kernel"),
    ("kernel missing", '[boot]\nkernel = "nowhere/vmlinux"\n', "boot.kernel"),
    ("initrd missing", f'[boot]\n{KERNEL_LINE}\ninitrd = "nowhere.img"\n', "boot.initrd"),
    ("cmdline type", f"[boot]\n{KERNEL_LINE}\ncmdline = 3\n", "boot.cmdline"),
    ("serial mode", f'[boot]\n{KERNEL_LINE}\n[serial]\nmode = "tty"\n', "serial.mode"),
    ("serial path", f'[boot]\n{KERNEL_LINE}\n[serial]\nmode = "file"\n', "serial.path"),
    ("machine scalar", f"machine = 3\n[boot]\n{KERNEL_LINE}\n", "machine"),
]


@pytest.mark.parametrize(("case", "text", "key"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, text: str, key: str,
) -> None:
    path = _write(tmp_path, text)
    assert main(["up", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"avmm: {path}")
    assert key in lines[0]
    assert "Traceback" not in captured.err


def test_bad_config_through_the_real_command(tmp_path: Path) -> None:
    path = _write(tmp_path, f"[machine]\nvcpus = 0\n[boot]\n{KERNEL_LINE}\n")
    result = avmm("up", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "machine.vcpus" in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", str(tmp_path / "absent.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
