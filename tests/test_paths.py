"""``PathPolicy``: the files a VM config names are opened without blocking, checked on
the opened fd, and under ``--allow-path`` never outside the allowed directories."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import avmm.paths
from avmm.errors import HostFileError, PathNotAllowedError
from avmm.paths import PathPolicy


@pytest.fixture
def area() -> Iterator[Path]:
    """A short directory (socket paths) with ``allowed/`` and ``outside/`` in it."""
    root = Path(tempfile.mkdtemp(prefix="avmm-paths-", dir="/tmp"))
    (root / "allowed").mkdir()
    (root / "outside").mkdir()
    (root / "outside" / "secret").write_text("secret\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["openat2", "walk"])
def policy(request: pytest.FixtureRequest, area: Path, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[PathPolicy]:
    """A policy allowing ``area/allowed``, with openat2 and with the fallback walk."""
    monkeypatch.setattr(avmm.paths, "_openat2_missing", request.param == "walk")
    policy = PathPolicy([area / "allowed"])
    yield policy
    policy.close()


def test_anywhere_reads_a_file_and_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    policy = PathPolicy()
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"K" * 100)
    assert policy.read_file(kernel, "boot.kernel", max_size=100, limit_text="RAM") == b"K" * 100
    with pytest.raises(HostFileError, match="larger than RAM") as info:
        policy.read_file(kernel, "boot.kernel", max_size=99, limit_text="RAM")
    assert info.value.key == "boot.kernel"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # A blocking open would wait here forever for a writer.
    with pytest.raises(HostFileError, match="a FIFO, not a regular file"):
        policy.read_file(fifo, "boot.initrd", max_size=100, limit_text="RAM")
    with pytest.raises(HostFileError, match="a character device"):
        policy.read_file(Path("/dev/zero"), "boot.initrd", max_size=100, limit_text="RAM")


def test_output_files_truncated_devices_kept_fifos_and_sockets_refused(tmp_path: Path) -> None:
    policy = PathPolicy()
    log = tmp_path / "serial.log"
    log.write_text("old contents\n")
    fd = policy.open_output(log, "serial.path")
    try:
        os.write(fd, b"new\n")
        assert os.get_blocking(fd)  # O_NONBLOCK was only for the open
    finally:
        os.close(fd)
    assert log.read_text() == "new\n"
    fd = policy.open_output(Path("/dev/null"), "serial.path")
    os.close(fd)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(HostFileError, match="FIFO") as info:
        policy.open_output(fifo, "console.path")  # no reader: refused, not waited on
    assert info.value.key == "console.path"
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(HostFileError, match="a FIFO; name a regular file"):
            policy.open_output(fifo, "serial.path")  # with a reader: refused too
    finally:
        os.close(reader)
    with pytest.raises(HostFileError, match="directory"):
        policy.open_output(tmp_path, "serial.path")


def test_a_new_output_file_is_created_0644(tmp_path: Path) -> None:
    fd = PathPolicy().open_output(tmp_path / "new.log", "serial.path")
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "new.log").st_mode) & 0o022 == 0


def test_disks_must_be_regular_files_or_block_devices(tmp_path: Path) -> None:
    policy = PathPolicy()
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    fd = policy.open_disk(disk, "disk[0].path")
    try:
        # The O_PATH fd reopens as the disk itself.
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            assert f.read() == bytes(4096)
    finally:
        os.close(fd)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(HostFileError, match="a FIFO; a disk must be") as info:
        policy.open_disk(fifo, "disk[1].path")
    assert info.value.key == "disk[1].path"


def test_inside_the_allowed_directory_everything_works(policy: PathPolicy, area: Path) -> None:
    allowed = area / "allowed"
    (allowed / "sub").mkdir()
    (allowed / "sub" / "kernel").write_bytes(b"kernel")
    (allowed / "link").symlink_to("sub/kernel")  # relative, stays inside
    assert policy.read_file(allowed / "sub" / "kernel", "boot.kernel", max_size=10,
                            limit_text="RAM") == b"kernel"
    fd = policy.open_output(allowed / "sub" / "serial.log", "serial.path")
    os.close(fd)
    fd = policy.open_directory(allowed / "sub", "snapshot.dir")
    os.close(fd)
    if not avmm.paths._openat2_missing:
        assert policy.read_file(allowed / "link", "boot.kernel", max_size=10,
                                limit_text="RAM") == b"kernel"
    for kind in ("file", "output", "bind", "directory"):
        policy.check(allowed / "sub" / "kernel", "boot.kernel", kind)  # type: ignore[arg-type]
    policy.check(allowed / "sub" / "not-yet.sock", "console.path", "bind")


def test_outside_the_allowed_directory_is_refused_naming_the_key(
        policy: PathPolicy, area: Path) -> None:
    allowed = area / "allowed"
    secret = area / "outside" / "secret"
    with pytest.raises(PathNotAllowedError, match="outside the directories") as info:
        policy.read_file(secret, "boot.initrd", max_size=100, limit_text="RAM")
    assert info.value.key == "boot.initrd"
    with pytest.raises(PathNotAllowedError):
        policy.read_file(Path("/etc/passwd"), "boot.initrd", max_size=1 << 20,
                         limit_text="RAM")
    with pytest.raises(PathNotAllowedError):
        policy.check(Path("/etc/passwd"), "disk[0].path", "file")
    # Not even whether it exists is told: a missing file outside is refused the same way.
    with pytest.raises(PathNotAllowedError):
        policy.check(area / "outside" / "nothing-here", "disk[0].path", "file")
    # '..' and symlinks that lead out: refused by the kernel at the open.
    with pytest.raises(PathNotAllowedError):
        policy.read_file(Path(f"{allowed}/../outside/secret"), "boot.kernel",
                         max_size=100, limit_text="RAM")
    (allowed / "abs").symlink_to(secret)
    (allowed / "rel").symlink_to("../outside/secret")
    (allowed / "dir").symlink_to("../outside")
    for name in ("abs", "rel"):
        with pytest.raises(PathNotAllowedError) as info:
            policy.open_output(allowed / name, "serial.path")
        assert info.value.key == "serial.path"
        with pytest.raises(PathNotAllowedError):
            policy.check(allowed / name, "serial.path", "output")
    assert secret.read_text() == "secret\n"  # never truncated
    with pytest.raises(PathNotAllowedError):
        policy.open_output(allowed / "dir" / "new.log", "serial.path")
    assert not (area / "outside" / "new.log").exists()
    with pytest.raises(PathNotAllowedError):
        policy.open_disk(allowed / "dir" / "secret", "disk[0].path")
    with pytest.raises(PathNotAllowedError):
        policy.bind_socket(allowed / "dir" / "console.sock", "console.path")
    assert not (area / "outside" / "console.sock").exists()
    with pytest.raises(PathNotAllowedError):
        policy.check(allowed / "dir" / "console.sock", "console.path", "bind")
    with pytest.raises(PathNotAllowedError):
        policy.open_directory(allowed / "dir", "snapshot.dir")
    # /proc magic links never lead anywhere.
    with pytest.raises(PathNotAllowedError):
        policy.read_file(Path("/proc/self/root/etc/passwd"), "boot.kernel",
                         max_size=1 << 20, limit_text="RAM")


def test_sockets_connect_to_what_was_checked(policy: PathPolicy, area: Path) -> None:
    allowed = area / "allowed"
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.fspath(allowed / "backend.sock"))
    server.listen(1)
    outside = socket.socket(socket.AF_UNIX)
    outside.bind(os.fspath(area / "outside" / "other.sock"))
    outside.listen(1)
    try:
        address, fd = policy.socket_address(allowed / "backend.sock", "vhost_user[0].socket")
        assert fd is not None
        client = socket.socket(socket.AF_UNIX)
        try:
            client.connect(address)
        finally:
            client.close()
            os.close(fd)
        with pytest.raises(PathNotAllowedError) as info:
            policy.socket_address(area / "outside" / "other.sock", "disk[0].vhost_user")
        assert info.value.key == "disk[0].vhost_user"
        (allowed / "sneaky.sock").symlink_to(area / "outside" / "other.sock")
        with pytest.raises(PathNotAllowedError):
            policy.socket_address(allowed / "sneaky.sock", "net[0].vhost_user")
        (allowed / "plain").write_text("")
        with pytest.raises(HostFileError, match="not a unix socket"):
            policy.socket_address(allowed / "plain", "vhost_user[0].socket")
    finally:
        server.close()
        outside.close()


def test_bind_socket_is_0600_replaces_only_stale_sockets(tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="avmm-bind-", dir="/tmp"))
    try:
        policy = PathPolicy()
        path = directory / "console.sock"
        old_umask = os.umask(0)
        try:
            bound = policy.bind_socket(path, "console.path")
        finally:
            os.umask(old_umask)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        # A live server at the path is refused.
        with pytest.raises(HostFileError, match="another program is listening"):
            policy.bind_socket(path, "console.path")
        bound.close()
        assert not path.exists()
        # A stale socket (its server is gone) is replaced.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(os.fspath(path))
        stale.close()
        bound = policy.bind_socket(path, "console.path")
        bound.close()
        # Anything else is refused and left as it was.
        path.write_text("precious\n")
        with pytest.raises(HostFileError, match="a regular file, not a socket") as info:
            policy.bind_socket(path, "console.path")
        assert info.value.key == "console.path"
        assert path.read_text() == "precious\n"
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(HostFileError, match="a FIFO, not a socket"):
            policy.bind_socket(path, "console.path")
        assert stat.S_ISFIFO(os.lstat(path).st_mode)
        path.unlink()
        # A socket replaced by someone else after we bound it is not removed by us.
        bound = policy.bind_socket(path, "console.path")
        path.unlink()
        other = socket.socket(socket.AF_UNIX)
        other.bind(os.fspath(path))
        bound.close()
        assert path.exists()
        other.close()
        with pytest.raises(HostFileError, match="at most 107"):
            policy.bind_socket(directory / ("x" * 120), "console.path")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_an_allowed_directory_that_cannot_be_opened_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(HostFileError, match="allowed directory"):
        PathPolicy([tmp_path / "missing"])
    (tmp_path / "file").write_text("")
    with pytest.raises(HostFileError, match="allowed directory"):
        PathPolicy([tmp_path / "file"])
