"""Guest workloads run as separate ``avmm`` processes, for the seccomp tests and for
``scripts/seccomp_derive.py`` (which runs them under strace to derive the allow-lists).

Each scenario writes its vm.toml into a scratch directory, runs ``avmm up`` (and, for
vhost-user, an ``avmm backend``) with ``--seccomp MODE``, and checks the guest's report.
``wrap(label)`` gives a command prefix per process (``strace -f -o ...`` for the
derivation; nothing for the tests).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.prerequisites import TEST_GUEST

AVMM = [sys.executable, "-m", "avmm.cli"]
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 180

Wrap = Callable[[str], list[str]]


def no_wrap(_label: str) -> list[str]:
    return []


@dataclass
class Outcome:
    """What one scenario's processes did: return codes (negative: killed by that
    signal), the guest's output, the VMM's stderr, and ``problems`` (empty: all well)."""
    returncodes: dict[str, int]
    stdout: str
    stderr: str
    problems: list[str]


def vm_toml(cmdline: str, extra: str = "", serial: str = "console") -> str:
    return (f'[machine]\nmemory_mib = 64\nacpi = false\n'
            f'[boot]\nkernel = "{TEST_GUEST}"\ncmdline = "console=ttyS0 {cmdline}"\n'
            f'[serial]\nmode = "{serial}"\n{extra}')


def _up(directory: Path, toml: str, mode: str, wrap: Wrap, stdin: bytes = b"",
        label: str = "vmm") -> subprocess.CompletedProcess[bytes]:
    config = directory / f"{label}.toml"
    config.write_text(toml)
    return subprocess.run([*wrap(label), *AVMM, "up", str(config), "--seccomp", mode],
                          input=stdin, capture_output=True, timeout=TIMEOUT, cwd=REPO)


def _outcome(result: subprocess.CompletedProcess[bytes], expected: list[str],
             **others: int) -> Outcome:
    out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    problems = [f"missing from the guest's output: {line!r}" for line in expected
                if line not in out]
    codes = {"vmm": result.returncode, **others}
    problems += [f"{name} exited with {code}" for name, code in codes.items() if code != 0]
    return Outcome(codes, out, err, problems)


def hello(directory: Path, mode: str, wrap: Wrap = no_wrap) -> Outcome:
    result = _up(directory, vm_toml("avmm.test=hello"), mode, wrap)
    return _outcome(result, ["avmm-testguest: hello"])


def _blank_image(path: Path, sectors: int) -> Path:
    path.write_bytes(bytes(sectors * 512))
    return path


def blk_write(directory: Path, mode: str, wrap: Wrap = no_wrap) -> Outcome:
    from tests.virtio_guest_support import expected_pattern

    sectors, seed = 2048, 11
    image = _blank_image(directory / "disk.img", sectors)
    result = _up(directory, vm_toml(f"avmm.test=blk-write avmm.seed={seed}",
                                     f'[[disk]]\npath = "{image}"\n'), mode, wrap)
    outcome = _outcome(result, [f"blk0 written={sectors} verify=ok"])
    if image.read_bytes() != expected_pattern(seed, sectors):
        outcome.problems.append("the disk image does not hold what the guest wrote")
    return outcome


def console(directory: Path, mode: str, wrap: Wrap = no_wrap) -> Outcome:
    inputs = ["typed on stdin", "another line"]
    toml = vm_toml("avmm.test=console", '[console]\nmode = "console"\n', serial="none")
    result = _up(directory, toml, mode, wrap,
                 stdin="".join(f"{line}\n" for line in [*inputs, "quit"]).encode())
    lines = ["hello", *(f"echo {line}" for line in inputs), "bye"]
    return _outcome(result, [f"avmm-testguest: console {line}\n" for line in lines])


def net_echo(directory: Path, mode: str, wrap: Wrap = no_wrap) -> Outcome:
    from tests.virtio_guest_support import echoing_tap

    frames = 20
    with echoing_tap() as (namespace, _echoer):
        toml = vm_toml(f"avmm.test=net-echo avmm.n={frames}",
                        f'[[net]]\ntap = "{namespace.tap}"\nmac = "52:54:00:ab:cd:ef"\n'
                        f'netns = "{namespace.netns}"\n')
        result = _up(directory, toml, mode, wrap)
    return _outcome(result, [f"net0 echoed={frames}"])


def vhost_user_blk(directory: Path, mode: str, wrap: Wrap = no_wrap) -> Outcome:
    """``avmm backend blk`` and ``avmm up`` both filtered; the guest writes the disk."""
    from tests.virtio_guest_support import expected_pattern

    sectors, seed = 2048, 5
    image = _blank_image(directory / "vu-disk.img", sectors)
    sock = directory / "blk.sock"
    backend = subprocess.Popen(
        [*wrap("backend"), *AVMM, "backend", "blk", "--socket", str(sock), "--image",
         str(image), "--seccomp", mode],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=REPO, start_new_session=True)  # its own group: a wrapper (strace) and all
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if backend.poll() is not None or time.monotonic() > deadline:
                os.killpg(backend.pid, signal.SIGKILL)
                _, err = backend.communicate(timeout=30)
                return Outcome({"backend": backend.returncode}, "", err.decode(),
                               ["the back-end did not start listening"])
            time.sleep(0.05)
        result = _up(directory, vm_toml(f"avmm.test=blk-write avmm.seed={seed}",
                                         f'[[disk]]\nvhost_user = "{sock}"\n'), mode, wrap)
    finally:
        if backend.poll() is None:
            os.killpg(backend.pid, signal.SIGTERM)
        try:
            _, backend_err = backend.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(backend.pid, signal.SIGKILL)
            _, backend_err = backend.communicate()
    outcome = _outcome(result, [f"blk0 written={sectors} verify=ok"],
                       backend=backend.returncode)
    outcome.stderr += backend_err.decode(errors="replace")
    if image.read_bytes() != expected_pattern(seed, sectors):
        outcome.problems.append("the disk image does not hold what the guest wrote")
    return outcome


class _Daemon:
    """An ``avmm serve --seccomp MODE --isolation none`` in its own process group (a
    wrapper and all). Dense mode, pinned (process is root's default): the scenarios
    measure the daemon's filters with every VM's device and event-loop work in the
    daemon itself, which only dense mode has; workers' filters have tests of their own."""

    def __init__(self, directory: Path, label: str, mode: str, wrap: Wrap,
                 *options: str) -> None:
        self.label = label
        self.socket = directory / f"{label}.sock"
        self.log = directory / f"{label}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*wrap(label), *AVMM, "serve", "--socket", str(self.socket), "--seccomp",
                 mode, "--isolation", "none", *options], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)

    def close(self) -> int:
        """SIGTERM (a clean shutdown), then its exit status (negative: killed by that
        signal; -31 is SIGSYS, a seccomp kill)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


async def _daemon_lifecycle(directory: Path, a: _Daemon, b: _Daemon) -> list[str]:
    """What a daemon does for its clients, each once: create a VM with a disk, stream
    its console, metrics, pause, snapshot, resume, restore the snapshot, migrate over
    TCP to the other daemon and back over a unix socket, delete."""
    import socket as socket_module

    import trio

    from avmm.api import ApiClient

    problems: list[str] = []
    image = _blank_image(directory / "serve-disk.img", 2048)
    config = {"machine": {"memory_mib": 32, "acpi": False},
              "boot": {"kernel": str(TEST_GUEST),
                       "cmdline": "console=ttyS0 avmm.test=mem-walk avmm.mib=4 "
                                  "avmm.rounds=60000"},
              "serial": {"mode": "console"},
              "disk": [{"path": str(image)}]}

    async def wait_state(api: ApiClient, vm_id: str, state: str) -> dict[str, object]:
        with trio.fail_after(TIMEOUT):
            while (vm := await api.get_vm(vm_id))["state"] != state:
                await trio.sleep(0.05)
        return vm

    async def wait_output(api: ApiClient, vm_id: str, text: bytes) -> None:
        output = bytearray()
        with trio.fail_after(TIMEOUT):
            async with api.console(vm_id) as chunks:
                async for chunk in chunks:
                    output += chunk
                    if text in output:
                        return

    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with ApiClient(a.socket) as api_a, ApiClient(b.socket) as api_b:
        vm = (await api_a.create_vm(config))["id"]
        await wait_output(api_a, vm, b"round=2 ")
        if "avmm_vm" not in await api_a.metrics():
            problems.append("/metrics has no avmm_vm series")
        await api_a.pause(vm)
        await api_a.snapshot(vm, directory / "snap")
        await api_a.resume(vm)
        restored = (await api_a.restore_vm(directory / "snap"))["id"]
        await wait_output(api_a, restored, b"round=")
        await api_a.delete_vm(restored)
        incoming = (await api_b.receive_vm(f"tcp:127.0.0.1:{port}"))["id"]
        # By name: the daemon resolves it (the resolver's files and sockets).
        await api_a.migrate(vm, f"tcp:localhost:{port}")
        source = await wait_state(api_a, vm, "stopped")
        if source["exit"]["reason"] != "migrated":  # type: ignore[index]
            problems.append(f"A → B over TCP: the source ended {source['exit']}")
        await wait_state(api_b, incoming, "running")
        back = (await api_a.receive_vm(f"unix:{directory / 'back.sock'}"))["id"]
        await api_b.migrate(incoming, f"unix:{directory / 'back.sock'}")
        await wait_state(api_b, incoming, "stopped")
        await wait_state(api_a, back, "running")
        await wait_output(api_a, back, b"round=")
        for api, vm_id in ((api_a, vm), (api_b, incoming), (api_a, back)):
            await api.delete_vm(vm_id)
    return problems


def serve(directory: Path, mode: str, wrap: Wrap = no_wrap) -> Outcome:
    """Two ``avmm serve`` daemons, filtered, through a VM's whole life (see
    :func:`_daemon_lifecycle`); both must shut down cleanly afterwards."""
    import trio

    # One daemon checks every path against --allow-path (openat2 beneath them).
    a = _Daemon(directory, "daemon", mode, wrap, "--allow-path", str(directory),
                "--allow-path", str(TEST_GUEST.parent))
    b = _Daemon(directory, "daemon2", mode, wrap)
    problems: list[str] = []
    try:
        problems += trio.run(_daemon_lifecycle, directory, a, b)
    except Exception as e:  # the outcome says what failed; the daemons' logs say why
        problems.append(f"the lifecycle failed: {e!r}")
    finally:
        codes = {a.label: a.close(), b.label: b.close()}
    problems += [f"{name} exited with {code}" for name, code in codes.items() if code != 0]
    logs = "".join(d.log.read_text(errors="replace") for d in (a, b))
    return Outcome(codes, "", logs, problems)


SCENARIOS: dict[str, Callable[..., Outcome]] = {
    "hello": hello,
    "blk-write": blk_write,
    "console": console,
    "net-echo": net_echo,
    "vhost-user-blk": vhost_user_blk,
    "serve": serve,
}


