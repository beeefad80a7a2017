"""``avmm receive`` and ``avmm migrate`` against a daemon serving the fake host (any
machine): what they send, what they print (a progress bar on a terminal, plain lines
otherwise, the measured downtime at the end) and their exit status."""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from avmm.api import ApiClient, serve_api
from avmm.api.cli_migration import ProgressView, migrate, receive
from avmm.cli import _parser
from avmm.config import config_from_dict
from tests.api.fake_host import FakeHost, FakeVm


@pytest.fixture
def area() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avmm-cli-mig-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_host() -> FakeHost:
    return FakeHost()


@pytest.fixture
async def api(nursery: trio.Nursery, area: Path, fake_host: FakeHost
              ) -> AsyncIterator[ApiClient]:
    path = await nursery.start(serve_api, fake_host, area / "avmm.sock")
    async with ApiClient(path) as client:
        yield client


def _args(command: str, *argv: str) -> argparse.Namespace:
    return _parser().parse_args([command, *argv])


async def _source(fake_host: FakeHost, area: Path) -> FakeVm:
    kernel = area / "vmlinux"
    kernel.write_bytes(b"\x7fELF fake")
    config = config_from_dict({"boot": {"kernel": str(kernel)},
                               "machine": {"memory_mib": 16}}, base_dir=None)
    return await fake_host.create(config)


async def test_receive_prints_the_new_vm_id(
        api: ApiClient, fake_host: FakeHost, area: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    capsys.readouterr()  # the daemon's start-up log
    (area / "vmlinux").write_bytes(b"\x7fELF fake")
    (area / "vm.toml").write_text('name = "moved"\n[boot]\nkernel = "vmlinux"\n')
    monkeypatch.chdir(area)
    status = await receive(api, _args("receive", "--listen", "unix:in.sock",
                                      "--config", "vm.toml"))
    assert status == 0
    out = capsys.readouterr().out
    [(listen, config, start)] = fake_host.received
    assert out == f"{next(iter(fake_host.vms))}\n"
    # A relative unix: path is this shell's directory; the config's paths are
    # relative to vm.toml.
    assert listen == f"unix:{area}/in.sock"
    assert config is not None and config.name == "moved"
    assert config.boot.kernel == area / "vmlinux"
    assert start
    assert await receive(api, _args("receive", "--listen", "tcp:127.0.0.1:4444",
                                    "--paused")) == 0
    assert fake_host.received[-1] == ("tcp:127.0.0.1:4444", None, False)
    assert fake_host.accept_timeouts == [None, None]


async def test_receive_passes_accept_timeout(api: ApiClient, fake_host: FakeHost,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert await receive(api, _args("receive", "--listen", "tcp:127.0.0.1:4444",
                                    "--accept-timeout", "90")) == 0
    assert fake_host.accept_timeouts == [90.0]
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(SystemExit) as usage:
            _args("receive", "--listen", "tcp:127.0.0.1:4444", "--accept-timeout", bad)
        assert usage.value.code == 2
        assert "--accept-timeout" in capsys.readouterr().err
    assert len(fake_host.received) == 1


async def test_receive_with_a_bad_config_file_exits_2(
        api: ApiClient, fake_host: FakeHost, area: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()  # the daemon's start-up log
    (area / "vm.toml").write_text("[boot\n")
    status = await receive(api, _args("receive", "--listen", "tcp:127.0.0.1:4444",
                                      "--config", str(area / "vm.toml")))
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("avmm: ") and err.count("\n") == 1
    assert fake_host.received == []


async def _drive(vm: FakeVm, *, fail: str | None = None, state: str = "failed") -> None:
    """The engine's side: three rounds, then the hand-over (or a failure)."""
    while not vm.migrations:
        await trio.sleep(0.01)
    for number, (sent, dirty) in enumerate([(4096, 900), (4996, 120), (5116, 8)]):
        vm.progress(state="precopy", round=number, pages_sent=sent, pages_dirty=dirty,
                    bytes_sent=sent * 4100, total_ms=200.0 * (number + 1))
        await trio.sleep(0.6)
    if fail is not None:
        vm.progress(state=state, error=fail)
    else:
        vm.migrated(downtime_ms=37.5)


async def test_migrate_follows_the_rounds_and_prints_the_downtime(
        api: ApiClient, fake_host: FakeHost, area: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Every round must be seen: each lasts 0.6 s, and the CLI looking every 0.25 s could
    # miss one behind a stall of a loaded host; looking every 20 ms it needs a longer one.
    monkeypatch.setattr("avmm.api.cli_migration.POLL_INTERVAL_S", 0.02)
    vm = await _source(fake_host, area)
    capsys.readouterr()  # the daemon's start-up log
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drive, vm)
        status = await migrate(api, _args("migrate", vm.id, "--to", "tcp:127.0.0.1:4444",
                                          "--downtime-ms", "100"))
    assert status == 0
    assert vm.migrations == [("tcp:127.0.0.1:4444", 100)]
    captured = capsys.readouterr()
    # Not a terminal: one plain line per round (no bar, no carriage returns).
    lines = captured.err.splitlines()
    assert "\r" not in captured.err
    rounds = [line for line in lines if line.startswith("precopy, round ")]
    assert [line.split(",")[1].strip() for line in rounds] == ["round 0", "round 1",
                                                               "round 2"]
    assert "MB sent" in rounds[-1]
    assert "dirty rate" in rounds[-1]
    assert captured.out.startswith(f"{vm.id} migrated to tcp:127.0.0.1:4444: downtime "
                                   "37.5 ms")


async def test_migrate_that_fails_exits_1_with_the_reason(
        api: ApiClient, fake_host: FakeHost, area: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    vm = await _source(fake_host, area)
    capsys.readouterr()  # the daemon's start-up log
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _drive(vm, fail="the destination closed the stream"))
        status = await migrate(api, _args("migrate", vm.id, "--to", "tcp:127.0.0.1:4444"))
    assert status == 1
    captured = capsys.readouterr()
    assert "migrated" not in captured.out
    last = captured.err.splitlines()[-1]
    assert last.startswith(f"avmm: migration of {vm.id} to tcp:127.0.0.1:4444 failed: "
                           "the destination closed the stream")


async def test_an_unconfirmed_hand_over_exits_1_saying_the_vm_stays_paused(
        api: ApiClient, fake_host: FakeHost, area: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    vm = await _source(fake_host, area)
    capsys.readouterr()  # the daemon's start-up log
    why = ("the hand-over to tcp:127.0.0.1:4444 is unconfirmed (the migration stream "
           "broke): the guest stays paused here; resume it only if it does not run there")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _drive(vm, fail=why, state="unconfirmed"))
        with trio.fail_after(30):  # it stops following once the state says so
            status = await migrate(api, _args("migrate", vm.id, "--to",
                                              "tcp:127.0.0.1:4444"))
    assert status == 1
    captured = capsys.readouterr()
    assert "migrated" not in captured.out
    last = captured.err.splitlines()[-1]
    assert last == f"avmm: migration of {vm.id} to tcp:127.0.0.1:4444: {why}"
    assert "keeps running" not in captured.err


def test_progress_bar_on_a_terminal_is_redrawn_in_place() -> None:
    out = io.StringIO()
    view = ProgressView(out, tty=True, total_pages=1000)
    view.show({"state": "precopy", "round": 0, "pages_sent": 500, "pages_dirty": 0,
               "bytes_sent": 2_048_000, "total_ms": 100.0})
    view.show({"state": "precopy", "round": 1, "pages_sent": 1100, "pages_dirty": 250,
               "bytes_sent": 4_505_600, "total_ms": 600.0})
    view.end()
    text = out.getvalue()
    frames = text.split("\r\x1b[K")[1:]
    assert len(frames) == 2
    assert frames[0].startswith("[" + "#" * 12 + "-" * 12 + "] precopy, round 0, 2.0 MB")
    # Round 1: a quarter of memory is still dirty, dirtied at 250 pages in 0.5 s.
    assert frames[1].startswith("[" + "#" * 18 + "-" * 6 + "] precopy, round 1, 4.5 MB")
    assert "dirty rate 2.0 MB/s" in frames[1]
    assert text.endswith("\n")
