# The cffi extensions (avmm.kvm._kvm_ffi against the build machine's <linux/kvm.h>,
# avmm.vhost._log_ffi, the dirty log's atomics, avmm.virtio._net_ffi, virtio-net's
# inner loops, and avmm.virtio._blk_ffi, virtio-blk's) are compiled at install time;
# everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["avmm/kvm/_ffi_build.py:ffibuilder",
                    "avmm/vhost/_log_build.py:ffibuilder",
                    "avmm/virtio/_net_build.py:ffibuilder",
                    "avmm/virtio/_blk_build.py:ffibuilder"])
