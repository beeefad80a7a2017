"""What `avmm up` and `avmm --help` import: start-up time is mostly imports, so the
heavy modules (rich, the API server, HTTP, migration) must stay off paths that do not use
them. Each check runs in a fresh interpreter: this test process has imported everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from avmm.cli import _command_of

REPO = Path(__file__).resolve().parent.parent
HELLO = REPO / "examples" / "hello.toml"

#: Never imported by `avmm up` for a config that does not use them.
NOT_ON_THE_UP_PATH = (
    "rich",
    "pygments",
    "hypercorn",
    "httpx",
    "avmm.api._server",
    "avmm.api.cli",
    "avmm.api.client",
    "avmm.host",
    "avmm.migration.source",
    "avmm.migration.destination",
    "avmm.migration.stream",
    "avmm.migration.transport",
    "avmm.vhost.cli",
    "avmm.vhost.frontend",
    "avmm.vhost.backend",
    "avmm.isolation.worker",
    "avmm.isolation.jail",
    # The state model: only a snapshot, a restore or a migration needs it.
    "avmm.state.machine",
    "avmm.state.vcpu",
    "avmm.state.platform",
    "avmm.state.snapshot",
    "avmm.state.memory_file",
    "avmm.state.vm_state",
    # The codec itself (its encoder and decoder); state classes take their integer
    # widths from avmm.state._widths.
    "avmm.state.codec",
    # Suggestions for a misspelt config key, imported when one is misspelt.
    "difflib",
    # construct (and the pdb it imports): the boot formats are struct layouts
    # (avmm._packed) and the codec's construct declaration waits for a snapshot.
    "construct",
    "pdb",
    "avmm.state._wire",
    # Devices the hello guest's config does not have.
    "avmm.virtio.blk",
    "avmm.virtio.net",
    "avmm.virtio.rng",
    "avmm.virtio.console",
)

#: `avmm --help` builds every subcommand's parser, but boots nothing. (avmm.config is
#: imported: avmm.api.cli_limits takes its checks from it.)
NOT_ON_THE_HELP_PATH = ("rich", "hypercorn", "httpx", "avmm.vm", "avmm.state",
                        "avmm.migration.source", "avmm.api._server")


def _modules_after(code: str, *argv: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (which sees
    ``argv`` as sys.argv[1:])."""
    code += "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                            text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_up_imports_none_of_the_heavy_modules() -> None:
    # What main() and _cmd_up/_run_up import before the VM runs (the boot itself needs
    # /dev/kvm: see the test below for the whole run).
    modules = _modules_after(
        "import sys\n"
        "from avmm.cli import _command_of, _parser\n"
        "args = _parser(only_up=_command_of(sys.argv[1:]) == 'up').parse_args(sys.argv[1:])\n"
        "from avmm.config import load_config\n"
        "config = load_config(args.config)\n"
        "from avmm.vm import VirtualMachine\n",
        "up", str(HELLO))
    assert "avmm.vm" in modules  # the check ran where it matters
    assert sorted(modules.intersection(NOT_ON_THE_UP_PATH)) == []


def test_a_vm_with_a_disk_does_not_bring_construct_back() -> None:
    # The hello config has no disk; virtio-blk's config space is a struct layout too.
    modules = _modules_after(
        "from avmm.vm import VirtualMachine\n"
        "from avmm.virtio.blk import BlockConfig\n"
        "assert len(BlockConfig.build(capacity=1)) == 60\n")
    assert "avmm.virtio.blk" in modules
    assert sorted(modules.intersection({"construct", "pdb", "avmm.state._wire"})) == []


def test_help_imports_neither_the_vm_nor_the_state_model() -> None:
    modules = _modules_after(
        "from avmm.cli import _parser\n"
        "help_text = _parser().format_help()\n"
        "assert 'serve' in help_text and 'backend' in help_text, help_text\n")
    assert "avmm.api.cli" in modules
    assert sorted(modules.intersection(NOT_ON_THE_HELP_PATH)) == []


@pytest.mark.kvm
@pytest.mark.guest
def test_a_whole_up_run_imports_none_of_the_heavy_modules() -> None:
    # The real command, seccomp filters included: the modules are listed at exit.
    code = ("import atexit, json, sys\n"
            "atexit.register(lambda: print('MODULES ' + json.dumps(sorted(sys.modules)), "
            "file=sys.stderr))\n"
            "from avmm.cli import main\n"
            "sys.exit(main())\n")
    result = subprocess.run([sys.executable, "-c", code, "up", str(HELLO)],
                            capture_output=True, text=True, timeout=60, cwd=REPO,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "avmm-testguest: hello" in result.stdout
    listing = [line for line in result.stderr.splitlines() if line.startswith("MODULES ")]
    modules = set(json.loads(listing[-1].removeprefix("MODULES ")))
    assert "avmm.vm" in modules
    assert sorted(modules.intersection(NOT_ON_THE_UP_PATH)) == []


def test_help_still_lists_every_command() -> None:
    result = subprocess.run([sys.executable, "-m", "avmm.cli", "--help"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for command in ("up", "backend", "serve", "ps", "run", "console"):
        assert f"    {command} " in result.stdout


@pytest.mark.parametrize(("argv", "command"), [
    (["up", "vm.toml"], "up"),
    (["--log-level", "debug", "up", "vm.toml"], "up"),
    (["--log-level=debug", "--log-format", "json", "up"], "up"),
    (["--log-l", "info", "up"], "up"),          # argparse takes abbreviations
    (["--log-level", "up", "serve"], "serve"),  # "up" is the level here
    (["--help", "up"], None),                   # the help lists every command
    (["-h"], None),
    (["serve", "up"], "serve"),
    ([], None),
])
def test_command_of_finds_the_command_as_argparse_does(argv: list[str],
                                                      command: str | None) -> None:
    assert _command_of(argv) == command


def test_public_names_resolve_on_first_use() -> None:
    import avmm
    import avmm.arch.x86

    for package in (avmm, avmm.arch.x86):
        for name in dir(package):
            if not name.startswith("_"):
                assert getattr(package, name) is not None
    from avmm import VirtualMachine
    from avmm.vm import VirtualMachine as defined

    assert VirtualMachine is defined
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        avmm.nothing  # noqa: B018
