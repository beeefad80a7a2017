"""The examples shipped in examples/ keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.helpers import host_profile_words

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.kvm
@pytest.mark.guest
def test_embed_runs_two_vms_concurrently_each_with_its_own_output() -> None:
    result = subprocess.run([sys.executable, str(REPO / "examples" / "embed.py")],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    greeter, counter = out.split("greeter: ")[1], out.split("greeter: ")[0]
    assert counter.startswith("counter: reset (exit status 0)")
    assert "avmm-testguest: count done n=200000000" in counter
    assert "greeting=from-the-first-vm" not in counter
    assert greeter.startswith("reset (exit status 0)")
    assert ("avmm-testguest: cmdline: " + host_profile_words()
            + "console=ttyS0 avmm.test=hello greeting=from-the-first-vm") in greeter
    assert "count done" not in greeter
    assert result.stderr == ""


def test_hello_toml_is_a_valid_config() -> None:
    from avmm import load_config

    config = load_config(REPO / "examples" / "hello.toml")
    assert config.boot.kernel.name == "testguest.elf"
    assert "avmm.test=hello" in config.boot.cmdline


@pytest.mark.kvm
@pytest.mark.guest
def test_virtio_example_reads_its_disk_end_to_end() -> None:
    import zlib

    disk = REPO / "build" / "examples" / "disk.img"
    subprocess.run(["make", "-s", "example-disk"], cwd=REPO, check=True, timeout=60)
    for scenario, expected in [
        ("blk-crc", f"avmm-testguest: blk0 sectors={disk.stat().st_size // 512} "
                    f"crc32={zlib.crc32(disk.read_bytes()):08x}"),
        ("rng", "avmm-testguest: rng0 "),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "avmm.cli", "up", str(REPO / "examples" / "virtio.toml"),
             "--append", f"avmm.test={scenario}"],
            capture_output=True, text=True, timeout=120, cwd=REPO, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout


@pytest.mark.kvm
@pytest.mark.guest
@pytest.mark.qemu
def test_vhost_user_blk_example_with_qemu_storage_daemon() -> None:
    import os
    import time
    import zlib

    subprocess.run(["make", "-s", "example-disk"], cwd=REPO, check=True, timeout=60)
    disk = REPO / "build" / "examples" / "disk.img"
    sock = Path("/tmp/avmm-blk.sock")
    if sock.exists():
        sock.unlink()
    daemon = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev",
         f"driver=file,node-name=disk,filename={disk}", "--export",
         f"type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={sock},"
         "writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert daemon.poll() is None, daemon.communicate()[1].decode()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        result = subprocess.run(
            [sys.executable, "-m", "avmm.cli", "up",
             str(REPO / "examples" / "vhost-user-blk.toml")],
            capture_output=True, text=True, timeout=120, cwd=REPO, stdin=subprocess.DEVNULL)
    finally:
        daemon.terminate()
        daemon.communicate(timeout=10)
        if os.path.exists(sock):
            os.unlink(sock)
    crc = zlib.crc32(disk.read_bytes())
    assert result.returncode == 0, result.stderr
    assert f"blk0 sectors={disk.stat().st_size // 512} crc32={crc:08x}" in result.stdout


@pytest.mark.kvm
@pytest.mark.guest
def test_service_runs_vms_on_demand_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    import signal
    import socket

    sock_path = tmp_path / "service.sock"
    service = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "service.py"), "--socket", str(sock_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert service.stdout is not None
        assert service.stdout.readline() == f"listening on {sock_path}\n"
        assert sock_path.stat().st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(60)
            client.connect(str(sock_path))
            client.sendall(b"run hello greeting=from-the-test\nrun fault\nrun bad/word\n"
                           b"quit\n")
            reply = b""
            while data := client.recv(4096):
                reply += data
        service.send_signal(signal.SIGTERM)
        out, err = service.communicate(timeout=60)
    finally:
        if service.poll() is None:
            service.kill()
            service.communicate()
    lines = reply.decode().splitlines()
    assert "avmm-testguest: hello" in lines
    assert lines[lines.index("avmm-testguest: hello") + 2] == "exit reset 0"
    assert "greeting=from-the-test" in lines[lines.index("avmm-testguest: hello") + 1]
    assert "exit debug-exit 7" in lines  # the fault scenario's exception exit (code 3)
    assert lines[-1].startswith("error: words may only hold")
    assert service.returncode == 0, err
    assert out == "SIGTERM: stopping every VM\n"
    assert not sock_path.exists()


@pytest.mark.parametrize("name", ["linux.toml", "linux-debian.toml"])
def test_linux_examples_are_valid_configs(name: str) -> None:
    """The Linux examples parse, use ACPI (their kernels find devices there) and point at
    what `make linux-kernel linux-initramfs` / `make debian-kernel linux-debian` build."""
    from avmm import load_config

    config = load_config(REPO / "examples" / name)
    assert config.machine.acpi and config.machine.vcpus == 2
    assert config.boot.initrd is not None
    built = {"linux.toml": ("linux/bzImage", "linux/initramfs.cpio"),
             "linux-debian.toml": ("debian-kernel/vmlinuz", "debian-kernel/initramfs.cpio")}
    kernel, initrd = built[name]
    assert config.boot.kernel.resolve() == REPO / "build" / kernel
    assert config.boot.initrd.resolve() == REPO / "build" / initrd
    assert len(config.disks) == 1 and len(config.nets) == 1 and config.rng is not None
