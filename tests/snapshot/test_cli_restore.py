"""``avmm up --restore``: its command line is checked before anything is opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from avmm.cli import main


@pytest.mark.parametrize("args", [
    ["up"],                                              # neither a config nor --restore
    ["up", "vm.toml", "--restore", "DIR"],               # both
    ["up", "vm.toml", "--copy-memory"],                  # --copy-memory without --restore
    ["up", "vm.toml", "--vhost-user", "blk0=/x.sock"],   # --vhost-user without --restore
    ["up", "--restore", "DIR", "--vhost-user", "blk0"],  # not NAME=SOCKET
    ["up", "--restore", "DIR", "--append", "quiet"],     # a restored command line
])
def test_bad_command_lines_are_one_line_and_exit_2(
        args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("avmm up: ") and "\n" not in err, err
