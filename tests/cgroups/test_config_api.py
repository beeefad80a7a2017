"""The ``[machine]`` CPU keys: parsed and checked as the schema says, bad values named
(exit 2 from ``avmm up``, 400 from the API), and the API's view of a running VM:
``vcpu_threads``, the effective limits, CPU time in GET /vms/{id} and /metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm.api import ApiClient, ApiError, serve_api
from avmm.cli import main
from avmm.config import ConfigError, check_cpu_limits, config_from_dict
from avmm.host import Host, config_to_dict
from tests.cgroups.conftest import cgroup_cpu_problem
from tests.prerequisites import require
from tests.vm.helpers import TEST_GUEST

KERNEL = str(TEST_GUEST)
CPUS = sorted(os.sched_getaffinity(0))
HOST_CPUS = os.cpu_count() or 1


def machine(**keys: Any) -> dict[str, Any]:
    return {"machine": keys, "boot": {"kernel": KERNEL}}


def parse(**keys: Any) -> Any:
    return config_from_dict(machine(**keys), base_dir=None).machine


def test_cpu_keys_are_parsed_and_round_trip_through_the_api_form() -> None:
    parsed = parse(vcpus=2, cpu_weight=300, cpu_max_percent=150.5,
                   cpu_affinity=f"{CPUS[0]}", vcpu_affinity=[f"{CPUS[0]}", [CPUS[0]]])
    assert parsed.cpu_weight == 300
    assert parsed.cpu_max_percent == 150.5
    assert parsed.cpu_affinity == (CPUS[0],)
    assert parsed.vcpu_affinity == ((CPUS[0],), (CPUS[0],))
    config = config_from_dict(machine(vcpus=2, cpu_weight=300, cpu_affinity=CPUS),
                              base_dir=None)
    assert config_from_dict(config_to_dict(config), base_dir=None) == config
    # Nothing asked: nothing set (and no key in the API's form).
    plain = parse()
    assert (plain.cpu_weight, plain.cpu_max_percent, plain.cpu_affinity,
            plain.vcpu_affinity) == (None, None, None, None)
    assert "cpu_weight" not in config_to_dict(config_from_dict(machine(), base_dir=None)
                                              )["machine"]


BAD = [
    ("weight-zero", {"cpu_weight": 0}, "machine.cpu_weight"),
    ("weight-high", {"cpu_weight": 10001}, "machine.cpu_weight"),
    ("weight-string", {"cpu_weight": "100"}, "machine.cpu_weight"),
    ("weight-bool", {"cpu_weight": True}, "machine.cpu_weight"),
    ("max-zero", {"cpu_max_percent": 0}, "machine.cpu_max_percent"),
    ("max-negative", {"cpu_max_percent": -1.5}, "machine.cpu_max_percent"),
    ("max-above-host", {"cpu_max_percent": 100 * HOST_CPUS + 1}, "machine.cpu_max_percent"),
    ("max-nan", {"cpu_max_percent": float("nan")}, "machine.cpu_max_percent"),
    ("affinity-no-cpu", {"cpu_affinity": "4096"}, "machine.cpu_affinity"),
    ("affinity-garbage", {"cpu_affinity": "0-x"}, "machine.cpu_affinity"),
    ("affinity-empty", {"cpu_affinity": []}, "machine.cpu_affinity"),
    ("vcpu-count", {"vcpus": 1, "vcpu_affinity": ["0", "0"]}, "machine.vcpu_affinity"),
    ("vcpu-entry", {"vcpu_affinity": ["9999"]}, "machine.vcpu_affinity[0]"),
    ("vcpu-outside", {"cpu_affinity": [CPUS[0]], "vcpu_affinity": [[CPUS[-1] + 1]]},
     "machine.vcpu_affinity[0]"),
]


@pytest.mark.parametrize(("case", "keys", "key"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_cpu_values_name_the_key(case: str, keys: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(**keys)
    assert error.value.key == key
    assert "\n" not in str(error.value)


def test_run_time_values_are_checked_as_the_config_is() -> None:
    check_cpu_limits(weight=1, max_percent=100 * HOST_CPUS)
    check_cpu_limits()
    with pytest.raises(ConfigError) as error:
        check_cpu_limits(weight=10001)
    assert error.value.key == "machine.cpu_weight"
    with pytest.raises(ConfigError) as error:
        check_cpu_limits(max_percent=100 * HOST_CPUS + 0.5)
    assert error.value.key == "machine.cpu_max_percent"


def test_avmm_up_exits_2_naming_the_key(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(f'[machine]\ncpu_max_percent = 0\n[boot]\nkernel = "{KERNEL}"\n')
    assert main(["up", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "machine.cpu_max_percent" in err[0]


async def test_api_refuses_a_bad_cpu_value_with_400_naming_the_key(socket_dir: Path) -> None:
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, socket_dir / "avmm.sock")
        async with ApiClient(path) as api:
            with pytest.raises(ApiError) as error:
                await api.create_vm(machine(cpu_weight=0))
        nursery.cancel_scope.cancel()
    assert error.value.status == 400
    assert "machine.cpu_weight" in str(error.value)


@pytest.mark.kvm
@pytest.mark.guest
async def test_api_shows_vcpu_threads_limits_and_cpu_time(socket_dir: Path) -> None:
    require(cgroup_cpu_problem())
    from tests.api.test_metrics_real import parse_metrics, value

    config = {"machine": {"memory_mib": 32, "acpi": False, "vcpus": 2, "cpu_weight": 200,
                          "cpu_max_percent": 80, "cpu_affinity": [CPUS[0]]},
              "boot": {"kernel": KERNEL,
                       "cmdline": "avmm.test=count avmm.n=100000000000000"},
              "serial": {"mode": "none"}}
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, socket_dir / "avmm.sock")
        async with ApiClient(path) as api:
            vm_id = (await api.create_vm(config))["id"]
            with trio.fail_after(60):
                while len((shown := await api.get_vm(vm_id))["vcpu_threads"]) < 2:
                    await trio.sleep(0.02)
            cpu = shown["cpu"]
            assert (cpu["weight"], cpu["max_percent"], cpu["affinity"]) == (200, 80,
                                                                             str(CPUS[0]))
            cgroup = Path(cpu["cgroup"])
            tasks = cgroup / ("tasks" if (cgroup / "tasks").exists() else "cgroup.threads")
            assert set(shown["vcpu_threads"]) <= {int(t) for t in tasks.read_text().split()}
            assert cpu["cpu_seconds"] >= 0 and cpu["throttled_seconds"] >= 0
            # The guest spins: its CPU time moves on.
            with trio.fail_after(60):
                while (await api.get_vm(vm_id))["cpu"]["cpu_seconds"] <= 0:
                    await trio.sleep(0.05)
            # PATCH /vms/{id} "machine": the files change, and GET shows it at once.
            patched = await api.update_limits(vm_id, {"machine": {
                "cpu_weight": 50, "cpu_max_percent": None}})
            assert (patched["cpu"]["weight"], patched["cpu"]["max_percent"]) == (50, None)
            changed = (await api.get_vm(vm_id))["cpu"]
            assert (changed["weight"], changed["max_percent"]) == (50, None)
            if (cgroup / "cpu.shares").exists():  # v1
                assert (cgroup / "cpu.shares").read_text().strip() == "512"
                assert (cgroup / "cpu.cfs_quota_us").read_text().strip() == "-1"
            else:
                assert (cgroup / "cpu.weight").read_text().strip() == "50"
                assert (cgroup / "cpu.max").read_text().split()[0] == "max"
            with pytest.raises(ApiError) as refused:
                await api.update_limits(vm_id, {"machine": {"cpu_affinity": [CPUS[0]]}})
            assert refused.value.status == 400
            samples = parse_metrics(await api.metrics())
            assert value(samples, "avmm_vm_cpu_seconds_total", vm=vm_id) > 0
            assert value(samples, "avmm_vm_cpu_throttled_seconds_total", vm=vm_id) >= 0
            await api.stop(vm_id)
            stopped = await api.get_vm(vm_id)
        nursery.cancel_scope.cancel()
    assert stopped["vcpu_threads"] == []
    assert stopped["cpu"]["cgroup"] is None and not cgroup.exists()
    assert stopped["cpu"]["cpu_seconds"] > 0  # the final count is kept
