"""The daemon's socket: its mode, who may own it, stale and live predecessors, cleanup."""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from avmm.api import ApiClient, DaemonError, serve_api
from tests.prerequisites import require

from .fake_host import FakeHost


async def _serve(nursery: trio.Nursery, path: Path, **kwargs: object) -> trio.Event:
    """Start a server on ``path``; set the returned event to stop it."""
    shutdown = trio.Event()
    await nursery.start(lambda task_status: serve_api(
        FakeHost(), path, shutdown=shutdown, task_status=task_status, **kwargs))
    return shutdown


async def test_socket_mode_is_0600(nursery: trio.Nursery, socket_dir: Path) -> None:
    path = socket_dir / "avmm.sock"
    previous = os.umask(0)  # a permissive umask must not leak into the socket's mode
    try:
        await _serve(nursery, path)
    finally:
        os.umask(previous)
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()


async def test_binding_leaves_the_process_umask_alone(nursery: trio.Nursery, socket_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The umask is process-wide: a daemon that changed it around bind(2) would give
    files other threads create meanwhile (a VM's serial log, a snapshot) its mode."""
    calls: list[int] = []
    real_umask = os.umask

    def recording_umask(mask: int) -> int:
        calls.append(mask)
        return real_umask(mask)

    monkeypatch.setattr(os, "umask", recording_umask)
    path = socket_dir / "avmm.sock"
    await _serve(nursery, path)
    assert calls == []
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_group_option_gives_the_group_0660(nursery: trio.Nursery,
                                                 socket_dir: Path) -> None:
    """The socket belongs to a group the daemon is not running as (so the daemon must
    chown it: only root may give a file to a group it is not in), with mode 0660:
    nothing for others, whatever the umask."""
    require(None if os.geteuid() == 0 else
            "giving the socket to a group the daemon is not in needs root")
    others = [group for group in grp.getgrall() if group.gr_gid != os.getegid()]
    require(None if others else "this host has no group besides the daemon's own")
    group = others[0]
    path = socket_dir / "avmm.sock"
    previous = os.umask(0)  # a permissive umask must not widen the mode
    try:
        await _serve(nursery, path, group=group.gr_name)
    finally:
        os.umask(previous)
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode)
    assert info.st_gid == group.gr_gid != os.getegid()
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_uid == os.geteuid()


async def test_the_socket_appears_only_listening_and_with_its_final_mode(
        nursery: trio.Nursery, socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sees the socket file (the usual sign that the daemon is up) can
    connect at once and never meets the mode of a moment before: the daemon makes it at
    a temporary name and links it into place last. Checked at that link: nothing at the
    path yet, and the socket being linked listens and has its final mode."""
    path = socket_dir / "avmm.sock"
    seen: list[tuple[bool, int, bool]] = []
    real_link = os.link

    def checking_link(source: str | os.PathLike[str], target: str | os.PathLike[str],
                      **kwargs: object) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fsencode(source))
            listening = True
        except ConnectionRefusedError:
            listening = False
        finally:
            probe.close()
        seen.append((listening, stat.S_IMODE(os.stat(source).st_mode),
                     os.path.lexists(target)))
        real_link(source, target, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", checking_link)
    await _serve(nursery, path)
    assert seen == [(True, 0o600, False)]
    assert sorted(p.name for p in socket_dir.iterdir()) == ["avmm.sock"]  # no temporary
    async with ApiClient(path) as api:
        assert await api.list_vms() == []


async def test_a_socket_file_swapped_for_a_symlink_hands_nothing_over(
        socket_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone who can write the socket's directory replaces the socket file, right
    after bind(2), with a symlink to another file: the daemon's chmod (and, with
    --group, its chown) must not follow it. It refuses to start and the file is as it
    was."""
    target = tmp_path / "elsewhere"
    target.write_text("not the daemon's")
    target.chmod(0o644)

    class SwappedAfterBind(socket.socket):
        def bind(self, address: object) -> None:
            super().bind(address)  # type: ignore[arg-type]
            bound = os.fsdecode(address)  # type: ignore[arg-type]
            os.unlink(bound)
            os.symlink(target, bound)

    monkeypatch.setattr(socket, "socket", SwappedAfterBind)
    # (A daemon that followed the symlink would start serving: bounded, to fail.)
    with trio.fail_after(10), pytest.raises(DaemonError,
                                            match="no longer the socket just bound"):
        await serve_api(FakeHost(), socket_dir / "avmm.sock")
    monkeypatch.undo()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_text() == "not the daemon's"
    assert sorted(p.name for p in socket_dir.iterdir()) == []  # nothing left behind


async def test_a_path_too_long_for_a_temporary_name_is_bound_in_place(
        nursery: trio.Nursery, socket_dir: Path) -> None:
    """At sun_path's limit (107 bytes) the temporary name would not fit: the socket is
    bound at its path directly, as it was before temporary names."""
    name = "s" * (107 - len(os.fsencode(socket_dir)) - 1)
    path = socket_dir / name
    assert len(os.fsencode(path)) == 107
    await _serve(nursery, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with ApiClient(path) as api:
        assert await api.list_vms() == []


async def test_unknown_group_is_refused(socket_dir: Path) -> None:
    with pytest.raises(DaemonError, match="unknown group"):
        await serve_api(FakeHost(), socket_dir / "avmm.sock", group="no-such-group-avmm")
    assert not (socket_dir / "avmm.sock").exists()


async def test_socket_is_removed_on_shutdown(nursery: trio.Nursery, socket_dir: Path) -> None:
    path = socket_dir / "avmm.sock"
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[Path]) -> None:
        await serve_api(FakeHost(), path, shutdown=shutdown, task_status=task_status)
        done.set()

    shutdown = trio.Event()
    await nursery.start(run)
    async with ApiClient(path) as api:
        assert await api.list_vms() == []
    shutdown.set()
    await done.wait()
    assert not path.exists()


async def test_stale_socket_is_replaced(nursery: trio.Nursery, socket_dir: Path) -> None:
    path = socket_dir / "avmm.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening, then closed: what a killed daemon leaves
    stale.close()
    await _serve(nursery, path)
    async with ApiClient(path) as api:
        assert await api.list_vms() == []


async def test_live_server_is_not_replaced(nursery: trio.Nursery, socket_dir: Path) -> None:
    path = socket_dir / "avmm.sock"
    await _serve(nursery, path)
    inode = os.stat(path).st_ino
    with pytest.raises(DaemonError, match="another server is listening"):
        await serve_api(FakeHost(), path)
    assert os.stat(path).st_ino == inode
    async with ApiClient(path) as api:
        assert await api.list_vms() == []


async def test_other_file_at_the_path_is_refused(socket_dir: Path) -> None:
    path = socket_dir / "avmm.sock"
    path.write_text("not a socket")
    with pytest.raises(DaemonError, match="is not a socket"):
        await serve_api(FakeHost(), path)
    assert path.read_text() == "not a socket"


async def test_missing_directory_is_refused(socket_dir: Path) -> None:
    with pytest.raises(DaemonError, match="directory not found"):
        await serve_api(FakeHost(), socket_dir / "missing" / "avmm.sock")


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from avmm.api import default_socket_path

    monkeypatch.delenv("AVMM_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert default_socket_path() == Path("/run/avmm.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket_path() == Path("/run/user/1000/avmm.sock")
    monkeypatch.setenv("AVMM_SOCKET", "/tmp/x.sock")
    assert default_socket_path() == Path("/tmp/x.sock")
