"""The management API's OpenAPI 3 document, declared once as Python data.

The daemon serves it at ``GET /openapi.json``; the tests drive a property-based client
from the served copy, so a route or status that is not declared here is a test failure.
The ``VmConfig`` schema mirrors :mod:`avmm.config` (the same keys, types, ranges and
choices); the config module stays the authority for everything a JSON Schema cannot say
(files that must exist, keys that depend on each other), and ``tests/api`` checks that
the two list the same keys.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from ..arch.x86.cpuid import FEATURES as CPU_FEATURES
from ..config import (
    BUCKET_SIZE_MAX,
    CMDLINE_MAX_BYTES,
    CONSOLE_MODES,
    CPU_PROFILES,
    DISK_ID_MAX_BYTES,
    GROUP_NAME_PATTERN,
    MEMORY_MIB_MAX,
    MEMORY_MIB_MIN,
    REFILL_MS_MAX,
    SERIAL_MODES,
    TAP_NAME_MAX,
    VCPUS_MAX,
)
from ..lifecycle import StopReason

__all__ = ["API_VERSION", "MIGRATION_STATES", "VM_STATES", "openapi_document"]

API_VERSION: Final = "1.0.0"
#: The states a hosted VM goes through (avmm.host.VmState's values).
VM_STATES: Final = ("starting", "incoming", "running", "paused", "stopping", "stopped")
#: The states of a migration's progress (MigrationProgress.state).
MIGRATION_STATES: Final = ("setup", "precopy", "stop-and-copy", "completed", "failed",
                           "incoming", "receiving", "unconfirmed")

_PATH: Final = {
    "type": "string",
    "minLength": 1,
    "description": "An absolute path on the daemon's machine (relative paths need the "
                   "base_dir query parameter of POST /vms).",
}

_ABSOLUTE_PATH: Final = {
    "type": "string",
    "pattern": "^/",
    "maxLength": 4095,
    "description": "An absolute path on the daemon's machine; with --allow-path it must "
                   "resolve inside those directories.",
}

_MACHINE: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "vcpus": {"type": "integer", "minimum": 1, "maximum": VCPUS_MAX, "default": 1},
        "memory_mib": {"type": "integer", "minimum": MEMORY_MIB_MIN,
                       "maximum": MEMORY_MIB_MAX, "default": 128},
        "cpu_profile": {"type": "string", "enum": list(CPU_PROFILES), "default": "host"},
        "hide_cpu_features": {"type": "array",
                              "items": {"type": "string", "enum": sorted(CPU_FEATURES)}},
        "acpi": {"type": "boolean", "default": True},
        "cpu_weight": {"type": "integer", "minimum": 1, "maximum": 10000,
                       "description": "CPU weight against other VMs (cgroup v2 cpu.weight; "
                                      "100 when unset)"},
        "cpu_max_percent": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                            "description": "CPU quota in percent of one host CPU"},
        "cpu_affinity": {"oneOf": [{"type": "string"},
                                   {"type": "array", "items": {"type": "integer"}}],
                         "description": "Host CPUs for the vCPU threads (\"0-1,3\")"},
        "vcpu_affinity": {"type": "array", "description": "Host CPUs per vCPU",
                          "items": {"oneOf": [{"type": "string"},
                                              {"type": "array",
                                               "items": {"type": "integer"}}]}},
    },
}

_BOOT: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["kernel"],
    "properties": {
        "kernel": _PATH,
        "initrd": _PATH,
        "cmdline": {"type": "string", "maxLength": CMDLINE_MAX_BYTES},
    },
}

_SERIAL: Final = {
    "type": "object",
    "additionalProperties": False,
    "description": 'path is required with mode "file" and not allowed otherwise.',
    "properties": {
        "mode": {"type": "string", "enum": list(SERIAL_MODES), "default": "console"},
        "path": _PATH,
    },
}

_BUCKET: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["size", "refill_ms"],
    "description": "A token bucket: size tokens (bytes or requests), refilled from empty "
                   "in refill_ms; one_time_burst extra tokens at the start, never refilled.",
    "properties": {
        "size": {"type": "integer", "minimum": 1, "maximum": BUCKET_SIZE_MAX},
        "refill_ms": {"type": "integer", "minimum": 1, "maximum": REFILL_MS_MAX},
        "one_time_burst": {"type": "integer", "minimum": 0, "maximum": BUCKET_SIZE_MAX,
                           "default": 0},
    },
}

_RATE_LIMIT: Final = {
    "type": "object",
    "additionalProperties": False,
    "description": "Token buckets for bytes (bandwidth) and requests (ops); a missing one "
                   "does not limit. A request larger than a bucket passes when the bucket "
                   "is full and leaves a debt that later requests wait off.",
    "properties": {"bandwidth": _BUCKET, "ops": _BUCKET},
}

_GROUP_NAME: Final = {"type": "string", "pattern": f"^{GROUP_NAME_PATTERN}$",
                      "description": "A [rate_limit_groups.NAME] of the same config"}

_DISK: Final = {
    "type": "object",
    "additionalProperties": False,
    "description": "Exactly one of path and vhost_user.",
    "properties": {
        "path": _PATH,
        "readonly": {"type": "boolean", "default": False},
        "id": {"type": "string", "pattern": f"^[\\x20-\\x7e]{{1,{DISK_ID_MAX_BYTES}}}$"},
        "vhost_user": _PATH,
        "rate_limit": _RATE_LIMIT,
        "rate_limit_group": _GROUP_NAME,
    },
}

_NET: Final = {
    "type": "object",
    "additionalProperties": False,
    "description": "Exactly one of tap and vhost_user.",
    "properties": {
        "tap": {"type": "string", "pattern": f"^[A-Za-z0-9_.-]{{1,{TAP_NAME_MAX}}}$"},
        "mac": {"type": "string",
                "pattern": "^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"},
        "netns": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
        "vhost_user": _PATH,
        "tx_rate_limit": _RATE_LIMIT,
        "rx_rate_limit": _RATE_LIMIT,
        "tx_rate_limit_group": _GROUP_NAME,
        "rx_rate_limit_group": _GROUP_NAME,
    },
}

_VHOST_USER: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["socket", "device_id"],
    "properties": {
        "socket": _PATH,
        "device_id": {"type": "integer", "minimum": 1, "maximum": 0xFFFF},
        "num_queues": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
        "queue_size": {"type": "integer", "minimum": 1, "maximum": 32768, "default": 256},
    },
}

_CONSOLE: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "mode": {"type": "string", "enum": list(CONSOLE_MODES), "default": "console"},
        "path": _PATH,
    },
}

_VM_CONFIG: Final = {
    "type": "object",
    "description": "The vm.toml schema as JSON (see the README). Validated by avmm.config: "
                   "a 400 names the offending key.",
    "additionalProperties": False,
    "required": ["boot"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
        "machine": _MACHINE,
        "boot": _BOOT,
        "serial": _SERIAL,
        "disk": {"type": "array", "items": _DISK},
        "net": {"type": "array", "items": _NET},
        "rng": {"type": "object", "additionalProperties": False, "properties": {}},
        "console": _CONSOLE,
        "vhost_user": {"type": "array", "items": _VHOST_USER},
        "rate_limit_groups": {"type": "object", "additionalProperties": _RATE_LIMIT,
                              "description": "NAME → buckets shared by the devices of "
                                             "this VM that name the group"},
    },
}

_NULLABLE_RATE_LIMIT: Final = {"allOf": [_RATE_LIMIT], "nullable": True,
                               "description": "The device's own buckets; null: unlimited"}

_INDEX: Final = {"type": "integer", "minimum": 0, "description": "The device's position in "
                 "the config's disk (or net) list"}

_LIMITS_UPDATE: Final = {
    "type": "object",
    "additionalProperties": False,
    "description": "Limits to change now, in effect within 100 ms. A device given "
                   "rate_limit leaves its group; null removes its limit. The whole request "
                   "is checked before anything changes. Not kept in snapshots.",
    "properties": {
        "disks": {"type": "array", "maxItems": 64, "items": {
            "type": "object", "additionalProperties": False, "required": ["index"],
            "properties": {"index": _INDEX, "rate_limit": _NULLABLE_RATE_LIMIT}}},
        "nets": {"type": "array", "maxItems": 64, "items": {
            "type": "object", "additionalProperties": False, "required": ["index"],
            "properties": {"index": _INDEX, "tx_rate_limit": _NULLABLE_RATE_LIMIT,
                           "rx_rate_limit": _NULLABLE_RATE_LIMIT}}},
        "rate_limit_groups": {"type": "object", "maxProperties": 64,
                              "additionalProperties": _RATE_LIMIT,
                              "description": "New buckets for groups of this VM's config"},
        "machine": {"type": "object",
                    "description": "CPU limits (cpu_weight, cpu_max_percent): a build "
                                   "without them answers 400"},
    },
}

_THROTTLE: Final = {
    "type": "object",
    "properties": {
        "rate_limit": {"allOf": [_RATE_LIMIT], "nullable": True},
        "rate_limit_group": {"type": "string", "nullable": True},
        "admitted_ops": {"type": "integer"},
        "admitted_bytes": {"type": "integer"},
        "throttled": {"type": "integer", "description": "Requests that had to wait"},
        "wait_seconds": {"type": "object", "additionalProperties": {"type": "number"},
                         "description": "Time requests waited, by the bucket that made "
                                        "them wait (bandwidth, ops)"},
        "tokens": {"type": "object", "additionalProperties": {"type": "integer"},
                   "description": "Whole tokens in each bucket now (negative: a debt)"},
    },
}

_RATE_LIMITS: Final = {
    "type": "object",
    "description": "The in-process disks' and NICs' effective limits and what they did "
                   "(vhost-user devices are limited by their back-end, not listed)",
    "properties": {
        "disks": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "device": {"type": "string"},
            **_THROTTLE["properties"]}}},
        "nets": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "device": {"type": "string"},
            "tx": _THROTTLE, "rx": _THROTTLE}}},
        "groups": {"type": "object", "additionalProperties": _RATE_LIMIT,
                   "description": "The groups of the VM's config"},
        "shared_groups": {"type": "array", "items": {"type": "string"},
                          "description": "The daemon's groups its devices use"},
    },
}

_RESTORE: Final = {
    "type": "object",
    "description": "A new VM from a snapshot directory (written by POST "
                   "/vms/{id}/snapshot or avmm snapshot): its config, state and memory "
                   "come from the snapshot, so no VM config goes with it. Disks are used "
                   "where the snapshot's config names them.",
    "additionalProperties": False,
    "required": ["restore"],
    "properties": {
        "restore": {**_ABSOLUTE_PATH, "description": "The snapshot directory"},
        "start": {"type": "boolean", "default": True,
                  "description": "false: restore it and leave it paused (POST "
                                 "/vms/{id}/resume runs it on from the snapshot); default: "
                                 "the start query parameter, else true"},
        "copy_memory": {"type": "boolean", "default": False,
                        "description": "Copy guest memory out of the snapshot (checking "
                                       "its digest) instead of mapping it copy-on-write"},
        "vhost_user": {
            "type": "object",
            "description": "Device name (such as blk0; letters, digits, '_.-', at most "
                           "64) → the socket of its vhost-user back-end now, instead of "
                           "the one in the snapshot's config",
            "maxProperties": 64,
            "additionalProperties": _ABSOLUTE_PATH,
        },
    },
}

_ADDRESS: Final = {
    "type": "string",
    "pattern": "^(unix:/.*|tcp:.*:[0-9]{1,5})$",
    "description": 'A migration address: "unix:/abs/path" (a unix socket, path at most '
                   '107 bytes; with --allow-path inside those directories) or '
                   '"tcp:HOST:PORT" (a host name, an IPv4 address or [IPv6], a port '
                   "1-65535). A migration stream runs the guest it carries: use tcp: "
                   "only on a trusted network.",
}

_COUNT: Final = {"type": "integer", "minimum": 0, "nullable": True}
_MS: Final = {"type": "number", "minimum": 0, "nullable": True}

_MIGRATION: Final = {
    "type": "object",
    "description": "The VM's latest migration (source or destination side), kept after "
                   "the VM stops. Fields are null until known; the engine may add more.",
    "required": ["state", "round", "pages_sent", "pages_dirty", "bytes_sent",
                 "downtime_ms", "total_ms", "error"],
    "properties": {
        "state": {"type": "string", "nullable": True,
                  "description": "setup, precopy, stop-and-copy, completed or failed on "
                                 "the source; incoming, receiving, completed or failed on "
                                 "the destination"},
        "round": {**_COUNT, "description": "Pre-copy round (0: the first full pass)"},
        "pages_sent": {**_COUNT, "description": "4 KiB pages sent (or received) so far"},
        "pages_dirty": {**_COUNT, "description": "Pages dirtied in the last round, still "
                                                 "to send"},
        "bytes_sent": {**_COUNT, "description": "Bytes of stream sent (or received)"},
        "downtime_ms": {**_MS, "description": "Measured time the guest was paused for "
                                              "the hand-over (once completed)"},
        "total_ms": {**_MS, "description": "Time since the migration began"},
        "error": {"type": "string", "nullable": True,
                  "description": "Why it failed (one line); the source VM keeps running"},
    },
}

_SCHEMAS: Final = {
    "VmConfig": _VM_CONFIG,
    "RestoreRequest": _RESTORE,
    "IncomingRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["listen"],
        "properties": {
            "listen": {**_ADDRESS, "description": "Where to listen for the one migration "
                                                  "stream: " + _ADDRESS["description"]},
            "config": {"allOf": [{"$ref": "#/components/schemas/VmConfig"}],
                       "description": "Build the VM from this config instead of the one "
                                      "the stream carries: the same devices in kind and "
                                      "order, with this host's paths (disks, taps, "
                                      "vhost-user sockets)"},
            "start": {"type": "boolean", "default": True,
                      "description": "false: leave the VM paused after the hand-over"},
            "accept_timeout_s": {"type": "number", "minimum": 0,
                                 "exclusiveMinimum": True, "nullable": True,
                                 "default": None,
                                 "description": "Seconds to wait for the source to "
                                                "connect; then the VM ends (stopped, "
                                                "failed, the socket released). null: no "
                                                "limit (stop it with DELETE)"},
        },
    },
    "MigrateRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["to"],
        "properties": {
            "to": {**_ADDRESS, "description": "The destination (an avmm that listens, "
                                              "POST /vms/incoming): "
                                              + _ADDRESS["description"]},
            "downtime_ms": {"type": "integer", "minimum": 1, "maximum": 600000,
                            "default": 300,
                            "description": "The pause the guest may see: pre-copy goes "
                                           "on until the rest can be sent in this time"},
        },
    },
    "Migration": _MIGRATION,
    "LimitsUpdate": _LIMITS_UPDATE,
    "RateLimitGroup": {
        "type": "object",
        "required": ["name", "rate_limit", "tokens"],
        "properties": {
            "name": {"type": "string"},
            "rate_limit": _RATE_LIMIT,
            "tokens": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "Whole tokens in each bucket now (negative: a debt)"},
        },
    },
    "RateLimitGroupList": {
        "type": "object",
        "required": ["rate_limit_groups"],
        "properties": {"rate_limit_groups": {
            "type": "array", "items": {"$ref": "#/components/schemas/RateLimitGroup"}}},
    },
    "SnapshotRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["path"],
        "properties": {
            "path": {**_ABSOLUTE_PATH,
                     "description": "A new directory (it must not exist; its parent "
                                    "must) where the snapshot is written, atomically"},
        },
    },
    "Snapshot": {
        "type": "object",
        "required": ["path", "bytes_state", "bytes_memory", "duration_ms"],
        "properties": {
            "path": {"type": "string", "description": "The snapshot directory"},
            "bytes_state": {"type": "integer", "minimum": 0,
                            "description": "Size of the state file"},
            "bytes_memory": {"type": "integer", "minimum": 0,
                             "description": "Bytes of guest memory written (the memory "
                                            "file's holes not counted)"},
            "duration_ms": {"type": "number", "minimum": 0,
                            "description": "Time taken to write the snapshot"},
        },
    },
    "VmExit": {
        "type": "object",
        "description": "How the VM ended: exit_status is what `avmm up` would exit with.",
        "required": ["reason", "exit_status", "detail"],
        "properties": {
            "reason": {"type": "string", "enum": [reason.value for reason in StopReason]},
            "exit_status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
    "Vm": {
        "type": "object",
        "required": ["id", "name", "state", "created_at", "uptime_s", "exit", "config",
                     "migration"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "state": {"type": "string", "enum": list(VM_STATES)},
            "created_at": {"type": "number", "description": "Unix time"},
            "uptime_s": {"type": "number", "nullable": True,
                         "description": "Seconds running (frozen once stopped)"},
            "exit": {"allOf": [{"$ref": "#/components/schemas/VmExit"}], "nullable": True},
            "config": {"allOf": [{"$ref": "#/components/schemas/VmConfig"}],
                       "nullable": True,
                       "description": "The VM's config as validated (absolute paths, "
                                      "defaults filled in); null while a restored VM is "
                                      "being built (its config is in the snapshot)"},
            "migration": {"allOf": [{"$ref": "#/components/schemas/Migration"}],
                          "nullable": True,
                          "description": "The latest live migration's progress; null if "
                                         "the VM never migrated"},
            "isolation": {"type": "string", "enum": ["none", "process"],
                          "description": "none: the VM runs in the daemon's process; "
                                         "process: in a jailed worker process of its own "
                                         "(avmm serve --isolation)"},
            "pid": {"type": "integer", "nullable": True,
                    "description": "The process that runs the VM: the worker's, or the "
                                   "daemon's with isolation none; null while a worker "
                                   "starts"},
            "vcpu_threads": {"type": "array", "items": {"type": "integer"},
                             "description": "Host thread ids of the vCPU threads (in a "
                                            "worker: as its PID namespace numbers them)"},
            "cpu": {"type": "object", "nullable": True,
                    "description": "Effective CPU controls (weight, max_percent, "
                                   "affinity, cgroup) and, in GET /vms/{id}, cpu_seconds "
                                   "and throttled_seconds"},
            "rate_limits": {"allOf": [_RATE_LIMITS], "nullable": True,
                            "description": "null until the VM's devices exist"},
        },
    },
    "VmList": {
        "type": "object",
        "required": ["vms"],
        "properties": {"vms": {"type": "array", "items": {"$ref": "#/components/schemas/Vm"}}},
    },
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "What went wrong, for a person"},
            "detail": {"nullable": True,
                       "description": "Structured detail: {key} for a bad config, "
                                      "{state} for a wrong state, {allow} for 405, ..."},
        },
    },
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


_VM_ID_PARAMETER: Final = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The VM's id, as POST /vms and GET /vms report it",
}

_UNKNOWN_VM: Final = _error("No VM with this id")
_GROUP_PARAMETER: Final = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{GROUP_NAME_PATTERN}$"},
    "description": "The group's name: 1 to 64 characters from A-Z a-z 0-9 _ -",
}
_OTHER: Final = _error("Any other error (JSON body as for every error)")


def _vm_action(summary: str, description: str, ok: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "description": description,
            "parameters": [_VM_ID_PARAMETER],
            "responses": {
                "200": _json(ok, "Vm"),
                "404": _UNKNOWN_VM,
                "409": _error("The VM is in a state that does not allow this"),
                "default": _OTHER,
            },
        }
    }


_PATHS: Final = {
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": {"description": "The OpenAPI document",
                                  "content": {"application/json": {"schema": {
                                      "type": "object"}}}}},
        }
    },
    "/vms": {
        "get": {
            "summary": "List the VMs, in creation order",
            "responses": {"200": _json("Every VM the daemon holds", "VmList"),
                          "default": _OTHER},
        },
        "post": {
            "summary": "Create and start a VM, or restore one from a snapshot",
            "description": "The body is a VM config with the vm.toml schema, as JSON or as "
                           "TOML (Content-Type: application/toml). Paths in it must be "
                           "absolute, unless base_dir is given. The daemon opens them as "
                           "its own user; with --allow-path only inside those "
                           "directories. Or the body is a RestoreRequest "
                           '({"restore": "/abs/dir"}): the VM is restored from that '
                           "snapshot and runs on from where it was taken.",
            "parameters": [{
                "name": "base_dir",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "An absolute directory that relative paths in the config are "
                               "resolved against (avmm run sends the directory of vm.toml)",
            }, {
                "name": "start",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["true", "false"], "default": "true"},
                "description": "false: build the VM and leave it paused before its first "
                               "instruction (POST /vms/{id}/resume starts it)",
            }],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"anyOf": [
                        {"$ref": "#/components/schemas/VmConfig"},
                        {"$ref": "#/components/schemas/RestoreRequest"}]}},
                    "application/toml": {"schema": {"type": "string"}},
                },
            },
            "responses": {
                "201": {
                    **_json("The VM was built (or restored) and started", "Vm"),
                    "headers": {"Location": {"description": "/vms/{id}",
                                             "schema": {"type": "string"}}},
                },
                "400": _error("Malformed body (also: nested too deeply, an integer of "
                              "more than 4300 digits) or bad config (a missing file, an "
                              "output path that is a FIFO, a socket path over 107 bytes "
                              "or over something that is not a socket); detail.key names "
                              "the key. For a restore: a bad request, or a snapshot that "
                              "cannot be restored faithfully here (truncated, corrupt, "
                              "another format version, a host without the KVM or CPU "
                              "features it needs); the error is one line"),
                "403": _error("A path in the config resolves outside the directories the "
                              "daemon allows (avmm serve --allow-path); detail.key names "
                              "the key"),
                "413": _error("Body larger than 1 MiB"),
                "415": _error("Content-Type is neither application/json nor application/toml"),
                "422": _error("The config is valid but the VM could not be built or started "
                              "(detail.step names the step that failed)"),
                "503": _error("The daemon is shutting down"),
                "default": _OTHER,
            },
        },
    },
    "/vms/incoming": {
        "post": {
            "summary": "A new VM that comes in by live migration",
            "description": "The VM listens at listen for one migration stream (POST "
                           "/vms/{id}/migrate on the source daemon) and is answered at "
                           "once in state incoming; it runs (state running) once the "
                           "source has handed over, or ends (stopped, with the reason "
                           "in exit.detail) if the stream fails. A unix: socket is "
                           "created with mode 0600.",
            "parameters": [{
                "name": "base_dir",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "An absolute directory that relative paths in config are "
                               "resolved against (avmm receive --config sends the "
                               "directory of vm.toml)",
            }],
            "requestBody": {
                "required": True,
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/IncomingRequest"}}},
            },
            "responses": {
                "201": {
                    **_json("The VM listens (state incoming)", "Vm"),
                    "headers": {"Location": {"description": "/vms/{id}",
                                             "schema": {"type": "string"}}},
                },
                "400": _error("Malformed body, a bad address (a relative unix: path, a "
                              "bad port), an address that cannot be listened on (in "
                              "use), or a bad config; detail.key names the key"),
                "403": _error("The unix: path or a path in config resolves outside the "
                              "directories the daemon allows (avmm serve --allow-path); "
                              "detail.key names the key"),
                "413": _error("Body larger than 1 MiB"),
                "415": _error("Content-Type is not application/json"),
                "422": _error("The VM could not be set up (detail.step names the step "
                              "that failed)"),
                "503": _error("The daemon is shutting down"),
                "default": _OTHER,
            },
        }
    },
    "/vms/{id}": {
        "get": {
            "summary": "One VM: state, config, uptime, stop reason and exit status",
            "parameters": [_VM_ID_PARAMETER],
            "responses": {"200": _json("The VM", "Vm"), "404": _UNKNOWN_VM, "default": _OTHER},
        },
        "patch": {
            "summary": "Change the VM's I/O rate limits at run time",
            "description": "Disks and NICs by index: a new rate_limit (or tx_rate_limit, "
                           "rx_rate_limit) for the device, null for none; new buckets for "
                           "a rate_limit_groups entry. In effect within 100 ms.",
            "parameters": [_VM_ID_PARAMETER],
            "requestBody": {
                "required": True,
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/LimitsUpdate"}}},
            },
            "responses": {
                "200": _json("The VM with its limits changed", "Vm"),
                "400": _error("A bad value (detail.key names it), or a device served by "
                              "a vhost-user back-end"),
                "404": _error("No VM with this id, or no device at that index"),
                "409": _error("The VM's devices do not exist yet"),
                "415": _error("Not Content-Type: application/json"),
                "default": _OTHER,
            },
        },
        "delete": {
            "summary": "Stop the VM (if it runs) and forget it; idempotent",
            "parameters": [_VM_ID_PARAMETER],
            "responses": {"204": {"description": "Gone (or never existed)"},
                          "default": _OTHER},
        },
    },
    "/vms/{id}/pause": _vm_action(
        "Pause a running VM",
        "Returns once every vCPU has left KVM_RUN; device queues stop taking requests.",
        "The paused VM"),
    "/vms/{id}/resume": _vm_action(
        "Resume a paused VM", "The guest continues exactly where it was paused.",
        "The running VM"),
    "/vms/{id}/snapshot": {
        "post": {
            "summary": "Write a paused VM's state and memory to a new directory",
            "description": "The VM must be paused (POST /vms/{id}/pause) and stays paused. "
                           "The directory is created (mode 0700) under a temporary name and "
                           "renamed once complete; its parent must exist and, with "
                           "--allow-path, resolve inside those directories. Writable disks "
                           "are flushed; their contents stay where they are (keep them "
                           "unchanged until the snapshot is restored). POST /vms with "
                           '{"restore": path} brings the VM back.',
            "parameters": [_VM_ID_PARAMETER],
            "requestBody": {
                "required": True,
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/SnapshotRequest"}}},
            },
            "responses": {
                "201": _json("The snapshot was written", "Snapshot"),
                "400": _error("Malformed body (not an object, extra keys, a path that is "
                              "not absolute), a path that exists or whose parent cannot be "
                              "used, or the snapshot could not be written (one line; "
                              "nothing is left behind); detail.key names the key"),
                "403": _error("The path resolves outside the directories the daemon allows "
                              "(avmm serve --allow-path)"),
                "404": _UNKNOWN_VM,
                "409": _error("The VM is not paused (or a snapshot of it is being written)"),
                "413": _error("Body larger than 16 KiB"),
                "415": _error("Content-Type is not application/json"),
                "default": _OTHER,
            },
        }
    },
    "/vms/{id}/migrate": {
        "post": {
            "summary": "Live-migrate a running VM to another avmm",
            "description": "Answered at once (202); the migration runs on: its progress "
                           "is under migration in GET /vms/{id}. The guest keeps running "
                           "during pre-copy and pauses for the hand-over (about "
                           "downtime_ms). On success the VM ends stopped with "
                           "exit.reason migrated; on failure it keeps running here and "
                           "migration.state is failed, with migration.error.",
            "parameters": [_VM_ID_PARAMETER],
            "requestBody": {
                "required": True,
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/MigrateRequest"}}},
            },
            "responses": {
                "202": {
                    **_json("The migration has begun", "Vm"),
                    "headers": {"Location": {"description": "/vms/{id}",
                                             "schema": {"type": "string"}}},
                },
                "400": _error("Malformed body or a bad address (a relative unix: path, a "
                              "bad port, downtime_ms out of range); detail.key names the "
                              "key"),
                "403": _error("The unix: path resolves outside the directories the "
                              "daemon allows (avmm serve --allow-path)"),
                "404": _UNKNOWN_VM,
                "409": _error("The VM is not running, or is already being migrated"),
                "413": _error("Body larger than 16 KiB"),
                "415": _error("Content-Type is not application/json"),
                "503": _error("The daemon is shutting down"),
                "default": _OTHER,
            },
        }
    },
    "/vms/{id}/stop": {
        "post": {
            "summary": "Stop a VM (any state; idempotent) and wait until it has stopped",
            "description": "Disks are flushed. The VM stays listed (with its exit) until "
                           "DELETE.",
            "parameters": [_VM_ID_PARAMETER],
            "responses": {"200": _json("The stopped VM", "Vm"), "404": _UNKNOWN_VM,
                          "default": _OTHER},
        }
    },
    "/vms/{id}/console": {
        "get": {
            "summary": "Stream the serial output",
            "description": "A chunked response that starts with the backlog (the last 64 KiB) "
                           "and follows the output until the VM stops (then the response "
                           "ends) or the client disconnects (the VM keeps running).",
            "parameters": [_VM_ID_PARAMETER],
            "responses": {
                "200": {"description": "Raw serial bytes",
                        "content": {"application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}}}},
                "404": _UNKNOWN_VM,
                "default": _OTHER,
            },
        },
        "post": {
            "summary": "Send bytes to the serial input",
            "parameters": [_VM_ID_PARAMETER],
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}},
            },
            "responses": {
                "204": {"description": "Delivered to the guest's serial port"},
                "404": _UNKNOWN_VM,
                "409": _error("The VM has stopped"),
                "413": _error("More than 64 KiB in one request"),
                "default": _OTHER,
            },
        },
    },
    "/metrics": {
        "get": {
            "summary": "Per-VM metrics in the Prometheus text exposition format (0.0.4)",
            "responses": {"200": {"description": "Metrics", "content": {"text/plain": {
                "schema": {"type": "string"}}}}},
        }
    },
    "/rate_limit_groups": {
        "get": {
            "summary": "The daemon's rate-limit groups (shared by every VM naming one)",
            "responses": {"200": _json("The groups", "RateLimitGroupList"),
                          "default": _OTHER},
        }
    },
    "/rate_limit_groups/{name}": {
        "get": {
            "summary": "One daemon-wide rate-limit group",
            "parameters": [_GROUP_PARAMETER],
            "responses": {"200": _json("The group", "RateLimitGroup"),
                          "404": _error("No such group"), "default": _OTHER},
        },
        "put": {
            "summary": "Create a daemon-wide rate-limit group, or change its buckets",
            "description": "A disk or NIC direction of any VM created afterwards whose "
                           "rate_limit_group names it, and that its own config does not "
                           "define, shares these buckets with every other such device. A "
                           "change applies to all of them within 100 ms.",
            "parameters": [_GROUP_PARAMETER],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"allOf": [_RATE_LIMIT], "minProperties": 1}}}},
            "responses": {
                "200": _json("The group, changed", "RateLimitGroup"),
                "201": {**_json("The group, created", "RateLimitGroup"),
                        "headers": {"Location": {"description": "/rate_limit_groups/{name}",
                                                 "schema": {"type": "string"}}}},
                "400": _error("A bad value (detail.key names it) or group name"),
                "413": _error("Body too large"),
                "415": _error("Not Content-Type: application/json"),
                "default": _OTHER,
            },
        },
        "delete": {
            "summary": "Forget a daemon-wide group; idempotent",
            "description": "VMs that use it keep its buckets; VMs created afterwards cannot "
                           "name it.",
            "parameters": [_GROUP_PARAMETER],
            "responses": {"204": {"description": "Gone (or never existed)"},
                          "default": _OTHER},
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may modify it)."""
    return copy.deepcopy({
        "openapi": "3.0.3",
        "info": {
            "title": "avmm management API",
            "version": API_VERSION,
            "description": "VMs hosted by `avmm serve`, over its unix socket. Every error is "
                           'a JSON body {"error": "...", "detail": ...}. Plain HTTP only: '
                           "a WebSocket upgrade request is answered 400.",
        },
        "paths": _PATHS,
        "components": {"schemas": _SCHEMAS},
    })
