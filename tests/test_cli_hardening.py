"""Hostile or unlucky input at the command line: every failure is one line on stderr
with the right exit status (2 bad input, 1 ``avmm serve`` cannot start), never a
traceback, never a hang and never an unbounded read."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
AVMM = [sys.executable, "-m", "avmm.cli"]
GUEST = REPO / "build" / "guest" / "testguest.elf"

kvm = [pytest.mark.kvm, pytest.mark.guest]


def avmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run avmm; a hang is a failure (TimeoutExpired), not a stuck test run."""
    return subprocess.run([*AVMM, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=REPO)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("avmm: "), result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    return lines[0]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avmm-cli-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(directory: Path, text: str, kernel: Path | None = None) -> Path:
    if kernel is None:
        kernel = directory / "vmlinux"
        if not kernel.exists():
            kernel.write_bytes(b"\x7fELF not booted: the config is refused first")
    path = directory / "vm.toml"
    path.write_text(f'[boot]\nkernel = "{kernel}"\n{text}')
    return path


# -- the config file itself (no KVM needed: refused before anything is built) ------------

def test_up_dev_zero_is_refused_without_reading_it() -> None:
    result = avmm("up", "/dev/zero", timeout=30)
    assert result.returncode == 2
    assert "not a regular file" in one_line(result)


def test_up_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "vm.toml"
    os.mkfifo(fifo)
    result = avmm("up", str(fifo), timeout=30)
    assert result.returncode == 2
    assert "not a regular file" in one_line(result)


def test_up_a_config_over_1_mib_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, "# " + "x" * (1 << 20) + "\n")
    result = avmm("up", str(path))
    assert result.returncode == 2
    assert "at most 1048576" in one_line(result)


@pytest.mark.parametrize("text", [
    "a = " + "[" * 5000 + "]" * 5000 + "\n",
    "a = " + "{b = " * 5000 + "1" + "}" * 5000 + "\n",
    "[machine]\nvcpus = " + "1" * 5000 + "\n",
], ids=["deep-arrays", "deep-inline-tables", "5000-digit-integer"])
def test_up_a_config_the_toml_parser_chokes_on_exits_2(tmp_path: Path, text: str) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(text)
    result = avmm("up", str(path))
    assert result.returncode == 2
    assert "not valid TOML" in one_line(result)


# -- paths in the config -----------------------------------------------------------------

def test_serial_path_that_is_a_fifo_is_refused_naming_the_key(tmp_path: Path) -> None:
    fifo = tmp_path / "serial.log"
    os.mkfifo(fifo)
    path = write_config(tmp_path, f'[serial]\nmode = "file"\npath = "{fifo}"\n')
    result = avmm("up", str(path), timeout=30)
    assert result.returncode == 2
    line = one_line(result)
    assert "serial.path" in line and "FIFO" in line


def test_console_file_that_is_a_socket_is_refused(short_dir: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.fspath(short_dir / "out"))
    try:
        path = write_config(short_dir, f'[console]\nmode = "file"\npath = "{short_dir}/out"\n')
        result = avmm("up", str(path))
    finally:
        listener.close()
    assert result.returncode == 2
    assert "console.path" in one_line(result)


def test_console_socket_over_a_regular_file_is_refused_and_the_file_kept(
        short_dir: Path) -> None:
    precious = short_dir / "console.sock"
    precious.write_text("keep me\n")
    path = write_config(short_dir, f'[console]\nmode = "socket"\npath = "{precious}"\n')
    result = avmm("up", str(path))
    assert result.returncode == 2
    line = one_line(result)
    assert "console.path" in line and "not a socket" in line
    assert precious.read_text() == "keep me\n"


def test_console_socket_path_over_107_bytes_is_refused(short_dir: Path) -> None:
    long_path = short_dir / ("c" * 120 + ".sock")
    path = write_config(short_dir, f'[console]\nmode = "socket"\npath = "{long_path}"\n')
    result = avmm("up", str(path))
    assert result.returncode == 2
    line = one_line(result)
    assert "console.path" in line and "at most 107" in line


# -- files that cannot be booted: bad input, exit 2 ----------------------------------------

def crafted_bzimage() -> bytes:
    """A setup header that claims far more protected-mode code than the file holds."""
    image = bytearray(0x1000)
    image[0x1F1] = 1  # setup_sects
    struct.pack_into("<I", image, 0x1F4, 0x0FFF_FFFF)  # syssize: ~4 GiB
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x201] = 0x6A  # header ends at 0x26c
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)
    struct.pack_into("<H", image, 0x236, 1)  # XLF_KERNEL_64
    return bytes(image)


@pytest.mark.parametrize("kind", ["text", "truncated-elf", "crafted-bzimage"])
@pytest.mark.kvm
@pytest.mark.guest
def test_a_file_that_is_not_a_kernel_exits_2(tmp_path: Path, kind: str) -> None:
    kernel = tmp_path / "kernel"
    if kind == "text":
        kernel.write_text("this is not a kernel\n" * 10)
    elif kind == "truncated-elf":
        kernel.write_bytes(GUEST.read_bytes()[:200])
    else:
        kernel.write_bytes(crafted_bzimage())
    path = write_config(tmp_path, "[machine]\nmemory_mib = 32\nacpi = false\n", kernel)
    result = avmm("up", str(path))
    assert result.returncode == 2, result.stderr
    assert "loading the kernel" in one_line(result)


@pytest.mark.kvm
@pytest.mark.guest
def test_an_initrd_larger_than_ram_exits_2_without_reading_it(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    with initrd.open("wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB for a 32 MiB guest
    path = write_config(tmp_path, f'initrd = "{initrd}"\n[machine]\nmemory_mib = 32\n'
                        "acpi = false\n", GUEST)
    result = avmm("up", str(path))
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert "boot.initrd" in line and "larger than the guest's 32 MiB of RAM" in line


@pytest.mark.kvm
@pytest.mark.guest
def test_an_initrd_that_does_not_fit_exits_2(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(bytes(31 << 20))
    path = write_config(tmp_path, f'initrd = "{initrd}"\n[machine]\nmemory_mib = 32\n'
                        "acpi = false\n", GUEST)
    result = avmm("up", str(path))
    assert result.returncode == 2, result.stderr
    assert "do not fit" in one_line(result)


@pytest.mark.kvm
@pytest.mark.guest
def test_a_command_line_too_long_with_the_profile_words_exits_2(tmp_path: Path) -> None:
    """65,535 bytes fit boot.cmdline, but not with the compat profile's words in front."""
    path = write_config(tmp_path, f'cmdline = "{"x" * 65535}"\n[machine]\nmemory_mib = 32\n'
                        'acpi = false\ncpu_profile = "compat"\n', GUEST)
    result = avmm("up", str(path))
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert "command line is" in line and "compat CPU profile" in line


# -- avmm serve: one line, exit 1 ------------------------------------------------------------

def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return avmm("serve", *args, timeout=60)


def test_serve_failures_are_one_line_and_exit_1(short_dir: Path) -> None:
    regular = short_dir / "regular"
    regular.write_text("")
    (short_dir / "directory").mkdir()
    live = short_dir / "live.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.fspath(live))
    server.listen(1)
    try:
        cases = {
            "unknown group": (["--socket", str(short_dir / "a.sock"), "--group",
                               "no-such-group-avmm", "--allow-any-path"], "unknown group"),
            "regular file": (["--socket", str(regular)], "not a socket"),
            "directory": (["--socket", str(short_dir / "directory")], "not a socket"),
            "missing directory": (["--socket", str(short_dir / "nowhere" / "a.sock")],
                                  "directory not found"),
            "long path": (["--socket", str(short_dir / ("s" * 120))], "too long"),
            "live server": (["--socket", str(live)], "another server is listening"),
            "group without allow-path": (["--socket", str(short_dir / "b.sock"), "--group",
                                          "root"], "--allow-path"),
            "missing allowed directory": (["--socket", str(short_dir / "c.sock"),
                                           "--allow-path", str(short_dir / "nowhere")],
                                          "allowed directory"),
        }
        for case, (args, expected) in cases.items():
            result = serve(*args)
            assert result.returncode == 1, (case, result.stderr)
            assert expected in one_line(result), case
    finally:
        server.close()
    assert regular.read_text() == "" and (short_dir / "directory").is_dir()
