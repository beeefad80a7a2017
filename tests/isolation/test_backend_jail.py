"""``avmm backend ... --jail-root DIR --uid N --gid N``: a vhost-user back-end shut into
the same jail as the daemon's VM workers, serving a guest as before."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from avmm import StopReason
from tests.prerequisites import require
from tests.vhost.test_frontend import avmm_backend, blk_config, run
from tests.virtio_guest_support import expected_pattern

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

UID = 64450


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


async def test_a_jailed_blk_backend_serves_a_guest_as_an_unprivileged_filtered_process(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        require("a jailed back-end needs root (namespaces, mounts, a jail uid)")
    sectors = 2048
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(sectors * 512))
    secret = tmp_path / "secret.txt"
    secret.write_text("the back-end has no business here")
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    sock = sockets / "blk.sock"
    jail_root = tmp_path / "jail"
    seed = int.from_bytes(os.urandom(4), "little")
    with avmm_backend("blk", sock, "--image", str(image), "--jail-root", str(jail_root),
                      "--uid", str(UID), "--gid", str(UID), "--seccomp", "kill") as process:
        # The supervisor (started here) → the jailer's reaper → the back-end (PID 1 of
        # its own PID namespace).
        reaper, = _children(process.pid)
        backend, = _children(reaper)
        jail, = jail_root.iterdir()
        assert jail.name == f"backend-{process.pid}"
        result, output, _ = await run(blk_config(f"avmm.test=blk-write avmm.seed={seed}",
                                                 sock))
        assert f"blk0 written={sectors} verify=ok" in output, output
        assert result.reason is StopReason.RESET
        status = _status(backend)
        assert status["Uid"].split() == [str(UID)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(UID)] * 4, status["Gid"]
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        assert status["NSpid"].split()[-1] == "1"
        root = Path(f"/proc/{backend}/root")
        assert (root / image.relative_to("/")).is_file()
        assert not (root / secret.relative_to("/")).exists()
        assert sorted(os.listdir(root / tmp_path.relative_to("/"))) == ["disk.img",
                                                                       "sockets"]
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            code = await trio.to_thread.run_sync(process.wait)
        assert code == 0, process.stderr.read() if process.stderr else code
    assert image.read_bytes() == expected_pattern(seed, sectors)
    assert list(jail_root.iterdir()) == []  # the supervisor removed the jail
    assert not sock.exists() or sock.is_socket()


@pytest.mark.parametrize("flags", [["--jail-root", "/tmp/j"], ["--uid", "5", "--gid", "5"]])
def test_jail_flags_go_together(tmp_path: Path, flags: list[str]) -> None:
    from tests.vhost.test_frontend import REPO

    result = subprocess.run(
        [*_avmm(), "backend", "rng", "--socket", str(tmp_path / "rng.sock"), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2  # bad input, as a bad config
    assert "--jail-root, --uid and --gid go together" in result.stderr


def _avmm() -> list[str]:
    import sys

    return [sys.executable, "-m", "avmm.cli"]


def _jailed(process_pid: int) -> dict[str, str]:
    """The status of the back-end the supervisor ``process_pid`` jailed (supervisor →
    the jailer's reaper → the back-end)."""
    reaper, = _children(process_pid)
    backend, = _children(reaper)
    return _status(backend)


def _check_confined(status: dict[str, str]) -> None:
    assert status["Uid"].split() == [str(UID)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(UID)] * 4, status["Gid"]
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert status["NSpid"].split()[-1] == "1"
    assert int(status["CapEff"], 16) == 0, status["CapEff"]


def _jail_flags(tmp_path: Path) -> list[str]:
    """The flags that jail a back-end under ``tmp_path``, filters in kill mode (root
    needed: namespaces, mounts, a jail uid)."""
    if os.geteuid() != 0:
        require("a jailed back-end needs root (namespaces, mounts, a jail uid)")
    (tmp_path / "sockets").mkdir()
    return ["--jail-root", str(tmp_path / "jail"), "--uid", str(UID), "--gid", str(UID),
            "--seccomp", "kill"]


async def test_a_jailed_rng_backend_serves_a_guest(tmp_path: Path) -> None:
    from tests.vhost.test_frontend import check_rng_output, rng_config

    flags = _jail_flags(tmp_path)
    sock = tmp_path / "sockets" / "rng.sock"
    with avmm_backend("rng", sock, *flags) as process:
        result, output, _ = await run(rng_config(sock))
        check_rng_output(result, output)
        assert process.poll() is None, "the back-end died serving the guest"
        # Once it has served (its filter comes after its socket, which the test waits
        # for), as it stands while it serves.
        status = _jailed(process.pid)
    _check_confined(status)


@pytest.mark.net
async def test_a_jailed_net_backend_serves_a_guest(tmp_path: Path) -> None:
    import dataclasses

    from avmm.config import NetConfig
    from tests.virtio_guest_support import echoing_tap
    from tests.vm.helpers import guest_config

    flags = _jail_flags(tmp_path)
    sock = tmp_path / "sockets" / "net.sock"
    with echoing_tap() as (namespace, _echoer), \
            avmm_backend("net", sock, "--tap", namespace.tap, *flags,
                         prefix=namespace.command_prefix()) as process:
        config = dataclasses.replace(
            guest_config("avmm.test=net-echo avmm.n=20 avmm.size=256", memory_mib=64),
            nets=(NetConfig(vhost_user=sock, mac=bytes.fromhex("525400abcdef")),))
        result, output, _ = await run(config)
        assert "net0 echoed=20" in output, output
        assert result.reason is StopReason.RESET
        assert process.poll() is None, "the back-end died serving the guest"
        status = _jailed(process.pid)
    _check_confined(status)
