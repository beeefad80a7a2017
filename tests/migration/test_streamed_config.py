"""The config a destination builds from the stream: the source's CPU controls travel
with it; a config given on the destination decides them instead (its host's CPUs, its
own limits), and then the source's affinity is not even checked against this host."""

from __future__ import annotations

import os

import pytest

from avmm.config import VmConfig
from avmm.migration.destination import streamed_config
from avmm.migration.errors import MigrationError
from avmm.state.codec import encode
from avmm.state.vm_state import config_to_state
from tests.vm.helpers import guest_config, with_machine

#: A host CPU this host does not have (the source's was bigger).
ABSENT_CPU = max(os.sched_getaffinity(0)) + 1000


def _with_machine(**keys: object) -> VmConfig:
    return with_machine(guest_config("avmm.test=hello"), **keys)


def _payload(config: object) -> bytes:
    state = config_to_state(config)  # type: ignore[arg-type]
    return encode(state)


def test_the_source_cpu_controls_come_with_the_stream() -> None:
    source = _with_machine(cpu_weight=300, cpu_max_percent=60.5)
    built = streamed_config(_payload(source), None)
    assert (built.machine.cpu_weight, built.machine.cpu_max_percent) == (300, 60.5)


def test_a_given_config_decides_the_cpu_controls_on_this_host() -> None:
    source = _with_machine(cpu_weight=300, cpu_affinity=(ABSENT_CPU,))
    payload = _payload(source)
    # Without a config of its own, this host cannot place the vCPUs where the source did.
    with pytest.raises(MigrationError, match="cpu_affinity"):
        streamed_config(payload, None)
    given = _with_machine(cpu_weight=50)
    built = streamed_config(payload, given)  # type: ignore[arg-type]
    assert (built.machine.cpu_weight, built.machine.cpu_affinity) == (50, None)
    assert built.machine.memory_mib == source.machine.memory_mib  # type: ignore[attr-defined]
